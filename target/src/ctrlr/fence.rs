//! Fencing on the I/O path: per-ANA-group fencing epochs, lease
//! revocation, and the quiesce barrier an ownership change waits on.
//!
//! Exists because the ANA state a queue checks when a capsule arrives says
//! nothing about a write that is already waiting for its R2T data or is
//! already inside a bdev when ownership moves. The cluster driver (and,
//! until it exists, the management plane and tests) calls the
//! [`Target`] methods here; the queues read the table on their hot path.
//!
//! The model:
//! * Each group has one fence word, alone on its 128-byte line: a change
//!   sequence number and two permission bits (read, write). The sequence
//!   moves at every change (a new epoch, a state change, a revoke), so "the
//!   word a write was admitted under" names exactly one fence state. The
//!   cluster's epoch is kept beside it; it only ever rises.
//! * A write-class command (Write, Write Zeroes, Dataset Management, Flush)
//!   is stamped with the word when its capsule is checked. It reaches the
//!   bdev only if the word is unchanged and writable when it is submitted
//!   (after its R2T data arrived), and completes with success only if the
//!   word is still unchanged and writable when the bdev completes it.
//!   Otherwise it gets the ANA status of the group, without DNR, so a
//!   multipath host fails over and retries on another path.
//! * Reads need the read bit when they are checked and when they complete,
//!   but not an unchanged word: a read changes nothing, and what it returns
//!   was current while this node could serve the group.
//! * Each I/O queue counts its own in-flight write-class commands per group
//!   (queue-local memory), and publishes into its own [`QueueFence`] only
//!   when what the barrier needs changes: the latest sequence it has
//!   observed and the sequence up to which its older writes have drained.
//!   A change wakes every registered queue, so an idle one acknowledges on
//!   its next pass instead of at its next command or tick.
//!
//! Lock order: `change` and `queues` are leaves, except that the ANA
//! reconfiguration a change triggers runs after `change` is released
//! (`ana_apply` → `registry` → `cfg`).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use super::target::{Target, lock};
use crate::spec::Status;
use crate::subsystem::{AnaState, MAX_ANA_GROUPS, TargetConfig};

/// Table entries, indexed by ANAGRPID (0 is never a group).
pub(crate) const GROUPS: usize = MAX_ANA_GROUPS as usize + 1;

const READ_OK: u64 = 1;
const WRITE_OK: u64 = 2;
const SEQ_SHIFT: u32 = 2;

/// The sequence part of a fence word.
pub(crate) fn seq_of(word: u64) -> u64 {
    word >> SEQ_SHIFT
}
pub(crate) fn writable(word: u64) -> bool {
    word & WRITE_OK != 0
}
pub(crate) fn readable(word: u64) -> bool {
    word & READ_OK != 0
}

fn ana_code(s: AnaState) -> u8 {
    match s {
        AnaState::Optimized => 1,
        AnaState::NonOptimized => 2,
        AnaState::Inaccessible => 3,
        AnaState::PersistentLoss => 4,
        AnaState::Change => 5,
    }
}

fn ana_from(c: u8) -> Option<AnaState> {
    Some(match c {
        1 => AnaState::Optimized,
        2 => AnaState::NonOptimized,
        3 => AnaState::Inaccessible,
        4 => AnaState::PersistentLoss,
        5 => AnaState::Change,
        _ => return None,
    })
}

/// One group's fence, alone on its line: written only by a change, read
/// by every queue per command.
#[repr(align(128))]
struct GroupFence {
    /// `seq << 2 | WRITE_OK | READ_OK`.
    word: AtomicU64,
    /// The cluster's fencing epoch (informational for the I/O path, which
    /// compares words).
    epoch: AtomicU64,
    /// The ANA state the last change asked for (0 = none: the port
    /// configuration decides, as without a cluster).
    ana: AtomicU8,
}

/// What a queue published for one group.
#[derive(Default)]
struct QueueGroupAck {
    /// Latest sequence this queue has observed.
    seen: AtomicU64,
    /// Every write-class command this queue submitted under an older
    /// sequence than this has completed.
    quiesced: AtomicU64,
    /// Write-class commands of older sequences still inside a bdev.
    old_writes: AtomicU32,
}

/// Which queue a barrier is waiting for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueName {
    pub subnqn: String,
    pub cntlid: u16,
    pub qid: u16,
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} cntlid {} qid {}", self.subnqn, self.cntlid, self.qid)
    }
}

/// One I/O queue's published fencing state. Only its queue writes it,
/// and only when a fence change or the drain that follows moves it.
#[repr(align(128))]
pub(crate) struct QueueFence {
    name: QueueName,
    groups: Box<[QueueGroupAck]>,
    /// The queue's task, woken by a change so an idle queue acknowledges.
    waker: Mutex<Option<Waker>>,
    /// The queue was dropped with write-class commands still in a device
    /// (its driver gave up waiting for them): it stays registered, so no
    /// barrier of those groups can resolve while they may still land.
    orphaned: AtomicBool,
}

/// The queue-side half, owned by the queue: its counters and its handle on
/// what it publishes. Nothing here is shared.
pub(crate) struct LocalFence {
    slot: Arc<QueueFence>,
    /// The table's change counter when this queue last scanned the groups.
    version: u64,
    groups: Box<[LocalGroup]>,
    /// The waker last handed to `slot` (compared locally, so the shared
    /// slot is locked only when the task's waker changes).
    waker: Option<Waker>,
}

#[derive(Clone, Copy, Default)]
struct LocalGroup {
    /// The word this queue last observed.
    word: u64,
    /// Write-class commands in a bdev admitted under `word`.
    cur: u32,
    /// Write-class commands in a bdev admitted under an older word.
    old: u32,
}

pub(crate) struct FenceTable {
    /// What queues read: alone on a line, so the locks below (and the
    /// rest of `Target`, whose config lock every admin command takes) never
    /// share one with it.
    hot: Hot,
    /// Serialises changes (the epoch check and the sequence increment).
    change: Mutex<()>,
    /// Serialises the ANA reconfiguration that follows a change, so the
    /// last one applied is the latest state asked for.
    ana_apply: Mutex<()>,
    queues: Mutex<Vec<Arc<QueueFence>>>,
    /// Barriers waiting for an acknowledgement.
    waiters: Mutex<Vec<Waker>>,
}

#[repr(align(128))]
struct Hot {
    groups: Box<[GroupFence]>,
    /// Moves at every change of any group: a queue reads it once per pass
    /// and scans the groups only when it moved.
    version: AtomicU64,
}

impl Default for FenceTable {
    fn default() -> Self {
        let groups = (0..GROUPS)
            .map(|_| GroupFence {
                // Without a cluster every group is readable and writable;
                // the port's ANA state alone decides, as before fencing.
                word: AtomicU64::new(READ_OK | WRITE_OK),
                epoch: AtomicU64::new(0),
                ana: AtomicU8::new(0),
            })
            .collect();
        Self {
            hot: Hot {
                groups,
                version: AtomicU64::new(0),
            },
            change: Mutex::new(()),
            ana_apply: Mutex::new(()),
            queues: Mutex::new(Vec::new()),
            waiters: Mutex::new(Vec::new()),
        }
    }
}

impl FenceTable {
    /// The group's fence word (the hot path: one load of a line written
    /// only by changes). An out-of-range group reads as open, because the
    /// configuration never admits one (`NamespaceConfig` validation).
    #[inline]
    pub(crate) fn word(&self, grp: u32) -> u64 {
        self.hot
            .groups
            .get(grp as usize)
            .map_or(READ_OK | WRITE_OK, |g| g.word.load(Ordering::Acquire))
    }

    pub(crate) fn version(&self) -> u64 {
        self.hot.version.load(Ordering::Acquire)
    }

    /// The status a fenced command of `grp` is answered with: the ANA
    /// state the group was put in, else Transition (the host re-reads the
    /// ANA log and retries, on another path if this one is not live).
    /// Never DNR: a fenced write must be retried, never failed.
    pub(crate) fn fenced_status(&self, grp: u32) -> Status {
        let ana = self
            .hot
            .groups
            .get(grp as usize)
            .and_then(|g| ana_from(g.ana.load(Ordering::Acquire)));
        match ana {
            Some(AnaState::Inaccessible) => Status::ANA_INACCESSIBLE,
            Some(AnaState::PersistentLoss) => Status::ANA_PERSISTENT_LOSS,
            _ => Status::ANA_TRANSITION,
        }
    }

    /// Registers an I/O queue. The queue starts quiesced at the current
    /// words: it has nothing in a device yet.
    pub(crate) fn register(&self, name: QueueName) -> LocalFence {
        let slot = Arc::new(QueueFence {
            name,
            groups: (0..GROUPS).map(|_| QueueGroupAck::default()).collect(),
            waker: Mutex::new(None),
            orphaned: AtomicBool::new(false),
        });
        // Registered before the words are read: a change that misses this
        // queue in its wake list stored its word before the list lock we
        // take here, so the loads below see it.
        lock(&self.queues).push(slot.clone());
        let version = self.version();
        let mut groups: Box<[LocalGroup]> = vec![LocalGroup::default(); GROUPS].into();
        for (g, lg) in groups.iter_mut().enumerate() {
            lg.word = self.word(g as u32);
            let s = seq_of(lg.word);
            slot.groups[g].seen.store(s, Ordering::Release);
            slot.groups[g].quiesced.store(s, Ordering::Release);
        }
        self.notify_waiters();
        LocalFence {
            slot,
            version,
            groups,
            waker: None,
        }
    }

    /// Removes a queue's slot, unless writes it counted may still be in a
    /// device; then it stays, marked orphaned, and barriers name it.
    pub(crate) fn unregister(&self, local: &LocalFence) {
        if local.groups.iter().any(|g| g.cur + g.old > 0) {
            local.slot.orphaned.store(true, Ordering::Release);
            tracing::error!(
                queue = %local.slot.name,
                "I/O queue dropped with writes still in a device: barriers of their groups cannot resolve"
            );
            return;
        }
        lock(&self.queues).retain(|q| !Arc::ptr_eq(q, &local.slot));
        self.notify_waiters();
    }

    fn notify_waiters(&self) {
        let ws = std::mem::take(&mut *lock(&self.waiters));
        for w in ws {
            w.wake();
        }
    }

    fn wake_queues(&self) {
        let wakers: Vec<Waker> = lock(&self.queues)
            .iter()
            .filter_map(|q| lock(&q.waker).clone())
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Stores a new word for `grp` (under `change`) and wakes every queue.
    fn store(
        &self,
        grp: u32,
        epoch: Option<u64>,
        ana: AnaState,
        bits: u64,
    ) -> Result<FenceTicket, FenceError> {
        let g = self
            .hot
            .groups
            .get(grp as usize)
            .filter(|_| grp != 0)
            .ok_or(FenceError::NoSuchGroup(grp))?;
        let ticket = {
            let _c = lock(&self.change);
            let current = g.epoch.load(Ordering::Acquire);
            let epoch = epoch.unwrap_or(current);
            if epoch < current {
                return Err(FenceError::StaleEpoch {
                    anagrpid: grp,
                    current,
                    requested: epoch,
                });
            }
            let seq = seq_of(g.word.load(Ordering::Acquire)) + 1;
            g.epoch.store(epoch, Ordering::Release);
            g.ana.store(ana_code(ana), Ordering::Release);
            // SeqCst so the word is ordered before the version (which the
            // queues check per pass) for every observer.
            g.word.store(seq << SEQ_SHIFT | bits, Ordering::SeqCst);
            self.hot.version.fetch_add(1, Ordering::SeqCst);
            FenceTicket {
                anagrpid: grp,
                epoch,
                seq,
            }
        };
        self.wake_queues();
        Ok(ticket)
    }

    /// What still keeps the barrier for `t` from resolving.
    fn outstanding(&self, t: FenceTicket) -> Vec<Outstanding> {
        let g = t.anagrpid as usize;
        lock(&self.queues)
            .iter()
            .filter_map(|q| {
                let a = &q.groups[g];
                let seen = a.seen.load(Ordering::Acquire);
                let quiesced = a.quiesced.load(Ordering::Acquire);
                if seen >= t.seq && quiesced >= t.seq {
                    return None;
                }
                Some(Outstanding {
                    queue: q.name.clone(),
                    observed: seen >= t.seq,
                    old_writes: a.old_writes.load(Ordering::Acquire),
                    orphaned: q.orphaned.load(Ordering::Acquire),
                })
            })
            .collect()
    }
}

impl LocalFence {
    /// The group's word, observing it if it moved: the hot path's check.
    #[inline]
    pub(crate) fn load(&mut self, table: &FenceTable, grp: u32) -> u64 {
        let w = table.word(grp);
        if self.groups.get(grp as usize).is_some_and(|lg| lg.word != w) {
            self.observe(table, grp as usize, w);
        }
        w
    }

    /// Once per pass: a cheap compare, and a scan of every group only when
    /// a change happened. Hands the task's waker to the slot when it is new.
    pub(crate) fn poll(&mut self, table: &FenceTable, waker: &Waker) {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.waker = Some(waker.clone());
            *lock(&self.slot.waker) = Some(waker.clone());
        }
        let v = table.version();
        if v == self.version {
            return;
        }
        self.version = v;
        for g in 1..GROUPS {
            let w = table.word(g as u32);
            if self.groups[g].word != w {
                self.observe(table, g, w);
            }
        }
    }

    /// The group moved: what was in flight under the old word is now "old",
    /// and the queue publishes what it has seen.
    #[cold]
    fn observe(&mut self, table: &FenceTable, g: usize, w: u64) {
        let lg = &mut self.groups[g];
        lg.old += lg.cur;
        lg.cur = 0;
        lg.word = w;
        self.publish(table, g);
    }

    fn publish(&self, table: &FenceTable, g: usize) {
        let lg = self.groups[g];
        let a = &self.slot.groups[g];
        let s = seq_of(lg.word);
        a.old_writes.store(lg.old, Ordering::Release);
        if lg.old == 0 {
            a.quiesced.store(s, Ordering::Release);
        }
        a.seen.store(s, Ordering::Release);
        table.notify_waiters();
    }

    /// A write-class command admitted under `word` goes into a bdev.
    #[inline]
    pub(crate) fn write_submitted(&mut self, grp: u32) {
        if let Some(lg) = self.groups.get_mut(grp as usize) {
            lg.cur += 1;
        }
    }

    /// A write-class command admitted under `word` came back from its bdev.
    #[inline]
    pub(crate) fn write_done(&mut self, table: &FenceTable, grp: u32, word: u64) {
        let Some(lg) = self.groups.get_mut(grp as usize) else {
            return;
        };
        if lg.word == word {
            lg.cur = lg.cur.saturating_sub(1);
        } else {
            lg.old = lg.old.saturating_sub(1);
            // Only during a drain: publish its progress (and its end).
            self.publish(table, grp as usize);
        }
    }
}

/// Names one fence change; [`Target::quiesce`] waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceTicket {
    pub anagrpid: u32,
    /// The group's epoch after the change.
    pub epoch: u64,
    /// The change's sequence number within the group (every change moves
    /// it, a revoke included).
    pub seq: u64,
}

/// A group's fencing state on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceState {
    pub epoch: u64,
    pub seq: u64,
    pub readable: bool,
    pub writable: bool,
    /// The ANA state the last change asked for (`None`: never changed, the
    /// port configuration alone decides).
    pub ana: Option<AnaState>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    #[error("ANA group {0} does not exist (ANAGRPIDs are 1..={MAX_ANA_GROUPS})")]
    NoSuchGroup(u32),
    #[error(
        "ANA group {anagrpid}: epoch {requested} is older than the group's epoch {current}; epochs only rise"
    )]
    StaleEpoch {
        anagrpid: u32,
        current: u64,
        requested: u64,
    },
}

/// A queue a barrier still waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outstanding {
    pub queue: QueueName,
    /// The queue has seen the change (else: it has not run since).
    pub observed: bool,
    /// Write-class commands admitted under an older fence still in a device.
    pub old_writes: u32,
    /// The queue is gone but its writes may still land.
    pub orphaned: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuiesceError {
    pub ticket: FenceTicket,
    pub waited: Duration,
    pub outstanding: Vec<Outstanding>,
}

impl fmt::Display for QuiesceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ANA group {} epoch {} (change {}) not quiesced after {:?}: ",
            self.ticket.anagrpid, self.ticket.epoch, self.ticket.seq, self.waited
        )?;
        for (i, o) in self.outstanding.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            if o.orphaned {
                write!(
                    f,
                    "{} closed with {} writes still in a device",
                    o.queue, o.old_writes
                )?;
            } else if !o.observed {
                write!(f, "{} has not observed the change", o.queue)?;
            } else {
                write!(
                    f,
                    "{} has {} older writes still in a device",
                    o.queue, o.old_writes
                )?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for QuiesceError {}

/// The API a cluster driver calls. Every method is safe to call from any
/// thread; none blocks on I/O.
impl Target {
    /// Sets ANA group `anagrpid`'s state on this node together with its
    /// fencing epoch: the ownership change a cluster committed.
    ///
    /// `Optimized` and `NonOptimized` let the group read and write; any
    /// other state fences both. The fence moves first, with one atomic
    /// store, and takes effect on every queue at once: a write-class
    /// command admitted before it is not submitted, and one already in a
    /// bdev is not reported successful (it gets the ANA status of `state`,
    /// Transition if `state` is live). Then every port reports `state` for
    /// the group (ANA Change AENs to the controllers concerned).
    ///
    /// `epoch` may equal the current epoch (a state change within one
    /// ownership) but never be lower. Wait for [`Target::quiesce`] with the
    /// returned ticket before another node may write the group.
    pub fn set_group_fence(
        &self,
        anagrpid: u32,
        epoch: u64,
        state: AnaState,
    ) -> Result<FenceTicket, FenceError> {
        let bits = match state {
            AnaState::Optimized | AnaState::NonOptimized => READ_OK | WRITE_OK,
            _ => 0,
        };
        let t = self.fence.store(anagrpid, Some(epoch), state, bits)?;
        self.apply_fence_ana(anagrpid);
        Ok(t)
    }

    /// The lease on `anagrpid` expired: from the moment this returns (its
    /// first effect is one atomic store, under a lock only fence changes
    /// take; the ANA reconfiguration comes after) no read, write, Write
    /// Zeroes, Deallocate or Flush of the group is decided successful on
    /// this node, and none more reaches a bdev. A response decided just
    /// before the store may still leave in that reactor pass. Fenced commands get ANA
    /// Inaccessible (DNR clear), and the ports report the group
    /// Inaccessible, so hosts fail over and do not come back until a new
    /// [`Target::set_group_fence`] makes the group live again. The epoch
    /// stays: only the cluster moves it.
    ///
    /// Reads are fenced too: a node that lost its lease may have been
    /// deposed, and the new owner may already have written blocks this
    /// node's copy (a mirror leg) does not have.
    pub fn revoke_group_lease(&self, anagrpid: u32) -> Result<FenceTicket, FenceError> {
        let t = self
            .fence
            .store(anagrpid, None, AnaState::Inaccessible, 0)?;
        self.apply_fence_ana(anagrpid);
        Ok(t)
    }

    /// The group's fencing state.
    pub fn group_fence(&self, anagrpid: u32) -> Option<FenceState> {
        let g = self.fence.hot.groups.get(anagrpid as usize)?;
        let w = g.word.load(Ordering::Acquire);
        Some(FenceState {
            epoch: g.epoch.load(Ordering::Acquire),
            seq: seq_of(w),
            readable: readable(w),
            writable: writable(w),
            ana: ana_from(g.ana.load(Ordering::Acquire)),
        })
    }

    /// Resolves once every I/O queue of this node has observed the change
    /// `ticket` names (or a later one of the group), and every write-class
    /// command of the group that a queue had submitted to a bdev before it
    /// observed the change has completed. After that nothing admitted
    /// under an older fence can reach a device of this node.
    ///
    /// Queues are woken by the change, so an idle one does not hold the
    /// barrier. A bdev that never completes does: after `timeout` this
    /// returns an error naming each queue still outstanding and why.
    /// Needs a Tokio runtime with time enabled.
    pub async fn quiesce(
        &self,
        ticket: FenceTicket,
        timeout: Duration,
    ) -> Result<(), QuiesceError> {
        let start = tokio::time::Instant::now();
        let done = std::future::poll_fn(|cx| {
            // Registered before the check, so an acknowledgement between
            // the two still wakes us.
            {
                let mut w = lock(&self.fence.waiters);
                if !w.iter().any(|x| x.will_wake(cx.waker())) {
                    w.push(cx.waker().clone());
                }
            }
            if self.fence.outstanding(ticket).is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        match tokio::time::timeout(timeout, done).await {
            Ok(()) => Ok(()),
            Err(_) => Err(QuiesceError {
                ticket,
                waited: start.elapsed(),
                outstanding: self.fence.outstanding(ticket),
            }),
        }
    }

    /// The barrier's condition without waiting: the queues it still waits
    /// for (empty = resolved). For drivers that poll, and for tests.
    pub fn quiesce_outstanding(&self, ticket: FenceTicket) -> Vec<Outstanding> {
        self.fence.outstanding(ticket)
    }

    /// Makes every port report the ANA state the latest change asked for.
    fn apply_fence_ana(&self, anagrpid: u32) {
        let _a = lock(&self.fence.ana_apply);
        let Some(state) = self
            .fence
            .hot
            .groups
            .get(anagrpid as usize)
            .and_then(|g| ana_from(g.ana.load(Ordering::Acquire)))
        else {
            return;
        };
        let mut reg = lock(&self.registry);
        let mut cfg = TargetConfig::clone(&self.snapshot());
        let mut changed = false;
        for p in &mut cfg.ports {
            let ana: &mut BTreeMap<u32, AnaState> = &mut p.ana;
            if ana.insert(anagrpid, state) != Some(state) {
                changed = true;
            }
        }
        if changed {
            self.apply_locked(&mut reg, cfg);
        }
    }
}
