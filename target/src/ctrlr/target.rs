//! The live target: the current configuration snapshot, the registry of
//! live controllers, and live reconfiguration, which diffs two snapshots
//! and tells each affected controller what changed.
//!
//! It sits in the controller layer because it owns controllers; the model
//! it serves ([`crate::subsystem`]) knows nothing of them.
//!
//! The configuration is an immutable snapshot behind an `Arc`: readers (the
//! admin path, `Ctrlr::io_view`) clone the `Arc` and never hold a lock while
//! they work. Asynchronous events are derived from a diff of two snapshots
//! and cannot drift from what the logs report.
//!
//! Lock order: `registry` → `cfg` → a controller's own state. A controller
//! never takes `registry` or `cfg` while holding its own state lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::Ctrlr;
use crate::subsystem::{AnaState, TargetConfig, changed_nsids, io_view_changed};

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
    /// ANA log CHGCNT: one counter for the whole target, as nvmet does, so it
    /// only ever grows whatever port or subsystem changed.
    pub(crate) ana_chgcnt: AtomicU64,
    /// Discovery log GENCTR.
    pub(crate) disc_genctr: AtomicU64,
    /// Per-group fencing epochs and the queues' acknowledgements.
    pub(crate) fence: super::FenceTable,
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
            ana_chgcnt: AtomicU64::new(1),
            disc_genctr: AtomicU64::new(1),
            fence: super::FenceTable::default(),
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
    /// destroyed. Moves the view generation of exactly the controllers
    /// whose I/O view changed.
    pub fn apply(&self, cfg: TargetConfig) {
        let mut reg = lock(&self.registry);
        self.apply_locked(&mut reg, cfg);
    }

    pub(super) fn apply_locked(&self, reg: &mut Registry, cfg: TargetConfig) {
        let new = Arc::new(cfg);
        let old = {
            let mut w = self.cfg.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *w, new.clone())
        };

        let mut doomed = Vec::new();
        let mut ns_notices: Vec<(Arc<Ctrlr>, Vec<u32>)> = Vec::new();
        let mut ana_notices = Vec::new();
        let mut disc_notices = Vec::new();
        let mut view_notices = Vec::new();
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
            if io_view_changed(&old, &new, c.subnqn(), c.port_id()) {
                view_notices.push(c.clone());
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
        // Before the events go out, so a host reacting to an event already
        // sees the new view on its I/O queues.
        for c in view_notices {
            c.view_changed();
        }
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
            crate::stats::registry()
                .subsystem(c.subnqn())
                .keepalive_expiries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            c.destroy();
        }
        expired.len()
    }

    /// Removes one controller; used by `Ctrlr::destroy`.
    pub(crate) fn unregister(&self, subnqn: &str, cntlid: u16) {
        lock(&self.registry)
            .ctrls
            .remove(&(subnqn.to_owned(), cntlid));
    }
}
