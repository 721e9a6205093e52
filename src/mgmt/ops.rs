//! Management changes as pure functions: (running configuration, change)
//! → new configuration, or an error naming the request field and the fix.
//!
//! A change edits the configuration in its file form ([`RawConfig`]) and
//! is parsed again with the config file's own parser, so a change made
//! through the API meets exactly the checks a config file meets and the
//! two cannot disagree. What only the running target knows (which
//! subsystems have hosts connected, a namespace's current size) comes in
//! as [`Running`]. No I/O here: the control plane applies the result.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;

use crate::config::{BackingSpec, RawConfig, RawNamespace, RawSubsystem, ServeConfig, parse_size};

/// The gRPC status class of an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    /// Well-formed, but refused by the running state.
    FailedPrecondition,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: Code,
    /// The request field, as the API and `strata ctl` name it.
    pub field: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; fix: {}", self.field, self.problem, self.fix)
    }
}

impl std::error::Error for OpError {}

fn err(code: Code, field: &str, problem: String, fix: &str) -> OpError {
    OpError {
        code,
        field: field.to_string(),
        problem,
        fix: fix.to_string(),
    }
}

/// What backs a namespace being added.
#[derive(Clone, Debug, PartialEq)]
pub enum NewBacking {
    Ram {
        size: u64,
    },
    File {
        path: String,
        /// `None`: the file's or device's size.
        size: Option<u64>,
    },
    ObjBacker {
        buckets: Vec<String>,
        size: u64,
        object_size: Option<u64>,
        store_options: BTreeMap<String, String>,
        auto_format: bool,
        writeback_bytes: Option<u64>,
        /// `Some(0)` turns read-ahead off; `None` keeps the default.
        readahead_bytes: Option<u64>,
    },
}

impl NewBacking {
    fn kind(&self) -> &'static str {
        match self {
            Self::Ram { .. } => "ram",
            Self::File { .. } => "file",
            Self::ObjBacker { .. } => "objbacker",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewNamespace {
    /// 0: the lowest free NSID.
    pub nsid: u32,
    pub backing: NewBacking,
    pub block_size: Option<u32>,
    pub ana_group: Option<u32>,
    pub uuid: Option<String>,
}

/// One management change.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    CreateSubsystem {
        nqn: String,
        serial: Option<String>,
        model: Option<String>,
        allow_any_host: bool,
        hosts: Vec<String>,
        /// Listener names; empty: every listener.
        listeners: Vec<String>,
    },
    DeleteSubsystem {
        nqn: String,
        force: bool,
    },
    SetAllowAnyHost {
        nqn: String,
        allow: bool,
    },
    AllowHost {
        nqn: String,
        host: String,
    },
    DenyHost {
        nqn: String,
        host: String,
    },
    AddNamespace {
        nqn: String,
        ns: NewNamespace,
    },
    RemoveNamespace {
        nqn: String,
        nsid: u32,
        force: bool,
    },
    ResizeNamespace {
        nqn: String,
        nsid: u32,
        size: u64,
    },
    AddListener {
        name: String,
        addr: String,
    },
    RemoveListener {
        name: String,
    },
    AttachListener {
        nqn: String,
        listener: String,
    },
    DetachListener {
        nqn: String,
        listener: String,
    },
    SetAnaState {
        listener: String,
        group: u32,
        state: String,
    },
}

impl Op {
    /// The change's name, for logs: never its fields, which can hold
    /// store credentials.
    pub fn name(&self) -> &'static str {
        match self {
            Op::CreateSubsystem { .. } => "create subsystem",
            Op::DeleteSubsystem { .. } => "delete subsystem",
            Op::SetAllowAnyHost { .. } => "set allow-any-host",
            Op::AllowHost { .. } => "allow host",
            Op::DenyHost { .. } => "deny host",
            Op::AddNamespace { .. } => "add namespace",
            Op::RemoveNamespace { .. } => "remove namespace",
            Op::ResizeNamespace { .. } => "resize namespace",
            Op::AddListener { .. } => "add listener",
            Op::RemoveListener { .. } => "remove listener",
            Op::AttachListener { .. } => "attach listener",
            Op::DetachListener { .. } => "detach listener",
            Op::SetAnaState { .. } => "set ANA state",
        }
    }
}

/// What the running target knows that the configuration does not.
#[derive(Default, Debug)]
pub struct Running {
    /// Subsystem NQN → live (non-discovery) controllers.
    pub controllers: HashMap<String, usize>,
    /// (NQN, NSID) → size in bytes of the device serving it.
    pub ns_sizes: HashMap<(String, u32), u64>,
}

/// Applies `op` to `cfg`. On `Err`, `cfg` is what stays in force.
pub fn apply(cfg: &ServeConfig, op: &Op, run: &Running) -> Result<ServeConfig, OpError> {
    let mut raw = cfg.to_raw();
    // Which config-file fields map back to which request fields, for the
    // parser's errors.
    let mut prefix: Option<(String, String)> = None;
    match op {
        Op::CreateSubsystem {
            nqn,
            serial,
            model,
            allow_any_host,
            hosts,
            listeners,
        } => {
            if find(&raw, nqn).is_ok() {
                return Err(err(
                    Code::AlreadyExists,
                    "nqn",
                    format!("subsystem `{nqn}` exists"),
                    "choose another NQN, or delete that subsystem first",
                ));
            }
            for (j, l) in listeners.iter().enumerate() {
                listener_index(&raw, l).map_err(|mut e| {
                    e.field = format!("listeners[{j}]");
                    e
                })?;
            }
            let listeners = if listeners.is_empty() {
                raw.listener.iter().map(|l| l.name.clone()).collect()
            } else {
                listeners.clone()
            };
            prefix = Some((
                format!("subsystem[{}].", raw.subsystem.len()),
                String::new(),
            ));
            raw.subsystem.push(RawSubsystem {
                nqn: nqn.clone(),
                serial: serial.clone().filter(|s| !s.is_empty()),
                model: model.clone().filter(|s| !s.is_empty()),
                allow_any_host: Some(*allow_any_host),
                hosts: hosts.clone(),
                listeners: Some(listeners),
                namespace: Vec::new(),
            });
        }
        Op::DeleteSubsystem { nqn, force } => {
            let i = find(&raw, nqn)?;
            in_use(run, nqn, *force, "deleting the subsystem")?;
            raw.subsystem.remove(i);
        }
        Op::SetAllowAnyHost { nqn, allow } => {
            let i = find(&raw, nqn)?;
            raw.subsystem[i].allow_any_host = Some(*allow);
        }
        Op::AllowHost { nqn, host } => {
            let i = find(&raw, nqn)?;
            let s = &mut raw.subsystem[i];
            if s.hosts.contains(host) {
                return Err(err(
                    Code::AlreadyExists,
                    "host_nqn",
                    format!("`{host}` is already allowed on `{nqn}`"),
                    "nothing to do",
                ));
            }
            // An allow-list only means something without allow-any-host;
            // keep what the operator set, the list applies once it is off.
            s.hosts.push(host.clone());
            prefix = Some((
                format!("subsystem[{i}].hosts[{}]", s.hosts.len() - 1),
                "host_nqn".into(),
            ));
        }
        Op::DenyHost { nqn, host } => {
            let i = find(&raw, nqn)?;
            let s = &mut raw.subsystem[i];
            let Some(k) = s.hosts.iter().position(|h| h == host) else {
                return Err(err(
                    Code::NotFound,
                    "host_nqn",
                    format!("`{host}` is not on the allow-list of `{nqn}`"),
                    "list the allowed hosts with `strata ctl subsystem ls`",
                ));
            };
            s.hosts.remove(k);
        }
        Op::AddNamespace { nqn, ns } => {
            let i = find(&raw, nqn)?;
            let s = &mut raw.subsystem[i];
            let nsid = if ns.nsid == 0 {
                (1..=1024u32)
                    .find(|id| s.namespace.iter().all(|n| n.nsid != *id))
                    .ok_or_else(|| {
                        err(
                            Code::FailedPrecondition,
                            "nsid",
                            format!("`{nqn}` already holds 1024 namespaces"),
                            "remove a namespace first",
                        )
                    })?
            } else {
                ns.nsid
            };
            if s.namespace.iter().any(|n| n.nsid == nsid) {
                return Err(err(
                    Code::AlreadyExists,
                    "nsid",
                    format!("NSID {nsid} exists in `{nqn}`"),
                    "choose another NSID, or 0 for the lowest free one",
                ));
            }
            prefix = Some((
                format!("subsystem[{i}].namespace[{}].", s.namespace.len()),
                format!("{}.", ns.backing.kind()),
            ));
            s.namespace.push(raw_namespace(nsid, ns));
        }
        Op::RemoveNamespace { nqn, nsid, force } => {
            let i = find(&raw, nqn)?;
            let j = find_ns(&raw, i, *nsid)?;
            in_use(run, nqn, *force, "removing the namespace")?;
            raw.subsystem[i].namespace.remove(j);
        }
        Op::ResizeNamespace { nqn, nsid, size } => {
            let i = find(&raw, nqn)?;
            let j = find_ns(&raw, i, *nsid)?;
            let spec = &cfg.subsystems[i].namespaces[j];
            match &spec.backing {
                BackingSpec::Ram { .. } => {
                    return Err(err(
                        Code::FailedPrecondition,
                        "size",
                        "a RAM namespace cannot be resized: a new size is a new, empty device"
                            .into(),
                        "add a new RAM namespace of the size wanted",
                    ));
                }
                BackingSpec::ObjBacker { .. } => {
                    return Err(err(
                        Code::FailedPrecondition,
                        "size",
                        "an objbacker namespace cannot be resized: its size is fixed when its buckets are formatted".into(),
                        "add a new objbacker namespace on new buckets",
                    ));
                }
                BackingSpec::File { .. } => {}
            }
            let now = run
                .ns_sizes
                .get(&(nqn.clone(), *nsid))
                .copied()
                .unwrap_or(0);
            if *size < now {
                return Err(err(
                    Code::FailedPrecondition,
                    "size",
                    format!(
                        "{size} bytes is smaller than the namespace's {now}: shrinking loses the data past the new end"
                    ),
                    "give a size at least as large as the current one",
                ));
            }
            raw.subsystem[i].namespace[j].size = Some(size.to_string());
            prefix = Some((format!("subsystem[{i}].namespace[{j}]."), String::new()));
        }
        Op::AddListener { name, addr } => {
            if raw.listener.iter().any(|l| &l.name == name) {
                return Err(err(
                    Code::AlreadyExists,
                    "name",
                    format!("listener `{name}` exists"),
                    "choose another name",
                ));
            }
            if name.is_empty() {
                return Err(err(
                    Code::InvalidArgument,
                    "name",
                    "a listener needs a name".into(),
                    "name it, e.g. `tcp1`",
                ));
            }
            let a: SocketAddr = addr.parse().map_err(|e| {
                err(
                    Code::InvalidArgument,
                    "addr",
                    format!("`{addr}` is not an address: {e}"),
                    "use IP:PORT, e.g. 127.0.0.1:4420",
                )
            })?;
            if let Some(l) = cfg.listeners.iter().find(|l| l.addr == a && a.port() != 0) {
                return Err(err(
                    Code::AlreadyExists,
                    "addr",
                    format!("{a} is listener `{}`", l.name),
                    "choose another address",
                ));
            }
            prefix = Some((format!("listener[{}].", raw.listener.len()), String::new()));
            raw.listener.push(crate::config::RawListener {
                name: name.clone(),
                addr: addr.clone(),
                ana: BTreeMap::new(),
            });
        }
        Op::RemoveListener { name } => {
            let k = listener_index(&raw, name)?;
            raw.listener.remove(k);
            for s in &mut raw.subsystem {
                if let Some(ls) = &mut s.listeners {
                    ls.retain(|l| l != name);
                }
            }
        }
        Op::AttachListener { nqn, listener } => {
            let i = find(&raw, nqn)?;
            listener_index(&raw, listener)?;
            let ls = raw.subsystem[i].listeners.get_or_insert_with(Vec::new);
            if ls.contains(listener) {
                return Err(err(
                    Code::AlreadyExists,
                    "listener",
                    format!("`{nqn}` is already exported on `{listener}`"),
                    "nothing to do",
                ));
            }
            ls.push(listener.clone());
        }
        Op::DetachListener { nqn, listener } => {
            let i = find(&raw, nqn)?;
            listener_index(&raw, listener)?;
            let ls = raw.subsystem[i].listeners.get_or_insert_with(Vec::new);
            let Some(k) = ls.iter().position(|l| l == listener) else {
                return Err(err(
                    Code::NotFound,
                    "listener",
                    format!("`{nqn}` is not exported on `{listener}`"),
                    "list its listeners with `strata ctl subsystem ls`",
                ));
            };
            ls.remove(k);
        }
        Op::SetAnaState {
            listener,
            group,
            state,
        } => {
            let k = listener_index(&raw, listener)?;
            if *group == 0 || *group > 128 {
                return Err(err(
                    Code::InvalidArgument,
                    "group",
                    format!("{group} is outside 1..=128"),
                    "use an ANA group from 1 to 128",
                ));
            }
            if strata_target::subsystem::AnaState::parse(state).is_none() {
                return Err(err(
                    Code::InvalidArgument,
                    "state",
                    format!("`{state}` is not an ANA state"),
                    "use one of optimized, non-optimized, inaccessible, persistent-loss, change",
                ));
            }
            raw.listener[k].ana.insert(group.to_string(), state.clone());
        }
    }
    reparse(&raw, cfg, prefix)
}

fn reparse(
    raw: &RawConfig,
    old: &ServeConfig,
    prefix: Option<(String, String)>,
) -> Result<ServeConfig, OpError> {
    let mut new = ServeConfig::from_raw(raw, &old.source).map_err(|e| {
        let field = match &prefix {
            Some((p, to)) => match e.field.strip_prefix(p.as_str()) {
                Some(rest) => request_field(rest, to),
                None if e.field == p.trim_end_matches('.') => to.trim_end_matches('.').to_string(),
                None => e.field.clone(),
            },
            None => e.field.clone(),
        };
        OpError {
            code: Code::InvalidArgument,
            field,
            problem: e.problem,
            fix: e.fix,
        }
    })?;
    new.source = old.source.clone();
    Ok(new)
}

/// A namespace's config field (`size`, `buckets[1]`) as the request names
/// it: backing fields under the backing (`file.size`), the rest as is.
fn request_field(rest: &str, backing: &str) -> String {
    let top = [
        "nsid",
        "block_size",
        "ana_group",
        "uuid",
        "nqn",
        "serial",
        "model",
        "hosts",
        "listeners",
        "name",
        "addr",
    ];
    let head = rest.split(['.', '[']).next().unwrap_or(rest);
    if top.contains(&head) || backing.is_empty() {
        rest.to_string()
    } else {
        format!("{backing}{rest}")
    }
}

fn find(raw: &RawConfig, nqn: &str) -> Result<usize, OpError> {
    raw.subsystem
        .iter()
        .position(|s| s.nqn == nqn)
        .ok_or_else(|| {
            err(
                Code::NotFound,
                "nqn",
                format!("no subsystem `{nqn}`"),
                "list them with `strata ctl subsystem ls`",
            )
        })
}

fn find_ns(raw: &RawConfig, i: usize, nsid: u32) -> Result<usize, OpError> {
    raw.subsystem[i]
        .namespace
        .iter()
        .position(|n| n.nsid == nsid)
        .ok_or_else(|| {
            err(
                Code::NotFound,
                "nsid",
                format!("no namespace {nsid} in `{}`", raw.subsystem[i].nqn),
                "list them with `strata ctl ns ls`",
            )
        })
}

fn listener_index(raw: &RawConfig, name: &str) -> Result<usize, OpError> {
    raw.listener
        .iter()
        .position(|l| l.name == name)
        .ok_or_else(|| {
            err(
                Code::NotFound,
                "listener",
                format!("no listener `{name}`"),
                "list them with `strata ctl listener ls`",
            )
        })
}

fn in_use(run: &Running, nqn: &str, force: bool, what: &str) -> Result<(), OpError> {
    match run.controllers.get(nqn).copied().unwrap_or(0) {
        0 => Ok(()),
        _ if force => Ok(()),
        n => Err(err(
            Code::FailedPrecondition,
            "nqn",
            format!("{n} host controller(s) are connected to `{nqn}`; {what} would fail their I/O"),
            "disconnect them first (`strata ctl ctrl disconnect`), or pass --force",
        )),
    }
}

fn raw_namespace(nsid: u32, ns: &NewNamespace) -> RawNamespace {
    let mut r = RawNamespace::new(nsid, ns.backing.kind());
    r.block_size = ns.block_size;
    r.ana_group = ns.ana_group;
    r.uuid = ns.uuid.clone();
    match &ns.backing {
        NewBacking::Ram { size } => r.size = Some(size.to_string()),
        NewBacking::File { path, size } => {
            r.path = Some(path.clone());
            r.size = size.map(|s| s.to_string());
        }
        NewBacking::ObjBacker {
            buckets,
            size,
            object_size,
            store_options,
            auto_format,
            writeback_bytes,
            readahead_bytes,
        } => {
            r.size = Some(size.to_string());
            r.buckets = Some(buckets.clone());
            r.object_size = object_size.map(|o| o.to_string());
            r.store_options = store_options.clone();
            r.auto_format = Some(*auto_format);
            r.writeback = writeback_bytes.map(|w| w.to_string());
            r.readahead = readahead_bytes.map(|w| w.to_string());
        }
    }
    r
}

/// "1GiB", "4096" → bytes, for `strata ctl` arguments.
pub fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("`{s}` is not a size; write it like 1GiB, 512MiB or 4096"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NQN: &str = "nqn.2026-12.dev.strata:t";

    fn base() -> ServeConfig {
        ServeConfig::parse(
            r#"
[[listener]]
name = "l1"
addr = "127.0.0.1:4420"

[[subsystem]]
nqn = "nqn.2026-12.dev.strata:t"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "1MiB"
"#,
            "state.toml",
        )
        .unwrap()
    }

    fn ram(nsid: u32, size: u64) -> Op {
        Op::AddNamespace {
            nqn: NQN.into(),
            ns: NewNamespace {
                nsid,
                backing: NewBacking::Ram { size },
                block_size: None,
                ana_group: None,
                uuid: None,
            },
        }
    }

    #[test]
    fn add_namespace_takes_the_lowest_free_nsid_and_keeps_the_rest() {
        let c = base();
        let n = apply(&c, &ram(0, 1 << 20), &Running::default()).unwrap();
        let s = &n.subsystems[0];
        assert_eq!(
            s.namespaces.iter().map(|n| n.nsid).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(s.namespaces[0], c.subsystems[0].namespaces[0]);
        assert_eq!(n.source, "state.toml");
    }

    #[test]
    fn duplicate_nsid_is_already_exists_and_changes_nothing() {
        let c = base();
        let e = apply(&c, &ram(1, 1 << 20), &Running::default()).unwrap_err();
        assert_eq!((e.code, e.field.as_str()), (Code::AlreadyExists, "nsid"));
    }

    #[test]
    fn parser_errors_name_the_request_field() {
        let c = base();
        let e = apply(&c, &ram(3, 1000), &Running::default()).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert_eq!(e.field, "ram.size", "{e}");
        assert!(e.fix.contains("block_size"), "{e}");
        let e = apply(
            &c,
            &Op::AddNamespace {
                nqn: NQN.into(),
                ns: NewNamespace {
                    nsid: 4,
                    backing: NewBacking::ObjBacker {
                        buckets: vec!["ftp://x".into()],
                        size: 1 << 30,
                        object_size: None,
                        store_options: BTreeMap::new(),
                        auto_format: true,
                        writeback_bytes: None,
                        readahead_bytes: None,
                    },
                    block_size: Some(512),
                    ana_group: Some(200),
                    uuid: None,
                },
            },
            &Running::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "objbacker.buckets[0]", "{e}");
    }

    #[test]
    fn invalid_nqns_are_refused_with_the_field() {
        let c = base();
        let op = Op::CreateSubsystem {
            nqn: "not-an-nqn".into(),
            serial: None,
            model: None,
            allow_any_host: true,
            hosts: vec![],
            listeners: vec![],
        };
        let e = apply(&c, &op, &Running::default()).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_str()),
            (Code::InvalidArgument, "nqn"),
            "{e}"
        );
        let e = apply(
            &c,
            &Op::AllowHost {
                nqn: NQN.into(),
                host: "bad host".into(),
            },
            &Running::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "host_nqn", "{e}");
    }

    #[test]
    fn unknown_listener_and_subsystem_are_not_found() {
        let c = base();
        for op in [
            Op::AttachListener {
                nqn: NQN.into(),
                listener: "nope".into(),
            },
            Op::RemoveListener {
                name: "nope".into(),
            },
            Op::DeleteSubsystem {
                nqn: "nqn.2026-12.x:none".into(),
                force: false,
            },
        ] {
            let e = apply(&c, &op, &Running::default()).unwrap_err();
            assert_eq!(e.code, Code::NotFound, "{op:?}: {e}");
        }
    }

    #[test]
    fn removing_what_hosts_use_needs_force() {
        let c = base();
        let run = Running {
            controllers: [(NQN.to_string(), 2)].into(),
            ..Default::default()
        };
        let op = |force| Op::RemoveNamespace {
            nqn: NQN.into(),
            nsid: 1,
            force,
        };
        let e = apply(&c, &op(false), &run).unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition);
        assert!(e.problem.contains("2 host"), "{e}");
        let n = apply(&c, &op(true), &run).unwrap();
        assert!(n.subsystems[0].namespaces.is_empty());
    }

    #[test]
    fn new_subsystem_is_exported_on_every_listener_and_listeners_detach() {
        let c = base();
        let n = apply(
            &c,
            &Op::AddListener {
                name: "l2".into(),
                addr: "127.0.0.1:4421".into(),
            },
            &Running::default(),
        )
        .unwrap();
        let n = apply(
            &n,
            &Op::CreateSubsystem {
                nqn: "nqn.2026-12.dev.strata:u".into(),
                serial: None,
                model: None,
                allow_any_host: false,
                hosts: vec!["nqn.2014-08.org.nvmexpress:uuid:h".into()],
                listeners: vec![],
            },
            &Running::default(),
        )
        .unwrap();
        assert_eq!(n.subsystems[1].listeners, [0, 1]);
        let n = apply(
            &n,
            &Op::RemoveListener { name: "l1".into() },
            &Running::default(),
        )
        .unwrap();
        assert_eq!(n.listeners.len(), 1);
        assert_eq!(n.subsystems[1].listeners, [0]);
        assert_eq!(n.listeners[0].name, "l2");
    }

    #[test]
    fn resize_only_grows_files() {
        let mut c = base();
        c = apply(
            &c,
            &Op::AddNamespace {
                nqn: NQN.into(),
                ns: NewNamespace {
                    nsid: 2,
                    backing: NewBacking::File {
                        path: "/tmp/x.img".into(),
                        size: Some(1 << 20),
                    },
                    block_size: None,
                    ana_group: None,
                    uuid: None,
                },
            },
            &Running::default(),
        )
        .unwrap();
        let run = Running {
            ns_sizes: [((NQN.to_string(), 2), 1 << 20)].into(),
            ..Default::default()
        };
        let rs = |nsid, size| Op::ResizeNamespace {
            nqn: NQN.into(),
            nsid,
            size,
        };
        let e = apply(&c, &rs(1, 2 << 20), &run).unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition, "RAM: {e}");
        let e = apply(&c, &rs(2, 512 << 10), &run).unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition, "shrink: {e}");
        let n = apply(&c, &rs(2, 4 << 20), &run).unwrap();
        assert_eq!(
            n.subsystems[0].namespaces[1].backing,
            BackingSpec::File {
                path: "/tmp/x.img".into(),
                size: Some(4 << 20)
            }
        );
    }

    #[test]
    fn ana_state_is_validated_and_set() {
        let c = base();
        let set = |state: &str, group| Op::SetAnaState {
            listener: "l1".into(),
            group,
            state: state.into(),
        };
        assert_eq!(
            apply(&c, &set("sleepy", 1), &Running::default())
                .unwrap_err()
                .field,
            "state"
        );
        assert_eq!(
            apply(&c, &set("inaccessible", 0), &Running::default())
                .unwrap_err()
                .field,
            "group"
        );
        let n = apply(&c, &set("inaccessible", 1), &Running::default()).unwrap();
        assert_eq!(
            n.listeners[0].ana.get(&1),
            Some(&strata_target::subsystem::AnaState::Inaccessible)
        );
    }
}
