//! Failover and failback as a pure function of committed state and the
//! leader's view of liveness. Only the leader runs it; what it decides goes
//! through Raft like any command, and `SetGroupOwner` is compare-and-set on
//! the epoch, so a decision made from a stale view is refused on apply.

use std::collections::BTreeMap;

use crate::state::{ClusterState, Command, GroupId, NodeId, Role};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failback {
    /// Return a group to its preferred owner once that node has been heard
    /// from continuously for this long.
    Automatic { healthy_ticks: u64 },
    /// Never by policy; an operator moves the group (`SetGroupOwner`).
    Manual,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// A node not heard from for longer than this is down.
    pub down_after_ticks: u64,
    pub failback: Failback,
}

impl Default for PolicyConfig {
    /// At 100 ms ticks: down after 1.5 s of silence, failback after 10 s.
    fn default() -> PolicyConfig {
        PolicyConfig {
            down_after_ticks: 15,
            failback: Failback::Automatic { healthy_ticks: 100 },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    last_heard: u64,
    /// Start of the current unbroken run of being heard; `None` until the
    /// node is actually heard (not just presumed alive at a leader change).
    healthy_since: Option<u64>,
}

/// Per-node liveness as the leader sees it, fed by every message it
/// receives from a node.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    down_after_ticks: u64,
    nodes: BTreeMap<NodeId, Seen>,
}

impl Liveness {
    pub fn new(down_after_ticks: u64) -> Liveness {
        Liveness {
            down_after_ticks,
            nodes: BTreeMap::new(),
        }
    }

    /// A new leader knows nothing yet: every node gets the benefit of the
    /// doubt for one `down_after_ticks`, and none counts as healthy for
    /// failback until heard.
    pub fn reset(&mut self, now: u64, nodes: impl IntoIterator<Item = NodeId>) {
        self.nodes = nodes
            .into_iter()
            .map(|id| {
                (
                    id,
                    Seen {
                        last_heard: now,
                        healthy_since: None,
                    },
                )
            })
            .collect();
    }

    pub fn heard(&mut self, node: NodeId, now: u64) {
        let down_after = self.down_after_ticks;
        let s = self.nodes.entry(node).or_insert(Seen {
            last_heard: now,
            healthy_since: None,
        });
        let gap = now.saturating_sub(s.last_heard);
        if s.healthy_since.is_none() || gap > down_after {
            s.healthy_since = Some(now);
        }
        s.last_heard = s.last_heard.max(now);
    }

    pub fn is_live(&self, node: NodeId, now: u64) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|s| now.saturating_sub(s.last_heard) <= self.down_after_ticks)
    }

    /// How long the node has been heard from without a gap, if it is live.
    pub fn healthy_for(&self, node: NodeId, now: u64) -> Option<u64> {
        let s = self.nodes.get(&node)?;
        if !self.is_live(node, now) {
            return None;
        }
        s.healthy_since.map(|t| now.saturating_sub(t))
    }
}

/// What the leader should propose now. Empty when the state already
/// matches liveness and policy, so a stable cluster proposes nothing.
pub fn decide(state: &ClusterState, live: &Liveness, now: u64, cfg: &PolicyConfig) -> Vec<Command> {
    let mut out = Vec::new();
    // Health marks first; what follows reasons on the marks after them.
    let mut up: BTreeMap<NodeId, bool> = BTreeMap::new();
    for n in state.nodes.values() {
        let is_live = live.is_live(n.id, now);
        // Coming back needs a full `down_after` of being heard, so a node
        // that flaps is not marked up on every message.
        let stable = live
            .healthy_for(n.id, now)
            .is_some_and(|t| t >= cfg.down_after_ticks);
        let now_up = if n.up && !is_live {
            out.push(Command::NodeDown { id: n.id });
            false
        } else if !n.up && stable {
            out.push(Command::NodeUp { id: n.id });
            true
        } else {
            n.up
        };
        up.insert(n.id, now_up);
    }
    let candidate = |id: NodeId| {
        state
            .nodes
            .get(&id)
            .is_some_and(|n| n.role == Role::Storage)
            && up.get(&id).copied().unwrap_or(false)
            && live.is_live(id, now)
    };
    let mut load: BTreeMap<NodeId, usize> = state
        .storage_nodes()
        .filter(|n| candidate(n.id))
        .map(|n| (n.id, 0))
        .collect();
    for g in state.groups.values() {
        if let Some(l) = g.owner.and_then(|o| load.get_mut(&o)) {
            *l += 1;
        }
    }
    for g in state.groups.values() {
        let owner_ok = g.owner.is_some_and(candidate);
        let target: Option<NodeId> = if !owner_ok {
            // Failover: the preferred owner if it can, else the least
            // loaded candidate (lowest id on ties, so every leader agrees).
            g.preferred_owner.filter(|&p| candidate(p)).or_else(|| {
                load.iter()
                    .min_by_key(|&(&id, &l)| (l, id))
                    .map(|(&id, _)| id)
            })
        } else {
            match cfg.failback {
                Failback::Automatic { healthy_ticks } => g.preferred_owner.filter(|&p| {
                    Some(p) != g.owner
                        && candidate(p)
                        // Already committed as up, not just marked in this
                        // round: failback is never the first thing a
                        // returning node sees.
                        && state.nodes.get(&p).is_some_and(|n| n.up)
                        && live.healthy_for(p, now).is_some_and(|t| t >= healthy_ticks)
                }),
                Failback::Manual => None,
            }
        };
        let change = match target {
            Some(t) => g.owner != Some(t),
            // Nobody can take it: unown it, so the old owner is fenced by
            // the epoch even though no one is optimized.
            None => !owner_ok && g.owner.is_some(),
        };
        if change {
            if let Some(t) = target {
                *load.entry(t).or_default() += 1;
            }
            if let Some(l) = g.owner.and_then(|o| load.get_mut(&o)) {
                *l = l.saturating_sub(1);
            }
            out.push(Command::SetGroupOwner {
                group: g.id,
                owner: target,
                expected_epoch: g.epoch,
            });
        }
    }
    out
}

/// Groups each node owns, for status and tests.
pub fn owned(state: &ClusterState) -> BTreeMap<NodeId, Vec<GroupId>> {
    let mut m: BTreeMap<NodeId, Vec<GroupId>> = BTreeMap::new();
    for g in state.groups.values() {
        if let Some(o) = g.owner {
            m.entry(o).or_default().push(g.id);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: PolicyConfig = PolicyConfig {
        down_after_ticks: 10,
        failback: Failback::Automatic { healthy_ticks: 50 },
    };

    fn cluster(storage: u64, witness: bool) -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=storage {
            s.apply(&Command::AddNode {
                id,
                name: format!("s{id}"),
                raft_addr: "a:1".into(),
                listeners: vec![format!("10.0.0.{id}:4420")],
                role: Role::Storage,
            })
            .unwrap();
            s.apply(&Command::AddGroup {
                id: id as GroupId,
                preferred_owner: Some(id),
            })
            .unwrap();
        }
        if witness {
            s.apply(&Command::AddNode {
                id: 9,
                name: "w".into(),
                raft_addr: "a:1".into(),
                listeners: vec![],
                role: Role::Witness,
            })
            .unwrap();
        }
        s
    }

    fn apply_all(s: &mut ClusterState, cmds: &[Command]) {
        for c in cmds {
            s.apply(c).unwrap();
        }
    }

    fn hear_all(l: &mut Liveness, ids: &[NodeId], from: u64, to: u64) {
        for t in from..=to {
            for &id in ids {
                l.heard(id, t);
            }
        }
    }

    #[test]
    fn unowned_groups_go_to_their_preferred_owner_and_then_nothing_changes() {
        let mut s = cluster(2, true);
        let mut l = Liveness::new(10);
        l.reset(0, [1, 2, 9]);
        let d = decide(&s, &l, 0, &CFG);
        assert_eq!(
            d,
            vec![
                Command::SetGroupOwner {
                    group: 1,
                    owner: Some(1),
                    expected_epoch: 0
                },
                Command::SetGroupOwner {
                    group: 2,
                    owner: Some(2),
                    expected_epoch: 0
                },
            ]
        );
        apply_all(&mut s, &d);
        assert!(decide(&s, &l, 5, &CFG).is_empty());
    }

    #[test]
    fn a_silent_node_is_marked_down_and_its_groups_move_to_a_storage_node_never_the_witness() {
        let mut s = cluster(2, true);
        let mut l = Liveness::new(10);
        l.reset(0, [1, 2, 9]);
        let d = decide(&s, &l, 0, &CFG);
        apply_all(&mut s, &d);
        hear_all(&mut l, &[1, 9], 1, 20);
        // Node 2 silent since 0: at 10 it is still within the bound.
        assert!(decide(&s, &l, 10, &CFG).is_empty());
        let d = decide(&s, &l, 11, &CFG);
        assert_eq!(
            d,
            vec![
                Command::NodeDown { id: 2 },
                Command::SetGroupOwner {
                    group: 2,
                    owner: Some(1),
                    expected_epoch: 1
                },
            ]
        );
        apply_all(&mut s, &d);
        assert_eq!(s.groups[&2].epoch, 2);
        assert_eq!(owned(&s)[&1], vec![1, 2]);
    }

    #[test]
    fn with_no_storage_node_left_a_group_is_unowned_not_given_to_the_witness() {
        let mut s = cluster(1, true);
        let mut l = Liveness::new(10);
        l.reset(0, [1, 9]);
        let d = decide(&s, &l, 0, &CFG);
        apply_all(&mut s, &d);
        hear_all(&mut l, &[9], 1, 30);
        let d = decide(&s, &l, 30, &CFG);
        assert_eq!(
            d,
            vec![
                Command::NodeDown { id: 1 },
                Command::SetGroupOwner {
                    group: 1,
                    owner: None,
                    expected_epoch: 1
                },
            ]
        );
        apply_all(&mut s, &d);
        assert!(decide(&s, &l, 31, &CFG).is_empty());
    }

    #[test]
    fn a_returning_node_comes_back_non_optimized_then_fails_back_after_the_healthy_time() {
        let mut s = cluster(2, false);
        let mut l = Liveness::new(10);
        l.reset(0, [1, 2]);
        let d = decide(&s, &l, 0, &CFG);
        apply_all(&mut s, &d);
        hear_all(&mut l, &[1], 1, 200);
        let d = decide(&s, &l, 20, &CFG);
        apply_all(&mut s, &d);
        assert_eq!(s.groups[&2].owner, Some(1));
        // Node 2 returns at 100.
        hear_all(&mut l, &[2], 100, 200);
        assert!(decide(&s, &l, 105, &CFG).is_empty(), "not stable yet");
        let d = decide(&s, &l, 110, &CFG);
        assert_eq!(d, vec![Command::NodeUp { id: 2 }]);
        apply_all(&mut s, &d);
        assert_eq!(
            s.ana_state(2, 2),
            Some(crate::state::AnaState::NonOptimized)
        );
        assert!(decide(&s, &l, 149, &CFG).is_empty());
        let d = decide(&s, &l, 150, &CFG);
        assert_eq!(
            d,
            vec![Command::SetGroupOwner {
                group: 2,
                owner: Some(2),
                expected_epoch: 2
            }]
        );
        // Manual failback never moves it.
        let manual = PolicyConfig {
            failback: Failback::Manual,
            ..CFG
        };
        assert!(decide(&s, &l, 150, &manual).is_empty());
        assert!(decide(&s, &l, 200, &manual).is_empty());
    }

    #[test]
    fn a_gap_restarts_the_healthy_time() {
        let mut l = Liveness::new(10);
        l.heard(1, 0);
        l.heard(1, 8);
        assert_eq!(l.healthy_for(1, 8), Some(8));
        l.heard(1, 30);
        assert_eq!(l.healthy_for(1, 30), Some(0));
        assert_eq!(l.healthy_for(1, 41), None);
        assert!(!l.is_live(2, 0));
    }

    #[test]
    fn load_spreads_over_the_survivors() {
        let mut s = cluster(3, false);
        // Three more groups preferring node 1.
        for id in 10..13 {
            s.apply(&Command::AddGroup {
                id,
                preferred_owner: Some(1),
            })
            .unwrap();
        }
        let mut l = Liveness::new(10);
        l.reset(0, [1, 2, 3]);
        let d = decide(&s, &l, 0, &CFG);
        apply_all(&mut s, &d);
        assert_eq!(owned(&s)[&1], vec![1, 10, 11, 12]);
        hear_all(&mut l, &[2, 3], 1, 20);
        let d = decide(&s, &l, 20, &CFG);
        apply_all(&mut s, &d);
        let o = owned(&s);
        assert_eq!(o.get(&1), None);
        assert_eq!(o[&2].len() + o[&3].len(), 6);
        assert!(o[&2].len().abs_diff(o[&3].len()) <= 1, "{o:?}");
    }
}
