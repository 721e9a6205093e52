//! The target's configuration (subsystems, namespaces, ports, ANA states) and
//! the registry of live controllers.
//!
//! The configuration is an immutable snapshot behind an `Arc`: readers (the
//! admin path, `Ctrlr::io_view`) clone the `Arc` and never hold a lock while
//! they work. Live reconfiguration swaps the snapshot and then tells each
//! affected controller what changed, so asynchronous events are derived from
//! a diff of two snapshots and cannot drift from what the logs report.
//!
//! Lock order: `registry` → `cfg` → a controller's own state. A controller
//! never takes `registry` or `cfg` while holding its own state lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::bdev::Bdev;
use crate::ctrlr::Ctrlr;

/// NSIDs a subsystem may use: 1..=MAX_NAMESPACES. Identify Controller reports
/// this as both NN and MNAN, which keeps the Linux host's ANA log buffer
/// (sized from NANAGRPID and MNAN) large enough for any configuration.
pub const MAX_NAMESPACES: u32 = 1024;
/// ANA group IDs a namespace may use: 1..=MAX_ANA_GROUPS (ANAGRPMAX, NANAGRPID).
pub const MAX_ANA_GROUPS: u32 = 128;
/// The group of a namespace configured with ANAGRPID 0, which the spec
/// reserves for "not reported".
pub const DEFAULT_ANA_GROUP: u32 = 1;

/// Asymmetric Namespace Access state (ANA log, ANAS field).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnaState {
    Optimized = 0x01,
    NonOptimized = 0x02,
    Inaccessible = 0x03,
    PersistentLoss = 0x04,
    Change = 0x0F,
}

impl AnaState {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "optimized" => Self::Optimized,
            "non-optimized" => Self::NonOptimized,
            "inaccessible" => Self::Inaccessible,
            "persistent-loss" => Self::PersistentLoss,
            "change" => Self::Change,
            _ => return None,
        })
    }
}

/// (NSID, size, block size, VWC, UUID, NGUID, EUI64, ANAGRPID).
type NamespaceIdentity = (u32, u64, u32, bool, [u8; 16], [u8; 16], [u8; 8], u32);

#[derive(Clone)]
pub struct NamespaceConfig {
    pub nsid: u32,
    pub bdev: Arc<dyn Bdev>,
    pub uuid: [u8; 16],
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub anagrpid: u32,
}

impl NamespaceConfig {
    /// ANAGRPID as reported to hosts (0 is mapped to the default group).
    pub fn effective_anagrpid(&self) -> u32 {
        if self.anagrpid == 0 {
            DEFAULT_ANA_GROUP
        } else {
            self.anagrpid
        }
    }

    fn is_valid(&self) -> bool {
        (1..=MAX_NAMESPACES).contains(&self.nsid)
            && self.effective_anagrpid() <= MAX_ANA_GROUPS
            && self.bdev.info().block_size.is_power_of_two()
            && self.bdev.info().block_size >= 512
    }

    /// What a host can observe of the namespace through Identify; a change
    /// here is a Namespace Attribute Changed event.
    fn visible(&self) -> NamespaceIdentity {
        let i = self.bdev.info();
        (
            self.nsid,
            i.num_blocks,
            i.block_size,
            i.volatile_write_cache,
            self.uuid,
            self.nguid,
            self.eui64,
            self.effective_anagrpid(),
        )
    }
}

#[derive(Clone)]
pub struct SubsystemConfig {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: bool,
    pub hosts: Vec<String>,
    pub namespaces: Vec<NamespaceConfig>,
    /// Port ids through which this subsystem is reachable.
    pub ports: Vec<u16>,
}

impl SubsystemConfig {
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.hosts.iter().any(|h| h == hostnqn)
    }

    /// The namespaces hosts see, sorted by NSID. Entries with an NSID or
    /// ANAGRPID outside what Identify Controller advertises, an unusable
    /// block size, or a duplicate NSID (the first wins) are left out rather
    /// than reported inconsistently.
    pub fn active_namespaces(&self) -> Vec<&NamespaceConfig> {
        let mut v: Vec<&NamespaceConfig> = Vec::with_capacity(self.namespaces.len());
        for ns in self.namespaces.iter().filter(|n| n.is_valid()) {
            if !v.iter().any(|o| o.nsid == ns.nsid) {
                v.push(ns);
            }
        }
        v.sort_by_key(|n| n.nsid);
        v
    }

    pub fn namespace(&self, nsid: u32) -> Option<&NamespaceConfig> {
        self.active_namespaces()
            .into_iter()
            .find(|n| n.nsid == nsid)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// PORTID in the discovery log.
    pub id: u16,
    /// e.g. "127.0.0.1"
    pub traddr: String,
    /// e.g. "4420"
    pub trsvcid: String,
    pub adrfam_ipv6: bool,
    /// ANA state of each group on this port; groups not listed are Optimized.
    pub ana: BTreeMap<u32, AnaState>,
}

#[derive(Clone, Default)]
pub struct TargetConfig {
    pub subsystems: Vec<SubsystemConfig>,
    pub ports: Vec<PortConfig>,
}

impl TargetConfig {
    /// One subsystem with one namespace on one 127.0.0.1 port, open to every
    /// host: what unit tests, fuzz targets and the in-process benchmark need.
    pub fn single_namespace(nqn: &str, bdev: Arc<dyn Bdev>, port_id: u16) -> Self {
        Self {
            subsystems: vec![SubsystemConfig {
                nqn: nqn.into(),
                serial: "STRATA".into(),
                model: "Strata".into(),
                allow_any_host: true,
                hosts: vec![],
                namespaces: vec![NamespaceConfig {
                    nsid: 1,
                    bdev,
                    uuid: [1; 16],
                    nguid: [1; 16],
                    eui64: [1; 8],
                    anagrpid: 1,
                }],
                ports: vec![port_id],
            }],
            ports: vec![PortConfig {
                id: port_id,
                traddr: "127.0.0.1".into(),
                trsvcid: "4420".into(),
                adrfam_ipv6: false,
                ana: Default::default(),
            }],
        }
    }
}

impl TargetConfig {
    pub fn subsystem(&self, nqn: &str) -> Option<&SubsystemConfig> {
        self.subsystems.iter().find(|s| s.nqn == nqn)
    }

    pub fn port(&self, id: u16) -> Option<&PortConfig> {
        self.ports.iter().find(|p| p.id == id)
    }

    /// The subsystem `nqn` if it is reachable through port `port_id`.
    pub fn subsystem_on_port(&self, nqn: &str, port_id: u16) -> Option<&SubsystemConfig> {
        self.port(port_id)?;
        self.subsystem(nqn).filter(|s| s.ports.contains(&port_id))
    }

    pub fn ana_state(&self, port_id: u16, anagrpid: u32) -> AnaState {
        self.port(port_id)
            .and_then(|p| p.ana.get(&anagrpid).copied())
            .unwrap_or(AnaState::Optimized)
    }

    /// The ANA log content of a subsystem on a port, as (group → (state,
    /// NSIDs)): one entry per group that has namespaces.
    pub fn ana_groups(&self, nqn: &str, port_id: u16) -> BTreeMap<u32, (AnaState, Vec<u32>)> {
        let mut groups: BTreeMap<u32, (AnaState, Vec<u32>)> = BTreeMap::new();
        if let Some(sub) = self.subsystem(nqn) {
            for ns in sub.active_namespaces() {
                let g = ns.effective_anagrpid();
                groups
                    .entry(g)
                    .or_insert_with(|| (self.ana_state(port_id, g), Vec::new()))
                    .1
                    .push(ns.nsid);
            }
        }
        groups
    }

    /// Everything that shapes some host's discovery log page.
    fn discovery_fingerprint(&self) -> Vec<(String, bool, Vec<String>, Vec<PortConfig>)> {
        self.subsystems
            .iter()
            .map(|s| {
                let mut hosts = s.hosts.clone();
                hosts.sort();
                let ports = s
                    .ports
                    .iter()
                    .filter_map(|&p| self.port(p))
                    .map(|p| PortConfig {
                        ana: BTreeMap::new(),
                        ..p.clone()
                    })
                    .collect();
                (s.nqn.clone(), s.allow_any_host, hosts, ports)
            })
            .collect()
    }
}

/// Controllers by (subsystem NQN, CNTLID), plus the next CNTLID to try per
/// subsystem.
#[derive(Default)]
pub(crate) struct Registry {
    pub(crate) ctrls: BTreeMap<(String, u16), Arc<Ctrlr>>,
    next_cntlid: HashMap<String, u16>,
}

/// Dynamic-model CNTLIDs: 1..=FFEFh (FFF0h and up are reserved).
pub const CNTLID_MIN: u16 = 1;
pub const CNTLID_MAX: u16 = 0xFFEF;

impl Registry {
    /// Allocates a CNTLID unique within `subnqn`. Allocation continues after
    /// the last one handed out instead of reusing the lowest free one, so a
    /// host reconnecting right after a teardown gets a different CNTLID and
    /// cannot confuse the old association with the new one.
    pub(crate) fn alloc_cntlid(&mut self, subnqn: &str) -> Option<u16> {
        let span = u32::from(CNTLID_MAX - CNTLID_MIN) + 1;
        let start = self
            .next_cntlid
            .get(subnqn)
            .copied()
            .unwrap_or(CNTLID_MIN)
            .clamp(CNTLID_MIN, CNTLID_MAX);
        for i in 0..span {
            let off = (u32::from(start - CNTLID_MIN) + i) % span;
            let id = CNTLID_MIN + off as u16;
            if !self.ctrls.contains_key(&(subnqn.to_owned(), id)) {
                let next = if id == CNTLID_MAX { CNTLID_MIN } else { id + 1 };
                self.next_cntlid.insert(subnqn.to_owned(), next);
                return Some(id);
            }
        }
        None
    }
}

pub struct Target {
    pub(crate) cfg: RwLock<Arc<TargetConfig>>,
    pub(crate) registry: Mutex<Registry>,
    /// Shared with every controller so the I/O path reads it without
    /// touching the target.
    pub(crate) generation: Arc<AtomicU64>,
    /// ANA log CHGCNT: one counter for the whole target, as nvmet does, so it
    /// only ever grows whatever port or subsystem changed.
    pub(crate) ana_chgcnt: AtomicU64,
    /// Discovery log GENCTR.
    pub(crate) disc_genctr: AtomicU64,
}

/// Poisoning only records that another thread panicked while holding the
/// lock; the data is still a consistent snapshot, so keep serving.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Target {
    pub fn new(cfg: TargetConfig) -> Arc<Target> {
        Arc::new(Target {
            cfg: RwLock::new(Arc::new(cfg)),
            registry: Mutex::new(Registry::default()),
            generation: Arc::new(AtomicU64::new(1)),
            ana_chgcnt: AtomicU64::new(1),
            disc_genctr: AtomicU64::new(1),
        })
    }

    pub(crate) fn snapshot(&self) -> Arc<TargetConfig> {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Live reconfiguration (SIGHUP): replaces the config. Namespaces
    /// added/removed/resized → Namespace Attribute Changed AEN (+ Changed NS
    /// List log) to the live controllers of that subsystem; ANA state changes
    /// on a port → ANA Change AEN to controllers connected through that port;
    /// any change visible in the discovery log → Discovery Log Change AEN to
    /// discovery controllers. Controllers of hosts no longer allowed, of
    /// removed subsystems, or whose port no longer exports the subsystem are
    /// destroyed. Bumps the generation.
    pub fn apply(&self, cfg: TargetConfig) {
        let mut reg = lock(&self.registry);
        self.apply_locked(&mut reg, cfg);
    }

    fn apply_locked(&self, reg: &mut Registry, cfg: TargetConfig) {
        let new = Arc::new(cfg);
        let old = {
            let mut w = self.cfg.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *w, new.clone())
        };

        let mut doomed = Vec::new();
        let mut ns_notices: Vec<(Arc<Ctrlr>, Vec<u32>)> = Vec::new();
        let mut ana_notices = Vec::new();
        let mut disc_notices = Vec::new();
        let mut ana_log_changed = false;
        let disc_changed = old.discovery_fingerprint() != new.discovery_fingerprint();

        for (key, c) in &reg.ctrls {
            if c.is_discovery() {
                if disc_changed
                    && crate::discovery::discovery_log(&old, c.hostnqn(), 0)
                        != crate::discovery::discovery_log(&new, c.hostnqn(), 0)
                {
                    disc_notices.push(c.clone());
                }
                continue;
            }
            let Some(nsub) = new.subsystem_on_port(c.subnqn(), c.port_id()) else {
                doomed.push(key.clone());
                continue;
            };
            if !nsub.host_allowed(c.hostnqn()) {
                doomed.push(key.clone());
                continue;
            }
            let changed = changed_nsids(old.subsystem(c.subnqn()), nsub);
            if !changed.is_empty() {
                ns_notices.push((c.clone(), changed));
            }
            let og = old.ana_groups(c.subnqn(), c.port_id());
            let ng = new.ana_groups(c.subnqn(), c.port_id());
            if og != ng {
                ana_log_changed = true;
            }
            // Group membership changes come with a Namespace Attribute
            // Changed event, after which the host re-reads the ANA log
            // anyway; the ANA Change notice is for state transitions (as
            // nvmet sends it).
            if og
                .iter()
                .any(|(g, (st, _))| ng.get(g).is_some_and(|(nst, _)| nst != st))
            {
                ana_notices.push(c.clone());
            }
        }

        for key in doomed {
            if let Some(c) = reg.ctrls.remove(&key) {
                c.mark_destroyed();
            }
        }
        if ana_log_changed {
            self.ana_chgcnt.fetch_add(1, Ordering::AcqRel);
        }
        if disc_changed {
            self.disc_genctr.fetch_add(1, Ordering::AcqRel);
        }
        // Bumped before the events go out so a host reacting to an event
        // already sees the new view on its I/O queues.
        self.generation.fetch_add(1, Ordering::AcqRel);
        for (c, nsids) in ns_notices {
            c.notice_ns_changed(&nsids);
        }
        for c in ana_notices {
            c.notice_ana_change();
        }
        for c in disc_notices {
            c.notice_disc_change();
        }
    }

    /// Sets one port's ANA state for one group and sends the ANA Change AEN
    /// to the controllers on that port whose ANA log changed.
    pub fn set_ana_state(&self, port_id: u16, anagrpid: u32, state: AnaState) {
        let mut reg = lock(&self.registry);
        let mut cfg = TargetConfig::clone(&self.snapshot());
        let Some(port) = cfg.ports.iter_mut().find(|p| p.id == port_id) else {
            tracing::warn!(port_id, "set_ana_state: no such port");
            return;
        };
        port.ana.insert(anagrpid, state);
        self.apply_locked(&mut reg, cfg);
    }

    /// Bumped on every change that the I/O path must see (namespaces, ANA
    /// states, controller destruction).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn config(&self) -> TargetConfig {
        TargetConfig::clone(&self.snapshot())
    }

    /// Live controllers (for logs and tests).
    pub fn controllers(&self) -> Vec<Arc<Ctrlr>> {
        lock(&self.registry).ctrls.values().cloned().collect()
    }

    /// Destroys every controller whose keep-alive expired. The admin
    /// connection normally notices first; this sweep is the backstop for a
    /// controller whose connection task is gone or wedged, so no CNTLID
    /// stays allocated for ever.
    pub fn reap_expired_controllers(&self, now_ms: u64) -> usize {
        let expired: Vec<Arc<Ctrlr>> = lock(&self.registry)
            .ctrls
            .values()
            .filter(|c| c.kato_expired(now_ms))
            .cloned()
            .collect();
        for c in &expired {
            tracing::warn!(
                cntlid = c.cntlid(),
                hostnqn = c.hostnqn(),
                "keep-alive expired: controller reaped by the registry sweep"
            );
            c.destroy();
        }
        expired.len()
    }

    /// Removes one controller; used by `Ctrlr::destroy`.
    pub(crate) fn unregister(&self, subnqn: &str, cntlid: u16) {
        let removed = lock(&self.registry)
            .ctrls
            .remove(&(subnqn.to_owned(), cntlid));
        if removed.is_some() {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// NSIDs whose host-visible attributes differ between two versions of a
/// subsystem (added, removed, resized, re-identified or regrouped).
fn changed_nsids(old: Option<&SubsystemConfig>, new: &SubsystemConfig) -> Vec<u32> {
    let old_ns: BTreeMap<u32, _> = old
        .map(|s| s.active_namespaces())
        .unwrap_or_default()
        .into_iter()
        .map(|n| (n.nsid, n))
        .collect();
    let new_ns: BTreeMap<u32, _> = new
        .active_namespaces()
        .into_iter()
        .map(|n| (n.nsid, n))
        .collect();
    let mut changed: Vec<u32> = old_ns
        .keys()
        .chain(new_ns.keys())
        .copied()
        // A reload that reopens the same device is not a change the host can
        // see; the new bdev reaches the I/O path through the generation.
        .filter(|nsid| match (old_ns.get(nsid), new_ns.get(nsid)) {
            (Some(a), Some(b)) => a.visible() != b.visible(),
            _ => true,
        })
        .collect();
    changed.sort_unstable();
    changed.dedup();
    changed
}
