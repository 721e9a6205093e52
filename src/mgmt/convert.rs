//! Between the wire messages (`strata_proto::mgmt::v1`) and the model
//! (`ServeConfig`, [`Op`]).

use std::collections::BTreeMap;

use strata_proto::mgmt::v1 as pb;
use strata_target::subsystem::AnaState;
use tonic::Status;

use super::ops::{Code, NewBacking, NewNamespace, OpError};
use crate::config::{BackingSpec, NamespaceSpec, ServeConfig, SubsystemSpec, format_uuid};
use crate::control::View;

pub fn status_of(e: &OpError) -> Status {
    let msg = e.to_string();
    match e.code {
        Code::InvalidArgument => Status::invalid_argument(msg),
        Code::NotFound => Status::not_found(msg),
        Code::AlreadyExists => Status::already_exists(msg),
        Code::FailedPrecondition => Status::failed_precondition(msg),
    }
}

pub fn ana_name(s: pb::AnaState) -> Option<&'static str> {
    Some(match s {
        pb::AnaState::Unspecified => return None,
        pb::AnaState::Optimized => "optimized",
        pb::AnaState::NonOptimized => "non-optimized",
        pb::AnaState::Inaccessible => "inaccessible",
        pb::AnaState::PersistentLoss => "persistent-loss",
        pb::AnaState::Change => "change",
    })
}

pub fn ana_pb(s: AnaState) -> pb::AnaState {
    match s {
        AnaState::Optimized => pb::AnaState::Optimized,
        AnaState::NonOptimized => pb::AnaState::NonOptimized,
        AnaState::Inaccessible => pb::AnaState::Inaccessible,
        AnaState::PersistentLoss => pb::AnaState::PersistentLoss,
        AnaState::Change => pb::AnaState::Change,
    }
}

pub fn ana_from_name(s: &str) -> Option<pb::AnaState> {
    AnaState::parse(s).map(ana_pb)
}

fn nonzero<T: PartialEq + Default>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

pub fn new_namespace(r: &pb::AddNamespaceRequest) -> Result<NewNamespace, Status> {
    use pb::add_namespace_request::Backing;
    let backing = match &r.backing {
        None => {
            return Err(Status::invalid_argument(
                "backing: a namespace needs one; fix: give ram, file or objbacker",
            ));
        }
        Some(Backing::Ram(b)) => NewBacking::Ram { size: b.size },
        Some(Backing::File(b)) => NewBacking::File {
            path: b.path.clone(),
            size: nonzero(b.size),
        },
        Some(Backing::Objbacker(b)) => NewBacking::ObjBacker {
            buckets: b.buckets.clone(),
            size: b.size,
            object_size: nonzero(b.object_size),
            store_options: b
                .store_options
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            auto_format: b.auto_format,
            writeback_bytes: nonzero(b.writeback_bytes),
            readahead_bytes: b.readahead_bytes,
        },
    };
    Ok(NewNamespace {
        nsid: r.nsid,
        backing,
        block_size: nonzero(r.block_size),
        ana_group: nonzero(r.ana_group),
        uuid: nonempty(&r.uuid),
    })
}

pub fn namespace(v: &View, nqn: &str, n: &NamespaceSpec) -> pb::Namespace {
    use pb::namespace::Backing;
    let size_bytes = v.ns_sizes.get(&(nqn.to_string(), n.nsid)).copied();
    let backing = match &n.backing {
        BackingSpec::Ram { size } => Backing::Ram(pb::RamBacking { size: *size }),
        BackingSpec::File { path, size } => Backing::File(pb::FileBacking {
            path: path.display().to_string(),
            size: size.unwrap_or(0),
        }),
        BackingSpec::ObjBacker {
            buckets,
            size,
            object_size,
            store_options,
            auto_format,
            writeback_bytes,
            readahead_bytes,
            ..
        } => Backing::Objbacker(pb::ObjBackerBacking {
            buckets: buckets.clone(),
            size: *size,
            object_size: *object_size,
            // Credentials are never returned.
            store_options: store_options
                .iter()
                .map(|(k, v)| {
                    let v = if super::server::is_secret_key(k) {
                        "(redacted)"
                    } else {
                        v
                    };
                    (k.clone(), v.to_string())
                })
                .collect(),
            auto_format: *auto_format,
            writeback_bytes: writeback_bytes.unwrap_or(0),
            readahead_bytes: *readahead_bytes,
        }),
    };
    let configured = match &n.backing {
        BackingSpec::Ram { size } | BackingSpec::ObjBacker { size, .. } => Some(*size),
        BackingSpec::File { size, .. } => *size,
    };
    pb::Namespace {
        nqn: nqn.to_string(),
        nsid: n.nsid,
        backing: Some(backing),
        size_bytes: size_bytes.or(configured).unwrap_or(0),
        block_size: n.block_size,
        ana_group: n.ana_group,
        uuid: format_uuid(&n.uuid),
    }
}

pub fn subsystem(v: &View, s: &SubsystemSpec) -> pb::Subsystem {
    pb::Subsystem {
        nqn: s.nqn.clone(),
        serial: s.serial.clone(),
        model: s.model.clone(),
        allow_any_host: s.allow_any_host,
        hosts: s.hosts.clone(),
        listeners: s
            .listeners
            .iter()
            .map(|&i| v.cfg.listeners[i].name.clone())
            .collect(),
        namespaces: s
            .namespaces
            .iter()
            .map(|n| namespace(v, &s.nqn, n))
            .collect(),
    }
}

pub fn listener(v: &View, i: usize) -> pb::Listener {
    let l = &v.cfg.listeners[i];
    pb::Listener {
        name: l.name.clone(),
        addr: l.addr.to_string(),
        bound_addr: v
            .bound_addr(&l.name)
            .map(|a| a.to_string())
            .unwrap_or_default(),
        ana: l
            .ana
            .iter()
            .map(|(g, st)| pb::AnaGroupState {
                group: *g,
                state: ana_pb(*st) as i32,
            })
            .collect(),
        subsystems: v
            .cfg
            .subsystems
            .iter()
            .filter(|s| s.listeners.contains(&i))
            .map(|s| s.nqn.clone())
            .collect(),
    }
}

pub fn find_subsystem<'a>(cfg: &'a ServeConfig, nqn: &str) -> Result<&'a SubsystemSpec, Status> {
    cfg.subsystems.iter().find(|s| s.nqn == nqn).ok_or_else(|| {
        Status::not_found(format!(
            "nqn: no subsystem `{nqn}`; fix: list them with `strata ctl subsystem ls`"
        ))
    })
}
