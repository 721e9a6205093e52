//! The deterministic simulator: the real [`Node`] (raft-rs, the log store
//! over [`MemDir`], the state machine, policy and leases) on a simulated
//! network, disk and clock, with every random choice drawn from one seeded
//! ChaCha stream. One seed is one schedule: the same seed replays the same
//! run, event for event (the trace hash proves it).
//!
//! Time is in steps, [`STEPS_PER_TICK`] per tick of real time; each node's
//! clock has its own phase and runs fast or slow by up to
//! `clock_drift_ppm` (1%, the bound the leases assume), so a node's tick is
//! not every other node's. Faults, during the first `fault_ticks`:
//! - network: drop, duplicate, delay (so reorder), and partitions that cut
//!   the nodes into two sides until healed;
//! - crash: the node's memory is gone, its disk loses (or tears) every
//!   byte not synced, and it restarts later from that disk;
//! - slow disk: a persist completes after a random delay, and the
//!   messages that wait on it are held until then.
//!
//! Every third seed also starts one storage node outside the voter set and
//! has the leader add it by a conf change mid-run; half of those remove it
//! again later.
//!
//! Then the network heals, crashed nodes restart, and within
//! `settle_ticks` the cluster must have one leader that every node follows,
//! every group owned by a live storage node that may write, and every node
//! caught up with everything committed. The checkers in [`checker`] run
//! after every event.
//!
//! Replay a failing seed with
//! `STRATA_SIM_SEED=<seed> cargo test -p strata-cluster --test sim -- --exact replay --nocapture`.

pub mod checker;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::disk::MemDir;
use crate::node::{Node, NodeConfig, Outgoing, Ready};
use crate::state::{ClusterState, Command, GroupId, NodeId, Role};
use checker::{Checker, fnv};

pub const STEPS_PER_TICK: u64 = 10;
/// Events in flight beyond this are dropped (as an overloaded network
/// would), so a run's memory is bounded.
const MAX_EVENTS: usize = 200_000;
/// Readies drained after one input; raft-rs needs one or two.
const MAX_READIES_PER_INPUT: usize = 64;

#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub storage_nodes: u64,
    pub witnesses: u64,
    pub fault_ticks: u64,
    pub settle_ticks: u64,
    /// Per message, in parts per million.
    pub drop_ppm: u32,
    pub duplicate_ppm: u32,
    /// Network delay, in steps.
    pub delay_steps: (u64, u64),
    /// Per tick.
    pub partition_ppm: u32,
    pub heal_ppm: u32,
    /// Per node and tick.
    pub crash_ppm: u32,
    /// Per Ready that applied entries: crash right after it, before its
    /// persist completes, so the node applied what its durable hard state
    /// does not yet commit (the worst moment for a lease voter).
    pub crash_after_apply_ppm: u32,
    pub restart_after_ticks: (u64, u64),
    /// Persist latency, in steps.
    pub disk_steps: (u64, u64),
    /// Each node's clock runs at a fixed rate drawn within ± this of real
    /// time: the lease's assumed bound (`LeaseConfig::drift_ppm`).
    pub clock_drift_ppm: u32,
    /// Entries between snapshots: small, so that compaction, snapshots
    /// sent to lagging followers and restarts from a snapshot all happen.
    pub snapshot_every: u64,
    /// A storage node that starts outside the voter set and is added by a
    /// conf change proposed from this tick on (retried until it is in).
    pub join_at_tick: Option<u64>,
    /// Then, this long after it is in, the leader removes it again.
    pub leave_after_ticks: Option<u64>,
}

impl SimOptions {
    /// The standard schedule for a seed: odd seeds run two storage nodes
    /// and a witness, seeds ≡ 0 (mod 4) three storage nodes, seeds ≡ 2
    /// (mod 4) four storage nodes and a witness (five voters, where a
    /// minority is two nodes).
    pub fn for_seed(seed: u64) -> SimOptions {
        let (storage_nodes, witnesses) = match seed % 4 {
            1 | 3 => (2, 1),
            0 => (3, 0),
            _ => (4, 1),
        };
        SimOptions {
            seed,
            storage_nodes,
            witnesses,
            fault_ticks: 300,
            settle_ticks: 300,
            drop_ppm: 50_000,
            duplicate_ppm: 20_000,
            delay_steps: (1, 25),
            partition_ppm: 15_000,
            heal_ppm: 40_000,
            crash_ppm: 2_000,
            crash_after_apply_ppm: 30_000,
            restart_after_ticks: (5, 60),
            disk_steps: (0, 30),
            clock_drift_ppm: 10_000,
            snapshot_every: 3 + seed % 8,
            // Every third seed grows the cluster by one voter mid-run.
            join_at_tick: (seed % 3 == 2).then_some(20 + seed % 200),
            // Half of those remove it again.
            leave_after_ticks: (seed % 6 == 5).then_some(30 + seed % 100),
        }
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    /// Hash of every event in order: equal for two runs of one seed.
    pub trace_hash: u64,
    pub events: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub messages_dropped: u64,
    pub committed: u64,
    /// Ticks after the heal until the cluster was whole again.
    pub settled_after_ticks: u64,
    /// Ownership changes committed (failovers and failbacks).
    pub ownership_changes: u64,
    /// Snapshots a lagging node received from the leader and installed.
    pub snapshots_installed: u64,
    /// The joiner ended the run as a voter on every node.
    pub joined: bool,
    /// The joiner was removed again and no member counts it as a voter.
    pub left: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Deliver {
        from: NodeId,
        to: NodeId,
        bytes: Vec<u8>,
    },
    DiskDone {
        node: NodeId,
        incarnation: u64,
        number: u64,
    },
}

struct Slot {
    id: NodeId,
    role: Role,
    dir: MemDir,
    node: Option<Node<MemDir>>,
    incarnation: u64,
    /// Persists in flight, in order, with the messages they hold back.
    disk: VecDeque<(u64, Vec<Outgoing>)>,
    /// When the last persist in flight completes.
    disk_free_at: u64,
    restart_at: Option<u64>,
    /// This node's clock rate error: it ticks every `STEPS_PER_TICK · (1
    /// - drift)` steps.
    drift_ppm: i64,
    /// Progress towards the next tick, in millionths of a step.
    clock_acc: i64,
}

pub struct Sim {
    opts: SimOptions,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    slots: Vec<Slot>,
    /// Partition side of each node; empty when the network is whole.
    sides: BTreeMap<NodeId, bool>,
    faults: bool,
    pub checker: Checker,
    trace: u64,
    report: SimReport,
    committed_before_heal: u64,
    settled: Option<u64>,
    joiner: Option<NodeId>,
    /// Tick of the last AddVoter proposal for the joiner.
    join_proposed_at: Option<u64>,
    /// When the leader was first seen with the joiner among its voters.
    joined_at: Option<u64>,
}

fn genesis(opts: &SimOptions) -> ClusterState {
    let mut s = ClusterState::default();
    let n = opts.storage_nodes + opts.witnesses;
    let joiner = u64::from(opts.join_at_tick.is_some());
    for id in 1..=n + joiner {
        let role = if id <= opts.storage_nodes || id > n {
            Role::Storage
        } else {
            Role::Witness
        };
        let listeners = match role {
            Role::Storage => vec![format!("10.9.0.{id}:4420")],
            Role::Witness => vec![],
        };
        s.apply(&Command::AddNode {
            id,
            name: format!("node{id}"),
            raft_addr: format!("10.9.0.{id}:7420"),
            listeners,
            role,
        })
        .expect("genesis node");
    }
    for id in 1..=opts.storage_nodes {
        s.apply(&Command::AddGroup {
            id: id as GroupId,
            preferred_owner: Some(id),
        })
        .expect("genesis group");
    }
    s
}

impl Sim {
    pub fn new(opts: SimOptions) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let g = genesis(&opts);
        let all: Vec<NodeId> = g.nodes.keys().copied().collect();
        let joiner = opts
            .join_at_tick
            .map(|_| opts.storage_nodes + opts.witnesses + 1);
        let voters: Vec<NodeId> = all
            .iter()
            .copied()
            .filter(|&id| Some(id) != joiner)
            .collect();
        let drift = opts.clock_drift_ppm as i64;
        let slots = all
            .iter()
            .map(|&id| {
                let dir = MemDir::new();
                let mut cfg = NodeConfig::new(id, rng.r#gen());
                cfg.snapshot_every = opts.snapshot_every;
                let node = if Some(id) == joiner {
                    Node::join(dir.clone(), cfg, &voters, &g).expect("join")
                } else {
                    Node::bootstrap(dir.clone(), cfg, &voters, &g).expect("bootstrap")
                };
                Slot {
                    id,
                    role: g.nodes[&id].role,
                    dir,
                    node: Some(node),
                    incarnation: 0,
                    disk: VecDeque::new(),
                    disk_free_at: 0,
                    restart_at: None,
                    drift_ppm: rng.gen_range(-drift..=drift),
                    clock_acc: rng.gen_range(0..STEPS_PER_TICK as i64 * 1_000_000),
                }
            })
            .collect();
        Sim {
            report: SimReport {
                seed: opts.seed,
                trace_hash: 0,
                events: 0,
                crashes: 0,
                partitions: 0,
                messages_dropped: 0,
                committed: 0,
                settled_after_ticks: 0,
                ownership_changes: 0,
                snapshots_installed: 0,
                joined: false,
                left: false,
            },
            opts,
            rng,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            slots,
            sides: BTreeMap::new(),
            faults: true,
            checker: Checker::default(),
            trace: 0xcbf29ce484222325,
            committed_before_heal: 0,
            settled: None,
            joiner,
            join_proposed_at: None,
            joined_at: None,
        }
    }

    fn trace(&mut self, parts: &[u64]) {
        for p in parts {
            self.trace ^= *p;
            self.trace = self.trace.wrapping_mul(0x100000001b3);
        }
        self.report.events += 1;
    }

    fn chance(&mut self, ppm: u32) -> bool {
        self.rng.gen_range(0..1_000_000) < ppm
    }

    fn schedule(&mut self, at: u64, ev: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.report.messages_dropped += 1;
            return;
        }
        self.seq += 1;
        self.events.insert((at, self.seq), ev);
    }

    fn slot(&mut self, id: NodeId) -> &mut Slot {
        let i = self
            .slots
            .iter()
            .position(|s| s.id == id)
            .expect("known node");
        &mut self.slots[i]
    }

    fn cut(&self, a: NodeId, b: NodeId) -> bool {
        match (self.sides.get(&a), self.sides.get(&b)) {
            (Some(x), Some(y)) => x != y,
            _ => false,
        }
    }

    fn send(&mut self, from: NodeId, m: Outgoing) {
        if self.cut(from, m.to) || (self.faults && self.chance(self.opts.drop_ppm)) {
            self.report.messages_dropped += 1;
            return;
        }
        let copies = if self.faults && self.chance(self.opts.duplicate_ppm) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let (lo, hi) = self.opts.delay_steps;
            let at = self.now + self.rng.gen_range(lo..=hi);
            self.schedule(
                at,
                Event::Deliver {
                    from,
                    to: m.to,
                    bytes: m.bytes.clone(),
                },
            );
        }
    }

    /// Drains the node's Readies after an input.
    fn drive(&mut self, id: NodeId) -> Result<(), String> {
        for _ in 0..MAX_READIES_PER_INPUT {
            let slot = self.slot(id);
            let Some(node) = slot.node.as_mut() else {
                return Ok(());
            };
            let rd: Ready = match node.ready() {
                Ok(Some(rd)) => rd,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("node {id}: ready: {e}")),
            };
            let term = node.term();
            let leader = node.is_leader();
            let applied = node.applied_index();
            let state = node.state().clone();
            for a in &rd.applied {
                self.checker.on_applied(id, a.index, a.term, &a.data);
                if matches!(a.result, Ok(crate::state::Applied::Owner { .. })) {
                    self.report.ownership_changes += 1;
                }
                self.trace(&[1, id, a.index, a.term, fnv(&a.data)]);
            }
            if rd.restored.is_some() {
                self.report.snapshots_installed += 1;
            }
            if !rd.applied.is_empty() || rd.restored.is_some() {
                self.checker.on_state(id, applied, &state);
            }
            self.checker.on_role(id, term, leader);
            for m in rd.messages {
                self.trace(&[2, id, m.to, fnv(&m.bytes)]);
                self.send(id, m);
            }
            let worst_moment = !rd.applied.is_empty()
                && self.faults
                && self.chance(self.opts.crash_after_apply_ppm);
            if let Some(p) = rd.persist {
                let (lo, hi) = self.opts.disk_steps;
                let delay = self.rng.gen_range(lo..=hi);
                let now = self.now;
                let slot = self.slot(id);
                // Writes are pipelined (the next sync covers every write
                // before it, as group commit does), but complete in order.
                let at = slot.disk_free_at.max(now + delay);
                slot.disk_free_at = at;
                slot.disk.push_back((p.number, rd.after_persist));
                let incarnation = slot.incarnation;
                self.trace(&[3, id, p.number, p.entries.len() as u64, at]);
                self.schedule(
                    at,
                    Event::DiskDone {
                        node: id,
                        incarnation,
                        number: p.number,
                    },
                );
            }
            if worst_moment {
                self.crash(id);
                return Ok(());
            }
        }
        Err(format!(
            "node {id}: more than {MAX_READIES_PER_INPUT} readies for one input"
        ))
    }

    fn handle(&mut self, ev: Event) -> Result<(), String> {
        match ev {
            Event::Deliver { from, to, bytes } => {
                if self.cut(from, to) {
                    self.report.messages_dropped += 1;
                    return Ok(());
                }
                let slot = self.slot(to);
                let Some(node) = slot.node.as_mut() else {
                    return Ok(());
                };
                // Errors are expected here (a response from a stale term,
                // a peer raft-rs no longer tracks) and change nothing.
                let ok = node.step(&bytes).is_ok();
                self.trace(&[4, from, to, fnv(&bytes), u64::from(ok)]);
                self.drive(to)
            }
            Event::DiskDone {
                node: id,
                incarnation,
                number,
            } => {
                let slot = self.slot(id);
                if slot.incarnation != incarnation {
                    return Ok(());
                }
                let Some(node) = slot.node.as_mut() else {
                    return Ok(());
                };
                node.on_persisted(number)
                    .map_err(|e| format!("node {id}: persist {number}: {e}"))?;
                let (n, held) = slot.disk.pop_front().ok_or("disk queue empty")?;
                if n != number {
                    return Err(format!("node {id}: persist {number} completed before {n}"));
                }
                self.trace(&[5, id, number]);
                for m in held {
                    self.send(id, m);
                }
                self.drive(id)
            }
        }
    }

    fn crash(&mut self, id: NodeId) {
        let (lo, hi) = self.opts.restart_after_ticks;
        let after = self.rng.gen_range(lo..=hi) * STEPS_PER_TICK;
        let now = self.now;
        let mut rng = ChaCha8Rng::seed_from_u64(self.rng.r#gen());
        let slot = self.slot(id);
        slot.node = None;
        slot.incarnation += 1;
        slot.disk.clear();
        slot.disk_free_at = 0;
        slot.dir.crash(&mut rng);
        slot.restart_at = Some(now + after);
        self.report.crashes += 1;
        self.trace(&[6, id]);
    }

    fn restart(&mut self, id: NodeId) -> Result<(), String> {
        let mut cfg = NodeConfig::new(id, self.rng.r#gen());
        cfg.snapshot_every = self.opts.snapshot_every;
        let slot = self.slot(id);
        slot.restart_at = None;
        let node =
            Node::restart(slot.dir.clone(), cfg).map_err(|e| format!("node {id}: restart: {e}"))?;
        let applied = node.applied_index();
        let state = node.state().clone();
        slot.node = Some(node);
        self.checker.on_restart(id);
        self.checker.on_state(id, applied, &state);
        self.trace(&[7, id, applied]);
        self.drive(id)
    }

    fn inject_faults(&mut self) {
        if self.sides.is_empty() {
            if self.chance(self.opts.partition_ppm) {
                let ids: Vec<NodeId> = self.slots.iter().map(|s| s.id).collect();
                for id in ids {
                    let side = self.rng.r#gen();
                    self.sides.insert(id, side);
                }
                self.report.partitions += 1;
                let sides: Vec<u64> = self.sides.values().map(|&b| u64::from(b)).collect();
                self.trace(&sides);
            }
        } else if self.chance(self.opts.heal_ppm) {
            self.sides.clear();
            self.trace(&[8]);
        }
        let ids: Vec<NodeId> = self.slots.iter().map(|s| s.id).collect();
        for id in ids {
            let up = self.slot(id).node.is_some();
            if up && self.chance(self.opts.crash_ppm) {
                self.crash(id);
            }
        }
    }

    fn check_writers(&mut self) {
        let mut writers = Vec::new();
        for s in &self.slots {
            if let Some(n) = &s.node {
                for &g in n.state().groups.keys() {
                    if n.can_write(g) {
                        writers.push((s.id, g));
                    }
                }
            }
        }
        self.checker.on_writers(self.now, &writers);
    }

    /// One leader every node follows, every group owned by a live storage
    /// node that may write, everyone caught up with what was committed.
    fn whole(&self, committed_before_heal: u64) -> bool {
        if self.slots.iter().any(|s| s.node.is_none()) {
            return false;
        }
        let departed = self.departed();
        let nodes: Vec<&Node<MemDir>> = self
            .slots
            .iter()
            .filter(|s| Some(s.id) != departed)
            .filter_map(|s| s.node.as_ref())
            .collect();
        let leaders: Vec<&&Node<MemDir>> = nodes.iter().filter(|n| n.is_leader()).collect();
        let [leader] = leaders.as_slice() else {
            return false;
        };
        if nodes.iter().any(|n| n.leader() != Some(leader.id())) {
            return false;
        }
        if nodes
            .iter()
            .any(|n| n.applied_index() < committed_before_heal)
        {
            return false;
        }
        // The joiner is a voter on every member, or, once it left, on none.
        if let Some(j) = self.joiner {
            let want = departed.is_none();
            if nodes.iter().any(|n| n.voters().contains(&j) != want) {
                return false;
            }
        }
        let state = leader.state();
        state.groups.values().all(|g| {
            g.owner.is_some_and(|o| {
                state
                    .nodes
                    .get(&o)
                    .is_some_and(|n| n.role == Role::Storage && n.up)
                    && self.checker.writers().get(&g.id) == Some(&o)
            })
        })
    }

    /// Asks the leader, as an operator would, to add the joiner as a voter
    /// until the leader's voter set has it; retried after 20 ticks, since a
    /// proposal can be lost with its leader.
    fn drive_join(&mut self) -> Result<(), String> {
        let (Some(j), Some(at)) = (self.joiner, self.opts.join_at_tick) else {
            return Ok(());
        };
        let tick = self.now / STEPS_PER_TICK;
        if tick < at || self.join_proposed_at.is_some_and(|t| tick < t + 20) {
            return Ok(());
        }
        let Some(leader) = self
            .slots
            .iter()
            .filter_map(|s| s.node.as_ref())
            .find(|n| n.is_leader())
            .map(|n| n.id())
        else {
            return Ok(());
        };
        let leave_after = self.opts.leave_after_ticks;
        let is_voter = self
            .slot(leader)
            .node
            .as_ref()
            .is_some_and(|n| n.voters().contains(&j));
        if is_voter && self.joined_at.is_none() {
            self.joined_at = Some(tick);
        }
        let change = match (is_voter, self.joined_at, leave_after) {
            (false, None, _) => crate::node::Membership::AddVoter(j),
            (true, Some(t), Some(after)) if tick >= t + after => {
                crate::node::Membership::RemoveVoter(j)
            }
            _ => return Ok(()),
        };
        let node = self.slot(leader).node.as_mut().expect("found above");
        let ok = node.propose_membership(change).is_ok();
        self.join_proposed_at = Some(tick);
        self.trace(&[11, leader, j, u64::from(ok), u64::from(is_voter)]);
        self.drive(leader)
    }

    /// The joiner, once it has been removed again: it no longer counts as
    /// a member of the cluster.
    fn departed(&self) -> Option<NodeId> {
        self.opts.leave_after_ticks.and(self.joiner)
    }

    /// Advances every node's clock by one step; the nodes whose clock
    /// reaches a tick boundary tick now.
    fn due_ticks(&mut self) -> Vec<NodeId> {
        let period = STEPS_PER_TICK as i64 * 1_000_000;
        let mut due = Vec::new();
        for s in &mut self.slots {
            s.clock_acc += 1_000_000 + s.drift_ppm;
            if s.clock_acc >= period {
                s.clock_acc -= period;
                due.push(s.id);
            }
        }
        due
    }

    /// One step of simulated time: the heal, faults, due events, ticks.
    fn step(&mut self) -> Result<(), String> {
        let heal_at = self.opts.fault_ticks * STEPS_PER_TICK;
        if self.now == heal_at {
            self.faults = false;
            self.sides.clear();
            let down: Vec<NodeId> = self
                .slots
                .iter()
                .filter(|s| s.node.is_none())
                .map(|s| s.id)
                .collect();
            for id in down {
                self.restart(id)?;
            }
            self.committed_before_heal = self.checker.max_applied();
            self.trace(&[9]);
        }
        if self.faults && self.now.is_multiple_of(STEPS_PER_TICK) {
            self.inject_faults();
        }
        if self.now.is_multiple_of(STEPS_PER_TICK) {
            self.drive_join()?;
        }
        while let Some(entry) = self.events.first_entry() {
            // Events scheduled for this step by its node ticks run at the
            // start of the next step.
            if entry.key().0 > self.now {
                break;
            }
            let ev = entry.remove();
            self.handle(ev)?;
            self.check_writers();
        }
        for id in self.due_ticks() {
            let restart_due = self.slot(id).restart_at.is_some_and(|t| t <= self.now);
            if restart_due {
                self.restart(id)?;
            }
            if let Some(n) = self.slot(id).node.as_mut() {
                n.tick();
                self.drive(id)?;
            }
            self.check_writers();
        }
        if let Some(v) = self.checker.violations.first() {
            return Err(format!("step {}: {v}", self.now));
        }
        if self.now >= heal_at && self.settled.is_none() && self.whole(self.committed_before_heal) {
            self.settled = Some((self.now - heal_at) / STEPS_PER_TICK);
        }
        self.now += 1;
        Ok(())
    }

    /// Runs up to simulated tick `tick`; `Err` names the first violated
    /// invariant.
    pub fn run_until_tick(&mut self, tick: u64) -> Result<SimReport, String> {
        let end = tick * STEPS_PER_TICK;
        while self.now < end {
            self.step()?;
        }
        let mut r = self.report.clone();
        r.settled_after_ticks = self.settled.unwrap_or(0);
        r.committed = self.checker.max_applied();
        r.trace_hash = self.trace;
        r.joined = self.joiner.is_some_and(|j| {
            self.slots
                .iter()
                .all(|s| s.node.as_ref().is_some_and(|n| n.voters().contains(&j)))
        });
        r.left = self.departed().is_some_and(|j| {
            self.slots
                .iter()
                .filter(|s| s.id != j)
                .all(|s| s.node.as_ref().is_some_and(|n| !n.voters().contains(&j)))
        });
        Ok(r)
    }

    /// Runs the whole schedule, then checks liveness.
    pub fn run(mut self) -> Result<SimReport, String> {
        let r = self.run_until_tick(self.opts.fault_ticks + self.opts.settle_ticks)?;
        // Liveness at the end, not just once: failbacks must have settled
        // too, and the cluster must still be whole.
        if !self.whole(self.committed_before_heal) {
            return Err(format!(
                "not whole {} ticks after the heal: {}",
                self.opts.settle_ticks,
                self.describe()
            ));
        }
        Ok(r)
    }

    /// Cuts `side` off from the other nodes until [`Sim::heal`] (or the
    /// scheduled heal).
    pub fn partition(&mut self, side: &[NodeId]) {
        self.sides = self
            .slots
            .iter()
            .map(|s| (s.id, side.contains(&s.id)))
            .collect();
        self.report.partitions += 1;
        self.trace(&[10]);
    }

    pub fn heal(&mut self) {
        self.sides.clear();
        self.trace(&[8]);
    }

    /// Restarts a crashed node from its disk now.
    pub fn restart_node(&mut self, id: NodeId) -> Result<(), String> {
        self.restart(id)
    }

    /// Crashes a node now; it stays down until the heal.
    pub fn crash_node(&mut self, id: NodeId) {
        self.crash(id);
        self.slot(id).restart_at = None;
    }

    pub fn node_state(&self, id: NodeId) -> Option<&ClusterState> {
        self.slots
            .iter()
            .find(|s| s.id == id)?
            .node
            .as_ref()
            .map(|n| n.state())
    }

    pub fn can_write(&self, id: NodeId, group: GroupId) -> bool {
        self.slots
            .iter()
            .find(|s| s.id == id)
            .and_then(|s| s.node.as_ref())
            .is_some_and(|n| n.can_write(group))
    }

    /// Every node's view, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = format!("{} events in flight; ", self.events.len());
        for s in &self.slots {
            match &s.node {
                None => out.push_str(&format!("[{}: down] ", s.id)),
                Some(n) => {
                    let owned: BTreeSet<GroupId> = n
                        .state()
                        .groups
                        .values()
                        .filter(|g| g.owner == Some(s.id))
                        .map(|g| g.id)
                        .collect();
                    out.push_str(&format!(
                        "[{} {:?}: term {} leader {:?} applied {} commit {} owns {:?} writes {:?}] ",
                        s.id,
                        s.role,
                        n.term(),
                        n.leader(),
                        n.applied_index(),
                        n.commit_index(),
                        owned,
                        owned.iter().filter(|&&g| n.can_write(g)).collect::<Vec<_>>(),
                    ));
                    out.push_str(&format!("persists in flight {}; ", s.disk.len()));
                }
            }
        }
        out
    }
}

/// Runs one seed's standard schedule.
pub fn run_seed(seed: u64) -> Result<SimReport, String> {
    Sim::new(SimOptions::for_seed(seed)).run()
}
