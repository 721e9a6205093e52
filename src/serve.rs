//! `strata serve`: loads the config, starts the [`ControlPlane`] (which owns
//! bdevs, listeners and the target model), and turns signals into control
//! requests: SIGHUP → [`Request::Reload`](crate::control::Request),
//! SIGINT/SIGTERM → shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use strata_target::transport::TransportConfig;

use crate::config::ServeConfig;
use crate::control::{
    ControlHandle, ControlOptions, ControlPlane, DEFAULT_DRAIN_TIMEOUT, DISCOVERY_PORT_ID,
};

pub use crate::control::objbacker_config;

#[derive(Clone, Debug, Default)]
pub struct ServeArgs {
    pub config: Option<PathBuf>,
    pub listen: Vec<SocketAddr>,
    pub discovery: Option<SocketAddr>,
    pub reactors: Option<usize>,
    pub poll_us: Option<u64>,
    /// The Prometheus endpoint's address (overrides `[metrics] addr`).
    pub metrics_addr: Option<SocketAddr>,
}

/// The config file (or the embedded default) with the command-line
/// overrides applied.
pub fn load(args: &ServeArgs) -> Result<ServeConfig> {
    let mut cfg = match &args.config {
        Some(p) => ServeConfig::load(p)?,
        None => ServeConfig::embedded_default(),
    };
    for (i, addr) in args.listen.iter().enumerate() {
        match cfg.listeners.get_mut(i) {
            Some(l) => l.addr = *addr,
            None => anyhow::bail!(
                "--listen given {} times but {} defines {} listener(s); fix: pass at most one --listen per [[listener]]",
                args.listen.len(),
                cfg.source,
                cfg.listeners.len()
            ),
        }
    }
    if let Some(d) = args.discovery {
        cfg.discovery = Some(d);
    }
    if let Some(r) = args.reactors {
        cfg.reactors = Some(r);
    }
    Ok(cfg)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let cfg = load(&args)?;
    let mut tc = TransportConfig::default();
    cfg.limits.apply(&mut tc);
    if let Some(r) = cfg.reactors {
        tc.reactors = r;
    }
    if let Some(p) = args.poll_us {
        tc.poll_us = p;
    }
    let reactors = tc.reactors;
    let _metrics = match args.metrics_addr.or(cfg.metrics_addr) {
        Some(a) => Some(crate::metrics::MetricsServer::start(a)?),
        None => None,
    };

    // Object-store I/O for objbacker namespaces runs here, apart from the
    // reactors, whose only job is the NVMe/TCP path. Built and dropped
    // outside any async context.
    strata_objbacker::install_crypto_provider();
    let objstore_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("objstore")
        .enable_all()
        .build()?;
    // The control plane and signal handling.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let opts = ControlOptions {
        transport: tc,
        objstore: objstore_rt.handle().clone(),
        drain_timeout: DEFAULT_DRAIN_TIMEOUT,
    };
    let r = rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;

        let (cp, handle) = ControlPlane::start(cfg.clone(), opts).await?;
        tracing::info!(reactors, config = %cfg.source, "strata serve started");
        print_connect_lines(&cfg, &cp);
        let control = tokio::spawn(cp.run());
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    // Queued behind any reload in progress; signals keep
                    // being handled meanwhile.
                    tokio::spawn(reload(args.clone(), handle.clone()));
                }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            }
        }
        handle.shutdown().await?;
        let _ = control.await;
        anyhow::Ok(())
    });
    drop(rt);
    drop(objstore_rt);
    r?;
    tracing::info!("stopped");
    Ok(())
}

async fn reload(args: ServeArgs, handle: ControlHandle) {
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused, running configuration unchanged: {e:#}");
            return;
        }
    };
    let (subsystems, listeners) = (cfg.subsystems.len(), cfg.listeners.len());
    match handle.reload(cfg).await {
        Ok(r) => tracing::info!(
            subsystems,
            listeners,
            added = ?r.added,
            removed = ?r.removed,
            kept = r.kept,
            warnings = r.warnings.len(),
            "configuration applied"
        ),
        Err(e) => tracing::error!("reload refused, running configuration unchanged: {e:#}"),
    }
}

fn print_connect_lines(cfg: &ServeConfig, cp: &ControlPlane) {
    let bound = cp.bound_listeners();
    for s in &cfg.subsystems {
        for &i in &s.listeners {
            let l = &cfg.listeners[i];
            let Some(id) = cp.port_id_of(&l.name) else {
                continue;
            };
            let addr = bound.get(&id).copied().unwrap_or(l.addr);
            println!(
                "nvme connect -t tcp -a {} -s {} -n {}",
                addr.ip(),
                addr.port(),
                s.nqn
            );
        }
    }
    if let Some(d) = bound.get(&DISCOVERY_PORT_ID) {
        println!("nvme discover -t tcp -a {} -s {}", d.ip(), d.port());
    }
}
