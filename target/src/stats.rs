//! Counters behind the metrics endpoint: per-queue blocks written by one
//! queue only, summed when scraped.
//!
//! Exists so that counting costs the I/O path nothing shared: each queue
//! pair keeps one [`QueueNsStats`] block per namespace it has a channel
//! for, written only by that queue (so only by the queue's reactor thread)
//! with a Relaxed load and a store, never a locked read-modify-write, on
//! lines no other queue writes. A scrape ([`Registry::snapshot`]) reads
//! every live block, adds what dropped blocks left behind, and returns
//! plain numbers; nothing on the I/O path waits for it.
//!
//! What is per connection (accepted, refused, queues, terminations,
//! keep-alive expiries) happens once per connection, not per I/O, and is
//! counted with ordinary shared atomics.
//!
//! Invariants:
//! * Only its own queue writes a [`QueueNsStats`]; readers only load.
//! * Counters are monotonic across connections: a block that is dropped
//!   (its channel or queue went away) is folded into its namespace's
//!   `retired` sum under the registry lock, in the same critical section
//!   that removes it from the live list, so a scrape counts it exactly once.
//! * Steady-state I/O allocates nothing here: the histogram has fixed
//!   buckets ([`LAT_BUCKETS`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Instant;

/// The I/O commands counted per namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    /// Dataset Management (Deallocate).
    Trim = 3,
    WriteZeroes = 4,
}

impl IoKind {
    pub const ALL: [IoKind; 5] = [
        IoKind::Read,
        IoKind::Write,
        IoKind::Flush,
        IoKind::Trim,
        IoKind::WriteZeroes,
    ];
    pub const COUNT: usize = 5;

    /// The `op` label value.
    pub fn name(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Trim => "trim",
            IoKind::WriteZeroes => "write_zeroes",
        }
    }
}

/// Smallest bucket bound: 2^10 ns (~1 µs).
const LAT_MIN_SHIFT: u32 = 10;
/// Largest finite bucket bound: 2^34 ns (~17 s).
const LAT_MAX_SHIFT: u32 = 34;
/// Sub-buckets per power of two (log-linear: bounds 2^k and 1.5·2^k).
const LAT_SUB: u32 = 2;
/// Finite buckets plus the overflow bucket.
pub const LAT_BUCKETS: usize = 1 + ((LAT_MAX_SHIFT - LAT_MIN_SHIFT) * LAT_SUB) as usize + 1;

/// The bucket a latency of `ns` nanoseconds falls in. Buckets are
/// `(lower, upper]`, so the Prometheus `le` bound ([`bucket_upper_ns`]) is
/// exact: bucket 0 is `[0, 1024]`, then two per power of two (`(1024,
/// 1536]`, `(1536, 2048]`, …), the last is everything over 2^34 ns.
/// A leading-zero count and two shifts: no loop, no table.
#[inline]
pub fn bucket_of(ns: u64) -> usize {
    let v = ns.saturating_sub(1);
    if v < (1 << LAT_MIN_SHIFT) {
        return 0;
    }
    let octave = 63 - v.leading_zeros();
    if octave >= LAT_MAX_SHIFT {
        return LAT_BUCKETS - 1;
    }
    let sub = ((v >> (octave - 1)) & 1) as usize;
    1 + ((octave - LAT_MIN_SHIFT) * LAT_SUB) as usize + sub
}

/// Inclusive upper bound of bucket `i` in nanoseconds; `None` for the
/// overflow bucket (`+Inf`).
pub fn bucket_upper_ns(i: usize) -> Option<u64> {
    if i == 0 {
        return Some(1 << LAT_MIN_SHIFT);
    }
    if i >= LAT_BUCKETS - 1 {
        return None;
    }
    let k = (i - 1) as u32;
    let octave = LAT_MIN_SHIFT + k / LAT_SUB;
    let sub = u64::from(k % LAT_SUB);
    // (2 + sub + 1) halves of 2^octave.
    Some((3 + sub) << (octave - 1))
}

/// A single-writer counter: the owner adds with a load and a store (a plain
/// `mov`/`add`/`mov` on x86, no `lock` prefix); anyone may load it.
#[derive(Debug, Default)]
struct Cnt(AtomicU64);

impl Cnt {
    #[inline]
    fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Debug)]
struct OpBlock {
    commands: Cnt,
    bytes: Cnt,
    errors: Cnt,
    latency_sum_ns: Cnt,
    buckets: [Cnt; LAT_BUCKETS],
}

impl Default for OpBlock {
    fn default() -> Self {
        Self {
            commands: Cnt::default(),
            bytes: Cnt::default(),
            errors: Cnt::default(),
            latency_sum_ns: Cnt::default(),
            buckets: std::array::from_fn(|_| Cnt::default()),
        }
    }
}

/// One queue's counters for one namespace. 128-byte aligned (x86 fetches
/// line pairs), so no other queue's block shares a line with it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueNsStats {
    ops: [OpBlock; IoKind::COUNT],
}

impl QueueNsStats {
    /// Records one finished command. Only the owning queue calls this.
    #[inline]
    pub fn record(&self, kind: IoKind, bytes: u64, ok: bool, latency_ns: u64) {
        let o = &self.ops[kind as usize];
        o.commands.add(1);
        if ok {
            o.bytes.add(bytes);
        } else {
            o.errors.add(1);
        }
        o.latency_sum_ns.add(latency_ns);
        o.buckets[bucket_of(latency_ns)].add(1);
    }

    fn add_to(&self, out: &mut NsSnapshot) {
        for (o, s) in self.ops.iter().zip(out.ops.iter_mut()) {
            s.commands += o.commands.get();
            s.bytes += o.bytes.get();
            s.errors += o.errors.get();
            s.latency_sum_ns += o.latency_sum_ns.get();
            for (b, sb) in o.buckets.iter().zip(s.buckets.iter_mut()) {
                *sb += b.get();
            }
        }
    }
}

/// One command kind's totals for a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpSnapshot {
    pub commands: u64,
    /// Bytes moved by commands that succeeded (0 for flush).
    pub bytes: u64,
    /// Commands the device failed.
    pub errors: u64,
    pub latency_sum_ns: u64,
    /// Per-bucket (not cumulative) counts; see [`bucket_of`].
    pub buckets: [u64; LAT_BUCKETS],
}

impl Default for OpSnapshot {
    fn default() -> Self {
        Self {
            commands: 0,
            bytes: 0,
            errors: 0,
            latency_sum_ns: 0,
            buckets: [0; LAT_BUCKETS],
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NsSnapshot {
    pub ops: [OpSnapshot; IoKind::COUNT],
}

impl NsSnapshot {
    pub fn op(&self, k: IoKind) -> &OpSnapshot {
        &self.ops[k as usize]
    }
}

/// A latency histogram with many writers (the object-store runtime's
/// worker threads): `fetch_add`s, for code off the reactors, where a
/// request costs milliseconds and a shared line costs nothing measurable.
#[derive(Debug)]
pub struct SharedHistogram {
    count: AtomicU64,
    sum_ns: AtomicU64,
    buckets: [AtomicU64; LAT_BUCKETS],
}

impl Default for SharedHistogram {
    fn default() -> Self {
        Self {
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl SharedHistogram {
    pub fn record(&self, ns: u64) {
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            count: self.count.load(Relaxed),
            sum_ns: self.sum_ns.load(Relaxed),
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
        }
    }
}

/// Per-bucket (not cumulative) counts, with their count and sum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum_ns: u64,
    pub buckets: [u64; LAT_BUCKETS],
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            buckets: [0; LAT_BUCKETS],
        }
    }
}

/// How a connection ended, as the `reason` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EndReason {
    /// The host closed the socket.
    HostClosed,
    /// A Disconnect command.
    Disconnect,
    /// The host sent H2CTermReq.
    HostTerminated,
    /// A malformed PDU: we sent C2HTermReq.
    Malformed,
    /// Keep-alive expired.
    KeepAlive,
    /// The controller was destroyed (its admin queue went, or a reload).
    ControllerDestroyed,
    /// A limit or a timeout cut the connection.
    Cut,
    /// The target is shutting down.
    Shutdown,
    /// A socket error.
    SocketError,
}

impl EndReason {
    pub const ALL: [EndReason; 9] = [
        EndReason::HostClosed,
        EndReason::Disconnect,
        EndReason::HostTerminated,
        EndReason::Malformed,
        EndReason::KeepAlive,
        EndReason::ControllerDestroyed,
        EndReason::Cut,
        EndReason::Shutdown,
        EndReason::SocketError,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EndReason::HostClosed => "host_closed",
            EndReason::Disconnect => "disconnect",
            EndReason::HostTerminated => "host_terminated",
            EndReason::Malformed => "malformed_pdu",
            EndReason::KeepAlive => "keep_alive",
            EndReason::ControllerDestroyed => "controller_destroyed",
            EndReason::Cut => "cut",
            EndReason::Shutdown => "shutdown",
            EndReason::SocketError => "socket_error",
        }
    }
}

/// Per-listener connection counters (written per connection, not per I/O).
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub accepted: AtomicU64,
    /// Closed at accept: a connection limit was reached.
    pub refused: AtomicU64,
    /// Admin queues now connected (Fabrics Connect done).
    pub admin_queues: AtomicU64,
    /// I/O queues now connected.
    pub io_queues: AtomicU64,
    ended: [AtomicU64; EndReason::ALL.len()],
}

impl ListenerStats {
    pub fn ended(&self, r: EndReason) {
        self.ended[r as usize].fetch_add(1, Relaxed);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerSnapshot {
    pub port_id: u16,
    /// The bound address, as a label.
    pub addr: String,
    pub accepted: u64,
    pub refused: u64,
    pub admin_queues: u64,
    pub io_queues: u64,
    pub ended: Vec<(EndReason, u64)>,
}

/// Per-subsystem controller counters.
#[derive(Debug, Default)]
pub struct SubsystemStats {
    pub controllers_created: AtomicU64,
    pub keepalive_expiries: AtomicU64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubsystemSnapshot {
    pub nqn: String,
    pub controllers_created: u64,
    pub keepalive_expiries: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// By (subsystem NQN, NSID).
    pub namespaces: BTreeMap<(String, u32), NsSnapshot>,
    pub listeners: Vec<ListenerSnapshot>,
    pub subsystems: Vec<SubsystemSnapshot>,
}

#[derive(Default)]
struct NsEntry {
    live: Vec<Weak<QueueNsStats>>,
    /// What dropped blocks had counted.
    retired: NsSnapshot,
}

#[derive(Default)]
struct Inner {
    ns: BTreeMap<(String, u32), NsEntry>,
    listeners: BTreeMap<u16, (String, Arc<ListenerStats>)>,
    subsystems: BTreeMap<String, Arc<SubsystemStats>>,
}

/// Where the blocks are found at scrape time. Locked only when a block is
/// created or dropped (a queue's first command to a namespace, a queue's
/// end), when a listener or subsystem is first seen, and by a scrape.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

/// The process's registry: one per process (a test process that runs
/// several targets sums them).
pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

/// A queue's handle on its block for one namespace; dropping it folds the
/// block's counts into the namespace's retired sum.
pub struct NsStatsHandle {
    block: Arc<QueueNsStats>,
    key: (String, u32),
    registry: &'static Registry,
}

impl NsStatsHandle {
    #[inline]
    pub fn block(&self) -> &QueueNsStats {
        &self.block
    }
}

impl Drop for NsStatsHandle {
    fn drop(&mut self) {
        let mut g = self.registry.lock();
        let e = g.ns.entry(self.key.clone()).or_default();
        self.block.add_to(&mut e.retired);
        let me = Arc::as_ptr(&self.block);
        e.live.retain(|w| w.as_ptr() != me && w.strong_count() > 0);
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new block for one queue's commands to (subsystem, nsid).
    pub fn ns_block(&'static self, subnqn: &str, nsid: u32) -> NsStatsHandle {
        let block = Arc::new(QueueNsStats::default());
        let key = (subnqn.to_owned(), nsid);
        self.lock()
            .ns
            .entry(key.clone())
            .or_default()
            .live
            .push(Arc::downgrade(&block));
        NsStatsHandle {
            block,
            key,
            registry: self,
        }
    }

    /// The counters of listener `port_id` (created on first use; `addr`
    /// labels it).
    pub fn listener(&self, port_id: u16, addr: &str) -> Arc<ListenerStats> {
        let mut g = self.lock();
        let e = g
            .listeners
            .entry(port_id)
            .or_insert_with(|| (addr.to_owned(), Arc::default()));
        if !addr.is_empty() && e.0 != addr {
            e.0 = addr.to_owned();
        }
        e.1.clone()
    }

    pub fn subsystem(&self, nqn: &str) -> Arc<SubsystemStats> {
        let mut g = self.lock();
        if let Some(s) = g.subsystems.get(nqn) {
            return s.clone();
        }
        let s = Arc::<SubsystemStats>::default();
        g.subsystems.insert(nqn.to_owned(), s.clone());
        s
    }

    /// Sums every block, live and retired. Holds the registry lock while
    /// it reads (a few KiB per queue and namespace); the I/O path never
    /// takes this lock.
    pub fn snapshot(&self) -> Snapshot {
        let g = self.lock();
        let mut out = Snapshot::default();
        for (k, e) in &g.ns {
            let mut s = e.retired.clone();
            for w in &e.live {
                if let Some(b) = w.upgrade() {
                    b.add_to(&mut s);
                }
            }
            out.namespaces.insert(k.clone(), s);
        }
        for (&port_id, (addr, l)) in &g.listeners {
            out.listeners.push(ListenerSnapshot {
                port_id,
                addr: addr.clone(),
                accepted: l.accepted.load(Relaxed),
                refused: l.refused.load(Relaxed),
                admin_queues: l.admin_queues.load(Relaxed),
                io_queues: l.io_queues.load(Relaxed),
                ended: EndReason::ALL
                    .iter()
                    .map(|&r| (r, l.ended[r as usize].load(Relaxed)))
                    .collect(),
            });
        }
        for (nqn, s) in &g.subsystems {
            out.subsystems.push(SubsystemSnapshot {
                nqn: nqn.clone(),
                controllers_created: s.controllers_created.load(Relaxed),
                keepalive_expiries: s.keepalive_expiries.load(Relaxed),
            });
        }
        out
    }
}

/// Nanoseconds on a process-wide monotonic clock. Drivers hand it to
/// queues ([`crate::queue::QueuePair::set_clock`]); the queue itself reads
/// no clock.
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// `t` on the [`now_ns`] clock: a driver that already read the time for
/// its pass converts it without reading the clock again.
#[inline]
pub fn ns_at(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    t.saturating_duration_since(*EPOCH.get_or_init(Instant::now))
        .as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log_linear_and_le_bounds_are_exact() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(1024), 0);
        assert_eq!(bucket_of(1025), 1);
        assert_eq!(bucket_of(1536), 1);
        assert_eq!(bucket_of(1537), 2);
        assert_eq!(bucket_of(2048), 2);
        assert_eq!(bucket_of(2049), 3);
        assert_eq!(bucket_of(u64::MAX), LAT_BUCKETS - 1);
        assert_eq!(bucket_of((1 << 34) + 1), LAT_BUCKETS - 1);
        assert_eq!(bucket_of(1 << 34), LAT_BUCKETS - 2);
        assert_eq!(bucket_upper_ns(LAT_BUCKETS - 2), Some(1 << 34));
        assert_eq!(bucket_upper_ns(LAT_BUCKETS - 1), None);
        // Every value lands in the bucket whose bound is the first >= it,
        // and bounds rise strictly by a factor of at most 1.5.
        let mut prev = 0;
        for i in 0..LAT_BUCKETS - 1 {
            let up = bucket_upper_ns(i).unwrap();
            assert!(up > prev);
            if i > 0 {
                assert!(up * 2 <= prev * 3, "bucket {i}: {prev} → {up}");
            }
            assert_eq!(bucket_of(up), i, "upper bound of {i}");
            assert_eq!(bucket_of(up + 1), i + 1, "just past {i}");
            prev = up;
        }
    }

    #[test]
    fn record_counts_bytes_errors_and_latency() {
        let b = QueueNsStats::default();
        b.record(IoKind::Read, 4096, true, 5_000);
        b.record(IoKind::Read, 4096, true, 5_000);
        b.record(IoKind::Read, 4096, false, 1_000_000);
        b.record(IoKind::Flush, 0, true, 100);
        let mut s = NsSnapshot::default();
        b.add_to(&mut s);
        let r = s.op(IoKind::Read);
        assert_eq!((r.commands, r.bytes, r.errors), (3, 8192, 1));
        assert_eq!(r.latency_sum_ns, 1_010_000);
        assert_eq!(r.buckets[bucket_of(5_000)], 2);
        assert_eq!(r.buckets[bucket_of(1_000_000)], 1);
        assert_eq!(r.buckets.iter().sum::<u64>(), 3);
        assert_eq!(s.op(IoKind::Flush).commands, 1);
        assert_eq!(s.op(IoKind::Write).commands, 0);
    }

    /// Live blocks and blocks of queues that ended both count, once.
    #[test]
    fn snapshot_sums_live_and_retired_blocks() {
        let reg: &'static Registry = Box::leak(Box::default());
        let a = reg.ns_block("nqn.a", 1);
        let b = reg.ns_block("nqn.a", 1);
        let c = reg.ns_block("nqn.b", 7);
        a.block().record(IoKind::Write, 512, true, 2_000);
        b.block().record(IoKind::Write, 1024, true, 3_000);
        c.block().record(IoKind::Read, 4096, true, 4_000);
        let s1 = reg.snapshot();
        let w = s1.namespaces[&("nqn.a".to_string(), 1)]
            .op(IoKind::Write)
            .clone();
        assert_eq!((w.commands, w.bytes), (2, 1536));
        drop(a);
        let s2 = reg.snapshot();
        assert_eq!(
            s1.namespaces, s2.namespaces,
            "a dropped block still counts, once"
        );
        b.block().record(IoKind::Write, 1024, true, 3_000);
        drop(b);
        drop(c);
        let s3 = reg.snapshot();
        let w = s3.namespaces[&("nqn.a".to_string(), 1)]
            .op(IoKind::Write)
            .clone();
        assert_eq!((w.commands, w.bytes), (3, 2560));
        assert_eq!(
            s3.namespaces[&("nqn.b".to_string(), 7)]
                .op(IoKind::Read)
                .commands,
            1
        );
        assert!(reg.lock().ns.values().all(|e| e.live.is_empty()));
    }

    #[test]
    fn listener_and_subsystem_counters() {
        let reg: &'static Registry = Box::leak(Box::default());
        let l = reg.listener(3, "127.0.0.1:4420");
        l.accepted.fetch_add(2, Relaxed);
        l.ended(EndReason::KeepAlive);
        assert!(Arc::ptr_eq(&l, &reg.listener(3, "")));
        reg.subsystem("nqn.x")
            .keepalive_expiries
            .fetch_add(1, Relaxed);
        let s = reg.snapshot();
        assert_eq!(s.listeners[0].addr, "127.0.0.1:4420");
        assert_eq!(s.listeners[0].accepted, 2);
        assert!(s.listeners[0].ended.contains(&(EndReason::KeepAlive, 1)));
        assert_eq!(s.subsystems[0].keepalive_expiries, 1);
    }
}
