//! One cluster member, sans-IO: raft-rs's `RawNode` driven in its Ready
//! loop over a [`DiskLog`], the replicated [`ClusterState`], the leader's
//! failover [`policy`], and the write [`lease`]s.
//!
//! Inputs: [`Node::tick`] (time), [`Node::step`] (bytes from a peer),
//! [`Node::propose`] (a command), [`Node::propose_membership`] (one voter
//! change), [`Node::on_persisted`] (a persist is durable). After any input, drain [`Node::ready`] until it returns
//! `None`, and for each [`Ready`]:
//! 1. send `messages` now;
//! 2. make the persist durable by calling `on_persisted(persist.number)`,
//!    in order (now, or later on a slow disk);
//! 3. only then send `after_persist` (votes and appends acknowledgements:
//!    raft-rs's persisted messages, which promise what the disk holds);
//! 4. `applied` lists the committed commands the state machine has just
//!    applied, with their results, for whoever waits on them.
//!
//! Before returning a `Ready`, the node has already handed its entries and
//! snapshot to the log store (raft-rs requires them readable from the
//! `Storage` before `advance_append_async`); they are only made durable by
//! `on_persisted`, so a crash before it loses them, as the simulator's disk
//! checks.
//!
//! **Determinism:** raft-rs draws election timeouts from `thread_rng`. The
//! node overwrites the draw from its own seeded generator after every
//! input that may have reset it, before any tick can compare against it.

use std::collections::{BTreeMap, VecDeque};

use prost::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, Entry, EntryType, HardState, Message, SnapshotMetadata,
};
use raft::{RawNode, StateRole, Storage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::disk::Dir;
use crate::lease::{self, LeaseConfig, LeaseGrant, LeaseRequest, Leases};
use crate::log_store::{DiskLog, LogError};
use crate::policy::{self, Liveness, PolicyConfig};
use crate::state::{Applied, ClusterState, Command, CommandError, GroupId, NodeId};

/// Lease messages waiting for the next `ready`; beyond this they are
/// dropped (they are renewed anyway).
const MAX_OUTBOX: usize = 1024;
/// Largest message accepted from the network.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Largest command a node proposes: the largest document plus room for
/// its JSON escaping.
pub const MAX_ENTRY_BYTES: usize = 4 << 20;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Ticks without a leader before a follower campaigns (randomized in
    /// `[election_tick, 2 · election_tick)`).
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub policy: PolicyConfig,
    /// How often the leader re-evaluates the policy.
    pub policy_interval_ticks: u64,
    pub lease: LeaseConfig,
    /// Take a snapshot and compact once this many entries were applied
    /// since the last one.
    pub snapshot_every: u64,
    /// Seeds the election-timeout randomness (the simulator derives it
    /// from its seed; production from the OS).
    pub seed: u64,
}

impl NodeConfig {
    /// At 100 ms ticks: election after 1–2 s, heartbeats every 200 ms.
    pub fn new(id: NodeId, seed: u64) -> NodeConfig {
        NodeConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            policy: PolicyConfig::default(),
            policy_interval_ticks: 2,
            lease: LeaseConfig::default(),
            snapshot_every: 1000,
            seed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("message: {0}")]
    Malformed(String),
    #[error("message: addressed to node {to}, this is node {me}")]
    Misaddressed { to: NodeId, me: NodeId },
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error("state: {0}")]
    State(#[from] CommandError),
    #[error("command: {bytes} bytes encoded, at most {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("persist {got} completed out of order (next is {expected:?})")]
    PersistOrder { got: u64, expected: Option<u64> },
}

/// One change of the Raft voter set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    AddVoter(NodeId),
    RemoveVoter(NodeId),
}

/// A message for the transport, already encoded.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Outgoing {
    pub to: NodeId,
    pub bytes: Vec<u8>,
}

impl Outgoing {
    /// Whether this carries a snapshot, whose delivery the transport
    /// reports with [`Node::report_snapshot`].
    pub fn is_snapshot(&self) -> bool {
        self.bytes.first() == Some(&TAG_RAFT)
            && matches!(Wire::decode(&self.bytes), Ok(Wire::Raft(m))
                if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot)
    }
}

/// What one Ready asks to make durable.
#[derive(Clone, Debug, Default)]
pub struct Persist {
    pub number: u64,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub snapshot: Option<SnapshotMetadata>,
    pub must_sync: bool,
}

#[derive(Clone, Debug)]
pub struct AppliedEntry {
    pub index: u64,
    pub term: u64,
    /// The entry's payload, for checkers comparing logs across nodes.
    pub data: Vec<u8>,
    pub result: Result<Applied, CommandError>,
}

#[derive(Debug, Default)]
pub struct Ready {
    /// `None` when this Ready only carries lease messages.
    pub persist: Option<Persist>,
    pub messages: Vec<Outgoing>,
    pub after_persist: Vec<Outgoing>,
    pub applied: Vec<AppliedEntry>,
    /// The state machine was replaced by a snapshot at this index.
    pub restored: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseMsg {
    from: NodeId,
    to: NodeId,
    body: LeaseWire,
}

const TAG_RAFT: u8 = 1;
const TAG_LEASE: u8 = 2;

/// One message on the wire between members.
#[derive(Clone, Debug, PartialEq)]
pub enum Wire {
    Raft(Box<Message>),
    Lease {
        from: NodeId,
        to: NodeId,
        body: LeaseWire,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseWire {
    Request(LeaseRequest),
    Grant(LeaseGrant),
}

impl Wire {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Wire::Raft(m) => {
                let mut out = vec![TAG_RAFT];
                out.extend_from_slice(&m.encode_to_vec());
                out
            }
            Wire::Lease { from, to, body } => {
                let msg = LeaseMsg {
                    from: *from,
                    to: *to,
                    body: body.clone(),
                };
                let mut out = vec![TAG_LEASE];
                out.extend_from_slice(&serde_json::to_vec(&msg).expect("lease message serializes"));
                out
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Wire, NodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(NodeError::Malformed(format!("{} bytes", bytes.len())));
        }
        match bytes.split_first() {
            Some((&TAG_RAFT, rest)) => Message::decode(rest)
                .map(|m| Wire::Raft(Box::new(m)))
                .map_err(|e| NodeError::Malformed(e.to_string())),
            Some((&TAG_LEASE, rest)) => {
                let m: LeaseMsg = serde_json::from_slice(rest)
                    .map_err(|e| NodeError::Malformed(e.to_string()))?;
                Ok(Wire::Lease {
                    from: m.from,
                    to: m.to,
                    body: m.body,
                })
            }
            Some((tag, _)) => Err(NodeError::Malformed(format!("unknown tag {tag}"))),
            None => Err(NodeError::Malformed("empty".into())),
        }
    }
}

pub struct Node<D: Dir> {
    cfg: NodeConfig,
    raw: RawNode<DiskLog<D>>,
    state: ClusterState,
    /// Index of the last entry applied to `state` (or of the snapshot it
    /// was restored from).
    applied: u64,
    now: u64,
    rng: ChaCha8Rng,
    liveness: Liveness,
    leases: Leases,
    outbox: Vec<Outgoing>,
    /// Persist numbers handed out and not yet durable, in order.
    unpersisted: VecDeque<(u64, Option<HardState>)>,
    next_policy_at: u64,
    was_leader: bool,
    /// Peer → when this leader last sent it a snapshot.
    snapshots_sent: BTreeMap<NodeId, u64>,
    /// A conf change was applied since the last snapshot.
    snapshot_due: bool,
}

impl<D: Dir> Node<D> {
    /// A member of a new cluster. Every member must bootstrap with the
    /// same `voters` and `genesis`.
    pub fn bootstrap(
        dir: D,
        cfg: NodeConfig,
        voters: &[NodeId],
        genesis: &ClusterState,
    ) -> Result<Node<D>, NodeError> {
        let store = DiskLog::bootstrap(dir, voters, genesis.encode())?;
        Node::with_store(store, cfg)
    }

    /// A node that will join a running cluster. It starts where every
    /// member started (the genesis voters and state, onto which the log
    /// replays, or a snapshot replaces) without being a voter itself, and
    /// waits for the leader once a member proposed
    /// [`Membership::AddVoter`] for it.
    pub fn join(
        dir: D,
        cfg: NodeConfig,
        voters: &[NodeId],
        genesis: &ClusterState,
    ) -> Result<Node<D>, NodeError> {
        if voters.contains(&cfg.id) {
            return Err(NodeError::Log(LogError::Invalid {
                field: "voters",
                reason: format!("a joining node ({}) is not a voter yet", cfg.id),
            }));
        }
        Node::bootstrap(dir, cfg, voters, genesis)
    }

    /// A member restarting from what its disk holds.
    pub fn restart(dir: D, cfg: NodeConfig) -> Result<Node<D>, NodeError> {
        let store = DiskLog::open(dir)?;
        Node::with_store(store, cfg)
    }

    fn with_store(store: DiskLog<D>, cfg: NodeConfig) -> Result<Node<D>, NodeError> {
        let snap = store.latest_snapshot();
        let state = ClusterState::decode(&snap.data)?;
        let applied = snap.get_metadata().index;
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            min_election_tick: cfg.election_tick,
            max_election_tick: 2 * cfg.election_tick,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let raw = RawNode::new(&raft_cfg, store, &crate::raft_logger())?;
        let mut node = Node {
            liveness: Liveness::new(cfg.policy.down_after_ticks),
            leases: Leases::new(cfg.lease, cfg.id),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            cfg,
            raw,
            state,
            applied,
            now: 0,
            outbox: Vec::new(),
            unpersisted: VecDeque::new(),
            next_policy_at: 0,
            was_leader: false,
            snapshots_sent: BTreeMap::new(),
            snapshot_due: false,
        };
        node.reseed_election_timeout();
        node.leases.on_state(&node.state);
        Ok(node)
    }

    fn reseed_election_timeout(&mut self) {
        // Every raft-rs reset (any role change, and a follower hearing its
        // leader) zeroes `election_elapsed`, and nothing reads the timeout
        // before the next tick, so raft-rs's own draw is never used.
        if self.raw.raft.election_elapsed == 0 {
            let e = self.cfg.election_tick;
            let t = self.rng.gen_range(e..2 * e);
            self.raw.raft.set_randomized_election_timeout(t);
        }
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The Raft role, as `strata ctl cluster status` names it.
    pub fn role_name(&self) -> &'static str {
        match self.raw.raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        }
    }

    /// The transport could not deliver to `to`: the leader stops
    /// pipelining appends to it and probes instead, until it answers.
    pub fn report_unreachable(&mut self, to: NodeId) {
        self.raw.report_unreachable(to);
    }

    /// Asks this leader to hand leadership to the voter `to` (which
    /// campaigns at once once its log is caught up). A leader about to
    /// remove itself does this first: a leader that removes itself steps
    /// down possibly before the others learned that the removal committed,
    /// and a lone remaining voter that did not learn it would wait for the
    /// removed one's vote forever.
    pub fn transfer_leader(&mut self, to: NodeId) {
        if self.is_leader() && to != self.cfg.id {
            self.raw.transfer_leader(to);
        }
    }

    /// The leader this node believes in, if any.
    pub fn leader(&self) -> Option<NodeId> {
        let l = self.raw.raft.leader_id;
        (l != 0).then_some(l)
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    /// The current Raft voters, sorted.
    pub fn voters(&self) -> Vec<NodeId> {
        let mut v = self.raw.store().conf_state().voters.clone();
        v.sort_unstable();
        v
    }

    pub fn store(&self) -> &DiskLog<D> {
        self.raw.store()
    }

    /// Whether this node may complete a write for `group` now (it owns the
    /// group in its applied state and holds a valid lease for that epoch).
    pub fn can_write(&self, group: GroupId) -> bool {
        self.leases.can_write(group, self.now)
    }

    /// The epoch of the lease this node holds or seeks for `group`.
    pub fn lease_epoch(&self, group: GroupId) -> Option<u64> {
        self.leases.epoch(group)
    }

    /// A voter grants leases only once it has applied everything in its
    /// log (see `lease`).
    fn caught_up(&self) -> bool {
        self.applied >= self.raw.raft.raft_log.last_index()
    }

    pub fn tick(&mut self) {
        self.now += 1;
        self.raw.tick();
        self.reseed_election_timeout();
        if self.is_leader() {
            self.liveness.heard(self.cfg.id, self.now);
            self.retry_snapshots();
            self.run_policy();
        }
        let voters = self.voters();
        for req in self.leases.due_requests(self.now) {
            for &v in &voters {
                if v == self.cfg.id {
                    let g = LeaseGrant {
                        group: req.group,
                        epoch: req.epoch,
                        seq: req.seq,
                        granted: lease::grants(&self.state, self.caught_up(), v, &req),
                    };
                    self.leases.on_grant(v, &g, &voters, self.now);
                } else {
                    self.send_lease(v, LeaseWire::Request(req));
                }
            }
        }
    }

    /// raft-rs pauses a follower's replication while a snapshot is in
    /// flight until the application reports how it went; a snapshot the
    /// network lost would pause it forever. A transport that knows can call
    /// [`Node::report_snapshot`]; without word for two election timeouts
    /// the node reports a failure itself, and raft-rs sends another.
    fn retry_snapshots(&mut self) {
        let timeout = 2 * self.cfg.election_tick as u64;
        let now = self.now;
        let mut failed = Vec::new();
        let prs = self.raw.raft.prs();
        self.snapshots_sent.retain(|&id, &mut sent| {
            let pending = prs
                .get(id)
                .is_some_and(|p| p.state == raft::ProgressState::Snapshot);
            if pending && now >= sent + timeout {
                failed.push(id);
            }
            pending && now < sent + timeout
        });
        for id in failed {
            self.raw.report_snapshot(id, raft::SnapshotStatus::Failure);
        }
    }

    /// What the transport learned about a snapshot it carried to `to`.
    pub fn report_snapshot(&mut self, to: NodeId, delivered: bool) {
        self.snapshots_sent.remove(&to);
        let status = if delivered {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    /// The leader proposes what the policy decides, once its state holds
    /// everything committed (an entry of its own term is committed and
    /// applied), so it never decides from an older leader's view, and
    /// once its previous decisions are applied (nothing of its own is in
    /// flight), so it never proposes the same move twice.
    fn run_policy(&mut self) {
        if self.now < self.next_policy_at {
            return;
        }
        let log = &self.raw.raft.raft_log;
        let fresh = log.term(log.committed).ok() == Some(self.raw.raft.term)
            && self.applied >= log.last_index();
        if !fresh {
            return;
        }
        self.next_policy_at = self.now + self.cfg.policy_interval_ticks;
        for cmd in policy::decide(&self.state, &self.liveness, self.now, &self.cfg.policy) {
            // Dropped proposals (leadership lost meanwhile) are retried by
            // the next leader's own decision.
            let _ = self.raw.propose(vec![], cmd.encode());
        }
    }

    fn send_lease(&mut self, to: NodeId, body: LeaseWire) {
        if self.outbox.len() < MAX_OUTBOX {
            let bytes = Wire::Lease {
                from: self.cfg.id,
                to,
                body,
            }
            .encode();
            self.outbox.push(Outgoing { to, bytes });
        }
    }

    /// Proposes a command; it is committed (or refused) once it appears
    /// in a later `Ready.applied`. Larger than [`MAX_ENTRY_BYTES`] is an
    /// error here, so no entry the log store cannot hold is ever replicated.
    pub fn propose(&mut self, cmd: &Command) -> Result<(), NodeError> {
        let data = cmd.encode();
        if data.len() > MAX_ENTRY_BYTES {
            return Err(NodeError::TooLarge {
                bytes: data.len(),
                max: MAX_ENTRY_BYTES,
            });
        }
        self.raw.propose(vec![], data)?;
        Ok(())
    }

    /// Proposes one change of the Raft voter set. raft-rs commits voter
    /// changes one at a time: while one is pending, a second is turned into
    /// an empty entry, so propose the next only once this one is applied.
    pub fn propose_membership(&mut self, change: Membership) -> Result<(), NodeError> {
        let (change_type, node_id) = match change {
            Membership::AddVoter(id) => (ConfChangeType::AddNode, id),
            Membership::RemoveVoter(id) => (ConfChangeType::RemoveNode, id),
        };
        if node_id == 0 {
            return Err(NodeError::Malformed("node id 0".into()));
        }
        let cc = ConfChange {
            change_type: change_type as i32,
            node_id,
            ..Default::default()
        };
        self.raw.propose_conf_change(vec![], cc)?;
        Ok(())
    }

    /// A message from a peer. Anything malformed or misaddressed is an
    /// error and changes nothing.
    pub fn step(&mut self, bytes: &[u8]) -> Result<(), NodeError> {
        let me = self.cfg.id;
        match Wire::decode(bytes)? {
            Wire::Raft(m) => {
                if m.to != me {
                    return Err(NodeError::Misaddressed { to: m.to, me });
                }
                if raft::raw_node::is_local_msg(m.get_msg_type()) {
                    return Err(NodeError::Malformed("a local message type".into()));
                }
                // Only members count: a removed node that has not heard of
                // its removal keeps campaigning, and must not look alive to
                // the policy.
                if self.is_leader() && self.raw.raft.prs().conf().voters().contains(m.from) {
                    self.liveness.heard(m.from, self.now);
                }
                self.raw.step(*m)?;
                self.reseed_election_timeout();
            }
            Wire::Lease { from, to, body } => {
                if to != me {
                    return Err(NodeError::Misaddressed { to, me });
                }
                match body {
                    LeaseWire::Request(req) => {
                        let granted = lease::grants(&self.state, self.caught_up(), from, &req);
                        self.send_lease(
                            from,
                            LeaseWire::Grant(LeaseGrant {
                                group: req.group,
                                epoch: req.epoch,
                                seq: req.seq,
                                granted,
                            }),
                        );
                    }
                    LeaseWire::Grant(g) => {
                        let voters = self.voters();
                        self.leases.on_grant(from, &g, &voters, self.now);
                    }
                }
            }
        }
        Ok(())
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready() || !self.outbox.is_empty()
    }

    pub fn ready(&mut self) -> Result<Option<Ready>, NodeError> {
        if !self.raw.has_ready() {
            if self.outbox.is_empty() {
                return Ok(None);
            }
            return Ok(Some(Ready {
                messages: std::mem::take(&mut self.outbox),
                ..Default::default()
            }));
        }
        let mut rd = self.raw.ready();
        let number = rd.number();
        let encode = |ms: Vec<Message>| -> Vec<Outgoing> {
            ms.into_iter()
                .map(|m| Outgoing {
                    to: m.to,
                    bytes: Wire::Raft(Box::new(m)).encode(),
                })
                .collect()
        };
        for m in rd.messages() {
            if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                self.snapshots_sent.insert(m.to, self.now);
            }
        }
        let mut messages = encode(rd.take_messages());
        messages.append(&mut self.outbox);
        let after_persist = encode(rd.take_persisted_messages());

        let mut restored = None;
        let snapshot = if rd.snapshot().is_empty() {
            None
        } else {
            let snap = rd.snapshot().clone();
            self.raw.mut_store().apply_snapshot(&snap)?;
            self.state = ClusterState::decode(&snap.data)?;
            self.applied = snap.get_metadata().index;
            restored = Some(self.applied);
            Some(snap.get_metadata().clone())
        };
        let entries = rd.take_entries();
        self.raw.mut_store().append(&entries)?;
        let hard_state = rd.hs().cloned();
        let must_sync = rd.must_sync();

        let mut applied = Vec::new();
        for e in rd.take_committed_entries() {
            if e.index <= self.applied {
                continue;
            }
            self.applied = e.index;
            if e.data.is_empty() {
                // A new leader's empty entry.
                continue;
            }
            let result = match e.get_entry_type() {
                EntryType::EntryNormal => self.state.apply_entry(&e.data),
                EntryType::EntryConfChange => self.apply_membership(&e.data),
                // We never propose joint (V2) changes.
                EntryType::EntryConfChangeV2 => {
                    Err(CommandError::Malformed("a joint conf change".into()))
                }
            };
            applied.push(AppliedEntry {
                index: e.index,
                term: e.term,
                data: e.data,
                result,
            });
        }
        self.raw.advance_append_async(rd);
        self.advance_raft_applied();
        self.leases.on_state(&self.state);
        self.unpersisted.push_back((number, hard_state.clone()));

        let leader = self.is_leader();
        if leader && !self.was_leader {
            let ids: Vec<NodeId> = self.state.nodes.keys().copied().collect();
            self.liveness.reset(self.now, ids);
            self.next_policy_at = self.now;
        }
        self.was_leader = leader;

        Ok(Some(Ready {
            persist: Some(Persist {
                number,
                entries,
                hard_state,
                snapshot,
                must_sync,
            }),
            messages,
            after_persist,
            applied,
            restored,
        }))
    }

    /// A committed voter change. Every replica applies the same ones in
    /// the same order, so a refused one is refused everywhere.
    fn apply_membership(&mut self, data: &[u8]) -> Result<Applied, CommandError> {
        let cc = ConfChange::decode(data).map_err(|e| CommandError::Malformed(e.to_string()))?;
        let cs = self
            .raw
            .apply_conf_change(&cc)
            .map_err(|e| CommandError::Invalid {
                field: "node_id",
                reason: e.to_string(),
            })?;
        let removed_self = !cs.voters.contains(&self.cfg.id);
        self.raw.mut_store().set_conf_state(cs);
        if removed_self && self.is_leader() {
            // raft-rs 0.7 has no step-down on removal: a leader outside
            // its own voter set fails an assertion on the next append
            // response. Step down; the remaining voters elect a leader.
            let term = self.raw.raft.term;
            self.raw.raft.become_follower(term, raft::INVALID_ID);
        }
        // A snapshot from before the change does not list a new voter, and
        // raft-rs refuses a snapshot whose voters lack it: the next one
        // must be taken at once, not after `snapshot_every` entries.
        self.snapshot_due = true;
        Ok(Applied::Done)
    }

    fn advance_raft_applied(&mut self) {
        let log = &self.raw.raft.raft_log;
        let to = self.applied.min(log.committed).min(log.persisted);
        if to > log.applied {
            self.raw.advance_apply_to(to);
        }
    }

    /// The persist of Ready `number` is to be made durable now: syncs the
    /// log, then writes the hard state that may commit it. Persists must
    /// complete in the order their Readies were returned.
    pub fn on_persisted(&mut self, number: u64) -> Result<(), NodeError> {
        let expected = self.unpersisted.front().map(|(n, _)| *n);
        if expected != Some(number) {
            return Err(NodeError::PersistOrder {
                got: number,
                expected,
            });
        }
        let (_, hs) = self.unpersisted.pop_front().expect("checked");
        let store = self.raw.mut_store();
        store.sync()?;
        if let Some(hs) = hs {
            store.set_hard_state(&hs)?;
        }
        self.raw.on_persist_ready(number);
        self.advance_raft_applied();
        self.maybe_compact()?;
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        let store = self.raw.store();
        let snap_index = store.latest_snapshot().get_metadata().index;
        let due = self.applied >= snap_index + self.cfg.snapshot_every
            || (self.snapshot_due && self.applied > snap_index);
        if !due || self.applied > store.hard_state().commit || self.applied > store.last_index()? {
            return Ok(());
        }
        let data = self.state.encode();
        let applied = self.applied;
        self.raw.mut_store().compact(applied, data)?;
        self.snapshot_due = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDir;
    use crate::state::Role;

    fn genesis() -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            s.apply(&Command::AddNode {
                id,
                name: format!("n{id}"),
                raft_addr: format!("n{id}:7000"),
                listeners: vec![format!("n{id}:4420")],
                role: Role::Storage,
            })
            .unwrap();
            s.apply(&Command::AddGroup {
                id: id as GroupId,
                preferred_owner: Some(id),
            })
            .unwrap();
        }
        s
    }

    /// Three nodes on a perfect network with instant disks.
    fn drive<D: Dir>(nodes: &mut [Node<D>], ticks: u64) {
        for _ in 0..ticks {
            for n in nodes.iter_mut() {
                n.tick();
            }
            for _round in 0..50 {
                let mut inflight = Vec::new();
                for n in nodes.iter_mut() {
                    while let Some(rd) = n.ready().unwrap() {
                        inflight.extend(rd.messages);
                        if let Some(p) = &rd.persist {
                            n.on_persisted(p.number).unwrap();
                        }
                        inflight.extend(rd.after_persist);
                    }
                }
                if inflight.is_empty() {
                    break;
                }
                for m in inflight {
                    let to = nodes.iter_mut().find(|n| n.id() == m.to).unwrap();
                    let _ = to.step(&m.bytes);
                }
            }
        }
    }

    /// Like `drive`, but `deliver` decides which messages arrive.
    fn drive_filtered(
        nodes: &mut [Node<MemDir>],
        ticks: u64,
        deliver: &mut dyn FnMut(&Outgoing) -> bool,
    ) {
        for _ in 0..ticks {
            for n in nodes.iter_mut() {
                n.tick();
            }
            for _round in 0..50 {
                let mut inflight = Vec::new();
                for n in nodes.iter_mut() {
                    while let Some(rd) = n.ready().unwrap() {
                        inflight.extend(rd.messages);
                        if let Some(p) = &rd.persist {
                            n.on_persisted(p.number).unwrap();
                        }
                        inflight.extend(rd.after_persist);
                    }
                }
                if inflight.is_empty() {
                    break;
                }
                for m in inflight {
                    if deliver(&m) {
                        let to = nodes.iter_mut().find(|n| n.id() == m.to).unwrap();
                        let _ = to.step(&m.bytes);
                    }
                }
            }
        }
    }

    #[test]
    fn a_lost_snapshot_is_sent_again() {
        let dirs: Vec<MemDir> = (0..3).map(|_| MemDir::new()).collect();
        let mut nodes: Vec<Node<MemDir>> = (1..=3)
            .map(|id| {
                let mut cfg = NodeConfig::new(id, id);
                cfg.snapshot_every = 3;
                Node::bootstrap(dirs[id as usize - 1].clone(), cfg, &[1, 2, 3], &genesis()).unwrap()
            })
            .collect();
        drive(&mut nodes, 60);
        let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
        let lagging = nodes[(leader + 1) % 3].id();
        let cut = |m: &Outgoing| m.to != lagging;
        for v in 0..10 {
            let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
            nodes[leader]
                .propose(&Command::PutDocument {
                    expected_version: v,
                    text: format!("v{v}"),
                })
                .unwrap();
            drive_filtered(&mut nodes, 2, &mut |m| cut(m));
        }
        let leader_id = nodes.iter().find(|n| n.is_leader()).unwrap().id();
        assert!(
            nodes
                .iter()
                .all(|n| n.store().latest_snapshot().get_metadata().index > 0 || n.id() == lagging),
            "the others compacted, so only a snapshot can catch the lagging node up"
        );
        // Reconnect, but lose the first snapshot on the way.
        let mut lost = 0;
        drive_filtered(&mut nodes, 60, &mut |m| {
            let is_snapshot = matches!(Wire::decode(&m.bytes), Ok(Wire::Raft(ref r))
                if r.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot);
            if is_snapshot && lost == 0 {
                lost += 1;
                return false;
            }
            true
        });
        assert_eq!(lost, 1, "the leader sent a snapshot");
        let l = nodes.iter().find(|n| n.id() == leader_id).unwrap();
        let f = nodes.iter().find(|n| n.id() == lagging).unwrap();
        assert_eq!(
            f.state().document.version,
            10,
            "caught up through a second snapshot"
        );
        assert_eq!(f.state(), l.state());
    }

    fn three(dirs: &[MemDir]) -> Vec<Node<MemDir>> {
        (1..=3)
            .map(|id| {
                Node::bootstrap(
                    dirs[id as usize - 1].clone(),
                    NodeConfig::new(id, id),
                    &[1, 2, 3],
                    &genesis(),
                )
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn three_nodes_elect_a_leader_assign_owners_and_grant_leases() {
        let dirs: Vec<MemDir> = (0..3).map(|_| MemDir::new()).collect();
        let mut nodes = three(&dirs);
        drive(&mut nodes, 80);
        let leaders: Vec<_> = nodes
            .iter()
            .filter(|n| n.is_leader())
            .map(|n| n.id())
            .collect();
        assert_eq!(leaders.len(), 1, "{leaders:?}");
        for n in &nodes {
            for g in 1..=3 {
                assert_eq!(
                    n.state().groups[&g].owner,
                    Some(g as NodeId),
                    "node {}",
                    n.id()
                );
                assert_eq!(n.state().groups[&g].epoch, 1);
            }
        }
        for g in 1..=3u32 {
            let writers: Vec<_> = nodes
                .iter()
                .filter(|n| n.can_write(g))
                .map(|n| n.id())
                .collect();
            assert_eq!(writers, vec![g as NodeId], "group {g}");
        }
    }

    #[test]
    fn proposals_commit_everywhere_and_survive_a_restart() {
        let dirs: Vec<MemDir> = (0..3).map(|_| MemDir::new()).collect();
        let mut nodes = three(&dirs);
        drive(&mut nodes, 60);
        let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
        nodes[leader]
            .propose(&Command::PutDocument {
                expected_version: 0,
                text: "[target]".into(),
            })
            .unwrap();
        drive(&mut nodes, 5);
        for n in &nodes {
            assert_eq!(n.state().document.version, 1);
        }
        let before = nodes[0].state().clone();
        let applied = nodes[0].applied_index();
        drop(nodes);
        let mut nodes: Vec<Node<MemDir>> = (1..=3)
            .map(|id| {
                Node::restart(dirs[id as usize - 1].clone(), NodeConfig::new(id, 10 + id)).unwrap()
            })
            .collect();
        drive(&mut nodes, 60);
        assert!(nodes[0].applied_index() >= applied);
        assert_eq!(nodes[0].state().document, before.document);
        assert_eq!(nodes.iter().filter(|n| n.is_leader()).count(), 1);
    }

    #[test]
    fn a_cluster_on_real_directories_restarts_from_them() {
        use crate::disk::OsDir;
        let tmp = tempfile::tempdir().unwrap();
        let dir = |id: u64| OsDir::open(tmp.path().join(format!("n{id}"))).unwrap();
        let mut nodes: Vec<Node<OsDir>> = (1..=3)
            .map(|id| {
                let mut cfg = NodeConfig::new(id, id);
                cfg.snapshot_every = 4;
                Node::bootstrap(dir(id), cfg, &[1, 2, 3], &genesis()).unwrap()
            })
            .collect();
        drive(&mut nodes, 60);
        for v in 0..6 {
            let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
            nodes[leader]
                .propose(&Command::PutDocument {
                    expected_version: v,
                    text: format!("v{v}"),
                })
                .unwrap();
            drive(&mut nodes, 2);
        }
        let before: Vec<ClusterState> = nodes.iter().map(|n| n.state().clone()).collect();
        drop(nodes);
        assert!(tmp.path().join("n1/snapshot").exists());
        assert!(!tmp.path().join("n1/snapshot.tmp").exists());
        let mut nodes: Vec<Node<OsDir>> = (1..=3)
            .map(|id| Node::restart(dir(id), NodeConfig::new(id, 7 * id)).unwrap())
            .collect();
        drive(&mut nodes, 60);
        for (n, b) in nodes.iter().zip(&before) {
            assert_eq!(n.state().document, b.document);
            assert_eq!(n.state().document.version, 6);
        }
        assert_eq!(nodes.iter().filter(|n| n.is_leader()).count(), 1);
    }

    #[test]
    fn malformed_and_misaddressed_messages_are_errors() {
        let dirs: Vec<MemDir> = (0..3).map(|_| MemDir::new()).collect();
        let mut nodes = three(&dirs);
        let n = &mut nodes[0];
        assert!(matches!(n.step(&[]), Err(NodeError::Malformed(_))));
        assert!(matches!(n.step(&[9, 1, 2]), Err(NodeError::Malformed(_))));
        assert!(matches!(
            n.step(&[TAG_RAFT, 0xff, 0xff, 0xff]),
            Err(NodeError::Malformed(_))
        ));
        assert!(matches!(
            n.step(&[TAG_LEASE, b'{']),
            Err(NodeError::Malformed(_))
        ));
        let m = Message {
            to: 2,
            from: 3,
            ..Default::default()
        };
        assert!(matches!(
            n.step(&Wire::Raft(Box::new(m)).encode()),
            Err(NodeError::Misaddressed { to: 2, me: 1 })
        ));
        let hup = Message {
            to: 1,
            from: 3,
            msg_type: raft::eraftpb::MessageType::MsgHup as i32,
            ..Default::default()
        };
        assert!(n.step(&Wire::Raft(Box::new(hup)).encode()).is_err());
        assert!(
            !n.is_leader(),
            "a network MsgHup must not start an election"
        );
        assert!(matches!(
            n.on_persisted(42),
            Err(NodeError::PersistOrder { got: 42, .. })
        ));
    }

    #[test]
    fn voters_join_and_leave_one_at_a_time_and_survive_a_restart() {
        let dirs: Vec<MemDir> = (0..4).map(|_| MemDir::new()).collect();
        let mut nodes = three(&dirs);
        drive(&mut nodes, 60);
        assert!(Node::join(MemDir::new(), NodeConfig::new(4, 4), &[1, 4], &genesis()).is_err());
        nodes.push(
            Node::join(
                dirs[3].clone(),
                NodeConfig::new(4, 4),
                &[1, 2, 3],
                &genesis(),
            )
            .unwrap(),
        );
        assert!(!nodes[3].voters().contains(&4));
        let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
        nodes[leader]
            .propose_membership(Membership::AddVoter(4))
            .unwrap();
        drive(&mut nodes, 20);
        for n in &nodes {
            assert_eq!(n.voters(), vec![1, 2, 3, 4], "node {}", n.id());
        }
        assert_eq!(
            nodes[3].state(),
            nodes[leader].state(),
            "the joiner replayed onto genesis"
        );

        // Remove a voter that is not the leader; the other three go on.
        let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
        let gone = nodes[(leader + 1) % 3].id();
        nodes[leader]
            .propose_membership(Membership::RemoveVoter(gone))
            .unwrap();
        drive(&mut nodes, 20);
        let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
        let mut expect: Vec<NodeId> = vec![1, 2, 3, 4];
        expect.retain(|&id| id != gone);
        assert_eq!(nodes[leader].voters(), expect);
        nodes.retain(|n| n.id() != gone);
        let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
        nodes[leader]
            .propose(&Command::PutDocument {
                expected_version: 0,
                text: "three voters".into(),
            })
            .unwrap();
        drive(&mut nodes, 10);
        assert!(nodes.iter().all(|n| n.state().document.version == 1));

        // Node 4 restarts: the conf changes replay from its log.
        nodes.retain(|n| n.id() != 4);
        nodes.push(Node::restart(dirs[3].clone(), NodeConfig::new(4, 44)).unwrap());
        drive(&mut nodes, 40);
        let n4 = nodes.iter().find(|n| n.id() == 4).unwrap();
        assert_eq!(n4.voters(), expect);
        assert_eq!(n4.state().document.version, 1);
        assert_eq!(nodes.iter().filter(|n| n.is_leader()).count(), 1);
        assert!(matches!(
            nodes[0].propose_membership(Membership::AddVoter(0)),
            Err(NodeError::Malformed(_))
        ));
    }

    /// The grant node 3 answers to a lease request from `from`.
    fn lease_answer(n3: &mut Node<MemDir>, from: NodeId, req: LeaseRequest) -> bool {
        let bytes = Wire::Lease {
            from,
            to: 3,
            body: LeaseWire::Request(req),
        }
        .encode();
        n3.step(&bytes).unwrap();
        let rd = n3.ready().unwrap().unwrap();
        let grants: Vec<bool> = rd
            .messages
            .iter()
            .filter(|m| m.to == from)
            .filter_map(|m| match Wire::decode(&m.bytes) {
                Ok(Wire::Lease {
                    body: LeaseWire::Grant(g),
                    ..
                }) if g.seq == req.seq => Some(g.granted),
                _ => None,
            })
            .collect();
        assert_eq!(grants.len(), 1);
        grants[0]
    }

    #[test]
    fn a_voter_restarted_behind_its_log_grants_no_lease_until_it_caught_up() {
        use rand::SeedableRng;
        let dirs: Vec<MemDir> = (0..3).map(|_| MemDir::new()).collect();
        let mut nodes = three(&dirs);
        drive(&mut nodes, 80);
        assert_eq!(nodes[2].state().groups[&1].owner, Some(1));
        let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
        nodes[leader]
            .propose(&Command::SetGroupOwner {
                group: 1,
                owner: Some(2),
                expected_epoch: 1,
            })
            .unwrap();
        // Deliver until node 3 applies the move, and crash it right there:
        // before the persist whose hard state commits the move.
        let mut crashed = false;
        'rounds: for _ in 0..200 {
            let mut inflight = Vec::new();
            for n in nodes.iter_mut() {
                while let Some(rd) = n.ready().unwrap() {
                    inflight.extend(rd.messages);
                    let moved = n.id() == 3
                        && rd
                            .applied
                            .iter()
                            .any(|a| matches!(a.result, Ok(Applied::Owner { group: 1, .. })));
                    if moved {
                        crashed = true;
                        break 'rounds;
                    }
                    if let Some(p) = &rd.persist {
                        n.on_persisted(p.number).unwrap();
                    }
                    inflight.extend(rd.after_persist);
                }
            }
            for m in inflight {
                let to = nodes.iter_mut().find(|n| n.id() == m.to).unwrap();
                let _ = to.step(&m.bytes);
            }
            for n in nodes.iter_mut() {
                n.tick();
            }
        }
        assert!(crashed, "node 3 applied the move");
        nodes.pop();
        dirs[2].crash(&mut ChaCha8Rng::seed_from_u64(1));
        let mut n3 = Node::restart(dirs[2].clone(), NodeConfig::new(3, 33)).unwrap();
        // Replay what its hard state commits, cut off from the others.
        while let Some(rd) = n3.ready().unwrap() {
            if let Some(p) = rd.persist {
                n3.on_persisted(p.number).unwrap();
            }
        }
        // The scenario: its durable hard state predates the move, so its
        // state replays to the old owner, while its log holds the move.
        assert_eq!(n3.state().groups[&1].owner, Some(1));
        assert_eq!(n3.state().groups[&1].epoch, 1);
        assert!(n3.store().entries_after_snapshot().len() as u64 > n3.applied_index());
        let old = LeaseRequest {
            group: 1,
            epoch: 1,
            seq: 900,
        };
        assert!(
            !lease_answer(&mut n3, 1, old),
            "no grant to the old owner from a voter behind its log"
        );
        // Once it caught up, it grants the new owner and never the old.
        nodes.push(n3);
        drive(&mut nodes, 20);
        let n3 = nodes.iter_mut().find(|n| n.id() == 3).unwrap();
        assert_eq!(n3.state().groups[&1].epoch, 2);
        let new = LeaseRequest {
            group: 1,
            epoch: 2,
            seq: 901,
        };
        assert!(lease_answer(n3, 2, new));
        assert!(!lease_answer(n3, 1, LeaseRequest { seq: 902, ..old }));
    }

    fn raft_types(out: &[Outgoing]) -> Vec<raft::eraftpb::MessageType> {
        out.iter()
            .filter_map(|m| match Wire::decode(&m.bytes) {
                Ok(Wire::Raft(r)) => Some(r.get_msg_type()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_vote_waits_for_the_persist_of_the_term_and_vote_it_promises() {
        use raft::eraftpb::MessageType::*;
        let mut n =
            Node::bootstrap(MemDir::new(), NodeConfig::new(1, 5), &[1, 2, 3], &genesis()).unwrap();
        let mut rd = None;
        for _ in 0..40 {
            n.tick();
            if let Some(r) = n.ready().unwrap() {
                rd = Some(r);
                break;
            }
        }
        let rd = rd.expect("campaigned");
        assert!(raft_types(&rd.messages).is_empty());
        assert_eq!(raft_types(&rd.after_persist), vec![MsgRequestPreVote; 2]);
        n.on_persisted(rd.persist.unwrap().number).unwrap();
        let grant = Message {
            msg_type: MsgRequestPreVoteResponse as i32,
            from: 2,
            to: 1,
            term: 1,
            ..Default::default()
        };
        n.step(&Wire::Raft(Box::new(grant)).encode()).unwrap();
        let rd = n.ready().unwrap().unwrap();
        let hs = rd.persist.as_ref().unwrap().hard_state.clone().unwrap();
        assert_eq!(
            (hs.term, hs.vote),
            (1, 1),
            "the vote for itself is to be persisted"
        );
        assert!(
            raft_types(&rd.messages).is_empty(),
            "nothing goes out before that"
        );
        assert_eq!(raft_types(&rd.after_persist), vec![MsgRequestVote; 2]);
        assert_eq!(
            n.store().hard_state().term,
            0,
            "not durable until on_persisted"
        );
        n.on_persisted(rd.persist.unwrap().number).unwrap();
        assert_eq!(n.store().hard_state().vote, 1);
    }

    #[test]
    fn a_leader_that_removes_itself_steps_down_and_the_rest_elect_another() {
        let dirs: Vec<MemDir> = (0..4).map(|_| MemDir::new()).collect();
        let mut nodes = three(&dirs);
        nodes.push(
            Node::join(
                dirs[3].clone(),
                NodeConfig::new(4, 4),
                &[1, 2, 3],
                &genesis(),
            )
            .unwrap(),
        );
        drive(&mut nodes, 60);
        let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
        nodes[leader]
            .propose_membership(Membership::AddVoter(4))
            .unwrap();
        drive(&mut nodes, 20);
        let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
        let old = nodes[leader].id();
        nodes[leader]
            .propose_membership(Membership::RemoveVoter(old))
            .unwrap();
        drive(&mut nodes, 60);
        let leaders: Vec<NodeId> = nodes
            .iter()
            .filter(|n| n.is_leader())
            .map(|n| n.id())
            .collect();
        assert_eq!(leaders.len(), 1);
        assert_ne!(leaders[0], old, "the removed leader stepped down");
        let l = nodes.iter().find(|n| n.is_leader()).unwrap();
        assert!(!l.voters().contains(&old));
        assert_eq!(l.voters().len(), 3);
    }

    #[test]
    fn random_bytes_from_the_network_never_panic_and_change_nothing() {
        use rand::{Rng, SeedableRng};
        let dirs: Vec<MemDir> = (0..3).map(|_| MemDir::new()).collect();
        let mut nodes = three(&dirs);
        drive(&mut nodes, 40);
        let n = &mut nodes[0];
        let (term, applied, state) = (n.term(), n.applied_index(), n.state().clone());
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let mut errors = 0;
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let mut b: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            if let Some(t) = b.first_mut() {
                *t = [TAG_RAFT, TAG_LEASE, 0, 7][rng.gen_range(0..4)];
            }
            if n.step(&b).is_err() {
                errors += 1;
            }
        }
        assert!(errors > 19_000, "{errors} of 20000 refused");
        assert_eq!((n.term(), n.applied_index()), (term, applied));
        assert_eq!(n.state(), &state);
        let big = Command::PutDocument {
            expected_version: 0,
            text: "x".repeat(MAX_ENTRY_BYTES),
        };
        assert!(matches!(n.propose(&big), Err(NodeError::TooLarge { .. })));
    }

    #[test]
    fn compaction_keeps_the_state_across_restart() {
        let dirs: Vec<MemDir> = (0..3).map(|_| MemDir::new()).collect();
        let mut nodes: Vec<Node<MemDir>> = (1..=3)
            .map(|id| {
                let mut cfg = NodeConfig::new(id, id);
                cfg.snapshot_every = 5;
                Node::bootstrap(dirs[id as usize - 1].clone(), cfg, &[1, 2, 3], &genesis()).unwrap()
            })
            .collect();
        drive(&mut nodes, 60);
        for v in 0..12 {
            let leader = nodes.iter().position(|n| n.is_leader()).unwrap();
            nodes[leader]
                .propose(&Command::PutDocument {
                    expected_version: v,
                    text: format!("v{v}"),
                })
                .unwrap();
            drive(&mut nodes, 2);
        }
        for n in &nodes {
            assert_eq!(n.state().document.version, 12);
            assert!(
                n.store().latest_snapshot().get_metadata().index > 0,
                "node {} compacted",
                n.id()
            );
        }
        drop(nodes);
        let n = Node::restart(dirs[0].clone(), NodeConfig::new(1, 1)).unwrap();
        assert!(
            n.state().document.version >= 1,
            "restored from the snapshot, not genesis"
        );
    }
}
