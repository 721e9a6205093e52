//! The control plane: the one task that owns the running state (bdevs,
//! listeners, port ids) and applies every change to it, one at a time.
//!
//! SIGHUP today, a management API later: both send a [`Request`] through a
//! [`ControlHandle`] and get one `Result` back. A reload runs in a fixed
//! order:
//!
//! 1. **validate** the whole configuration without side effects: backing
//!    paths exist or can be created, objbacker parameters parse, no two
//!    namespaces share a bucket or a file, no in-place change of an
//!    objbacker backing (that would attach a second engine to buckets the
//!    first one still serves);
//! 2. **apply**: create/extend files, create bucket directories, attach (and
//!    auto-format) object-backed devices, bind new listeners; a failure here
//!    rolls back what this reload created and the reload is refused;
//!    then swap the target configuration;
//! 3. **drain**: wait (bounded) until no queue holds a removed device any
//!    more: queues drop it when they see the target generation change, at
//!    their next input or tick (~500 ms);
//! 4. **flush** every removed object-backed device, so every write
//!    acknowledged before its removal is durable;
//! 5. **drop** it.
//!
//! Object-store work (attach, format, flush, the final drop) runs on the
//! object-store runtime through its [`Handle`], awaited from here; nothing
//! in this module calls `block_on`, so it is safe inside any async context.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use strata_objbacker::{FormatOptions, ObjBacker, ObjBackerConfig, ObjError};
use strata_target::bdev::Bdev;
use strata_target::bdev::ram::RamBdev;
use strata_target::bdev::uring::{UringBdev, UringOptions};
use strata_target::ctrlr::Target;
use strata_target::subsystem::{NamespaceConfig, PortConfig, SubsystemConfig, TargetConfig};
use strata_target::transport::{BoundListener, Transport, TransportConfig};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{BackingSpec, ConfigError, ServeConfig};
use crate::mgmt::ops::{self, Op, OpError, Running};
use crate::state::StateDir;

/// The discovery-only port. I/O listeners are numbered from 1.
pub const DISCOVERY_PORT_ID: u16 = 0;

/// Default bound on waiting for queues to let go of a removed device.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// What the control plane can be asked to do.
#[derive(Debug)]
pub enum Request {
    /// Replace the running configuration (validate → apply → drain → flush
    /// → drop). Refused as a whole, changing nothing, if validation fails.
    Reload(Box<ServeConfig>),
    /// One management change (`crate::mgmt`): applied to the running
    /// configuration, then validated, applied and persisted as a reload.
    Change(Box<Op>),
    /// Stop serving: close listeners and connections, flush and close every
    /// device. The control plane's task ends after answering.
    Shutdown,
}

#[derive(Debug)]
pub enum Response {
    Reloaded(ReloadReport),
    /// A change was applied and persisted.
    Changed(Changed),
    Stopped,
}

/// The running configuration as the management API shows it, published
/// after every change so reads never wait behind a reload in progress.
#[derive(Debug)]
pub struct View {
    pub cfg: ServeConfig,
    /// Port id → bound address (port 0 in the config resolved).
    pub bound: BTreeMap<u16, SocketAddr>,
    /// Listener name → port id.
    pub port_ids: HashMap<String, u16>,
    /// Where the state is persisted (`None`: not persisted).
    pub state_file: Option<PathBuf>,
    /// (NQN, NSID) → bytes of the device serving it.
    pub ns_sizes: HashMap<(String, u32), u64>,
}

impl View {
    /// The bound address of a listener, by name.
    pub fn bound_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.bound.get(self.port_ids.get(listener)?).copied()
    }
}

/// What a [`Request::Change`] did.
#[derive(Debug)]
pub struct Changed {
    /// The view right after this change (before any later one).
    pub view: Arc<View>,
    /// For an added namespace: its NSID (the one chosen if 0 was asked).
    pub added_nsid: Option<u32>,
}

/// Why a [`Request::Change`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The change itself is invalid: nothing was touched.
    #[error(transparent)]
    Invalid(#[from] OpError),
    /// Valid, but applying it failed (a path that cannot be created, a
    /// port in use, a store that does not answer): rolled back.
    #[error("{0:#}")]
    Apply(anyhow::Error),
    /// The control plane has stopped (the target is shutting down).
    #[error("the control plane has stopped")]
    Stopped,
}

/// What a reload did.
#[derive(Debug, Default, Clone)]
pub struct ReloadReport {
    /// Namespaces opened by this reload, as `nqn/nsid`.
    pub added: Vec<String>,
    /// Namespaces closed by this reload.
    pub removed: Vec<String>,
    /// Namespaces whose device was kept.
    pub kept: usize,
    /// Problems after the point of no return (a listener that could not be
    /// re-bound, a removed device that did not drain or flush): logged, and
    /// reported here.
    pub warnings: Vec<String>,
}

type Envelope = (Request, oneshot::Sender<Result<Response>>);

/// Cloneable sender of requests to the [`ControlPlane`].
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::UnboundedSender<Envelope>,
    view: watch::Receiver<Arc<View>>,
    target: Arc<Target>,
}

impl ControlHandle {
    pub async fn request(&self, req: Request) -> Result<Response> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((req, tx))
            .map_err(|_| anyhow!("the control plane has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("the control plane stopped before answering"))?
    }

    pub async fn reload(&self, cfg: ServeConfig) -> Result<ReloadReport> {
        match self.request(Request::Reload(Box::new(cfg))).await? {
            Response::Reloaded(r) => Ok(r),
            other => Err(anyhow!("unexpected answer to a reload: {other:?}")),
        }
    }

    pub async fn shutdown(&self) -> Result<()> {
        self.request(Request::Shutdown).await.map(|_| ())
    }

    /// Applies one management change.
    pub async fn change(&self, op: Op) -> Result<Changed, ChangeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((Request::Change(Box::new(op)), tx))
            .map_err(|_| ChangeError::Stopped)?;
        match rx.await.map_err(|_| ChangeError::Stopped)? {
            Ok(Response::Changed(c)) => Ok(c),
            Ok(other) => Err(ChangeError::Apply(anyhow!(
                "unexpected answer to a change: {other:?}"
            ))),
            Err(e) => Err(match e.downcast::<OpError>() {
                Ok(op) => ChangeError::Invalid(op),
                Err(e) => ChangeError::Apply(e),
            }),
        }
    }

    /// The running configuration, as of the last completed change.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }
}

/// Everything the control plane needs that is not in the configuration.
pub struct ControlOptions {
    pub transport: TransportConfig,
    /// Object-store I/O runs here (a multi-thread runtime apart from the
    /// reactors), including attach, format and flush.
    pub objstore: Handle,
    /// How long a removed object-backed namespace may stay referenced by
    /// queues before it is flushed anyway (and the delay logged).
    pub drain_timeout: Duration,
    /// Where every applied configuration is persisted (`None`: nowhere).
    pub state: Option<StateDir>,
}

/// (subsystem NQN, NSID, backing, block size): a reload that keeps all four
/// keeps the device (and a RAM namespace's data).
type NsKey = (String, u32, BackingSpec, u32);

struct Dev {
    bdev: Arc<dyn Bdev>,
    /// The same allocation as `bdev` for object-backed devices.
    obj: Option<Arc<ObjBacker>>,
}

/// The running state: owned by the control plane's task alone.
pub struct ControlPlane {
    target: Arc<Target>,
    transport: Option<Transport>,
    objstore: Handle,
    drain_timeout: Duration,
    devs: HashMap<NsKey, Dev>,
    /// Listener name → port id, stable for the life of the process so
    /// hosts' discovery entries and ANA state keep their identity.
    port_ids: HashMap<String, u16>,
    next_port_id: u16,
    /// Port id → address currently bound.
    bound: BTreeMap<u16, SocketAddr>,
    rx: mpsc::UnboundedReceiver<Envelope>,
    /// The configuration in force (the last one applied).
    current: ServeConfig,
    state: Option<StateDir>,
    view: watch::Sender<Arc<View>>,
}

/// A namespace this reload has to open.
struct ToOpen {
    key: NsKey,
    name: String,
}

/// Undo record of one side effect of a reload that has not committed yet.
enum Undo {
    /// A file that did not exist before (remove) or was shorter (truncate).
    File { path: PathBuf, old_len: Option<u64> },
    /// A directory (and everything under it) this reload created.
    Dir(PathBuf),
    /// A directory that existed and was empty: empty it again.
    EmptyDir(PathBuf),
    /// An object-backed device attached by this reload.
    Obj(Arc<ObjBacker>),
    /// A bucket outside the local filesystem that this reload formatted.
    FormattedRemote(String),
}

impl ControlPlane {
    /// Starts the transport with no namespaces and applies `cfg` as the
    /// first reload. Must be awaited inside a tokio runtime with timers.
    pub async fn start(cfg: ServeConfig, opts: ControlOptions) -> Result<(Self, ControlHandle)> {
        let target = Target::new(TargetConfig::default());
        let transport = Transport::start(target.clone(), opts.transport)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (view, view_rx) = watch::channel(Arc::new(View {
            cfg: cfg.clone(),
            bound: BTreeMap::new(),
            port_ids: HashMap::new(),
            state_file: opts.state.as_ref().map(StateDir::path),
            ns_sizes: HashMap::new(),
        }));
        let mut cp = ControlPlane {
            target: target.clone(),
            transport: Some(transport),
            objstore: opts.objstore,
            drain_timeout: opts.drain_timeout,
            devs: HashMap::new(),
            port_ids: HashMap::new(),
            next_port_id: 1,
            bound: BTreeMap::new(),
            rx,
            current: cfg.clone(),
            state: opts.state,
            view,
        };
        if let Err(e) = cp.commit(&cfg).await {
            cp.stop().await;
            return Err(e);
        }
        Ok((
            cp,
            ControlHandle {
                tx,
                view: view_rx,
                target,
            },
        ))
    }

    /// Reload, then persist, then publish. A configuration that cannot be
    /// persisted is rolled back (to the one in force before), so what runs
    /// is always what a restart would load.
    async fn commit(&mut self, cfg: &ServeConfig) -> Result<ReloadReport> {
        let report = self.reload(cfg).await?;
        if let Some(Err(e)) = self.state.as_ref().map(|st| st.save(cfg)) {
            let old = self.current.clone();
            if let Err(rb) = self.reload(&old).await {
                tracing::error!("rolling back an unpersisted change failed: {rb:#}");
            }
            return Err(e.context(
                "the change was applied but could not be persisted, so it was rolled back",
            ));
        }
        self.current = cfg.clone();
        self.publish();
        Ok(report)
    }

    fn publish(&self) {
        self.view.send_replace(Arc::new(View {
            cfg: self.current.clone(),
            bound: self.bound.clone(),
            port_ids: self.port_ids.clone(),
            state_file: self.state.as_ref().map(StateDir::path),
            ns_sizes: self.ns_sizes(),
        }));
    }

    /// What only the running target knows, for [`crate::mgmt::ops::apply`].
    fn running(&self) -> Running {
        let mut run = Running::default();
        for c in self.target.controllers() {
            if !c.is_discovery() && !c.is_destroyed() {
                *run.controllers.entry(c.subnqn().to_string()).or_default() += 1;
            }
        }
        run.ns_sizes = self.ns_sizes();
        run
    }

    /// (NQN, NSID) → bytes of the device serving it.
    fn ns_sizes(&self) -> HashMap<(String, u32), u64> {
        self.devs
            .iter()
            .map(|(k, d)| {
                let i = d.bdev.info();
                ((k.0.clone(), k.1), i.num_blocks * u64::from(i.block_size))
            })
            .collect()
    }

    async fn change(&mut self, op: &Op) -> Result<Changed> {
        let new = ops::apply(&self.current, op, &self.running())?;
        // Only this change lies between the two: the NSID that is new is
        // the one it added.
        let added_nsid = match op {
            Op::AddNamespace { nqn, .. } => {
                let nsids = |c: &ServeConfig| -> Vec<u32> {
                    c.subsystems
                        .iter()
                        .filter(|s| &s.nqn == nqn)
                        .flat_map(|s| s.namespaces.iter().map(|n| n.nsid))
                        .collect()
                };
                let old = nsids(&self.current);
                nsids(&new).into_iter().find(|n| !old.contains(n))
            }
            _ => None,
        };
        self.commit(&new).await?;
        Ok(Changed {
            view: self.view.borrow().clone(),
            added_nsid,
        })
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Port id → bound address (port 0 in the config resolved).
    pub fn bound_listeners(&self) -> &BTreeMap<u16, SocketAddr> {
        &self.bound
    }

    pub fn port_id_of(&self, listener: &str) -> Option<u16> {
        self.port_ids.get(listener).copied()
    }

    /// Serves requests until [`Request::Shutdown`] or until every handle is
    /// gone (which also shuts down).
    pub async fn run(mut self) {
        while let Some((req, reply)) = self.rx.recv().await {
            match req {
                Request::Reload(cfg) => {
                    let r = self.commit(&cfg).await.map(Response::Reloaded);
                    let _ = reply.send(r);
                }
                Request::Change(op) => {
                    let r = self.change(&op).await.map(Response::Changed);
                    let _ = reply.send(r);
                }
                Request::Shutdown => {
                    self.stop().await;
                    let _ = reply.send(Ok(Response::Stopped));
                    return;
                }
            }
        }
        self.stop().await;
    }

    /// Closes listeners and connections, then flushes and drops every
    /// device.
    async fn stop(&mut self) {
        if let Some(t) = self.transport.take() {
            // Joins the reactor threads: a blocking wait, off this task.
            if let Err(e) = tokio::task::spawn_blocking(move || t.shutdown()).await {
                tracing::error!("transport shutdown: {e}");
            }
        }
        self.target.apply(TargetConfig::default());
        self.bound.clear();
        let removed: Vec<(String, Dev)> = self
            .devs
            .drain()
            .map(|(k, d)| (format!("{}/{}", k.0, k.1), d))
            .collect();
        let mut warnings = Vec::new();
        self.retire(removed, &mut warnings).await;
    }

    fn port_id(port_ids: &mut HashMap<String, u16>, next: &mut u16, name: &str) -> u16 {
        if let Some(id) = port_ids.get(name) {
            return *id;
        }
        let id = *next;
        *next += 1;
        port_ids.insert(name.to_string(), id);
        id
    }

    /// Validate → apply → drain → flush → drop. On `Err` nothing changed
    /// (or, if a rollback step itself failed, the error says what remains).
    async fn reload(&mut self, cfg: &ServeConfig) -> Result<ReloadReport> {
        // ---------------------------------------------------- 1. validate
        let mut port_ids = self.port_ids.clone();
        let mut next_port_id = self.next_port_id;
        let mut ports = Vec::new();
        let mut want = BTreeMap::new();
        for l in &cfg.listeners {
            let id = Self::port_id(&mut port_ids, &mut next_port_id, &l.name);
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
        let plan = self.validate(cfg)?;

        // ------------------------------------------------------- 2. apply
        let mut undo: Vec<Undo> = Vec::new();
        let mut opened: HashMap<NsKey, Dev> = HashMap::new();
        let mut report = ReloadReport::default();
        for o in &plan {
            match self.open(&o.key, &o.name, &mut undo).await {
                Ok(d) => {
                    opened.insert(o.key.clone(), d);
                    report.added.push(o.name.clone());
                }
                Err(e) => {
                    drop(opened);
                    let rb = self.rollback(undo).await;
                    return Err(refused(
                        e.context(format!("{}: opening namespace {}", cfg.source, o.name)),
                        rb,
                    ));
                }
            }
        }
        // Listeners: bind the new addresses that no stale listener holds
        // now, so a bind failure can still be rolled back.
        let stale: Vec<u16> = self
            .bound
            .iter()
            .filter(|(id, addr)| want.get(id) != Some(addr))
            .map(|(id, _)| *id)
            .collect();
        let stale_addrs: HashSet<SocketAddr> = stale.iter().map(|id| self.bound[id]).collect();
        let mut late = Vec::new();
        // Bound but not accepting until the target configuration they
        // serve is applied (hosts wait in the backlog meanwhile); a
        // refused reload drops them, closing the sockets.
        let mut pending: Vec<(u16, BoundListener)> = Vec::new();
        for (&id, &addr) in &want {
            if self.bound.get(&id) == Some(&addr) {
                continue;
            }
            if stale_addrs.contains(&addr) {
                late.push((id, addr));
                continue;
            }
            match BoundListener::bind(addr) {
                Ok(b) => pending.push((id, b)),
                Err(e) => {
                    drop(opened);
                    let rb = self.rollback(undo).await;
                    return Err(refused(
                        anyhow!(e).context(format!(
                            "{}: cannot listen on {addr}; fix: free the port or choose another address",
                            cfg.source
                        )),
                        rb,
                    ));
                }
            }
        }

        // Point of no return: build and swap the target configuration.
        let mut keep: HashMap<NsKey, Dev> = HashMap::new();
        let mut subsystems = Vec::new();
        for s in &cfg.subsystems {
            let mut namespaces = Vec::new();
            for n in &s.namespaces {
                let key = (s.nqn.clone(), n.nsid, n.backing.clone(), n.block_size);
                // Keys are unique (NSIDs are unique per subsystem).
                let dev = opened
                    .remove(&key)
                    .or_else(|| self.devs.remove(&key))
                    .expect("validated: every namespace is kept or opened");
                let mut eui64 = [0u8; 8];
                eui64.copy_from_slice(&n.uuid[8..]);
                namespaces.push(NamespaceConfig {
                    nsid: n.nsid,
                    bdev: dev.bdev.clone(),
                    uuid: n.uuid,
                    nguid: n.uuid,
                    eui64,
                    anagrpid: n.ana_group,
                });
                keep.insert(key, dev);
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
                    .map(|&i| port_ids[&cfg.listeners[i].name])
                    .collect(),
            });
        }
        let removed: Vec<(String, Dev)> = std::mem::replace(&mut self.devs, keep)
            .into_iter()
            .map(|(k, d)| (format!("{}/{}", k.0, k.1), d))
            .collect();
        report.kept = self.devs.len() - report.added.len();
        self.port_ids = port_ids;
        self.next_port_id = next_port_id;
        self.target.apply(TargetConfig { subsystems, ports });
        for (id, b) in pending {
            match self.transport_mut().start_listener(b, id) {
                Ok(local) => {
                    self.bound.insert(id, local);
                }
                Err(e) => {
                    let w = format!("{}: cannot serve port {id}: {e}", cfg.source);
                    tracing::error!("reload: {w}");
                    report.warnings.push(w);
                }
            }
        }
        for id in stale {
            self.transport_mut().remove_listener(id);
            self.bound.remove(&id);
        }
        for (id, addr) in late {
            match self.transport_mut().add_listener(addr, id) {
                Ok(local) => {
                    self.bound.insert(id, local);
                }
                Err(e) => {
                    let w = format!(
                        "{}: cannot listen on {addr}: {e}; fix: free the port or choose another address, then reload",
                        cfg.source
                    );
                    tracing::error!("reload: {w}");
                    report.warnings.push(w);
                }
            }
        }

        // ------------------------------------- 3.-5. drain, flush, drop
        report.removed = removed.iter().map(|(n, _)| n.clone()).collect();
        self.retire(removed, &mut report.warnings).await;
        Ok(report)
    }

    fn transport_mut(&mut self) -> &mut Transport {
        self.transport
            .as_mut()
            .expect("the transport lives until the control plane stops")
    }

    /// Everything a reload can check before touching anything: returns the
    /// namespaces it has to open, in config order.
    fn validate(&self, cfg: &ServeConfig) -> Result<Vec<ToOpen>> {
        let err = |field: String, problem: String, fix: &str| ConfigError {
            file: cfg.source.clone(),
            field,
            problem,
            fix: fix.to_string(),
        };
        let mut plan = Vec::new();
        let mut buckets_in_use: Vec<(String, String)> = Vec::new();
        let mut files_in_use: HashMap<PathBuf, String> = HashMap::new();
        let mut all_keys = HashSet::new();
        for (i, s) in cfg.subsystems.iter().enumerate() {
            for (j, n) in s.namespaces.iter().enumerate() {
                let f = |x: &str| format!("subsystem[{i}].namespace[{j}].{x}");
                let name = format!("{}/{}", s.nqn, n.nsid);
                let key = (s.nqn.clone(), n.nsid, n.backing.clone(), n.block_size);
                all_keys.insert(key.clone());
                // Sharing between namespaces of the new configuration.
                match &n.backing {
                    BackingSpec::ObjBacker { buckets, .. } => {
                        for (k, b) in buckets.iter().enumerate() {
                            if let Some((_, other)) =
                                buckets_in_use.iter().find(|(u, _)| buckets_overlap(u, b))
                            {
                                return Err(err(
                                    f(&format!("buckets[{k}]")),
                                    format!("`{b}` is also used by namespace {other}"),
                                    "give every objbacker namespace its own buckets (or prefixes)",
                                )
                                .into());
                            }
                        }
                        buckets_in_use.extend(buckets.iter().map(|b| (b.clone(), name.clone())));
                    }
                    BackingSpec::File { path, .. } => {
                        let p = std::path::absolute(path).unwrap_or(path.clone());
                        if let Some(other) = files_in_use.insert(p, name.clone()) {
                            return Err(err(
                                f("path"),
                                format!("`{}` is also used by namespace {other}", path.display()),
                                "give every file namespace its own file or device",
                            )
                            .into());
                        }
                    }
                    BackingSpec::Ram { .. } => {}
                }
                if self.devs.contains_key(&key) {
                    continue;
                }
                // In-place change of an object-backed namespace: a second
                // engine on buckets the first still serves.
                if let BackingSpec::ObjBacker { buckets, .. } = &n.backing {
                    if let Some(ok) = self.devs.keys().find(|k| {
                        k.0 == s.nqn
                            && k.1 == n.nsid
                            && matches!(k.2, BackingSpec::ObjBacker { .. })
                    }) {
                        let changed = objbacker_diff(&ok.2, ok.3, &n.backing, n.block_size);
                        return Err(err(
                            f(changed.first().copied().unwrap_or("buckets")),
                            format!(
                                "namespace {name} is served by an objbacker device and its parameters changed ({}); \
                                 changing them in place would attach a second engine to the buckets the running one still writes",
                                changed.join(", ")
                            ),
                            "restore the running values, or remove the namespace in one reload and add it with the new values in the next (its data stays in the buckets)",
                        )
                        .into());
                    }
                    // The same buckets moved to another namespace, or a new
                    // namespace on buckets a running one serves.
                    for ok in self.devs.keys() {
                        let BackingSpec::ObjBacker { buckets: ob, .. } = &ok.2 else {
                            continue;
                        };
                        if let Some(b) = buckets
                            .iter()
                            .find(|b| ob.iter().any(|o| buckets_overlap(o, b)))
                        {
                            return Err(err(
                                f("buckets"),
                                format!("`{b}` is still served by namespace {}/{}", ok.0, ok.1),
                                "remove that namespace in one reload and add this one in the next",
                            )
                            .into());
                        }
                    }
                }
                precheck(&n.backing, &name, n.block_size, &f).map_err(
                    |(field, problem, fix)| anyhow::Error::from(err(field, problem, &fix)),
                )?;
                plan.push(ToOpen { key, name });
            }
        }
        Ok(plan)
    }

    /// Opens one new device, recording every side effect in `undo`.
    async fn open(&self, key: &NsKey, name: &str, undo: &mut Vec<Undo>) -> Result<Dev> {
        let (_, _, b, block_size) = key;
        let block_size = *block_size;
        match b {
            BackingSpec::Ram { size } => Ok(Dev {
                bdev: RamBdev::new(name, *size, block_size)?,
                obj: None,
            }),
            BackingSpec::File { path, size } => {
                let old_len = std::fs::metadata(path).ok().map(|m| m.len());
                let grows = match (old_len, size) {
                    (None, _) => true,
                    (Some(l), Some(s)) => *s > l,
                    _ => false,
                };
                let r = UringBdev::open(
                    path,
                    UringOptions {
                        block_size,
                        size_bytes: *size,
                        ..UringOptions::default()
                    },
                );
                if grows && path.exists() {
                    undo.push(Undo::File {
                        path: path.clone(),
                        old_len,
                    });
                }
                let bdev = r.with_context(|| format!("opening {}", path.display()))?;
                Ok(Dev { bdev, obj: None })
            }
            BackingSpec::ObjBacker {
                buckets,
                auto_format,
                ..
            } => {
                for url in buckets {
                    let Some(dir) = url.strip_prefix("file://") else {
                        continue;
                    };
                    let dir = Path::new(dir);
                    if dir.is_dir() {
                        if *auto_format && dir_is_empty(dir) {
                            undo.push(Undo::EmptyDir(dir.to_path_buf()));
                        }
                        continue;
                    }
                    let top = topmost_missing(dir);
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating bucket directory {}", dir.display()))?;
                    undo.push(Undo::Dir(top));
                }
                let cfg = objbacker_config(name, b, block_size);
                let auto = *auto_format;
                let (ob, formatted) = self
                    .objstore
                    .spawn(attach_or_format(cfg, auto))
                    .await
                    .map_err(|e| anyhow!("objbacker attach task failed: {e}"))??;
                if formatted {
                    undo.extend(
                        buckets
                            .iter()
                            .filter(|u| !u.starts_with("file://"))
                            .map(|u| Undo::FormattedRemote(u.clone())),
                    );
                }
                undo.push(Undo::Obj(ob.clone()));
                Ok(Dev {
                    bdev: ob.clone(),
                    obj: Some(ob),
                })
            }
        }
    }

    /// Undoes the side effects of a reload that did not commit, newest
    /// first. Returns what could not be undone.
    async fn rollback(&mut self, undo: Vec<Undo>) -> Vec<String> {
        let mut left = Vec::new();
        for u in undo.into_iter().rev() {
            match u {
                Undo::Obj(ob) => {
                    // Never exposed to a host: nothing to flush.
                    let _ = self.objstore.spawn_blocking(move || drop(ob)).await;
                }
                Undo::File { path, old_len } => {
                    let r = match old_len {
                        None => std::fs::remove_file(&path),
                        Some(l) => std::fs::OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .and_then(|f| f.set_len(l)),
                    };
                    if let Err(e) = r {
                        left.push(format!("{}: {e}", path.display()));
                    }
                }
                Undo::Dir(d) => {
                    if let Err(e) = std::fs::remove_dir_all(&d) {
                        left.push(format!("{}: {e}", d.display()));
                    }
                }
                Undo::EmptyDir(d) => {
                    let r = std::fs::read_dir(&d).and_then(|it| {
                        for e in it {
                            let p = e?.path();
                            if p.is_dir() {
                                std::fs::remove_dir_all(&p)?;
                            } else {
                                std::fs::remove_file(&p)?;
                            }
                        }
                        Ok(())
                    });
                    if let Err(e) = r {
                        left.push(format!("{}: {e}", d.display()));
                    }
                }
                Undo::FormattedRemote(url) => left.push(format!(
                    "{url} was formatted by this reload and stays formatted (it holds no data)"
                )),
            }
        }
        left
    }

    /// Drain, flush, drop: the removed devices leave only once no queue
    /// holds them and their acknowledged writes are durable.
    async fn retire(&self, removed: Vec<(String, Dev)>, warnings: &mut Vec<String>) {
        let mut objs = Vec::new();
        for (name, d) in removed {
            match d.obj {
                Some(ob) => {
                    drop(d.bdev);
                    objs.push((name, ob));
                }
                None => tracing::info!(namespace = %name, "namespace removed"),
            }
        }
        if objs.is_empty() {
            return;
        }
        // Drain: every queue drops its channel and cached view of the old
        // configuration on the generation change. A queue that had I/O in
        // flight at that moment keeps its retired channel until the next
        // change; re-publishing the same configuration is that change.
        let start = Instant::now();
        let mut nudged = start;
        loop {
            if objs.iter().all(|(_, ob)| Arc::strong_count(ob) == 1) {
                break;
            }
            if start.elapsed() >= self.drain_timeout {
                for (name, ob) in &objs {
                    let refs = Arc::strong_count(ob) - 1;
                    if refs > 0 {
                        let w = format!(
                            "removed namespace {name} is still referenced {refs} time(s) after {:?}; flushing it anyway: \
                             writes acknowledged after this flush may be lost when the last queue lets go",
                            self.drain_timeout
                        );
                        tracing::error!("{w}");
                        warnings.push(w);
                    }
                }
                break;
            }
            if nudged.elapsed() >= Duration::from_secs(1) {
                self.target.apply(self.target.config());
                nudged = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (name, ob) in objs {
            let o = ob.clone();
            match self.objstore.spawn(async move { o.flush().await }).await {
                Ok(Ok(())) => {
                    tracing::info!(namespace = %name, "removed objbacker namespace flushed and closed")
                }
                Ok(Err(e)) => {
                    let w = format!(
                        "flushing removed objbacker namespace {name} failed: {e:?}; writes acknowledged before its removal may be lost"
                    );
                    tracing::error!("{w}");
                    warnings.push(w);
                }
                Err(e) => {
                    let w =
                        format!("flushing removed objbacker namespace {name}: task failed: {e}");
                    tracing::error!("{w}");
                    warnings.push(w);
                }
            }
            let _ = self.objstore.spawn_blocking(move || drop(ob)).await;
        }
    }
}

fn refused(e: anyhow::Error, rollback_left: Vec<String>) -> anyhow::Error {
    if rollback_left.is_empty() {
        e.context("rolled back everything this reload had created")
    } else {
        let mut s = String::from("rollback incomplete:");
        for l in &rollback_left {
            let _ = write!(s, "\n  {l}");
        }
        e.context(s)
    }
}

/// Two bucket URLs that name the same objects (one is the other or a
/// prefix of it).
fn buckets_overlap(a: &str, b: &str) -> bool {
    let a = a.trim_end_matches('/');
    let b = b.trim_end_matches('/');
    a == b
        || b.strip_prefix(a).is_some_and(|r| r.starts_with('/'))
        || a.strip_prefix(b).is_some_and(|r| r.starts_with('/'))
}

/// Config field names whose values differ between two objbacker backings.
fn objbacker_diff(a: &BackingSpec, abs: u32, b: &BackingSpec, bbs: u32) -> Vec<&'static str> {
    let (
        BackingSpec::ObjBacker {
            buckets: b1,
            size: s1,
            object_size: o1,
            store_options: so1,
            auto_format: af1,
            max_in_flight: m1,
            writeback_bytes: w1,
            readahead_bytes: ra1,
            inject: i1,
            request_timeout_ms: rt1,
            retry_budget_ms: rb1,
        },
        BackingSpec::ObjBacker {
            buckets: b2,
            size: s2,
            object_size: o2,
            store_options: so2,
            auto_format: af2,
            max_in_flight: m2,
            writeback_bytes: w2,
            readahead_bytes: ra2,
            inject: i2,
            request_timeout_ms: rt2,
            retry_budget_ms: rb2,
        },
    ) = (a, b)
    else {
        return vec![];
    };
    let mut v = Vec::new();
    let mut d = |c: bool, n: &'static str| {
        if c {
            v.push(n);
        }
    };
    d(b1 != b2, "buckets");
    d(s1 != s2, "size");
    d(abs != bbs, "block_size");
    d(o1 != o2, "object_size");
    d(so1 != so2, "store_options");
    d(af1 != af2, "auto_format");
    d(m1 != m2, "max_in_flight");
    d(w1 != w2, "writeback");
    d(ra1 != ra2, "readahead");
    d(
        i1 != i2,
        "inject_latency_ms/inject_error_rate/inject_timeout_rate",
    );
    d(rt1 != rt2, "request_timeout_ms");
    d(rb1 != rb2, "retry_budget_ms");
    v
}

fn dir_is_empty(d: &Path) -> bool {
    std::fs::read_dir(d).is_ok_and(|mut it| it.next().is_none())
}

/// The highest ancestor of `p` (or `p` itself) that does not exist.
fn topmost_missing(p: &Path) -> PathBuf {
    let mut top = p.to_path_buf();
    let mut cur = p;
    while let Some(parent) = cur.parent() {
        if parent.exists() {
            break;
        }
        top = parent.to_path_buf();
        cur = parent;
    }
    top
}

/// `access(2)` for write (and search, for directories).
fn writable(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: NUL-terminated path that lives across the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::R_OK) == 0 }
}

/// The nearest existing ancestor must be a writable directory for `p` to be
/// creatable.
fn creatable(p: &Path) -> std::result::Result<(), String> {
    let mut cur = p.parent();
    while let Some(a) = cur {
        if a.as_os_str().is_empty() {
            cur = Some(Path::new("."));
            continue;
        }
        if let Ok(m) = std::fs::metadata(a) {
            if !m.is_dir() {
                return Err(format!("`{}` is not a directory", a.display()));
            }
            if !writable(a) {
                return Err(format!("directory `{}` is not writable", a.display()));
            }
            return Ok(());
        }
        cur = a.parent();
    }
    Err("no existing parent directory".into())
}

type Precheck = (String, String, String);

/// Side-effect-free checks of one new backing. `f` makes field names.
fn precheck(
    b: &BackingSpec,
    name: &str,
    block_size: u32,
    f: &dyn Fn(&str) -> String,
) -> std::result::Result<(), Precheck> {
    match b {
        BackingSpec::Ram { .. } => Ok(()),
        BackingSpec::File { path, size } => match std::fs::metadata(path) {
            Ok(m) => {
                use std::os::unix::fs::FileTypeExt;
                if !m.is_file() && !m.file_type().is_block_device() {
                    return Err((
                        f("path"),
                        format!("`{}` is not a regular file or block device", path.display()),
                        "point path at a file or a block device".into(),
                    ));
                }
                if !writable(path) {
                    return Err((
                        f("path"),
                        format!("`{}` is not readable and writable", path.display()),
                        "fix its permissions or run strata as a user that may write it".into(),
                    ));
                }
                if m.is_file() && size.is_none() && m.len() < u64::from(block_size) {
                    return Err((
                        f("size"),
                        format!(
                            "`{}` is {} bytes, smaller than one block",
                            path.display(),
                            m.len()
                        ),
                        "add size = \"1GiB\" to extend it".into(),
                    ));
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if size.is_none() {
                    return Err((
                        f("size"),
                        format!(
                            "`{}` does not exist and no size is given to create it",
                            path.display()
                        ),
                        "add size = \"1GiB\", or create the file first".into(),
                    ));
                }
                creatable(path).map_err(|why| {
                    (
                        f("path"),
                        format!("cannot create `{}`: {why}", path.display()),
                        "create its directory first, or use a path in a writable directory".into(),
                    )
                })
            }
            Err(e) => Err((
                f("path"),
                format!("cannot stat `{}`: {e}", path.display()),
                "point path at a file or a block device strata may open".into(),
            )),
        },
        BackingSpec::ObjBacker {
            buckets,
            auto_format,
            ..
        } => {
            objbacker_config(name, b, block_size)
                .validate()
                .map_err(|e| {
                    (
                        f("buckets"),
                        e.to_string(),
                        "correct the objbacker fields (docs/objbacker.md)".into(),
                    )
                })?;
            for (k, url) in buckets.iter().enumerate() {
                let Some(dir) = url.strip_prefix("file://") else {
                    continue;
                };
                let dir = Path::new(dir);
                match std::fs::metadata(dir) {
                    Ok(m) if !m.is_dir() => {
                        return Err((
                            f(&format!("buckets[{k}]")),
                            format!("`{}` is not a directory", dir.display()),
                            "point the file:// bucket at a directory".into(),
                        ));
                    }
                    Ok(_) if !writable(dir) => {
                        return Err((
                            f(&format!("buckets[{k}]")),
                            format!("directory `{}` is not writable", dir.display()),
                            "fix its permissions".into(),
                        ));
                    }
                    Ok(_) => {}
                    Err(_) if !auto_format => {
                        return Err((
                            f(&format!("buckets[{k}]")),
                            format!("`{}` does not exist, so it holds no device", dir.display()),
                            "run `strata objbacker format` first, or set auto_format = true".into(),
                        ));
                    }
                    Err(_) => creatable(dir).map_err(|why| {
                        (
                            f(&format!("buckets[{k}]")),
                            format!("cannot create `{}`: {why}", dir.display()),
                            "use a directory under a writable one".into(),
                        )
                    })?,
                }
            }
            Ok(())
        }
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
        readahead_bytes,
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
        readahead_bytes: readahead_bytes.unwrap_or(d.readahead_bytes),
        request_timeout: request_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(d.request_timeout),
        retry_budget: retry_budget_ms
            .map(Duration::from_millis)
            .unwrap_or(d.retry_budget),
        fault: inject.map(
            |(lat_us, err_ppm, timeout_ppm)| strata_objbacker::FaultConfig {
                latency: if lat_us == 0 {
                    strata_objbacker::Latency::None
                } else {
                    strata_objbacker::Latency::Fixed(Duration::from_micros(lat_us))
                },
                error_rate: f64::from(err_ppm) / 1e6,
                timeout_rate: f64::from(timeout_ppm) / 1e6,
                ..strata_objbacker::FaultConfig::default()
            },
        ),
        ..d
    }
}

/// Attaches; formats first only when `auto` is set and the buckets hold
/// nothing at all (never over foreign data or another device). Runs on the
/// object-store runtime (the device's tasks are spawned onto the runtime
/// current at attach). Returns whether it formatted.
async fn attach_or_format(cfg: ObjBackerConfig, auto: bool) -> Result<(Arc<ObjBacker>, bool)> {
    match ObjBacker::attach(cfg.clone()).await {
        Ok(ob) => Ok((ob, false)),
        Err(ObjError::NotFormatted { .. }) if auto => {
            // `format` logs the new device's fields itself.
            strata_objbacker::format(&cfg, FormatOptions { force: false }).await?;
            Ok((ObjBacker::attach(cfg).await?, true))
        }
        Err(e) => Err(e.into()),
    }
}
