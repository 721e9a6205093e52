//! `strata serve` configuration: TOML in, a validated [`ServeConfig`] out.
//!
//! Every error names the file, the field and the fix, because the person
//! reading it is an operator at a prompt, often after a SIGHUP that must not
//! take the target down.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod render;
pub use render::format_uuid;

#[derive(Debug)]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config error in {}: field `{}`: {}\n  fix: {}",
            self.file, self.field, self.problem, self.fix
        )
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize, Serialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) target: RawTarget,
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) listener: Vec<RawListener>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) subsystem: Vec<RawSubsystem>,
    #[serde(default)]
    pub(crate) limits: RawLimits,
    #[serde(default)]
    pub(crate) metrics: RawMetrics,
}

#[derive(Debug, Deserialize, Serialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) addr: Option<String>,
}

/// A byte count written as a number or a size string ("4MiB").
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(untagged)]
pub(crate) enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Deserialize, Serialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_connections_per_listener: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_pending_output: Option<RawSize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_r2t_bytes: Option<RawSize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) data_phase_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tx_stall_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) connect_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pool_retain: Option<RawSize>,
}

/// `[limits]`: the bounds on what hosts can make the target hold (see
/// `strata_target::queue::QueueLimits` and `TransportConfig`). Read at
/// start; a reload does not change them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitsSpec {
    pub max_connections: usize,
    pub max_connections_per_listener: usize,
    pub max_pending_output: usize,
    pub max_r2t_bytes: usize,
    pub data_phase_timeout_ms: u64,
    pub tx_stall_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub pool_retain: usize,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        let t = strata_target::transport::TransportConfig::default();
        let q = t.limits;
        Self {
            max_connections: t.max_connections,
            max_connections_per_listener: t.max_connections_per_listener,
            max_pending_output: q.max_pending_output,
            max_r2t_bytes: q.max_r2t_bytes,
            data_phase_timeout_ms: q.data_phase_timeout_ms,
            tx_stall_timeout_ms: q.tx_stall_timeout_ms,
            connect_timeout_ms: q.connect_timeout_ms,
            pool_retain: q.pool_retain_bytes,
        }
    }
}

impl LimitsSpec {
    /// Applies these limits to a transport configuration.
    pub fn apply(&self, tc: &mut strata_target::transport::TransportConfig) {
        tc.max_connections = self.max_connections;
        tc.max_connections_per_listener = self.max_connections_per_listener;
        tc.limits.max_pending_output = self.max_pending_output;
        tc.limits.max_r2t_bytes = self.max_r2t_bytes;
        tc.limits.data_phase_timeout_ms = self.data_phase_timeout_ms;
        tc.limits.tx_stall_timeout_ms = self.tx_stall_timeout_ms;
        tc.limits.connect_timeout_ms = self.connect_timeout_ms;
        tc.limits.pool_retain_bytes = self.pool_retain;
    }
}

#[derive(Debug, Deserialize, Serialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTarget {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reactors: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) discovery: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub(crate) name: String,
    pub(crate) addr: String,
    #[serde(default)]
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) ana: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSubsystem {
    pub(crate) nqn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) model: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) allow_any_host: Option<bool>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) hosts: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) listeners: Option<Vec<String>>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) namespace: Vec<RawNamespace>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNamespace {
    pub(crate) nsid: u32,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) block_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ana_group: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) uuid: Option<String>,
    // objbacker namespaces
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) buckets: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) object_size: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) store_options: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) auto_format: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_in_flight: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) writeback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) readahead: Option<String>,
    /// Fault injection around every bucket client (benchmarks, fault tests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) inject_latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) inject_error_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) inject_timeout_rate: Option<f64>,
    /// Time limit of one store request, and total retry time of one store
    /// operation before the host gets an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) request_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) retry_budget_ms: Option<u64>,
}

impl RawNamespace {
    /// A namespace entry with only its NSID and type set.
    pub(crate) fn new(nsid: u32, kind: &str) -> Self {
        Self {
            nsid,
            kind: kind.to_string(),
            size: None,
            path: None,
            block_size: None,
            ana_group: None,
            uuid: None,
            buckets: None,
            object_size: None,
            store_options: BTreeMap::new(),
            auto_format: None,
            max_in_flight: None,
            writeback: None,
            readahead: None,
            inject_latency_ms: None,
            inject_error_rate: None,
            inject_timeout_rate: None,
            request_timeout_ms: None,
            retry_budget_ms: None,
        }
    }
}

/// `$NAME` as a path, if set and not empty.
pub fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A systemd directory variable (`$STATE_DIRECTORY`, `$RUNTIME_DIRECTORY`):
/// systemd may pass several, colon-separated; the first is ours.
pub fn systemd_dir(name: &str) -> Option<PathBuf> {
    env_path(name).map(|d| PathBuf::from(d.to_string_lossy().split(':').next().unwrap_or_default()))
}

/// What backs a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BackingSpec {
    Ram {
        size: u64,
    },
    File {
        path: PathBuf,
        size: Option<u64>,
    },
    /// The object-backed device (strata-objbacker): one object per
    /// `object_size` block, striped over `buckets`.
    ObjBacker {
        buckets: Vec<String>,
        size: u64,
        object_size: u64,
        store_options: Vec<(String, String)>,
        /// Format the buckets on first use when they hold nothing at all.
        auto_format: bool,
        max_in_flight: Option<usize>,
        writeback_bytes: Option<u64>,
        /// Bytes read ahead of a sequential reader; `Some(0)` turns it off.
        readahead_bytes: Option<u64>,
        /// Injected per-request latency (µs) and error/timeout rates (ppm):
        /// integers so the spec stays `Eq + Hash`.
        inject: Option<(u64, u32, u32)>,
        /// Per-request time limit and per-operation retry budget (ms).
        request_timeout_ms: Option<u64>,
        retry_budget_ms: Option<u64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceSpec {
    pub nsid: u32,
    pub backing: BackingSpec,
    pub block_size: u32,
    pub ana_group: u32,
    pub uuid: [u8; 16],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    pub name: String,
    pub addr: SocketAddr,
    pub ana: BTreeMap<u32, strata_target::subsystem::AnaState>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsystemSpec {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: bool,
    pub hosts: Vec<String>,
    /// Indexes into `ServeConfig::listeners`.
    pub listeners: Vec<usize>,
    pub namespaces: Vec<NamespaceSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    pub source: String,
    pub reactors: Option<usize>,
    pub discovery: Option<SocketAddr>,
    pub listeners: Vec<ListenerSpec>,
    pub subsystems: Vec<SubsystemSpec>,
    pub limits: LimitsSpec,
    /// `[metrics] addr`: where the Prometheus endpoint listens (off when
    /// absent). Read at startup; a reload does not move it.
    pub metrics_addr: Option<SocketAddr>,
}

/// The embedded default: one subsystem with a 1 GiB RAM namespace (NSID 1)
/// and a 1 GiB objbacker namespace (NSID 2) striped over two buckets in a
/// local directory, I/O on 127.0.0.1:4420 and discovery on 127.0.0.1:8009.
/// `{DATA}` is replaced by [`data_dir`].
pub const EMBEDDED_DEFAULT: &str = r#"
[target]
discovery = "127.0.0.1:8009"

[[listener]]
name = "default"
addr = "127.0.0.1:4420"

[[subsystem]]
nqn = "nqn.2026-11.dev.strata:default"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "1GiB"

[[subsystem.namespace]]
nsid = 2
type = "objbacker"
size = "1GiB"
buckets = ["file://{DATA}/objbacker/bucket0", "file://{DATA}/objbacker/bucket1"]
auto_format = true
"#;

/// Where the embedded default keeps its objbacker buckets:
/// `$STRATA_DATA_DIR`, else `$XDG_DATA_HOME/strata`, else
/// `$HOME/.local/share/strata`, else `./strata-data`.
pub fn data_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let d = env("STRATA_DATA_DIR")
        .or_else(|| env("XDG_DATA_HOME").map(|d| d.join("strata")))
        .or_else(|| env("HOME").map(|h| h.join(".local/share/strata")))
        .unwrap_or_else(|| PathBuf::from("strata-data"));
    std::path::absolute(&d).unwrap_or(d)
}

pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A stable namespace UUID derived from the subsystem NQN and NSID, so the
/// same config yields the same identifiers across restarts and nodes: the
/// Linux host refuses a multipath namespace whose IDs differ by path.
pub fn derived_uuid(nqn: &str, nsid: u32) -> [u8; 16] {
    let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
    let mut h2: u64 = 0x8422_2325_cbf2_9ce4;
    for b in nqn.bytes().chain(nsid.to_le_bytes()) {
        h1 = (h1 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        h2 = (h2 ^ u64::from(b))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(7);
    }
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&h1.to_be_bytes());
    u[8..].copy_from_slice(&h2.to_be_bytes());
    u[6] = (u[6] & 0x0f) | 0x80; // version 8: custom
    u[8] = (u[8] & 0x3f) | 0x80; // RFC 4122 variant
    u
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(u)
}

impl ServeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            field: "(file)".into(),
            problem: format!("cannot read: {e}"),
            fix: "pass an existing, readable TOML file to --config".into(),
        })?;
        Self::parse(&text, &file)
    }

    pub fn embedded_default() -> Self {
        {
            let text = EMBEDDED_DEFAULT.replace("{DATA}", &data_dir().display().to_string());
            Self::parse(&text, "(embedded default)").expect("embedded default config is valid")
        }
    }

    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let err = |field: &str, problem: String, fix: &str| ConfigError {
            file: file.to_string(),
            field: field.to_string(),
            problem,
            fix: fix.to_string(),
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let field = e
                .message()
                .split('`')
                .nth(1)
                .map(str::to_owned)
                .unwrap_or_else(|| "(syntax)".into());
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            ConfigError {
                file: file.to_string(),
                field,
                problem: match line {
                    Some(l) => format!("line {l}: {}", e.message()),
                    None => e.message().to_string(),
                },
                fix: "correct the TOML; the fields are documented in docs/CONFIG.md".into(),
            }
        })?;

        let discovery = match &raw.target.discovery {
            None => None,
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|e| {
                err(
                    "target.discovery",
                    format!("`{s}` is not an address: {e}"),
                    "use IP:PORT, e.g. \"127.0.0.1:8009\"",
                )
            })?),
        };
        let metrics_addr = match &raw.metrics.addr {
            None => None,
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|e| {
                err(
                    "metrics.addr",
                    format!("`{s}` is not an address: {e}"),
                    "use IP:PORT, e.g. \"127.0.0.1:9464\", or remove [metrics] to turn the endpoint off",
                )
            })?),
        };
        if raw.target.reactors == Some(0) {
            return Err(err(
                "target.reactors",
                "0 reactors cannot serve anything".into(),
                "omit it (one per core) or set 1 or more",
            ));
        }

        let limits = parse_limits(&raw.limits, &err)?;

        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        for (i, l) in raw.listener.iter().enumerate() {
            let f = |x: &str| format!("listener[{i}].{x}");
            if !names.insert(l.name.clone()) {
                return Err(err(
                    &f("name"),
                    format!("`{}` is used twice", l.name),
                    "give every listener a unique name",
                ));
            }
            let addr = l.addr.parse::<SocketAddr>().map_err(|e| {
                err(
                    &f("addr"),
                    format!("`{}` is not an address: {e}", l.addr),
                    "use IP:PORT, e.g. \"127.0.0.1:4420\"",
                )
            })?;
            let mut ana = BTreeMap::new();
            for (g, st) in &l.ana {
                let grp: u32 = g.parse().ok().filter(|g| *g > 0).ok_or_else(|| {
                    err(
                        &f(&format!("ana.{g}")),
                        format!("`{g}` is not an ANA group id"),
                        "use a group number >= 1 as key, e.g. ana = { \"1\" = \"optimized\" }",
                    )
                })?;
                let state = strata_target::subsystem::AnaState::parse(st).ok_or_else(|| {
                    err(
                        &f(&format!("ana.{g}")),
                        format!("`{st}` is not an ANA state"),
                        "use one of optimized, non-optimized, inaccessible, persistent-loss, change",
                    )
                })?;
                ana.insert(grp, state);
            }
            listeners.push(ListenerSpec {
                name: l.name.clone(),
                addr,
                ana,
            });
        }

        let mut subsystems = Vec::new();
        let mut nqns = HashSet::new();
        for (i, s) in raw.subsystem.iter().enumerate() {
            let f = |x: &str| format!("subsystem[{i}].{x}");
            if !s.nqn.starts_with("nqn.")
                || s.nqn.len() > 223
                || s.nqn == strata_target::spec::DISCOVERY_NQN
            {
                return Err(err(
                    &f("nqn"),
                    format!("`{}` is not a valid subsystem NQN", s.nqn),
                    "use nqn.YYYY-MM.reverse.domain:name, at most 223 bytes, not the discovery NQN",
                ));
            }
            if !nqns.insert(s.nqn.clone()) {
                return Err(err(
                    &f("nqn"),
                    format!("`{}` is used twice", s.nqn),
                    "give every subsystem a unique NQN",
                ));
            }
            for (j, h) in s.hosts.iter().enumerate() {
                if !h.starts_with("nqn.") || h.len() > 223 {
                    return Err(err(
                        &f(&format!("hosts[{j}]")),
                        format!("`{h}` is not a host NQN"),
                        "use the host's NQN from /etc/nvme/hostnqn",
                    ));
                }
            }
            let allow_any_host = s.allow_any_host.unwrap_or(s.hosts.is_empty());
            let listener_idx =
                match &s.listeners {
                    None => (0..listeners.len()).collect(),
                    Some(ls) => {
                        let mut v = Vec::new();
                        for (j, name) in ls.iter().enumerate() {
                            let idx = listeners.iter().position(|l| &l.name == name).ok_or_else(
                                || {
                                    err(
                                        &f(&format!("listeners[{j}]")),
                                        format!("no listener is named `{name}`"),
                                        "name a [[listener]] defined in this file",
                                    )
                                },
                            )?;
                            v.push(idx);
                        }
                        v
                    }
                };
            let mut namespaces = Vec::new();
            let mut nsids = HashSet::new();
            for (j, n) in s.namespace.iter().enumerate() {
                let f = |x: &str| format!("subsystem[{i}].namespace[{j}].{x}");
                if n.nsid == 0 || n.nsid >= 0xffff_fff0 {
                    return Err(err(
                        &f("nsid"),
                        format!("{} is not a usable NSID", n.nsid),
                        "use 1, 2, 3, …",
                    ));
                }
                if n.nsid > 1024 {
                    return Err(err(
                        &f("nsid"),
                        format!("{} exceeds the 1024 namespaces a subsystem holds", n.nsid),
                        "use an NSID from 1 to 1024",
                    ));
                }
                if !nsids.insert(n.nsid) {
                    return Err(err(
                        &f("nsid"),
                        format!("NSID {} is used twice", n.nsid),
                        "give every namespace a unique NSID",
                    ));
                }
                let block_size = n.block_size.unwrap_or(512);
                if block_size != 512 && block_size != 4096 {
                    return Err(err(
                        &f("block_size"),
                        format!("{block_size} is not supported"),
                        "use 512 or 4096",
                    ));
                }
                let size = match &n.size {
                    None => None,
                    Some(sz) => {
                        let v = parse_size(sz).ok_or_else(|| {
                            err(
                                &f("size"),
                                format!("`{sz}` is not a size"),
                                "write it like \"1GiB\", \"512MiB\" or \"4096\"",
                            )
                        })?;
                        if v == 0 || v % u64::from(block_size) != 0 {
                            return Err(err(
                                &f("size"),
                                format!(
                                    "{v} bytes is not a positive multiple of the block size {block_size}"
                                ),
                                "use a multiple of block_size",
                            ));
                        }
                        Some(v)
                    }
                };
                let backing = match n.kind.as_str() {
                    "ram" => BackingSpec::Ram {
                        size: size.ok_or_else(|| {
                            err(
                                &f("size"),
                                "a RAM namespace needs a size".into(),
                                "add size = \"1GiB\"",
                            )
                        })?,
                    },
                    "file" => BackingSpec::File {
                        path: PathBuf::from(n.path.clone().ok_or_else(|| {
                            err(
                                &f("path"),
                                "a file namespace needs a path".into(),
                                "add path = \"/var/lib/strata/ns1.img\" (a file or block device)",
                            )
                        })?),
                        size,
                    },
                    "objbacker" => {
                        let buckets = n.buckets.clone().unwrap_or_default();
                        if buckets.is_empty() {
                            return Err(err(
                                &f("buckets"),
                                "an objbacker namespace needs at least one bucket URL".into(),
                                "add buckets = [\"s3://bucket/prefix\"] (or gs://, az://, file:///dir)",
                            ));
                        }
                        for (k, b) in buckets.iter().enumerate() {
                            if !["s3://", "gs://", "az://", "file:///"]
                                .iter()
                                .any(|p| b.starts_with(p))
                            {
                                return Err(err(
                                    &f(&format!("buckets[{k}]")),
                                    format!("`{b}` is not a supported bucket URL"),
                                    "use s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///absolute/dir",
                                ));
                            }
                        }
                        let object_size = match &n.object_size {
                            None => 1 << 20,
                            Some(o) => parse_size(o)
                                .filter(|v| {
                                    v.is_power_of_two() && (128 << 10..=16 << 20).contains(v)
                                })
                                .ok_or_else(|| {
                                    err(
                                        &f("object_size"),
                                        format!("`{o}` is not a power of two from 128KiB to 16MiB"),
                                        "use e.g. \"1MiB\"",
                                    )
                                })?,
                        };
                        let writeback_bytes = match &n.writeback {
                            None => None,
                            Some(w) => Some(parse_size(w).ok_or_else(|| {
                                err(
                                    &f("writeback"),
                                    format!("`{w}` is not a size"),
                                    "write it like \"64MiB\"",
                                )
                            })?),
                        };
                        let readahead_bytes = match &n.readahead {
                            None => None,
                            Some(r) => Some(
                                parse_size(r)
                                    .filter(|&v| v <= strata_objbacker::config::MAX_READAHEAD_BYTES)
                                    .ok_or_else(|| {
                                        err(
                                            &f("readahead"),
                                            format!("`{r}` is not a size from 0 to 64MiB"),
                                            "write it like \"32MiB\" (the default), or \"0\" to turn read-ahead off",
                                        )
                                    })?,
                            ),
                        };
                        let ms = |v: Option<u64>, name: &str| -> Result<Option<u64>, ConfigError> {
                            match v {
                                Some(x) if !(1..=3_600_000).contains(&x) => Err(err(
                                    &f(name),
                                    format!("{x} ms is out of range"),
                                    "use 1 to 3600000 (milliseconds), or omit it for the default (30000)",
                                )),
                                v => Ok(v),
                            }
                        };
                        let request_timeout_ms = ms(n.request_timeout_ms, "request_timeout_ms")?;
                        let retry_budget_ms = ms(n.retry_budget_ms, "retry_budget_ms")?;
                        BackingSpec::ObjBacker {
                            request_timeout_ms,
                            retry_budget_ms,
                            buckets,
                            size: size.ok_or_else(|| {
                                err(
                                    &f("size"),
                                    "an objbacker namespace needs a size".into(),
                                    "add size = \"100GiB\"",
                                )
                            })?,
                            object_size,
                            store_options: n
                                .store_options
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                            auto_format: n.auto_format.unwrap_or(false),
                            max_in_flight: n.max_in_flight,
                            writeback_bytes,
                            readahead_bytes,
                            inject: match (
                                n.inject_latency_ms,
                                n.inject_error_rate,
                                n.inject_timeout_rate,
                            ) {
                                (None, None, None) => None,
                                (l, e, t) => {
                                    let rate =
                                        |v: Option<f64>, name: &str| -> Result<u32, ConfigError> {
                                            let v = v.unwrap_or(0.0);
                                            if !(0.0..=1.0).contains(&v) {
                                                return Err(err(
                                                    &f(name),
                                                    format!("{v} is not a fraction"),
                                                    "use a number from 0.0 to 1.0",
                                                ));
                                            }
                                            Ok((v * 1e6).round() as u32)
                                        };
                                    let lat = l.unwrap_or(0.0);
                                    if !(0.0..=60_000.0).contains(&lat) {
                                        return Err(err(
                                            &f("inject_latency_ms"),
                                            format!("{lat} ms is out of range"),
                                            "use 0 to 60000",
                                        ));
                                    }
                                    Some((
                                        (lat * 1000.0).round() as u64,
                                        rate(e, "inject_error_rate")?,
                                        rate(t, "inject_timeout_rate")?,
                                    ))
                                }
                            },
                        }
                    }
                    other => {
                        return Err(err(
                            &f("type"),
                            format!("`{other}` is not a namespace type"),
                            "use \"ram\", \"file\" or \"objbacker\"",
                        ));
                    }
                };
                let uuid = match &n.uuid {
                    None => derived_uuid(&s.nqn, n.nsid),
                    Some(u) => parse_uuid(u).ok_or_else(|| {
                        err(
                            &f("uuid"),
                            format!("`{u}` is not a UUID"),
                            "use the 8-4-4-4-12 hex form or omit it",
                        )
                    })?,
                };
                let ana_group = n.ana_group.unwrap_or(1);
                if ana_group == 0 || ana_group > 128 {
                    return Err(err(
                        &f("ana_group"),
                        format!("{ana_group} is outside 1..=128"),
                        "use an ANA group from 1 to 128",
                    ));
                }
                namespaces.push(NamespaceSpec {
                    nsid: n.nsid,
                    backing,
                    block_size,
                    ana_group,
                    uuid,
                });
            }
            subsystems.push(SubsystemSpec {
                nqn: s.nqn.clone(),
                serial: s.serial.clone().unwrap_or_else(|| serial_for(&s.nqn)),
                model: s.model.clone().unwrap_or_else(|| "Strata".into()),
                allow_any_host,
                hosts: s.hosts.clone(),
                listeners: listener_idx,
                namespaces,
            });
        }
        let mut addrs = HashSet::new();
        for (i, l) in listeners.iter().enumerate() {
            if !addrs.insert(l.addr) || Some(l.addr) == discovery || Some(l.addr) == metrics_addr {
                return Err(err(
                    &format!("listener[{i}].addr"),
                    format!("{} is bound twice", l.addr),
                    "give each listener (and target.discovery, metrics.addr) its own address",
                ));
            }
        }
        Ok(Self {
            source: file.to_string(),
            reactors: raw.target.reactors,
            discovery,
            listeners,
            subsystems,
            limits,
            metrics_addr,
        })
    }
}

fn parse_limits(
    r: &RawLimits,
    err: &dyn Fn(&str, String, &str) -> ConfigError,
) -> Result<LimitsSpec, ConfigError> {
    let mut l = LimitsSpec::default();
    let size =
        |field: &str, v: &Option<RawSize>, min: u64, dst: &mut usize| -> Result<(), ConfigError> {
            let Some(v) = v else { return Ok(()) };
            let n = match v {
                RawSize::Bytes(n) => Some(*n),
                RawSize::Text(t) => parse_size(t),
            };
            match n {
                Some(n) if n >= min => {
                    *dst = n as usize;
                    Ok(())
                }
                Some(n) => Err(err(
                    &format!("limits.{field}"),
                    format!("{n} bytes is below the minimum of {min}"),
                    "raise it, or omit it for the default",
                )),
                None => Err(err(
                    &format!("limits.{field}"),
                    format!("{v:?} is not a size"),
                    "write it like \"8MiB\" or a number of bytes",
                )),
            }
        };
    // One MDTS worth: a single largest transfer must always fit.
    let mdts = u64::from(strata_target::ctrlr::MDTS_BYTES);
    size(
        "max_pending_output",
        &r.max_pending_output,
        mdts,
        &mut l.max_pending_output,
    )?;
    size(
        "max_r2t_bytes",
        &r.max_r2t_bytes,
        mdts,
        &mut l.max_r2t_bytes,
    )?;
    size("pool_retain", &r.pool_retain, 0, &mut l.pool_retain)?;
    let count = |field: &str, v: Option<usize>, dst: &mut usize| -> Result<(), ConfigError> {
        match v {
            Some(0) => Err(err(
                &format!("limits.{field}"),
                "0 would refuse every connection".into(),
                "set 1 or more, or omit it for the default",
            )),
            Some(n) => {
                *dst = n;
                Ok(())
            }
            None => Ok(()),
        }
    };
    count("max_connections", r.max_connections, &mut l.max_connections)?;
    count(
        "max_connections_per_listener",
        r.max_connections_per_listener,
        &mut l.max_connections_per_listener,
    )?;
    let ms = |field: &str, v: Option<u64>, dst: &mut u64| -> Result<(), ConfigError> {
        match v {
            Some(n) if !(100..=3_600_000).contains(&n) => Err(err(
                &format!("limits.{field}"),
                format!("{n} ms is outside 100 … 3600000"),
                "give a time in milliseconds between 100 and 3600000",
            )),
            Some(n) => {
                *dst = n;
                Ok(())
            }
            None => Ok(()),
        }
    };
    ms(
        "data_phase_timeout_ms",
        r.data_phase_timeout_ms,
        &mut l.data_phase_timeout_ms,
    )?;
    ms(
        "tx_stall_timeout_ms",
        r.tx_stall_timeout_ms,
        &mut l.tx_stall_timeout_ms,
    )?;
    ms(
        "connect_timeout_ms",
        r.connect_timeout_ms,
        &mut l.connect_timeout_ms,
    )?;
    Ok(l)
}

fn serial_for(nqn: &str) -> String {
    let u = derived_uuid(nqn, 0);
    u[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_NQN: &str = "nqn.2026-11.dev.strata:default";
    const DEFAULT_LISTEN: &str = "127.0.0.1:4420";
    const DEFAULT_DISCOVERY: &str = "127.0.0.1:8009";

    #[test]
    fn embedded_default_is_one_ram_namespace_on_4420() {
        let c = ServeConfig::embedded_default();
        assert_eq!(c.listeners[0].addr.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.discovery.unwrap().to_string(), DEFAULT_DISCOVERY);
        assert_eq!(c.subsystems[0].nqn, DEFAULT_NQN);
        assert_eq!(
            c.subsystems[0].namespaces[0].backing,
            BackingSpec::Ram { size: 1 << 30 }
        );
        assert!(c.subsystems[0].allow_any_host);
        let BackingSpec::ObjBacker { buckets, size, .. } = &c.subsystems[0].namespaces[1].backing
        else {
            panic!("NSID 2 is the objbacker namespace")
        };
        assert_eq!(*size, 1 << 30);
        assert!(
            buckets.iter().all(|b| b.starts_with("file:///")),
            "{buckets:?}"
        );
    }

    #[test]
    fn limits_parse_and_bad_ones_name_the_field() {
        let c = ServeConfig::parse(
            "[limits]\nmax_pending_output = \"4MiB\"\nmax_r2t_bytes = 2097152\nconnect_timeout_ms = 2000\n",
            "l.toml",
        )
        .unwrap();
        assert_eq!(c.limits.max_pending_output, 4 << 20);
        assert_eq!(c.limits.max_r2t_bytes, 2 << 20);
        assert_eq!(c.limits.connect_timeout_ms, 2000);
        assert_eq!(
            c.limits.tx_stall_timeout_ms,
            LimitsSpec::default().tx_stall_timeout_ms
        );
        let e = ServeConfig::parse("[limits]\nmax_r2t_bytes = \"4KiB\"\n", "l.toml").unwrap_err();
        assert_eq!(e.field, "limits.max_r2t_bytes");
        let e = ServeConfig::parse("[limits]\nmax_connections = 0\n", "l.toml").unwrap_err();
        assert_eq!(e.field, "limits.max_connections");
        let e = ServeConfig::parse("[limits]\ntx_stall_timeout_ms = 5\n", "l.toml").unwrap_err();
        assert_eq!(e.field, "limits.tx_stall_timeout_ms");
        let e = ServeConfig::parse("[limits]\nbogus = 1\n", "l.toml").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn errors_name_file_field_and_fix() {
        let e = ServeConfig::parse("[[listener]]\nname='a'\naddr='nope'\n", "x.toml").unwrap_err();
        assert_eq!(e.file, "x.toml");
        assert_eq!(e.field, "listener[0].addr");
        assert!(e.to_string().contains("fix:"), "{e}");

        let e = ServeConfig::parse(
            "[[subsystem]]\nnqn='nqn.a:b'\n[[subsystem.namespace]]\nnsid=1\ntype='ram'\n",
            "y.toml",
        )
        .unwrap_err();
        assert_eq!(e.field, "subsystem[0].namespace[0].size");

        let e = ServeConfig::parse("[[subsystem]]\nnqn='nqn.a:b'\n[[subsystem.namespace]]\nnsid=1\ntype='disk'\nsize='1M'\n", "y.toml").unwrap_err();
        assert_eq!(e.field, "subsystem[0].namespace[0].type");

        let e = ServeConfig::parse("[[subsystem]]\nnqn='nqn.a:b'\n[[subsystem.namespace]]\nnsid=1\ntype='objbacker'\nsize='1M'\nbuckets=['file:///tmp/x']\nretry_budget_ms=0\n", "u.toml").unwrap_err();
        assert_eq!(e.field, "subsystem[0].namespace[0].retry_budget_ms");
        assert!(e.fix.contains("milliseconds"), "{e}");

        for bad in ["65MiB", "lots"] {
            let e = ServeConfig::parse(&format!("[[subsystem]]\nnqn='nqn.a:b'\n[[subsystem.namespace]]\nnsid=1\ntype='objbacker'\nsize='1M'\nbuckets=['file:///tmp/x']\nreadahead='{bad}'\n"), "r.toml").unwrap_err();
            assert_eq!(e.field, "subsystem[0].namespace[0].readahead");
            assert!(e.fix.contains("32MiB"), "{e}");
        }

        let e =
            ServeConfig::parse("[[subsystem]]\nnqn='nqn.a:b'\nbogus=1\n", "z.toml").unwrap_err();
        assert_eq!(e.field, "bogus");
        assert!(e.problem.contains("line 3"), "{}", e.problem);

        let e = ServeConfig::parse(
            "[[listener]]\nname='a'\naddr='127.0.0.1:1'\nana={'1'='sideways'}\n",
            "w.toml",
        )
        .unwrap_err();
        assert_eq!(e.field, "listener[0].ana.1");

        let e = ServeConfig::parse("[[subsystem]]\nnqn='nqn.a:b'\nlisteners=['x']\n", "v.toml")
            .unwrap_err();
        assert_eq!(e.field, "subsystem[0].listeners[0]");
    }

    #[test]
    fn metrics_addr_is_optional_and_checked() {
        let c = ServeConfig::parse("[metrics]\naddr = '127.0.0.1:9464'\n", "m.toml").unwrap();
        assert_eq!(c.metrics_addr.unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(ServeConfig::parse("", "m.toml").unwrap().metrics_addr, None);
        let e = ServeConfig::parse("[metrics]\naddr = 'nowhere'\n", "m.toml").unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.field.as_str()),
            ("m.toml", "metrics.addr")
        );
        assert!(e.fix.contains("IP:PORT"), "{e}");
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("512 MiB"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1XB"), None);
    }

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        assert_eq!(derived_uuid("nqn.a", 1), derived_uuid("nqn.a", 1));
        assert_ne!(derived_uuid("nqn.a", 1), derived_uuid("nqn.a", 2));
        assert_ne!(derived_uuid("nqn.a", 1), derived_uuid("nqn.b", 1));
    }
}
