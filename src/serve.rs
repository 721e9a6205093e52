//! `strata serve`: loads the config, starts the [`ControlPlane`] (which owns
//! bdevs, listeners and the target model), and turns signals into control
//! requests: SIGHUP → [`Request::Reload`](crate::control::Request),
//! SIGINT/SIGTERM → shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use strata_target::transport::TransportConfig;

use crate::cluster::{Cluster, ClusterConfig};
use crate::config::ServeConfig;
use crate::control::{
    ControlHandle, ControlOptions, ControlPlane, DEFAULT_DRAIN_TIMEOUT, DISCOVERY_PORT_ID,
};
use crate::mgmt::listen::{bind_unix, default_socket, read_token, serve_tcp, serve_unix};
use crate::mgmt::server::Service;
use crate::state::{StateDir, default_state_dir, save_seed};

pub use crate::control::objbacker_config;

#[derive(Clone, Debug, Default)]
pub struct ServeArgs {
    pub config: Option<PathBuf>,
    pub listen: Vec<SocketAddr>,
    pub discovery: Option<SocketAddr>,
    pub reactors: Option<usize>,
    pub poll_us: Option<u64>,
    /// Where the running state is persisted (default: [`default_state_dir`]).
    pub state_dir: Option<PathBuf>,
    /// The management socket (default: [`default_socket`]).
    pub mgmt_socket: Option<PathBuf>,
    /// Opt-in TCP address of the management API; needs `mgmt_token_file`.
    pub mgmt_addr: Option<SocketAddr>,
    pub mgmt_token_file: Option<PathBuf>,
    /// The Prometheus endpoint's address (overrides `[metrics] addr`).
    pub metrics_addr: Option<SocketAddr>,
    /// Take part in a cluster: the Raft transport's address.
    pub cluster_addr: Option<SocketAddr>,
    /// The shared cluster token (mode 0600), needed with `cluster_addr`.
    pub cluster_token_file: Option<PathBuf>,
    /// A cluster voter that stores no data and serves no namespaces.
    pub witness: bool,
}

/// The config file (or the embedded default) with the command-line
/// overrides applied.
pub fn load(args: &ServeArgs) -> Result<ServeConfig> {
    let cfg = match &args.config {
        Some(p) => ServeConfig::load(p)?,
        None => ServeConfig::embedded_default(),
    };
    overridden(args, cfg)
}

/// What SIGHUP applies: the `--config` file if one was given, else the
/// state file (which an operator may have edited), with the overrides.
fn reload_source(args: &ServeArgs, state_file: &std::path::Path) -> Result<ServeConfig> {
    match &args.config {
        Some(_) => load(args),
        None => overridden(args, ServeConfig::load(state_file)?),
    }
}

/// The config text a start or SIGHUP applies: the `--config` file, or
/// the embedded default.
fn seed_text(args: &ServeArgs) -> Result<String> {
    Ok(match &args.config {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", p.display()))?,
        None => crate::config::EMBEDDED_DEFAULT.to_string(),
    })
}

/// The state a start begins with, and whether it came from the config
/// (which then has to be recorded as the seed):
/// - an empty state directory: the config file (or the embedded default);
/// - a saved state seeded from the same config text: the saved state,
///   so management changes survive a restart;
/// - a saved state, but the config file changed since it was seeded or
///   last applied: the file, as a SIGHUP would apply it.
fn initial(args: &ServeArgs, state: &StateDir, text: &str) -> Result<(ServeConfig, bool)> {
    // A broken --config is an error even when the saved state wins: the
    // operator learns now, not at the next SIGHUP.
    let seed = load(args)?;
    match state.load()? {
        Some(saved) if state.seed().as_deref() == Some(text) => {
            tracing::info!(
                state = %state.path().display(),
                "starting from the saved state (the config file is unchanged since it seeded it)"
            );
            Ok((overridden(args, saved)?, false))
        }
        Some(_) => {
            tracing::info!(
                state = %state.path().display(),
                config = ?args.config,
                "the config file changed since the saved state was seeded: applying it (management changes since are replaced)"
            );
            Ok((seed, true))
        }
        None => Ok((seed, true)),
    }
}

fn overridden(args: &ServeArgs, mut cfg: ServeConfig) -> Result<ServeConfig> {
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
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let state = StateDir::open(&state_dir)?;
    let state_file = state.path();
    let text = seed_text(&args)?;
    let (cfg, seeded) = initial(&args, &state, &text)?;
    let socket = args.mgmt_socket.clone().unwrap_or_else(default_socket);
    let token = match (&args.mgmt_addr, &args.mgmt_token_file) {
        (Some(_), Some(f)) => Some(read_token(f)?),
        (Some(a), None) => anyhow::bail!(
            "--mgmt-addr {a} needs --mgmt-token-file: the management API is never open on TCP without a token"
        ),
        (None, _) => None,
    };
    let cluster_cfg = cluster_config(&args, &state_dir, &cfg)?;
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
        state: Some(state),
    };
    let r = rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;

        // Bound before anything starts, so a second strata serve on the
        // same socket fails here, having changed nothing.
        let mgmt_listener = bind_unix(&socket)?;
        let cluster = cluster_cfg.map(Cluster::start).transpose()?;
        let (cp, handle) = ControlPlane::start(cfg.clone(), opts).await?;
        if seeded {
            save_seed(&state_dir, &text)?;
        }
        let (stop_mgmt, mgmt_stopped) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut mgmt = vec![tokio::spawn(serve_unix(
            mgmt_listener,
            Service::new(handle.clone(), reactors).with_cluster(cluster.clone()),
            stopped(mgmt_stopped.clone()),
        ))];
        if let (Some(addr), Some(token)) = (args.mgmt_addr, token) {
            mgmt.push(tokio::spawn(serve_tcp(
                addr,
                token,
                Service::new(handle.clone(), reactors).with_cluster(cluster.clone()),
                stopped(mgmt_stopped.clone()),
            )));
            tracing::info!(%addr, "management API on TCP (bearer token)");
        }
        tracing::info!(
            reactors,
            config = %cfg.source,
            state = %state_file.display(),
            socket = %socket.display(),
            "strata serve started"
        );
        print_connect_lines(&cfg, &cp);
        let control = tokio::spawn(cp.run());
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    // Queued behind any reload in progress; signals keep
                    // being handled meanwhile.
                    tokio::spawn(reload(args.clone(), state_dir.clone(), handle.clone()));
                }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            }
        }
        let _ = stop_mgmt.send(true);
        for m in mgmt {
            if let Ok(Err(e)) = m.await {
                tracing::error!("{e:#}");
            }
        }
        let _ = std::fs::remove_file(&socket);
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

/// The cluster flags, checked: a token with the address, and a witness
/// that has nothing to serve.
fn cluster_config(
    args: &ServeArgs,
    state_dir: &std::path::Path,
    cfg: &ServeConfig,
) -> Result<Option<ClusterConfig>> {
    let Some(addr) = args.cluster_addr else {
        if args.witness {
            anyhow::bail!("--witness needs --cluster-addr: a witness is a cluster voter");
        }
        if args.cluster_token_file.is_some() {
            anyhow::bail!("--cluster-token-file needs --cluster-addr");
        }
        return Ok(None);
    };
    let Some(f) = &args.cluster_token_file else {
        anyhow::bail!(
            "--cluster-addr {addr} needs --cluster-token-file: the cluster port is never open without a token"
        );
    };
    let token = read_token(f)?;
    if args.witness {
        let namespaces: usize = cfg.subsystems.iter().map(|s| s.namespaces.len()).sum();
        if namespaces > 0 {
            anyhow::bail!(
                "--witness: {} defines {namespaces} namespace(s), and a witness serves none; fix: give --config a file without namespaces",
                cfg.source
            );
        }
    }
    Ok(Some(ClusterConfig {
        addr,
        token,
        witness: args.witness,
        dir: state_dir.join("cluster"),
    }))
}

async fn reload(args: ServeArgs, state_dir: PathBuf, handle: ControlHandle) {
    let text = seed_text(&args);
    let cfg = match reload_source(&args, &state_dir.join(crate::state::STATE_FILE)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused, running configuration unchanged: {e:#}");
            return;
        }
    };
    let (subsystems, listeners) = (cfg.subsystems.len(), cfg.listeners.len());
    match handle.reload(cfg).await {
        Ok(r) => {
            tracing::info!(
                subsystems,
                listeners,
                added = ?r.added,
                removed = ?r.removed,
                kept = r.kept,
                warnings = r.warnings.len(),
                "configuration applied"
            );
            // The file applied is the new seed: a restart with it keeps
            // the state (and what the API changes after).
            if let (Some(_), Ok(t)) = (&args.config, &text)
                && let Err(e) = save_seed(&state_dir, t)
            {
                tracing::error!("recording the applied config: {e:#}");
            }
        }
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
