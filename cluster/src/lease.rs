//! Write leases: the owner of an ANA group completes writes only while a
//! quorum of voters has recently confirmed, from committed state, that it
//! owns the group at its epoch; a new owner starts only once every lease of
//! an older epoch has provably expired.
//!
//! The protocol, per (group, epoch):
//! 1. The owner sends `LeaseRequest{group, epoch, seq}` to every voter and
//!    remembers its local send time `sent`.
//! 2. A voter grants iff its applied state says the requester owns the
//!    group at exactly that epoch and it has applied everything in its log
//!    ([`grants`]). The second condition covers a voter that restarted:
//!    its hard state may lag, so it could replay to an older owner, but the
//!    entry that moved the group is in its log (it applied it, so it was
//!    persisted), so it grants nothing until it has applied that entry.
//! 3. With grants from a majority for `seq`, the lease is valid until
//!    `sent + duration` on the owner's clock.
//! 4. The first time a majority grants an epoch, the owner must still wait
//!    [`LeaseConfig::takeover_wait`] before completing a write.
//!
//! Why 4 is enough: any majority that granted the old owner shares a voter
//! `v` with the majority that granted the new one. `v` granted the old
//! owner before it applied the move and the new owner after, so the old
//! owner's last `sent` precedes the new owner's quorum. With clock rates
//! within `1 ± ρ` of real time, the old lease ends at most `duration / (1 -
//! ρ)` real time after that `sent`, and a wait of `W` on the new owner's
//! clock lasts at least `W / (1 + ρ)`: `W = duration · (1 + ρ) / (1 - ρ)`.
//!
//! **Assumed bound:** clock rates (not offsets: only intervals on one clock
//! are compared) within ρ = 1% of real time, so with a 2 s lease a new owner
//! waits 2.041 s (21 ticks of 100 ms, rounded up). Offsets between clocks do
//! not matter.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, GroupId, NodeId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Lease length on the owner's clock, in ticks.
    pub duration_ticks: u64,
    /// Assumed worst clock-rate error, in parts per million (10_000 = 1%).
    pub drift_ppm: u64,
    /// How often an owner asks for a renewal.
    pub renew_every_ticks: u64,
}

impl Default for LeaseConfig {
    /// 2 s lease at 100 ms ticks, renewed every 500 ms, ρ = 1%.
    fn default() -> LeaseConfig {
        LeaseConfig {
            duration_ticks: 20,
            drift_ppm: 10_000,
            renew_every_ticks: 5,
        }
    }
}

impl LeaseConfig {
    /// `duration · (1 + ρ) / (1 - ρ)`, rounded up.
    pub fn takeover_wait(&self) -> u64 {
        let num = self.duration_ticks as u128 * (1_000_000 + self.drift_ppm as u128);
        let den = 1_000_000u128.saturating_sub(self.drift_ppm as u128).max(1);
        num.div_ceil(den) as u64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub group: GroupId,
    pub epoch: u64,
    pub seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub group: GroupId,
    pub epoch: u64,
    pub seq: u64,
    pub granted: bool,
}

/// The voter's side: whether `from` may hold the lease it asks for.
/// `caught_up` is "applied index == last log index".
pub fn grants(state: &ClusterState, caught_up: bool, from: NodeId, req: &LeaseRequest) -> bool {
    caught_up
        && state
            .groups
            .get(&req.group)
            .is_some_and(|g| g.owner == Some(from) && g.epoch == req.epoch)
}

/// Outstanding requests kept per group; older ones are forgotten (their
/// grants would only give a shorter lease than a newer request's).
const MAX_PENDING: usize = 4;

#[derive(Debug)]
struct Holder {
    epoch: u64,
    /// seq → (sent, voters that granted).
    pending: BTreeMap<u64, (u64, BTreeSet<NodeId>)>,
    valid_until: u64,
    /// Set at the first quorum of this epoch.
    writable_from: Option<u64>,
    last_request: Option<u64>,
}

/// The owner's side, for every group this node owns.
#[derive(Debug)]
pub struct Leases {
    cfg: LeaseConfig,
    me: NodeId,
    next_seq: u64,
    holders: BTreeMap<GroupId, Holder>,
}

impl Leases {
    pub fn new(cfg: LeaseConfig, me: NodeId) -> Leases {
        Leases {
            cfg,
            me,
            next_seq: 1,
            holders: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// Follows committed ownership: a group this node lost, or now owns at
    /// a new epoch, starts from no lease.
    pub fn on_state(&mut self, state: &ClusterState) {
        let me = self.me;
        self.holders.retain(|id, h| {
            state
                .groups
                .get(id)
                .is_some_and(|g| g.owner == Some(me) && g.epoch == h.epoch)
        });
        for g in state.groups.values() {
            if g.owner == Some(me) && !self.holders.contains_key(&g.id) {
                self.holders.insert(
                    g.id,
                    Holder {
                        epoch: g.epoch,
                        pending: BTreeMap::new(),
                        valid_until: 0,
                        writable_from: None,
                        last_request: None,
                    },
                );
            }
        }
    }

    /// Requests due at `now` (first request at once, then every
    /// `renew_every_ticks`), to send to every voter.
    pub fn due_requests(&mut self, now: u64) -> Vec<LeaseRequest> {
        let mut out = Vec::new();
        for (&group, h) in &mut self.holders {
            if h.last_request
                .is_some_and(|t| now < t + self.cfg.renew_every_ticks)
            {
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            h.last_request = Some(now);
            h.pending.insert(seq, (now, BTreeSet::new()));
            while h.pending.len() > MAX_PENDING {
                h.pending.pop_first();
            }
            out.push(LeaseRequest {
                group,
                epoch: h.epoch,
                seq,
            });
        }
        out
    }

    /// A voter's answer. `voters` is the current voter set.
    pub fn on_grant(&mut self, from: NodeId, grant: &LeaseGrant, voters: &[NodeId], now: u64) {
        if !grant.granted || !voters.contains(&from) {
            return;
        }
        let Some(h) = self.holders.get_mut(&grant.group) else {
            return;
        };
        if h.epoch != grant.epoch {
            return;
        }
        let Some((sent, granted)) = h.pending.get_mut(&grant.seq) else {
            return;
        };
        granted.insert(from);
        if granted.len() * 2 > voters.len() {
            h.valid_until = h.valid_until.max(*sent + self.cfg.duration_ticks);
            if h.writable_from.is_none() {
                h.writable_from = Some(now + self.cfg.takeover_wait());
            }
        }
    }

    /// Whether this node may complete a write for `group` at `now`.
    pub fn can_write(&self, group: GroupId, now: u64) -> bool {
        self.holders
            .get(&group)
            .is_some_and(|h| now < h.valid_until && h.writable_from.is_some_and(|t| now >= t))
    }

    /// The epoch this node holds a lease for (whether or not it is valid).
    pub fn epoch(&self, group: GroupId) -> Option<u64> {
        self.holders.get(&group).map(|h| h.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Role};

    fn state_owned_by(owner: NodeId) -> ClusterState {
        let mut s = ClusterState::default();
        for (id, role) in [(1, Role::Storage), (2, Role::Storage), (3, Role::Witness)] {
            s.apply(&Command::AddNode {
                id,
                name: format!("n{id}"),
                raft_addr: "a:1".into(),
                listeners: vec![],
                role,
            })
            .unwrap();
        }
        s.apply(&Command::AddGroup {
            id: 1,
            preferred_owner: None,
        })
        .unwrap();
        s.apply(&Command::SetGroupOwner {
            group: 1,
            owner: Some(owner),
            expected_epoch: 0,
        })
        .unwrap();
        s
    }

    const VOTERS: [NodeId; 3] = [1, 2, 3];

    fn grant_from(l: &mut Leases, s: &ClusterState, from: NodeId, req: &LeaseRequest, now: u64) {
        let g = LeaseGrant {
            group: req.group,
            epoch: req.epoch,
            seq: req.seq,
            granted: grants(s, true, l.me, req),
        };
        l.on_grant(from, &g, &VOTERS, now);
    }

    #[test]
    fn the_takeover_wait_covers_the_drift_bound() {
        let cfg = LeaseConfig::default();
        assert_eq!(cfg.takeover_wait(), 21); // 20 · 1.01 / 0.99 = 20.40
        let exact = LeaseConfig {
            drift_ppm: 0,
            ..cfg
        };
        assert_eq!(exact.takeover_wait(), 20);
        // Brute force over clock rates at the bound: the old owner's lease,
        // measured on a clock running slow by ρ, ends before the new owner's
        // wait, measured on a clock running fast by ρ.
        for d in [1u64, 7, 20, 200] {
            let cfg = LeaseConfig {
                duration_ticks: d,
                drift_ppm: 10_000,
                renew_every_ticks: 1,
            };
            let old_end_real = d as f64 / 0.99;
            let new_start_real = cfg.takeover_wait() as f64 / 1.01;
            assert!(new_start_real >= old_end_real, "d={d}");
        }
    }

    #[test]
    fn a_lease_needs_a_quorum_then_the_takeover_wait_and_expires() {
        let s = state_owned_by(1);
        let mut l = Leases::new(LeaseConfig::default(), 1);
        l.on_state(&s);
        let reqs = l.due_requests(100);
        assert_eq!(reqs.len(), 1);
        let req = reqs[0];
        grant_from(&mut l, &s, 1, &req, 101);
        assert!(!l.can_write(1, 101), "one grant of three is no quorum");
        grant_from(&mut l, &s, 3, &req, 102);
        assert!(!l.can_write(1, 102), "a new epoch waits out older leases");
        assert!(!l.can_write(1, 102 + 20));
        // Without renewals the lease (sent 100, valid to 120) is gone
        // before the wait (to 123) ends.
        assert!(!l.can_write(1, 102 + 21));
        // Renew before it runs out: the lease then covers the wait's end.
        let mut l = Leases::new(LeaseConfig::default(), 1);
        l.on_state(&s);
        let r0 = l.due_requests(0)[0];
        grant_from(&mut l, &s, 1, &r0, 1);
        grant_from(&mut l, &s, 2, &r0, 1);
        assert!(l.due_requests(3).is_empty(), "not due yet");
        let mut t = 5;
        while t <= 30 {
            let r = l.due_requests(t)[0];
            grant_from(&mut l, &s, 1, &r, t);
            grant_from(&mut l, &s, 2, &r, t);
            t += 5;
        }
        assert!(l.can_write(1, 30));
        assert!(l.can_write(1, 49));
        assert!(!l.can_write(1, 50), "expires at the last sent + duration");
    }

    #[test]
    fn voters_refuse_stale_epochs_other_owners_and_while_catching_up() {
        let s = state_owned_by(1);
        let req = LeaseRequest {
            group: 1,
            epoch: 1,
            seq: 1,
        };
        assert!(grants(&s, true, 1, &req));
        assert!(!grants(&s, false, 1, &req));
        assert!(!grants(&s, true, 2, &req));
        assert!(!grants(&s, true, 1, &LeaseRequest { epoch: 0, ..req }));
        assert!(!grants(&s, true, 1, &LeaseRequest { group: 9, ..req }));
    }

    #[test]
    fn losing_ownership_ends_the_lease_at_once() {
        let mut s = state_owned_by(1);
        let mut l = Leases::new(LeaseConfig::default(), 1);
        l.on_state(&s);
        let r = l.due_requests(0)[0];
        grant_from(&mut l, &s, 1, &r, 0);
        grant_from(&mut l, &s, 2, &r, 0);
        // Pretend the wait is over by renewing past it.
        for t in (5..=25).step_by(5) {
            let r = l.due_requests(t)[0];
            grant_from(&mut l, &s, 1, &r, t);
            grant_from(&mut l, &s, 2, &r, t);
        }
        assert!(l.can_write(1, 25));
        s.apply(&Command::SetGroupOwner {
            group: 1,
            owner: Some(2),
            expected_epoch: 1,
        })
        .unwrap();
        l.on_state(&s);
        assert!(!l.can_write(1, 25));
        assert_eq!(l.epoch(1), None);
        // A late grant for the old epoch changes nothing.
        grant_from(&mut l, &s, 3, &r, 26);
        assert!(!l.can_write(1, 26));
    }

    #[test]
    fn grants_from_non_voters_and_refusals_do_not_count() {
        let s = state_owned_by(1);
        let mut l = Leases::new(LeaseConfig::default(), 1);
        l.on_state(&s);
        let r = l.due_requests(0)[0];
        let g = LeaseGrant {
            group: 1,
            epoch: 1,
            seq: r.seq,
            granted: true,
        };
        l.on_grant(1, &g, &VOTERS, 0);
        l.on_grant(9, &g, &VOTERS, 0);
        l.on_grant(
            2,
            &LeaseGrant {
                granted: false,
                ..g
            },
            &VOTERS,
            0,
        );
        assert!(!l.can_write(1, 30));
        l.on_grant(3, &g, &VOTERS, 0);
        // Quorum reached: valid until 20, but writable only from 21.
        assert!(!l.can_write(1, 21));
        assert_eq!(l.holders[&1].writable_from, Some(21));
        assert_eq!(l.holders[&1].valid_until, 20);
    }
}
