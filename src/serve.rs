//! `strata serve`: builds bdevs and the target model from the config, runs
//! the transport, and applies SIGHUP reloads live.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use strata_objbacker::{FormatOptions, ObjBacker, ObjBackerConfig, ObjError};
use strata_target::bdev::Bdev;
use strata_target::bdev::ram::RamBdev;
use strata_target::bdev::uring::{UringBdev, UringOptions};
use strata_target::subsystem::{
    NamespaceConfig, PortConfig, SubsystemConfig, Target, TargetConfig,
};
use strata_target::transport::{Transport, TransportConfig};

use crate::config::{BackingSpec, ServeConfig};

#[derive(Clone, Debug, Default)]
pub struct ServeArgs {
    pub config: Option<PathBuf>,
    pub listen: Vec<SocketAddr>,
    pub discovery: Option<SocketAddr>,
    pub reactors: Option<usize>,
    pub poll_us: Option<u64>,
}

/// The discovery-only port. I/O listeners are numbered from 1.
pub const DISCOVERY_PORT_ID: u16 = 0;

/// Live state a reload diffs against.
struct Running {
    /// Bdevs by (subsystem NQN, NSID, backing): a reload that keeps a
    /// namespace's backing keeps its device (and a RAM namespace's data).
    bdevs: HashMap<(String, u32, BackingSpec, u32), Arc<dyn Bdev>>,
    /// Listener name → port id, stable for the life of the process so hosts'
    /// discovery entries and ANA state keep their identity.
    port_ids: HashMap<String, u16>,
    next_port_id: u16,
    /// Port id → address currently bound.
    bound: BTreeMap<u16, SocketAddr>,
    /// Object-store I/O for objbacker namespaces runs here, apart from the
    /// reactors, whose only job is the NVMe/TCP path.
    objstore_rt: Option<tokio::runtime::Runtime>,
    objbackers: Vec<Arc<ObjBacker>>,
}

fn load(args: &ServeArgs) -> Result<ServeConfig> {
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

impl Running {
    fn new() -> Self {
        Self {
            bdevs: HashMap::new(),
            port_ids: HashMap::new(),
            next_port_id: 1,
            bound: BTreeMap::new(),
            objstore_rt: None,
            objbackers: Vec::new(),
        }
    }

    fn port_id(&mut self, name: &str) -> u16 {
        if let Some(id) = self.port_ids.get(name) {
            return *id;
        }
        let id = self.next_port_id;
        self.next_port_id += 1;
        self.port_ids.insert(name.to_string(), id);
        id
    }

    fn open_bdev(
        &mut self,
        nqn: &str,
        nsid: u32,
        b: &BackingSpec,
        block_size: u32,
    ) -> Result<Arc<dyn Bdev>> {
        let name = format!("{nqn}/{nsid}");
        Ok(match b {
            BackingSpec::Ram { size } => RamBdev::new(&name, *size, block_size)?,
            BackingSpec::File { path, size } => UringBdev::open(
                path,
                UringOptions {
                    block_size,
                    size_bytes: *size,
                    ..UringOptions::default()
                },
            )
            .with_context(|| format!("opening {}", path.display()))?,
            BackingSpec::ObjBacker { .. } => {
                let cfg = objbacker_config(&name, b, block_size);
                let rt = self.objstore_rt()?;
                let ob = rt.block_on(attach_or_format(cfg, b))?;
                self.objbackers.push(ob.clone());
                ob
            }
        })
    }

    fn objstore_rt(&mut self) -> Result<&tokio::runtime::Runtime> {
        if self.objstore_rt.is_none() {
            strata_objbacker::install_crypto_provider();
            self.objstore_rt = Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("objstore")
                    .enable_all()
                    .build()?,
            );
        }
        Ok(self.objstore_rt.as_ref().expect("runtime just built"))
    }

    /// Makes every acknowledged write to object-backed namespaces durable
    /// before the process exits (SIGINT/SIGTERM).
    fn flush_objbackers(&self) {
        let Some(rt) = &self.objstore_rt else { return };
        for ob in &self.objbackers {
            if let Err(e) = rt.block_on(ob.flush()) {
                tracing::error!(error = ?e, "flushing an objbacker namespace at shutdown failed");
            }
        }
    }

    /// Builds the target model, opening (or reusing) every bdev. Fails
    /// before anything live is touched, so a bad reload changes nothing.
    fn build(&mut self, cfg: &ServeConfig) -> Result<(TargetConfig, BTreeMap<u16, SocketAddr>)> {
        let mut ports = Vec::new();
        let mut want = BTreeMap::new();
        for l in &cfg.listeners {
            let id = self.port_id(&l.name);
            want.insert(id, l.addr);
            ports.push(PortConfig {
                id,
                traddr: l.addr.ip().to_string(),
                trsvcid: l.addr.port().to_string(),
                adrfam_ipv6: l.addr.is_ipv6(),
                ana: l.ana.clone(),
            });
        }
        if let Some(d) = cfg.discovery {
            want.insert(DISCOVERY_PORT_ID, d);
            ports.push(PortConfig {
                id: DISCOVERY_PORT_ID,
                traddr: d.ip().to_string(),
                trsvcid: d.port().to_string(),
                adrfam_ipv6: d.is_ipv6(),
                ana: BTreeMap::new(),
            });
        }
        let mut keep = HashMap::new();
        let mut subsystems = Vec::new();
        for s in &cfg.subsystems {
            let mut namespaces = Vec::new();
            for n in &s.namespaces {
                let key = (s.nqn.clone(), n.nsid, n.backing.clone(), n.block_size);
                let bdev = match self.bdevs.get(&key) {
                    Some(b) => b.clone(),
                    None => self
                        .open_bdev(&s.nqn, n.nsid, &n.backing, n.block_size)
                        .with_context(|| {
                            format!("{}: subsystem {} namespace {}", cfg.source, s.nqn, n.nsid)
                        })?,
                };
                keep.insert(key, bdev.clone());
                let mut eui64 = [0u8; 8];
                eui64.copy_from_slice(&n.uuid[8..]);
                namespaces.push(NamespaceConfig {
                    nsid: n.nsid,
                    bdev,
                    uuid: n.uuid,
                    nguid: n.uuid,
                    eui64,
                    anagrpid: n.ana_group,
                });
            }
            subsystems.push(SubsystemConfig {
                nqn: s.nqn.clone(),
                serial: s.serial.clone(),
                model: s.model.clone(),
                allow_any_host: s.allow_any_host,
                hosts: s.hosts.clone(),
                namespaces,
                ports: s
                    .listeners
                    .iter()
                    .map(|&i| self.port_id(&cfg.listeners[i].name))
                    .collect(),
            });
        }
        self.bdevs = keep;
        // A namespace removed by a reload gets its acknowledged writes made
        // durable before its device is dropped.
        let live: Vec<*const ()> = self
            .bdevs
            .values()
            .map(|b| Arc::as_ptr(b) as *const ())
            .collect();
        let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.objbackers)
            .into_iter()
            .partition(|ob| live.contains(&(Arc::as_ptr(ob) as *const ())));
        self.objbackers = kept;
        if let (Some(rt), false) = (&self.objstore_rt, gone.is_empty()) {
            for ob in gone {
                if let Err(e) = rt.block_on(ob.flush()) {
                    tracing::error!(error = ?e, "flushing a removed objbacker namespace failed");
                }
            }
        }
        Ok((TargetConfig { subsystems, ports }, want))
    }
}

fn sync_listeners(
    transport: &mut Transport,
    running: &mut Running,
    want: &BTreeMap<u16, SocketAddr>,
) -> Result<()> {
    let stale: Vec<u16> = running
        .bound
        .iter()
        .filter(|(id, addr)| want.get(id) != Some(addr))
        .map(|(id, _)| *id)
        .collect();
    for id in stale {
        transport.remove_listener(id);
        running.bound.remove(&id);
    }
    for (&id, &addr) in want {
        if running.bound.contains_key(&id) {
            continue;
        }
        let local = transport.add_listener(addr, id).with_context(|| {
            format!("cannot listen on {addr}; fix: free the port or choose another address")
        })?;
        running.bound.insert(id, local);
    }
    Ok(())
}

pub fn run(args: ServeArgs) -> Result<()> {
    let cfg = load(&args)?;
    let mut running = Running::new();
    let (tcfg, want) = running.build(&cfg)?;
    let target = Target::new(tcfg);
    let mut tc = TransportConfig::default();
    if let Some(r) = cfg.reactors {
        tc.reactors = r;
    }
    if let Some(p) = args.poll_us {
        tc.poll_us = p;
    }
    let reactors = tc.reactors;
    let mut transport = Transport::start(target.clone(), tc)?;
    sync_listeners(&mut transport, &mut running, &want)?;
    tracing::info!(reactors, config = %cfg.source, "strata serve started");
    print_connect_lines(&cfg, &running);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    match load(&args).and_then(|c| running.build(&c).map(|r| (c, r))) {
                        Ok((c, (tcfg, want))) => {
                            target.apply(tcfg);
                            if let Err(e) = sync_listeners(&mut transport, &mut running, &want) {
                                tracing::error!("reload: {e:#}");
                            }
                            tracing::info!(subsystems = c.subsystems.len(), listeners = c.listeners.len(), "configuration applied");
                        }
                        Err(e) => tracing::error!("reload refused, running configuration unchanged: {e:#}"),
                    }
                }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            }
        }
        anyhow::Ok(())
    })?;
    transport.shutdown();
    running.flush_objbackers();
    tracing::info!("stopped");
    Ok(())
}

fn print_connect_lines(cfg: &ServeConfig, running: &Running) {
    for s in &cfg.subsystems {
        for &i in &s.listeners {
            let l = &cfg.listeners[i];
            let Some(id) = running.port_ids.get(&l.name) else {
                continue;
            };
            let addr = running.bound.get(id).copied().unwrap_or(l.addr);
            println!(
                "nvme connect -t tcp -a {} -s {} -n {}",
                addr.ip(),
                addr.port(),
                s.nqn
            );
        }
    }
    if let Some(d) = running.bound.get(&DISCOVERY_PORT_ID) {
        println!("nvme discover -t tcp -a {} -s {}", d.ip(), d.port());
    }
}

pub fn objbacker_config(name: &str, b: &BackingSpec, block_size: u32) -> ObjBackerConfig {
    let BackingSpec::ObjBacker {
        buckets,
        size,
        object_size,
        store_options,
        max_in_flight,
        writeback_bytes,
        inject,
        request_timeout_ms,
        retry_budget_ms,
        ..
    } = b
    else {
        unreachable!("objbacker_config on a non-objbacker backing")
    };
    let d = ObjBackerConfig::default();
    ObjBackerConfig {
        name: name.to_string(),
        buckets: buckets.clone(),
        store_options: store_options.clone(),
        size_bytes: *size,
        object_size: *object_size,
        block_size,
        max_in_flight: max_in_flight.unwrap_or(d.max_in_flight),
        writeback_bytes: writeback_bytes.unwrap_or(d.writeback_bytes),
        request_timeout: request_timeout_ms
            .map(std::time::Duration::from_millis)
            .unwrap_or(d.request_timeout),
        retry_budget: retry_budget_ms
            .map(std::time::Duration::from_millis)
            .unwrap_or(d.retry_budget),
        fault: inject.map(
            |(lat_us, err_ppm, timeout_ppm)| strata_objbacker::FaultConfig {
                latency: if lat_us == 0 {
                    strata_objbacker::Latency::None
                } else {
                    strata_objbacker::Latency::Fixed(std::time::Duration::from_micros(lat_us))
                },
                error_rate: f64::from(err_ppm) / 1e6,
                timeout_rate: f64::from(timeout_ppm) / 1e6,
                ..strata_objbacker::FaultConfig::default()
            },
        ),
        ..d
    }
}

/// Attaches; formats first only when `auto_format` is set and the buckets
/// hold nothing at all (never over foreign data or another device).
async fn attach_or_format(cfg: ObjBackerConfig, b: &BackingSpec) -> Result<Arc<ObjBacker>> {
    let auto = matches!(
        b,
        BackingSpec::ObjBacker {
            auto_format: true,
            ..
        }
    );
    for url in &cfg.buckets {
        if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating bucket directory {dir}"))?;
        }
    }
    match ObjBacker::attach(cfg.clone()).await {
        Ok(ob) => Ok(ob),
        Err(ObjError::NotFormatted { .. }) if auto => {
            let sb = strata_objbacker::format(&cfg, FormatOptions { force: false }).await?;
            tracing::info!(name = %cfg.name, uuid = ?sb, "formatted new objbacker device");
            Ok(ObjBacker::attach(cfg).await?)
        }
        Err(e) => Err(e.into()),
    }
}
