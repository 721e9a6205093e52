//! The `Management` gRPC service. Mutations become one
//! [`Op`] each, sent to the control plane and answered once applied and
//! persisted; reads are served from the last published view, so a slow
//! reload (an objbacker attach) never blocks `ls` or `status`.

use std::time::Instant;

use strata_proto::mgmt::v1 as pb;
use strata_proto::mgmt::v1::management_server::Management;
use tonic::{Request, Response, Status};

use super::convert::{self, find_subsystem, status_of};
use super::ops::Op;
use crate::cluster::Cluster;
use crate::control::{ChangeError, Changed, ControlHandle, View};

pub struct Service {
    ctl: ControlHandle,
    started: Instant,
    reactors: usize,
    cluster: Option<Cluster>,
}

impl Service {
    pub fn new(ctl: ControlHandle, reactors: usize) -> Self {
        Self {
            ctl,
            started: Instant::now(),
            reactors,
            cluster: None,
        }
    }

    /// Answers `cluster` calls from this node's cluster driver (and, on a
    /// witness, refuses namespace changes).
    pub fn with_cluster(mut self, cluster: Option<Cluster>) -> Self {
        self.cluster = cluster;
        self
    }

    fn cluster(&self) -> Result<&Cluster, Status> {
        self.cluster.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this strata serve is not in cluster mode; fix: restart it with --cluster-addr IP:PORT --cluster-token-file FILE",
            )
        })
    }

    /// This node's NVMe/TCP listeners, for its entry in the cluster state.
    fn listener_addrs(&self) -> Vec<String> {
        self.ctl
            .view()
            .cfg
            .listeners
            .iter()
            .map(|l| l.addr.to_string())
            .collect()
    }

    async fn change(&self, op: Op) -> Result<std::sync::Arc<View>, Status> {
        self.change_full(op).await.map(|c| c.view)
    }

    async fn change_full(&self, op: Op) -> Result<Changed, Status> {
        if self.cluster.as_ref().is_some_and(Cluster::witness)
            && matches!(op, Op::AddNamespace { .. } | Op::ResizeNamespace { .. })
        {
            return Err(Status::failed_precondition(
                "this node is a witness (strata serve --witness): it stores no data and serves no namespaces; fix: add the namespace on a storage node",
            ));
        }
        tracing::info!(change = op.name(), "management change");
        self.ctl.change(op).await.map_err(|e| match e {
            ChangeError::Invalid(e) => status_of(&e),
            ChangeError::Apply(e) => Status::failed_precondition(format!("{e:#}")),
            ChangeError::Stopped => Status::unavailable("the target is stopping"),
        })
    }

    async fn subsystem_after(&self, op: Op, nqn: &str) -> Result<Response<pb::Subsystem>, Status> {
        let v = self.change(op).await?;
        let s = find_subsystem(&v.cfg, nqn)?;
        Ok(Response::new(convert::subsystem(&v, s)))
    }

    fn listener_reply(v: &View, name: &str) -> Result<Response<pb::Listener>, Status> {
        let i = v
            .cfg
            .listeners
            .iter()
            .position(|l| l.name == name)
            .ok_or_else(|| Status::not_found(format!("listener: no listener `{name}`")))?;
        Ok(Response::new(convert::listener(v, i)))
    }
}

type R<T> = Result<Response<T>, Status>;

fn required(v: &str, field: &str, example: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field}: missing; fix: give it, e.g. {example}"
        )));
    }
    Ok(())
}

const NQN_EXAMPLE: &str = "nqn.2026-12.com.example:vol1";

#[tonic::async_trait]
impl Management for Service {
    async fn status(&self, _: Request<pb::StatusRequest>) -> R<pb::StatusReply> {
        let v = self.ctl.view();
        let target = self.ctl.target();
        let controllers = target
            .controllers()
            .iter()
            .filter(|c| !c.is_discovery() && !c.is_destroyed())
            .count();
        Ok(Response::new(pb::StatusReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            reactors: self.reactors as u32,
            subsystems: v.cfg.subsystems.len() as u32,
            namespaces: v
                .cfg
                .subsystems
                .iter()
                .map(|s| s.namespaces.len())
                .sum::<usize>() as u32,
            controllers: controllers as u32,
            state_file: v
                .state_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            counters: namespace_counters(),
        }))
    }

    async fn list_subsystems(
        &self,
        _: Request<pb::ListSubsystemsRequest>,
    ) -> R<pb::ListSubsystemsReply> {
        let v = self.ctl.view();
        Ok(Response::new(pb::ListSubsystemsReply {
            subsystems: v
                .cfg
                .subsystems
                .iter()
                .map(|s| convert::subsystem(&v, s))
                .collect(),
        }))
    }

    async fn get_subsystem(&self, r: Request<pb::GetSubsystemRequest>) -> R<pb::Subsystem> {
        let v = self.ctl.view();
        let s = find_subsystem(&v.cfg, &r.get_ref().nqn)?;
        Ok(Response::new(convert::subsystem(&v, s)))
    }

    async fn create_subsystem(&self, r: Request<pb::CreateSubsystemRequest>) -> R<pb::Subsystem> {
        let r = r.into_inner();
        required(&r.nqn, "nqn", NQN_EXAMPLE)?;
        let nqn = r.nqn.clone();
        let op = Op::CreateSubsystem {
            nqn: r.nqn,
            serial: Some(r.serial).filter(|s| !s.is_empty()),
            model: Some(r.model).filter(|s| !s.is_empty()),
            allow_any_host: r.allow_any_host,
            hosts: r.hosts,
            listeners: r.listeners,
        };
        self.subsystem_after(op, &nqn).await
    }

    async fn delete_subsystem(&self, r: Request<pb::DeleteSubsystemRequest>) -> R<pb::Empty> {
        let r = r.into_inner();
        self.change(Op::DeleteSubsystem {
            nqn: r.nqn,
            force: r.force,
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn set_allow_any_host(&self, r: Request<pb::SetAllowAnyHostRequest>) -> R<pb::Subsystem> {
        let r = r.into_inner();
        let nqn = r.nqn.clone();
        self.subsystem_after(
            Op::SetAllowAnyHost {
                nqn: r.nqn,
                allow: r.allow_any_host,
            },
            &nqn,
        )
        .await
    }

    async fn allow_host(&self, r: Request<pb::HostRequest>) -> R<pb::Subsystem> {
        let r = r.into_inner();
        required(&r.host_nqn, "host_nqn", "the host's /etc/nvme/hostnqn")?;
        let nqn = r.nqn.clone();
        self.subsystem_after(
            Op::AllowHost {
                nqn: r.nqn,
                host: r.host_nqn,
            },
            &nqn,
        )
        .await
    }

    async fn deny_host(&self, r: Request<pb::HostRequest>) -> R<pb::Subsystem> {
        let r = r.into_inner();
        let nqn = r.nqn.clone();
        self.subsystem_after(
            Op::DenyHost {
                nqn: r.nqn,
                host: r.host_nqn,
            },
            &nqn,
        )
        .await
    }

    async fn add_namespace(&self, r: Request<pb::AddNamespaceRequest>) -> R<pb::Namespace> {
        let r = r.into_inner();
        let ns = convert::new_namespace(&r)?;
        let c = self
            .change_full(Op::AddNamespace {
                nqn: r.nqn.clone(),
                ns,
            })
            .await?;
        let v = c.view;
        let n = find_subsystem(&v.cfg, &r.nqn)?
            .namespaces
            .iter()
            .find(|n| Some(n.nsid) == c.added_nsid)
            .ok_or_else(|| Status::internal("the namespace added is not in the new state"))?;
        Ok(Response::new(convert::namespace(&v, &r.nqn, n)))
    }

    async fn remove_namespace(&self, r: Request<pb::RemoveNamespaceRequest>) -> R<pb::Empty> {
        let r = r.into_inner();
        self.change(Op::RemoveNamespace {
            nqn: r.nqn,
            nsid: r.nsid,
            force: r.force,
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn resize_namespace(&self, r: Request<pb::ResizeNamespaceRequest>) -> R<pb::Namespace> {
        let r = r.into_inner();
        let v = self
            .change(Op::ResizeNamespace {
                nqn: r.nqn.clone(),
                nsid: r.nsid,
                size: r.size,
            })
            .await?;
        let s = find_subsystem(&v.cfg, &r.nqn)?;
        let n = s
            .namespaces
            .iter()
            .find(|n| n.nsid == r.nsid)
            .ok_or_else(|| Status::internal("the namespace resized is not in the new state"))?;
        Ok(Response::new(convert::namespace(&v, &r.nqn, n)))
    }

    async fn list_namespaces(
        &self,
        r: Request<pb::ListNamespacesRequest>,
    ) -> R<pb::ListNamespacesReply> {
        let v = self.ctl.view();
        let nqn = &r.get_ref().nqn;
        if !nqn.is_empty() {
            find_subsystem(&v.cfg, nqn)?;
        }
        Ok(Response::new(pb::ListNamespacesReply {
            namespaces: v
                .cfg
                .subsystems
                .iter()
                .filter(|s| nqn.is_empty() || &s.nqn == nqn)
                .flat_map(|s| {
                    s.namespaces
                        .iter()
                        .map(|n| convert::namespace(&v, &s.nqn, n))
                })
                .collect(),
        }))
    }

    async fn add_listener(&self, r: Request<pb::AddListenerRequest>) -> R<pb::Listener> {
        let r = r.into_inner();
        required(&r.addr, "addr", "127.0.0.1:4420")?;
        let v = self
            .change(Op::AddListener {
                name: r.name.clone(),
                addr: r.addr,
            })
            .await?;
        Self::listener_reply(&v, &r.name)
    }

    async fn remove_listener(&self, r: Request<pb::RemoveListenerRequest>) -> R<pb::Empty> {
        self.change(Op::RemoveListener {
            name: r.into_inner().name,
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_listeners(
        &self,
        _: Request<pb::ListListenersRequest>,
    ) -> R<pb::ListListenersReply> {
        let v = self.ctl.view();
        Ok(Response::new(pb::ListListenersReply {
            listeners: (0..v.cfg.listeners.len())
                .map(|i| convert::listener(&v, i))
                .collect(),
        }))
    }

    async fn attach_listener(&self, r: Request<pb::AttachListenerRequest>) -> R<pb::Subsystem> {
        let r = r.into_inner();
        let nqn = r.nqn.clone();
        self.subsystem_after(
            Op::AttachListener {
                nqn: r.nqn,
                listener: r.listener,
            },
            &nqn,
        )
        .await
    }

    async fn detach_listener(&self, r: Request<pb::AttachListenerRequest>) -> R<pb::Subsystem> {
        let r = r.into_inner();
        let nqn = r.nqn.clone();
        self.subsystem_after(
            Op::DetachListener {
                nqn: r.nqn,
                listener: r.listener,
            },
            &nqn,
        )
        .await
    }

    async fn set_ana_state(&self, r: Request<pb::SetAnaStateRequest>) -> R<pb::Listener> {
        let r = r.into_inner();
        let state = pb::AnaState::try_from(r.state)
            .ok()
            .and_then(convert::ana_name)
            .ok_or_else(|| {
                Status::invalid_argument(
                    "state: missing or unknown; fix: use optimized, non-optimized, inaccessible, persistent-loss or change",
                )
            })?;
        let v = self
            .change(Op::SetAnaState {
                listener: r.listener.clone(),
                group: r.group,
                state: state.to_string(),
            })
            .await?;
        Self::listener_reply(&v, &r.listener)
    }

    async fn list_controllers(
        &self,
        r: Request<pb::ListControllersRequest>,
    ) -> R<pb::ListControllersReply> {
        let v = self.ctl.view();
        let nqn = &r.get_ref().nqn;
        let by_port: std::collections::HashMap<u16, &str> =
            v.port_ids.iter().map(|(n, id)| (*id, n.as_str())).collect();
        let mut controllers: Vec<pb::Controller> = self
            .ctl
            .target()
            .controllers()
            .iter()
            .filter(|c| !c.is_discovery() && !c.is_destroyed())
            .filter(|c| nqn.is_empty() || c.subnqn() == nqn)
            .map(|c| pb::Controller {
                nqn: c.subnqn().to_string(),
                cntlid: u32::from(c.cntlid()),
                host_nqn: c.hostnqn().to_string(),
                host_addr: c.host_addr().map(|a| a.to_string()).unwrap_or_default(),
                listener: by_port.get(&c.port_id()).copied().unwrap_or("").to_string(),
                io_queues: c.io_queues() as u32,
                kato_ms: c.kato_ms(),
            })
            .collect();
        controllers.sort_by(|a, b| (&a.nqn, a.cntlid).cmp(&(&b.nqn, b.cntlid)));
        Ok(Response::new(pb::ListControllersReply { controllers }))
    }

    async fn disconnect_controller(
        &self,
        r: Request<pb::DisconnectControllerRequest>,
    ) -> R<pb::Empty> {
        let r = r.into_inner();
        let c = self
            .ctl
            .target()
            .controllers()
            .into_iter()
            .find(|c| c.subnqn() == r.nqn && u32::from(c.cntlid()) == r.cntlid && !c.is_discovery())
            .ok_or_else(|| {
                Status::not_found(format!(
                    "cntlid: no controller {} on `{}`; fix: list them with `strata ctl ctrl ls`",
                    r.cntlid, r.nqn
                ))
            })?;
        tracing::info!(
            cntlid = c.cntlid(),
            subnqn = c.subnqn(),
            hostnqn = c.hostnqn(),
            "management: disconnecting controller"
        );
        c.destroy();
        Ok(Response::new(pb::Empty {}))
    }

    async fn cluster_init(&self, r: Request<pb::ClusterInitRequest>) -> R<pb::ClusterStatusReply> {
        let c = self.cluster()?;
        let s = c.init(r.into_inner().name, self.listener_addrs()).await?;
        Ok(Response::new(c.status_reply(&s)))
    }

    async fn cluster_join(&self, r: Request<pb::ClusterJoinRequest>) -> R<pb::ClusterStatusReply> {
        let c = self.cluster()?;
        let r = r.into_inner();
        let s = c.join(r.member_addr, r.name, self.listener_addrs()).await?;
        Ok(Response::new(c.status_reply(&s)))
    }

    async fn cluster_leave(&self, _: Request<pb::ClusterLeaveRequest>) -> R<pb::Empty> {
        self.cluster()?.leave().await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> R<pb::ClusterStatusReply> {
        let c = self.cluster()?;
        let s = c.snapshot();
        if s.id == 0 {
            return Err(Status::failed_precondition(match &s.fatal {
                Some(e) => format!("the cluster driver stopped: {e}; fix: restart strata serve"),
                None => crate::cluster::driver::not_member(),
            }));
        }
        Ok(Response::new(c.status_reply(&s)))
    }

    async fn save_config(&self, _: Request<pb::SaveConfigRequest>) -> R<pb::SaveConfigReply> {
        let mut cfg = self.ctl.view().cfg.clone();
        let mut redacted = 0;
        for s in &mut cfg.subsystems {
            for n in &mut s.namespaces {
                if let crate::config::BackingSpec::ObjBacker { store_options, .. } = &mut n.backing
                {
                    for (k, v) in store_options.iter_mut() {
                        if is_secret_key(k) {
                            *v = "(redacted)".into();
                            redacted += 1;
                        }
                    }
                }
            }
        }
        let mut toml = cfg.to_toml();
        if redacted > 0 {
            toml = format!(
                "# {redacted} secret store option(s) are shown as \"(redacted)\": put the real values back (or use the environment) before loading this file.\n{toml}"
            );
        }
        Ok(Response::new(pb::SaveConfigReply { toml }))
    }
}

/// Store options that hold credentials (`secret_access_key`, `token`,
/// `service_account_key`, `access_key`, `sas`, …): never sent back.
pub fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    ["secret", "key", "token", "password", "sas", "credential"]
        .iter()
        .any(|w| k.contains(w))
}

/// Per-namespace totals from the per-queue counters (summed here, off the
/// I/O path: the same snapshot a Prometheus scrape takes).
fn namespace_counters() -> Vec<pb::NamespaceCounters> {
    use strata_target::stats::{IoKind, registry};
    registry()
        .snapshot()
        .namespaces
        .iter()
        .map(|((nqn, nsid), s)| pb::NamespaceCounters {
            nqn: nqn.clone(),
            nsid: *nsid,
            reads: s.op(IoKind::Read).commands,
            writes: s.op(IoKind::Write).commands,
            read_bytes: s.op(IoKind::Read).bytes,
            write_bytes: s.op(IoKind::Write).bytes,
            flushes: s.op(IoKind::Flush).commands,
            errors: IoKind::ALL.iter().map(|k| s.op(*k).errors).sum(),
        })
        .collect()
}
