//! The target's model: subsystems, namespaces, ports and ANA states, as an
//! immutable [`TargetConfig`], and the diffs between two of them that
//! reconfiguration turns into asynchronous events.
//!
//! This is the lower layer: it knows nothing of controllers or queues. The
//! controller layer (`ctrlr`, whose [`crate::ctrlr::Target`] holds the live
//! snapshot and the registry of controllers) and the discovery log
//! (`discovery`) read it; nothing here imports them, so the dependencies
//! point one way.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::bdev::Bdev;

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

    /// The name [`AnaState::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::Optimized => "optimized",
            Self::NonOptimized => "non-optimized",
            Self::Inaccessible => "inaccessible",
            Self::PersistentLoss => "persistent-loss",
            Self::Change => "change",
        }
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

    /// What the I/O path of a controller of `nqn` connected through
    /// `port_id` serves: the active namespaces, sorted by NSID, each with
    /// the ANA state of its group on that port. None where the subsystem is
    /// not reachable through the port.
    pub fn io_namespaces(&self, nqn: &str, port_id: u16) -> Vec<(&NamespaceConfig, AnaState)> {
        self.subsystem_on_port(nqn, port_id)
            .map(|sub| {
                sub.active_namespaces()
                    .into_iter()
                    .map(|ns| (ns, self.ana_state(port_id, ns.effective_anagrpid())))
                    .collect()
            })
            .unwrap_or_default()
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
    pub(crate) fn discovery_fingerprint(
        &self,
    ) -> Vec<(String, bool, Vec<String>, Vec<PortConfig>)> {
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

/// Whether the I/O path of a controller of `nqn` on `port_id` serves
/// something else under `new` than under `old`: other NSIDs, other bdevs
/// (by identity: a reopened device is a new one, even where the host sees
/// no change) or other ANA states.
pub(crate) fn io_view_changed(
    old: &TargetConfig,
    new: &TargetConfig,
    nqn: &str,
    port_id: u16,
) -> bool {
    let (a, b) = (
        old.io_namespaces(nqn, port_id),
        new.io_namespaces(nqn, port_id),
    );
    a.len() != b.len()
        || a.iter().zip(&b).any(|((x, xs), (y, ys))| {
            x.nsid != y.nsid || !Arc::ptr_eq(&x.bdev, &y.bdev) || xs != ys
        })
}

/// NSIDs whose host-visible attributes differ between two versions of a
/// subsystem (added, removed, resized, re-identified or regrouped).
pub(crate) fn changed_nsids(old: Option<&SubsystemConfig>, new: &SubsystemConfig) -> Vec<u32> {
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
