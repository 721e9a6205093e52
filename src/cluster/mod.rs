//! The production side of the cluster (`strata serve --cluster-addr`):
//! the [`driver`] that owns `strata-cluster`'s sans-IO `Node` in its Ready
//! loop, the Raft [`transport`] between members, and membership changes
//! as the management API asks for them (`strata ctl cluster …`).
//!
//! Threads: the driver, the sender tasks and the cluster port's server run
//! on one thread of their own ("cluster"), so the driver's fsyncs never
//! stall the management API or the control plane. The rest of the process
//! talks to it through [`Cluster`]: a bounded command channel in, and a
//! `watch` of the applied state ([`driver::Snapshot`]) out.
//!
//! Membership changes are made by the leader, one at a time (a mutex
//! around each; raft-rs would turn a second pending conf change into an
//! empty entry), each step waited for until the leader has applied it,
//! bounded by [`COMMIT_TIMEOUT`]. A change asked of a follower is forwarded
//! to the leader once.

pub mod driver;
pub mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use strata_cluster::node::{MAX_MESSAGE_BYTES, Membership};
use strata_cluster::state::{Command, NodeId, Role};
use strata_proto::cluster::v1 as pb;
use strata_proto::cluster::v1::raft_server::{Raft, RaftServer};
use strata_proto::mgmt::v1 as mpb;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status};

use driver::{Cmd, Driver, Inbound, Snapshot, not_member};
use transport::{Counters, Sender, TokenCheck, authed, client};

/// How long a management call waits for its change to be applied.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(15);
/// A membership call to the leader waits for up to two steps.
const MEMBERSHIP_CALL_TIMEOUT: Duration = Duration::from_secs(2 * 15 + 5);
/// Commands waiting for the driver.
const CMD_QUEUE: usize = 64;
/// Incoming batches waiting for the driver; a full inbox drops (counted).
const INBOUND_QUEUE: usize = 1024;
/// Transport reports waiting for the driver.
const REPORT_QUEUE: usize = 1024;
/// Most messages one incoming batch may carry.
const MAX_BATCH_IN: usize = 4096;

pub struct ClusterConfig {
    pub addr: SocketAddr,
    pub token: String,
    pub witness: bool,
    /// `<state dir>/cluster`.
    pub dir: PathBuf,
}

/// A handle on the running cluster driver.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    token: Arc<str>,
    witness: bool,
    cmds: mpsc::Sender<Cmd>,
    snap: watch::Receiver<Arc<Snapshot>>,
    counters: Arc<Counters>,
    /// One membership change at a time.
    changes: tokio::sync::Mutex<()>,
}

enum Route {
    Local,
    Leader(NodeId, String),
}

impl Cluster {
    /// Binds the cluster port and starts the driver's thread (restarting
    /// the node from `dir` if it is a member).
    pub fn start(cfg: ClusterConfig) -> anyhow::Result<Cluster> {
        let listener = std::net::TcpListener::bind(cfg.addr).with_context(|| {
            format!(
                "--cluster-addr {}: cannot bind; fix: pick a free port",
                cfg.addr
            )
        })?;
        listener.set_nonblocking(true)?;
        let addr = cfg.addr.to_string();
        let counters = Arc::new(Counters::default());
        let token: Arc<str> = cfg.token.into();
        let (cmd_tx, cmd_rx) = mpsc::channel(CMD_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE);
        let (rep_tx, rep_rx) = mpsc::channel(REPORT_QUEUE);
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let cluster = Cluster {
            inner: Arc::new(Inner {
                addr: addr.clone(),
                token: token.clone(),
                witness: cfg.witness,
                cmds: cmd_tx,
                snap: snap_rx,
                counters: counters.clone(),
                changes: tokio::sync::Mutex::new(()),
            }),
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let svc = RaftService {
            cluster: cluster.clone(),
            inbound: in_tx,
        };
        let dir = cfg.dir;
        std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let me = Sender {
                        id: 0,
                        addr,
                        token: token.clone(),
                        counters: counters.clone(),
                        reports: rep_tx,
                    };
                    let driver = match Driver::open(&dir, me, cmd_rx, in_rx, rep_rx, snap_tx) {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::anyhow!(e)));
                            return;
                        }
                    };
                    let check = TokenCheck {
                        want: token,
                        counters,
                    };
                    let server = RaftServer::new(svc)
                        .max_decoding_message_size(transport::MAX_REQUEST_BYTES)
                        .max_encoding_message_size(transport::MAX_REQUEST_BYTES);
                    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                    tokio::spawn(async move {
                        let r = tonic::transport::Server::builder()
                            .add_service(tonic::service::interceptor::InterceptedService::new(
                                server, check,
                            ))
                            .serve_with_incoming(incoming)
                            .await;
                        if let Err(e) = r {
                            tracing::error!("cluster port: {e}");
                        }
                    });
                    let _ = ready_tx.send(Ok(()));
                    driver.run().await;
                });
            })?;
        ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the cluster thread died while starting"))??;
        tracing::info!(addr = %cluster.inner.addr, witness = cfg.witness, "cluster port listening (bearer token)");
        Ok(cluster)
    }

    pub fn witness(&self) -> bool {
        self.inner.witness
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snap.borrow().clone()
    }

    /// The seam for consumers of the committed state (ANA ownership,
    /// epochs): a `watch` updated after every round of the driver.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.snap.clone()
    }

    async fn cmd<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Cmd,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmds
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("the cluster driver has stopped"))?;
        rx.await
            .map_err(|_| Status::unavailable("the cluster driver stopped before answering"))?
            .map_err(Status::failed_precondition)
    }

    /// Waits until the applied state satisfies `done`, at most
    /// [`COMMIT_TIMEOUT`].
    async fn wait(&self, what: &str, done: impl Fn(&Snapshot) -> bool) -> Result<(), Status> {
        let mut rx = self.inner.snap.clone();
        match tokio::time::timeout(COMMIT_TIMEOUT, rx.wait_for(|s| done(s))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Status::unavailable("the cluster driver has stopped")),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{what}: not applied within {} s (no quorum, or leadership changed); it may still commit: check `strata ctl cluster status`, then retry",
                COMMIT_TIMEOUT.as_secs()
            ))),
        }
    }

    fn route(&self) -> Result<Route, Status> {
        let s = self.snapshot();
        if s.id == 0 {
            return Err(Status::failed_precondition(not_member()));
        }
        if s.is_leader() {
            return Ok(Route::Local);
        }
        match s
            .leader
            .and_then(|l| s.addr_of(l).map(|a| (l, a.to_string())))
        {
            Some((l, a)) => Ok(Route::Leader(l, a)),
            None => Err(Status::unavailable(
                "no cluster leader is known right now (an election is running, or there is no quorum); fix: retry in a few seconds",
            )),
        }
    }

    /// `strata ctl cluster init`: node 1 of a new cluster.
    pub async fn init(
        &self,
        name: String,
        listeners: Vec<String>,
    ) -> Result<Arc<Snapshot>, Status> {
        let s = self.snapshot();
        // A node killed between creating its log and committing its own
        // AddNode is node 1 of a cluster with no nodes: init finishes it.
        let unfinished = s.id == 1 && s.state.nodes.is_empty();
        if s.id != 0 && !unfinished {
            return Err(Status::already_exists(format!(
                "this node is already node {} of a cluster; fix: `strata ctl cluster leave` first",
                s.id
            )));
        }
        let _g = self.inner.changes.lock().await;
        if s.id == 0 {
            self.cmd(Cmd::Bootstrap).await?;
        }
        self.wait("electing this node leader", |s| s.is_leader())
            .await?;
        let name = if name.is_empty() {
            "node-1".into()
        } else {
            name
        };
        self.propose_until(
            Command::AddNode {
                id: 1,
                name,
                raft_addr: self.inner.addr.clone(),
                listeners: self.listeners(listeners),
                role: self.role(),
            },
            "adding this node",
            |s| s.state.nodes.contains_key(&1),
        )
        .await?;
        Ok(self.snapshot())
    }

    fn role(&self) -> Role {
        if self.inner.witness {
            Role::Witness
        } else {
            Role::Storage
        }
    }

    fn listeners(&self, l: Vec<String>) -> Vec<String> {
        if self.inner.witness { Vec::new() } else { l }
    }

    /// Proposes `c` and waits until `done` holds, or the state machine
    /// refused `c` (an error saying why), or the timeout.
    async fn propose_until(
        &self,
        c: Command,
        what: &str,
        done: impl Fn(&Snapshot) -> bool,
    ) -> Result<(), Status> {
        let data = c.encode();
        let after = self.snapshot().applied;
        let refusal = |s: &Snapshot| {
            s.refused
                .iter()
                .find(|(i, d, _)| *i > after && *d == data)
                .map(|(_, _, e)| e.clone())
        };
        self.cmd(|tx| Cmd::Propose(c, tx)).await?;
        self.wait(what, |s| done(s) || refusal(s).is_some()).await?;
        let s = self.snapshot();
        match refusal(&s) {
            Some(e) if !done(&s) => Err(Status::failed_precondition(format!(
                "{what}: refused by the cluster state: {e}"
            ))),
            _ => Ok(()),
        }
    }

    async fn membership(&self, m: Membership) -> Result<(), Status> {
        self.cmd(|tx| Cmd::Membership(m, tx)).await
    }

    /// `strata ctl cluster join ADDR`.
    pub async fn join(
        &self,
        member_addr: String,
        name: String,
        listeners: Vec<String>,
    ) -> Result<Arc<Snapshot>, Status> {
        let s = self.snapshot();
        if s.id != 0 {
            return Err(Status::already_exists(format!(
                "this node is already node {} of a cluster; fix: `strata ctl cluster leave` first",
                s.id
            )));
        }
        if member_addr.is_empty() {
            return Err(Status::invalid_argument(
                "member_addr: missing; fix: give the --cluster-addr of any member, e.g. 127.0.0.1:7400",
            ));
        }
        let mut c =
            client(&member_addr, MEMBERSHIP_CALL_TIMEOUT).map_err(Status::invalid_argument)?;
        let req = pb::AddMemberRequest {
            name,
            raft_addr: self.inner.addr.clone(),
            listeners: self.listeners(listeners),
            witness: self.inner.witness,
            forwarded: false,
        };
        let reply = c
            .add_member(authed(req, &self.inner.token))
            .await
            .map_err(|e| remote(&member_addr, e))?
            .into_inner();
        let id = reply.id;
        let peers = reply
            .peers
            .into_iter()
            .map(|p| (p.id, p.raft_addr))
            .collect();
        self.cmd(|reply| Cmd::Join { id, peers, reply }).await?;
        self.wait("catching up with the cluster", |s| {
            s.state.nodes.contains_key(&id) && s.voters.contains(&id)
        })
        .await?;
        Ok(self.snapshot())
    }

    /// `strata ctl cluster leave`.
    pub async fn leave(&self) -> Result<(), Status> {
        let s = self.snapshot();
        if s.id == 0 {
            return Err(Status::failed_precondition(not_member()));
        }
        let id = s.id;
        if s.is_leader() && s.voters.len() > 1 {
            self.step_down(&s).await?;
        }
        self.remove_member(pb::RemoveMemberRequest {
            id,
            forwarded: false,
        })
        .await?;
        self.cmd(Cmd::Forget).await?;
        tracing::info!(id, "left the cluster; its log is removed");
        Ok(())
    }

    /// Hands leadership to a reachable voter before this leader removes
    /// itself (see `Node::transfer_leader` for why).
    async fn step_down(&self, s: &Snapshot) -> Result<(), Status> {
        let me = s.id;
        let to = s
            .voters
            .iter()
            .copied()
            .filter(|&v| v != me)
            .max_by_key(|v| s.reachable.get(v).copied().unwrap_or(false))
            .ok_or_else(|| Status::internal("no other voter"))?;
        tracing::info!(to, "leaving: handing leadership over first");
        let mut rx = self.inner.snap.clone();
        for _ in 0..5 {
            self.inner
                .cmds
                .send(Cmd::TransferLeader(to))
                .await
                .map_err(|_| Status::unavailable("the cluster driver has stopped"))?;
            let moved = tokio::time::timeout(
                Duration::from_secs(3),
                rx.wait_for(|s| s.leader.is_some_and(|l| l != me)),
            )
            .await;
            if matches!(moved, Ok(Ok(_))) {
                return Ok(());
            }
        }
        Err(Status::deadline_exceeded(format!(
            "leaving: leadership did not move to node {to} within 15 s; fix: check that the other members are reachable (`strata ctl cluster status`), then retry"
        )))
    }

    async fn add_member(&self, r: pb::AddMemberRequest) -> Result<pb::AddMemberReply, Status> {
        match self.route()? {
            Route::Local => self.add_member_here(r).await,
            Route::Leader(l, addr) if r.forwarded => Err(not_leader(l, &addr)),
            Route::Leader(_, addr) => {
                let mut c = client(&addr, MEMBERSHIP_CALL_TIMEOUT).map_err(Status::internal)?;
                let r = pb::AddMemberRequest {
                    forwarded: true,
                    ..r
                };
                c.add_member(authed(r, &self.inner.token))
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|e| remote(&addr, e))
            }
        }
    }

    async fn add_member_here(&self, r: pb::AddMemberRequest) -> Result<pb::AddMemberReply, Status> {
        if r.raft_addr.is_empty() {
            return Err(Status::invalid_argument("raft_addr: missing"));
        }
        let _g = self.inner.changes.lock().await;
        let s = self.snapshot();
        // A join retried after a timeout finds its node already there.
        let id = match s.state.nodes.values().find(|n| n.raft_addr == r.raft_addr) {
            Some(n) => n.id,
            None => {
                let id = s
                    .state
                    .nodes
                    .keys()
                    .chain(&s.voters)
                    .max()
                    .copied()
                    .unwrap_or(0)
                    + 1;
                let name = if r.name.is_empty() {
                    format!("node-{id}")
                } else {
                    r.name
                };
                if s.state.nodes.values().any(|n| n.name == name) {
                    return Err(Status::already_exists(format!(
                        "name: {name:?} is taken by another member; fix: pass another --name"
                    )));
                }
                let role = if r.witness {
                    Role::Witness
                } else {
                    Role::Storage
                };
                tracing::info!(id, %name, addr = %r.raft_addr, ?role, "adding a cluster member");
                self.propose_until(
                    Command::AddNode {
                        id,
                        name,
                        raft_addr: r.raft_addr,
                        listeners: r.listeners,
                        role,
                    },
                    "adding the node",
                    |s| s.state.nodes.contains_key(&id),
                )
                .await?;
                id
            }
        };
        if !self.snapshot().voters.contains(&id) {
            self.membership(Membership::AddVoter(id)).await?;
            self.wait("making the node a voter", |s| s.voters.contains(&id))
                .await?;
        }
        let s = self.snapshot();
        Ok(pb::AddMemberReply {
            id,
            peers: s
                .state
                .nodes
                .values()
                .map(|n| pb::Peer {
                    id: n.id,
                    raft_addr: n.raft_addr.clone(),
                })
                .collect(),
        })
    }

    async fn remove_member(&self, r: pb::RemoveMemberRequest) -> Result<(), Status> {
        match self.route()? {
            Route::Local => self.remove_member_here(r.id).await,
            Route::Leader(l, addr) if r.forwarded => Err(not_leader(l, &addr)),
            Route::Leader(_, addr) => {
                let mut c = client(&addr, MEMBERSHIP_CALL_TIMEOUT).map_err(Status::internal)?;
                let r = pb::RemoveMemberRequest {
                    forwarded: true,
                    ..r
                };
                c.remove_member(authed(r, &self.inner.token))
                    .await
                    .map(|_| ())
                    .map_err(|e| remote(&addr, e))
            }
        }
    }

    async fn remove_member_here(&self, id: NodeId) -> Result<(), Status> {
        let _g = self.inner.changes.lock().await;
        let s = self.snapshot();
        if let Some(n) = s.state.nodes.get(&id) {
            if n.role == Role::Storage && s.state.storage_nodes().count() == 1 {
                return Err(Status::failed_precondition(format!(
                    "node {id} is the last storage node of the cluster; fix: join another storage node first"
                )));
            }
            let owned: Vec<_> = s
                .state
                .groups
                .values()
                .filter(|g| g.owner == Some(id))
                .map(|g| g.id)
                .collect();
            if !owned.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "node {id} owns ANA groups {owned:?}; fix: move them to another node first"
                )));
            }
            tracing::info!(id, "removing a cluster member");
            self.propose_until(Command::RemoveNode { id }, "removing the node", |s| {
                !s.state.nodes.contains_key(&id)
            })
            .await?;
        }
        if s.voters.contains(&id) {
            if s.voters.len() == 1 {
                return Err(Status::failed_precondition(format!(
                    "node {id} is the last voter; a cluster cannot remove its last voter"
                )));
            }
            self.membership(Membership::RemoveVoter(id)).await?;
            self.wait("removing the voter", |s| !s.voters.contains(&id))
                .await?;
        }
        Ok(())
    }

    /// The management API's view of [`Snapshot`].
    pub fn status_reply(&self, s: &Snapshot) -> mpb::ClusterStatusReply {
        let members = s
            .state
            .nodes
            .values()
            .map(|n| mpb::ClusterMember {
                id: n.id,
                name: n.name.clone(),
                raft_addr: n.raft_addr.clone(),
                role: match n.role {
                    Role::Storage => "storage".into(),
                    Role::Witness => "witness".into(),
                },
                voter: s.voters.contains(&n.id),
                reachable: n.id == s.id || s.reachable.get(&n.id).copied().unwrap_or(false),
                up: n.up,
                listeners: n.listeners.clone(),
            })
            .collect();
        mpb::ClusterStatusReply {
            id: s.id,
            leader: s.leader.unwrap_or(0),
            leader_addr: s
                .leader
                .and_then(|l| s.addr_of(l))
                .unwrap_or_default()
                .to_string(),
            role: s.role.to_string(),
            term: s.term,
            commit: s.commit,
            applied: s.applied,
            members,
            groups: s
                .state
                .groups
                .values()
                .map(|g| mpb::ClusterGroup {
                    id: g.id,
                    owner: g.owner.unwrap_or(0),
                    epoch: g.epoch,
                })
                .collect(),
            witness: self.inner.witness,
            refused_calls: self.inner.counters.refused_calls.load(Ordering::Relaxed),
            dropped_messages: self.inner.counters.dropped_out.load(Ordering::Relaxed)
                + self.inner.counters.dropped_in.load(Ordering::Relaxed),
        }
    }
}

fn not_leader(l: NodeId, addr: &str) -> Status {
    Status::failed_precondition(format!(
        "this node is not the leader (leadership moved while forwarding); the leader is node {l} at {addr}: retry"
    ))
}

/// A remote member's answer, saying who answered.
fn remote(addr: &str, s: Status) -> Status {
    Status::new(s.code(), format!("cluster member {addr}: {}", s.message()))
}

/// The cluster port's service.
struct RaftService {
    cluster: Cluster,
    inbound: mpsc::Sender<Inbound>,
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn send(&self, r: Request<pb::SendRequest>) -> Result<Response<pb::SendReply>, Status> {
        let r = r.into_inner();
        if r.messages.len() > MAX_BATCH_IN {
            return Err(Status::invalid_argument(format!(
                "messages: {} in one batch, at most {MAX_BATCH_IN}",
                r.messages.len()
            )));
        }
        let refused = r
            .messages
            .iter()
            .filter(|m| m.len() > MAX_MESSAGE_BYTES)
            .count() as u32;
        let messages: Vec<Vec<u8>> = r
            .messages
            .into_iter()
            .filter(|m| m.len() <= MAX_MESSAGE_BYTES)
            .collect();
        let b = Inbound {
            from: r.from_id,
            from_addr: r.from_addr,
            messages,
        };
        if self.inbound.try_send(b).is_err() {
            // Raft sends it again; a stalled driver must not grow memory.
            self.cluster
                .inner
                .counters
                .dropped_in
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(pb::SendReply { refused }))
    }

    async fn add_member(
        &self,
        r: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::AddMemberReply>, Status> {
        self.cluster
            .add_member(r.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove_member(
        &self,
        r: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberReply>, Status> {
        self.cluster
            .remove_member(r.into_inner())
            .await
            .map(|()| Response::new(pb::RemoveMemberReply {}))
    }
}
