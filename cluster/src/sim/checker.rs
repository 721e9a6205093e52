//! Invariant checkers, apart from the code under test: they see only what a
//! node exposes (applied entries, its state, its role, whether it may
//! write) and never reach into raft-rs or the log store.

use std::collections::BTreeMap;

use crate::state::{ClusterState, GroupId, NodeId};

/// FNV-1a: a stable hash (the same on every machine and Rust version), for
/// comparing payloads, states and traces.
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[derive(Default, Debug)]
pub struct Checker {
    /// index → (term, payload hash) of every entry any node applied.
    committed: BTreeMap<u64, (u64, u64)>,
    /// applied index → hash of the state after it.
    states: BTreeMap<u64, u64>,
    /// term → the node that was leader in it.
    leaders: BTreeMap<u64, NodeId>,
    /// (group, epoch) → owner, from any node's applied state.
    owners: BTreeMap<(GroupId, u64), Option<NodeId>>,
    /// (node, group) → last epoch seen in this incarnation of the node.
    epochs: BTreeMap<(NodeId, GroupId), u64>,
    /// group → the node allowed to write at the last check.
    writers: BTreeMap<GroupId, NodeId>,
    pub violations: Vec<String>,
}

impl Checker {
    fn fail(&mut self, what: String) {
        // Keep the first few: the first one is the bug, the rest follow.
        if self.violations.len() < 16 {
            self.violations.push(what);
        }
    }

    pub fn max_applied(&self) -> u64 {
        self.committed.keys().next_back().copied().unwrap_or(0)
    }

    /// Log matching: an index, once applied anywhere, has one term and one
    /// payload everywhere, forever.
    pub fn on_applied(&mut self, node: NodeId, index: u64, term: u64, data: &[u8]) {
        let h = fnv(data);
        match self.committed.get(&index) {
            Some(&(t, d)) if (t, d) != (term, h) => self.fail(format!(
                "node {node} applied index {index} as term {term} payload {h:x}, \
                 but it was committed as term {t} payload {d:x}"
            )),
            Some(_) => {}
            None => {
                self.committed.insert(index, (term, h));
            }
        }
    }

    /// Determinism of the state machine: the same applied index means the
    /// same state on every node; and the ownership invariants.
    pub fn on_state(&mut self, node: NodeId, applied: u64, state: &ClusterState) {
        let h = fnv(&state.encode());
        match self.states.get(&applied) {
            Some(&s) if s != h => self.fail(format!(
                "node {node} at applied index {applied} has a state that differs from another node's at the same index"
            )),
            Some(_) => {}
            None => {
                self.states.insert(applied, h);
            }
        }
        for g in state.groups.values() {
            let last = self.epochs.entry((node, g.id)).or_insert(g.epoch);
            if g.epoch < *last {
                let was = *last;
                self.fail(format!(
                    "node {node}: group {} epoch went back from {was} to {}",
                    g.id, g.epoch
                ));
            } else {
                *last = g.epoch;
            }
            match self.owners.get(&(g.id, g.epoch)) {
                Some(&o) if o != g.owner => self.fail(format!(
                    "group {} epoch {} has two owners: {o:?} and {:?} (node {node})",
                    g.id, g.epoch, g.owner
                )),
                Some(_) => {}
                None => {
                    self.owners.insert((g.id, g.epoch), g.owner);
                }
            }
        }
    }

    /// A node restarted: its state replays from its disk and may start
    /// behind what it had applied.
    pub fn on_restart(&mut self, node: NodeId) {
        self.epochs.retain(|(n, _), _| *n != node);
    }

    pub fn on_role(&mut self, node: NodeId, term: u64, is_leader: bool) {
        if !is_leader {
            return;
        }
        match self.leaders.get(&term) {
            Some(&l) if l != node => {
                self.fail(format!("term {term} has two leaders: {l} and {node}"));
            }
            Some(_) => {}
            None => {
                self.leaders.insert(term, node);
            }
        }
    }

    /// At one instant of simulated time: which nodes may complete writes
    /// for which groups. At most one per group.
    pub fn on_writers(&mut self, time: u64, writers: &[(NodeId, GroupId)]) {
        let mut now: BTreeMap<GroupId, NodeId> = BTreeMap::new();
        for &(n, g) in writers {
            if let Some(&other) = now.get(&g).filter(|&&o| o != n) {
                self.fail(format!(
                    "time {time}: nodes {other} and {n} both hold a valid write lease for group {g}"
                ));
            }
            now.insert(g, n);
        }
        self.writers = now;
    }

    pub fn writers(&self) -> &BTreeMap<GroupId, NodeId> {
        &self.writers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Role};

    #[test]
    fn each_checker_catches_its_violation() {
        let mut c = Checker::default();
        c.on_applied(1, 5, 2, b"a");
        c.on_applied(2, 5, 2, b"a");
        assert!(c.violations.is_empty());
        c.on_applied(3, 5, 3, b"a");
        assert_eq!(c.violations.len(), 1, "a changed committed entry");

        let mut c = Checker::default();
        c.on_role(1, 4, true);
        c.on_role(1, 4, true);
        c.on_role(2, 4, false);
        assert!(c.violations.is_empty());
        c.on_role(2, 4, true);
        assert_eq!(c.violations.len(), 1, "two leaders in a term");

        let mut c = Checker::default();
        c.on_writers(7, &[(1, 1), (2, 2)]);
        assert!(c.violations.is_empty());
        c.on_writers(8, &[(1, 1), (2, 1)]);
        assert_eq!(c.violations.len(), 1, "two writers for one group");

        let mut s = ClusterState::default();
        s.apply(&Command::AddNode {
            id: 1,
            name: "a".into(),
            raft_addr: "a:1".into(),
            listeners: vec![],
            role: Role::Storage,
        })
        .unwrap();
        s.apply(&Command::AddGroup {
            id: 1,
            preferred_owner: None,
        })
        .unwrap();
        let mut newer = s.clone();
        newer
            .apply(&Command::SetGroupOwner {
                group: 1,
                owner: Some(1),
                expected_epoch: 0,
            })
            .unwrap();
        let mut c = Checker::default();
        c.on_state(1, 3, &s);
        c.on_state(1, 4, &newer);
        assert!(c.violations.is_empty());
        c.on_state(1, 5, &s);
        assert_eq!(c.violations.len(), 1, "epoch went backwards");
        c.on_restart(1);
        c.on_state(1, 3, &s);
        assert_eq!(
            c.violations.len(),
            1,
            "a restart may replay from older state"
        );
        let mut other = s.clone();
        other.groups.get_mut(&1).unwrap().epoch = 1;
        c.on_state(2, 9, &other);
        assert_eq!(c.violations.len(), 2, "two owners for (group 1, epoch 1)");
        c.on_state(3, 4, &s);
        assert_eq!(c.violations.len(), 3, "two states at one index");
    }
}
