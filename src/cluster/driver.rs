//! The one task that owns the [`Node`]: raft-rs's Ready loop with real
//! time, disk and network.
//!
//! Order within one Ready, as raft-rs requires (and `Node` documents):
//! send `messages` at once; make the persist durable (`on_persisted`
//! fsyncs the log, then writes the hard state); only then send
//! `after_persist` (votes and append acknowledgements promise what the disk
//! holds). Everything runs on this task, so nothing can overtake a persist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use strata_cluster::disk::OsDir;
use strata_cluster::node::{Membership, Node, NodeConfig, Outgoing};
use strata_cluster::state::{ClusterState, Command, NodeId};
use tokio::sync::{mpsc, oneshot, watch};

use super::transport::{Peer, Report, Sender};

/// One Raft tick. The node's defaults make that a 1–2 s election timeout
/// and 200 ms heartbeats.
pub const TICK: Duration = Duration::from_millis(100);
/// The member file: this node's id in the cluster whose log the directory
/// holds. Written after the log is created, so its presence means the log
/// is there to restart from.
pub const MEMBER_FILE: &str = "member.json";
/// Every member starts from this voter set and an empty state (see
/// `Node::join`); the first entries the first node commits add it.
pub const GENESIS_VOTERS: &[NodeId] = &[1];
/// Refused commands kept for whoever waits on them.
const MAX_REFUSED: usize = 16;
/// Most addresses learned from the network that the applied state does not
/// confirm, so a token holder sending made-up ids cannot grow it.
const MAX_BOOK: usize = 64;

/// What the rest of the process asks the driver.
pub enum Cmd {
    /// Become node 1 of a new cluster.
    Bootstrap(oneshot::Sender<Result<(), String>>),
    /// Become `id` of the cluster whose members are `peers`.
    Join {
        id: NodeId,
        peers: Vec<(NodeId, String)>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Propose(Command, oneshot::Sender<Result<(), String>>),
    Membership(Membership, oneshot::Sender<Result<(), String>>),
    /// Hand leadership to this voter.
    TransferLeader(NodeId),
    /// This node was removed: forget the cluster (delete its log).
    Forget(oneshot::Sender<Result<(), String>>),
}

/// An incoming batch.
pub struct Inbound {
    pub from: NodeId,
    pub from_addr: String,
    pub messages: Vec<Vec<u8>>,
}

/// What the driver publishes after every round: the applied state and the
/// Raft progress. This is also the seam for the target: whoever needs the
/// committed ANA ownership subscribes to this `watch` (nothing in the I/O
/// path does yet; fencing is issue #10's target part).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// 0: not a member of any cluster.
    pub id: NodeId,
    pub leader: Option<NodeId>,
    pub role: &'static str,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<NodeId>,
    pub state: ClusterState,
    /// Peers the transport delivered to on its last try.
    pub reachable: BTreeMap<NodeId, bool>,
    /// Why the driver stopped (a disk error): the node takes no part in the
    /// cluster until restarted.
    pub fatal: Option<String>,
    /// The last committed commands the state machine refused: (index,
    /// entry payload, why), so a waiter learns why instead of timing out.
    pub refused: Vec<(u64, Vec<u8>, String)>,
}

impl Snapshot {
    pub fn is_leader(&self) -> bool {
        self.id != 0 && self.leader == Some(self.id)
    }

    pub fn addr_of(&self, id: NodeId) -> Option<&str> {
        self.state.nodes.get(&id).map(|n| n.raft_addr.as_str())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MemberFile {
    id: NodeId,
}

pub struct Driver {
    dir: PathBuf,
    me: Sender,
    node: Option<Node<OsDir>>,
    peers: BTreeMap<NodeId, Peer>,
    /// Addresses learned from incoming batches and join replies, for peers
    /// whose `AddNode` this node has not applied yet.
    book: BTreeMap<NodeId, String>,
    cmds: mpsc::Receiver<Cmd>,
    inbound: mpsc::Receiver<Inbound>,
    reports: mpsc::Receiver<Report>,
    published: watch::Sender<Arc<Snapshot>>,
    fatal: Option<String>,
    refused: std::collections::VecDeque<(u64, Vec<u8>, String)>,
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS: enough to keep two nodes'
    // election timeouts apart.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

fn node_config(id: NodeId) -> NodeConfig {
    NodeConfig::new(id, seed())
}

impl Driver {
    /// Opens the cluster directory; restarts the node from it if this node
    /// is a member.
    pub fn open(
        dir: &Path,
        me: Sender,
        cmds: mpsc::Receiver<Cmd>,
        inbound: mpsc::Receiver<Inbound>,
        reports: mpsc::Receiver<Report>,
        published: watch::Sender<Arc<Snapshot>>,
    ) -> anyhow::Result<Driver> {
        let mut d = Driver {
            dir: dir.to_path_buf(),
            me,
            node: None,
            peers: BTreeMap::new(),
            book: BTreeMap::new(),
            cmds,
            inbound,
            reports,
            published,
            fatal: None,
            refused: Default::default(),
        };
        let member = dir.join(MEMBER_FILE);
        if member.exists() {
            let m: MemberFile = serde_json::from_slice(&std::fs::read(&member)?).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e}; fix: restore it, or remove {} to leave the cluster for good",
                    member.display(),
                    dir.display()
                )
            })?;
            let os = OsDir::open(dir)?;
            let node = Node::restart(os, node_config(m.id))
                .map_err(|e| anyhow::anyhow!("cluster log in {}: {e}", dir.display()))?;
            tracing::info!(
                id = m.id,
                applied = node.applied_index(),
                dir = %dir.display(),
                "cluster member restarted from its disk"
            );
            d.me.id = m.id;
            d.node = Some(node);
        }
        d.publish();
        Ok(d)
    }

    pub async fn run(mut self) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Some(n) = self.node.as_mut() {
                        n.tick();
                    }
                }
                Some(b) = self.inbound.recv() => self.on_inbound(b),
                Some(r) = self.reports.recv() => {
                    if let Some(n) = self.node.as_mut() {
                        match r {
                            Report::Unreachable(id) => n.report_unreachable(id),
                            Report::Snapshot { to, delivered } => n.report_snapshot(to, delivered),
                        }
                    }
                }
                c = self.cmds.recv() => match c {
                    Some(c) => self.on_cmd(c),
                    None => return,
                },
            }
            let r = self.drain();
            self.sync_peers();
            if let Err(e) = r {
                // A log that cannot be written cannot promise anything: stop
                // taking part rather than vote or acknowledge from memory.
                tracing::error!("cluster driver stopped: {e}");
                self.fatal = Some(e);
                self.node = None;
            }
            self.publish();
        }
    }

    fn on_inbound(&mut self, b: Inbound) {
        if b.from != 0
            && !b.from_addr.is_empty()
            && (self.book.len() < MAX_BOOK || self.book.contains_key(&b.from))
        {
            self.book.insert(b.from, b.from_addr);
        }
        let Some(n) = self.node.as_mut() else {
            return;
        };
        for m in &b.messages {
            if let Err(e) = n.step(m) {
                tracing::debug!(from = b.from, "cluster message refused: {e}");
            }
        }
    }

    fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::Bootstrap(reply) => {
                let r = self.create(1, |os, cfg| {
                    Node::bootstrap(os, cfg, GENESIS_VOTERS, &ClusterState::default())
                });
                let _ = reply.send(r);
            }
            Cmd::Join { id, peers, reply } => {
                for (pid, addr) in peers {
                    if pid != id {
                        self.book.insert(pid, addr);
                    }
                }
                let r = self.create(id, |os, cfg| {
                    Node::join(os, cfg, GENESIS_VOTERS, &ClusterState::default())
                });
                let _ = reply.send(r);
            }
            Cmd::Propose(cmd, reply) => {
                let r = match self.node.as_mut() {
                    Some(n) => n.propose(&cmd).map_err(|e| e.to_string()),
                    None => Err(not_member()),
                };
                let _ = reply.send(r);
            }
            Cmd::Membership(m, reply) => {
                let r = match self.node.as_mut() {
                    Some(n) => n.propose_membership(m).map_err(|e| e.to_string()),
                    None => Err(not_member()),
                };
                let _ = reply.send(r);
            }
            Cmd::TransferLeader(to) => {
                if let Some(n) = self.node.as_mut() {
                    n.transfer_leader(to);
                }
            }
            Cmd::Forget(reply) => {
                self.node = None;
                self.peers.clear();
                self.book.clear();
                let r = std::fs::remove_dir_all(&self.dir)
                    .or_else(|e| {
                        if e.kind() == std::io::ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| format!("removing {}: {e}", self.dir.display()));
                let _ = reply.send(r);
            }
        }
    }

    fn create(
        &mut self,
        id: NodeId,
        make: impl FnOnce(OsDir, NodeConfig) -> Result<Node<OsDir>, strata_cluster::node::NodeError>,
    ) -> Result<(), String> {
        if self.node.is_some() {
            return Err("this node is already a cluster member".into());
        }
        let os = OsDir::open(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let node = make(os, node_config(id)).map_err(|e| {
            format!(
                "cluster log in {}: {e}; fix: if this node left a cluster, remove that directory",
                self.dir.display()
            )
        })?;
        let member = self.dir.join(MEMBER_FILE);
        let body = serde_json::to_vec(&MemberFile { id }).map_err(|e| e.to_string())?;
        replace_file(&member, &body).map_err(|e| format!("{}: {e}", member.display()))?;
        self.me.id = id;
        self.peers.clear();
        self.node = Some(node);
        self.fatal = None;
        Ok(())
    }

    fn drain(&mut self) -> Result<(), String> {
        loop {
            let Some(n) = self.node.as_mut() else {
                return Ok(());
            };
            let Some(rd) = n.ready().map_err(|e| e.to_string())? else {
                return Ok(());
            };
            self.send(rd.messages);
            if let Some(p) = &rd.persist {
                let n = self.node.as_mut().expect("checked above");
                n.on_persisted(p.number)
                    .map_err(|e| format!("persist: {e}"))?;
            }
            self.send(rd.after_persist);
            for a in rd.applied {
                if let Err(e) = a.result {
                    if self.refused.len() >= MAX_REFUSED {
                        self.refused.pop_front();
                    }
                    self.refused.push_back((a.index, a.data, e.to_string()));
                }
            }
        }
    }

    fn send(&mut self, out: Vec<Outgoing>) {
        for m in out {
            let Some(addr) = self.addr_of(m.to) else {
                tracing::debug!(to = m.to, "no address for a cluster peer yet; dropped");
                continue;
            };
            if self.peers.get(&m.to).is_none_or(|p| p.addr != addr) {
                self.peers
                    .insert(m.to, Peer::start(m.to, addr, self.me.clone()));
            }
            let snapshot = m.is_snapshot();
            if let Some(p) = self.peers.get(&m.to) {
                p.push(m.bytes, snapshot, &self.me.counters);
            }
        }
    }

    /// A sender (and its probes) for every other member, and none for a
    /// node that is gone.
    fn sync_peers(&mut self) {
        let Some(n) = self.node.as_ref() else {
            return;
        };
        let me = n.id();
        let voters = n.voters();
        let state = n.state();
        // Ids only grow: an unconfirmed address at or below the highest
        // applied id belongs to a node that was removed, unless it is still
        // a voter (a leaving node acknowledges its own removal).
        let max = state.nodes.keys().max().copied().unwrap_or(0);
        self.book
            .retain(|id, _| *id > max || voters.contains(id) || state.nodes.contains_key(id));
        let mut want: BTreeMap<NodeId, String> =
            self.book.iter().map(|(id, a)| (*id, a.clone())).collect();
        want.extend(state.nodes.values().map(|i| (i.id, i.raft_addr.clone())));
        want.remove(&me);
        self.peers.retain(|id, _| want.contains_key(id));
        for (id, addr) in want {
            if self.peers.get(&id).is_none_or(|p| p.addr != addr) {
                self.peers
                    .insert(id, Peer::start(id, addr, self.me.clone()));
            }
        }
    }

    fn addr_of(&self, id: NodeId) -> Option<String> {
        self.node
            .as_ref()
            .and_then(|n| n.state().nodes.get(&id))
            .map(|i| i.raft_addr.clone())
            .or_else(|| self.book.get(&id).cloned())
    }

    fn publish(&self) {
        let s = match &self.node {
            Some(n) => Snapshot {
                id: n.id(),
                leader: n.leader(),
                role: n.role_name(),
                term: n.term(),
                commit: n.commit_index(),
                applied: n.applied_index(),
                voters: n.voters(),
                state: n.state().clone(),
                reachable: self
                    .peers
                    .iter()
                    .map(|(id, p)| (*id, p.reachable()))
                    .collect(),
                fatal: None,
                refused: self.refused.iter().cloned().collect(),
            },
            None => Snapshot {
                fatal: self.fatal.clone(),
                ..Default::default()
            },
        };
        self.published.send_replace(Arc::new(s));
    }
}

pub fn not_member() -> String {
    "this node is not in a cluster; fix: `strata ctl cluster init` on the first node, `strata ctl cluster join ADDR` on the others".into()
}

/// Write-to-temp, fsync, rename, fsync the directory.
fn replace_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::transport::Counters;

    struct Ends {
        _cmds: mpsc::Sender<Cmd>,
        _inbound: mpsc::Sender<Inbound>,
        _reports: mpsc::Sender<Report>,
        snap: watch::Receiver<Arc<Snapshot>>,
    }

    fn open(dir: &Path) -> (anyhow::Result<Driver>, Ends) {
        let (rtx, rrx) = mpsc::channel(4);
        let me = Sender {
            id: 0,
            addr: "127.0.0.1:1".into(),
            token: "0123456789abcdef".into(),
            counters: Arc::new(Counters::default()),
            reports: rtx.clone(),
        };
        let (ctx, crx) = mpsc::channel(4);
        let (itx, irx) = mpsc::channel(4);
        let (stx, srx) = watch::channel(Arc::new(Snapshot::default()));
        let d = Driver::open(dir, me, crx, irx, rrx, stx);
        let ends = Ends {
            _cmds: ctx,
            _inbound: itx,
            _reports: rtx,
            snap: srx,
        };
        (d, ends)
    }

    #[test]
    fn a_member_restarts_from_its_directory_and_a_broken_member_file_names_the_fix() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cluster");
        let (d, ends) = open(&dir);
        let mut d = d.unwrap();
        assert_eq!(ends.snap.borrow().id, 0);
        let (tx, mut rx) = oneshot::channel();
        d.on_cmd(Cmd::Bootstrap(tx));
        rx.try_recv().unwrap().unwrap();
        // A second bootstrap of the same directory is refused.
        let (tx, mut rx) = oneshot::channel();
        d.on_cmd(Cmd::Bootstrap(tx));
        assert!(rx.try_recv().unwrap().is_err());
        drop(d);
        drop(ends);

        let (d, ends) = open(&dir);
        let d = d.unwrap();
        assert_eq!(ends.snap.borrow().id, 1, "restarted as node 1");
        assert_eq!(d.me.id, 1);
        drop(d);

        std::fs::write(dir.join(MEMBER_FILE), b"{not json").unwrap();
        let (d, _ends) = open(&dir);
        let e = d
            .err()
            .expect("a broken member file is an error")
            .to_string();
        assert!(e.contains("fix:"), "{e}");
    }

    #[test]
    fn forget_removes_the_log() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cluster");
        let (d, _ends) = open(&dir);
        let mut d = d.unwrap();
        let (tx, mut rx) = oneshot::channel();
        d.on_cmd(Cmd::Bootstrap(tx));
        rx.try_recv().unwrap().unwrap();
        assert!(dir.join(MEMBER_FILE).exists());
        let (tx, mut rx) = oneshot::channel();
        d.on_cmd(Cmd::Forget(tx));
        rx.try_recv().unwrap().unwrap();
        assert!(!dir.exists());
        assert!(d.node.is_none());
    }
}
