//! The write-back engine: per-object state, read/write/zero/flush.
//!
//! Invariants (see docs/objbacker.md for the reasoning):
//! - An object has at most one store mutation (PUT or DELETE) in flight
//!   (`busy`), so an older PUT can never land after a newer one.
//! - Every change gets a device-wide increasing generation. `durable_ver`
//!   is the newest generation of the object known to be in the store; an
//!   object with no entry in `objs` is clean (everything durable).
//! - Reads stack: dirty layer (newest) over in-flight layer over read-ahead
//!   cache or store. What a read takes from the dirty layer is copied at the
//!   read's start, so a write-back finishing mid-read cannot hide it.
//! - The state lock is a std Mutex never held across an await.
//! - A PUT/DELETE attempt is never abandoned (`Retrier::mutate`): the
//!   object stays busy until the store answered it, also past the retry
//!   budget (`unanswered`), so ordering holds at the store, not only here.
//!   Past `orphan_deadline` the object is `poisoned`: writes to it fail.
//! - `maybe_stored` is a superset of the objects present in the store
//!   (bit set before any PUT starts, cleared when a DELETE succeeds, seeded
//!   by one LIST at attach): a TRIM of an object outside it needs no DELETE.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use tokio::sync::Notify;

use crate::config::ObjBackerConfig;
use crate::store::{Bucket, MutFail, Retrier};

/// Sorted, merged, half-open byte ranges within one object.
#[derive(Default, Clone, Debug)]
pub(crate) struct Coverage(Vec<(u64, u64)>);

impl Coverage {
    fn full(len: u64) -> Self {
        Coverage(vec![(0, len)])
    }
    fn insert(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let (mut a, mut b) = (a, b);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(x, y) in &self.0 {
            if y < a {
                out.push((x, y));
            } else if x > b {
                if !placed {
                    out.push((a, b));
                    placed = true;
                }
                out.push((x, y));
            } else {
                a = a.min(x);
                b = b.max(y);
            }
        }
        if !placed {
            out.push((a, b));
        }
        self.0 = out;
    }
    fn covers(&self, a: u64, b: u64) -> bool {
        a >= b || self.0.iter().any(|&(x, y)| x <= a && b <= y)
    }
    /// Covered parts of [a, b).
    fn within(&self, a: u64, b: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0
            .iter()
            .map(move |&(x, y)| (x.max(a), y.min(b)))
            .filter(|(x, y)| x < y)
    }
    /// Uncovered parts of [a, b).
    fn gaps(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = a;
        for (x, y) in self.within(a, b) {
            if x > pos {
                out.push((pos, x));
            }
            pos = y;
        }
        if pos < b {
            out.push((pos, b));
        }
        out
    }
}

/// Newest not-yet-durable content of an object.
pub(crate) enum Layer {
    /// Object-sized buffer; bytes outside `cov` are not yet known (they
    /// are whatever the store holds) and are zero in `data`.
    Buf { data: Vec<u8>, cov: Coverage },
    /// A whole-object host write taken into the write cache: the host's
    /// own buffer, PUT as is (no copy).
    Whole(Bytes),
    /// The whole object is zero: written back as DELETE.
    Zero,
}

impl Layer {
    /// Counted in `dirty_bytes` (one object length).
    fn holds_bytes(&self) -> bool {
        !matches!(self, Layer::Zero)
    }
}

/// Content being made durable right now.
enum Inflight {
    Put(Bytes),
    Delete,
}

struct Obj {
    dirty: Option<Layer>,
    dirty_since: Instant,
    /// Host writes completed the buffer's coverage: write it back now (one
    /// PUT per sequentially filled object). A buffer made whole by a
    /// read-modify-write is not eager: later small writes into it wait for
    /// the write-back delay, so a hot object is PUT once per delay, not
    /// once per PUT round trip.
    eager: bool,
    inflight: Option<Inflight>,
    busy: bool,
    ver: u64,
    durable_ver: u64,
    /// fail_seq of this object's last failed write-back.
    last_fail_seq: u64,
    /// The busy mutation outlived its retry budget unanswered: it may
    /// still land, so the object stays busy and durability is unknown.
    unanswered: bool,
    /// Unanswered past `orphan_deadline`: writes to the object fail.
    poisoned: bool,
}

/// One bit per object.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u64, fill: bool) -> Self {
        Bits(vec![
            if fill { u64::MAX } else { 0 };
            n.div_ceil(64) as usize
        ])
    }
    fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_none_or(|w| w & (1 << (i % 64)) != 0)
    }
    fn set(&mut self, i: u64, v: bool) {
        if let Some(w) = self.0.get_mut((i / 64) as usize) {
            if v {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }
}

/// Devices with more objects than this do not track `maybe_stored` (it
/// would cost more than 32 MiB); every TRIM of them DELETEs.
const MAX_TRACKED_OBJECTS: u64 = 1 << 28;

#[derive(Clone, Copy, PartialEq, Eq)]
enum MutKind {
    /// A whole-object host write PUT straight from the host buffer.
    Direct,
    /// Write-back of the dirty layer (PUT or DELETE).
    Writeback,
}

enum MutOp {
    Put(Bytes),
    Delete,
}

enum Cached {
    Data(Bytes),
    Zero,
}

struct State {
    objs: HashMap<u64, Obj>,
    /// Bytes held by Buf and Whole layers (object length each).
    dirty_bytes: u64,
    next_ver: u64,
    fail_seq: u64,
    busy_count: usize,
    cache: HashMap<u64, Cached>,
    /// Bytes reads have taken from each cached object. A sequential reader
    /// is done with an object once it has taken all of it, in whatever
    /// order its concurrent reads ran.
    cache_served: HashMap<u64, u64>,
    cache_order: VecDeque<u64>,
    /// GETs in flight per object, demand and read-ahead alike, so no
    /// object is fetched twice at once.
    fetching: HashMap<u64, Fetch>,
    /// Read-ahead GETs in `fetching`.
    prefetches: usize,
    /// Sequential readers, at most MAX_STREAMS, least recently used evicted.
    streams: Vec<Stream>,
    stream_ids: u64,
    tick: u64,
    /// Next object of each sequential whole-object writer (most recent
    /// last), at most MAX_STREAMS.
    write_streams: VecDeque<u64>,
    /// No store mutation has failed since the last one that succeeded.
    store_ok: bool,
    /// Superset of the objects in the store; None: not tracked (all may be).
    maybe_stored: Option<Bits>,
    /// While the attach-time LIST runs: objects PUT since it began.
    put_since_scan: Option<Bits>,
    scan_done: bool,
    /// Most entries `objs` ever held (tests bound per-object memory).
    peak_objs: usize,
}

impl State {
    /// Records a change to `i`: a new version newer than everything the
    /// entry (possibly just created clean) already has.
    fn touch(&mut self, i: u64) -> (u64, &mut Obj) {
        let base = self.next_ver;
        self.next_ver += 1;
        let after = self.objs.len() + usize::from(!self.objs.contains_key(&i));
        self.peak_objs = self.peak_objs.max(after);
        let ver = self.next_ver;
        let o = self.objs.entry(i).or_insert_with(|| Obj {
            dirty: None,
            dirty_since: Instant::now(),
            eager: false,
            inflight: None,
            busy: false,
            ver: base,
            durable_ver: base,
            last_fail_seq: 0,
            unanswered: false,
            poisoned: false,
        });
        o.ver = ver;
        (ver, o)
    }
    fn may_be_stored(&self, i: u64) -> bool {
        self.maybe_stored.as_ref().is_none_or(|b| b.get(i))
    }
    /// A PUT of `i` is about to be sent.
    fn note_put(&mut self, i: u64) {
        if let Some(b) = &mut self.maybe_stored {
            b.set(i, true);
        }
        if let Some(b) = &mut self.put_since_scan {
            b.set(i, true);
        }
    }
    fn poisoned(&self, i: u64) -> bool {
        self.objs.get(&i).is_some_and(|o| o.poisoned)
    }
    fn cleanup(&mut self, i: u64) {
        if self
            .objs
            .get(&i)
            .is_some_and(|o| o.dirty.is_none() && !o.busy)
        {
            self.objs.remove(&i);
        }
    }
    /// A store mutation of `i` is starting: cached store content is stale.
    fn invalidate(&mut self, i: u64) {
        self.uncache(i);
        if let Some(valid) = self.fetching.get_mut(&i).and_then(|f| f.prefetch.as_mut()) {
            *valid = false;
        }
    }
    fn uncache(&mut self, i: u64) {
        self.cache_served.remove(&i);
        if self.cache.remove(&i).is_some() {
            self.cache_order.retain(|&x| x != i);
        }
    }
    /// Whether a whole-object write of `i` continues a sequential writer
    /// (the previous whole-object write was to `i - 1`); records it.
    fn note_whole_write(&mut self, i: u64) -> bool {
        let hit = self.write_streams.iter().position(|&n| n == i);
        if let Some(p) = hit {
            self.write_streams.remove(p);
        } else if self.write_streams.len() >= MAX_STREAMS {
            self.write_streams.pop_front();
        }
        self.write_streams.push_back(i + 1);
        hit.is_some()
    }
}

/// GETs of one object in flight.
#[derive(Default)]
struct Fetch {
    /// A read-ahead GET: Some(valid), false once a mutation made it stale.
    prefetch: Option<bool>,
    /// Demand reads GETting (part of) the object into their own buffers.
    demand: u32,
    /// Those of them that GET the whole object: read-ahead of it would
    /// fetch it twice. (A partial demand GET does not stop read-ahead from
    /// fetching the object for the reads that follow it.)
    whole: u32,
}

/// A sequential reader, found by where its next read should start.
struct Stream {
    id: u64,
    /// End of the furthest read seen.
    next_off: u64,
    /// Objects below this were already considered for read-ahead.
    ra_end: u64,
    /// Reads of this stream in flight, in bytes: they already keep that
    /// much of the store busy, so read-ahead only tops them up.
    demand_bytes: u64,
    /// Reads that started exactly where the stream ended.
    hits: u32,
    last_use: u64,
}

/// Sequential readers (and whole-object writers) tracked at once.
const MAX_STREAMS: usize = 16;
/// Upper bound of all read-ahead data held or in flight.
const MAX_READAHEAD_CACHE_BYTES: u64 = 128 << 20;

/// A read in progress, counted against its stream until dropped.
pub(crate) struct ReadTicket {
    inner: Arc<Inner>,
    stream: Option<(u64, u64)>,
}

impl Drop for ReadTicket {
    fn drop(&mut self) {
        if let Some((id, bytes)) = self.stream {
            let mut st = self.inner.lock();
            if let Some(s) = st.streams.iter_mut().find(|s| s.id == id) {
                s.demand_bytes = s.demand_bytes.saturating_sub(bytes);
            }
        }
    }
}

/// Unregisters a demand GET from `fetching`, also if the read is dropped.
struct DemandGuard<'a> {
    inner: &'a Inner,
    i: u64,
    whole: bool,
}

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Some(f) = st.fetching.get_mut(&self.i) {
            f.demand = f.demand.saturating_sub(1);
            if self.whole {
                f.whole = f.whole.saturating_sub(1);
            }
            if f.demand == 0 && f.prefetch.is_none() {
                st.fetching.remove(&self.i);
            }
        }
    }
}

pub(crate) struct Geometry {
    pub size: u64,
    pub obj_size: u64,
    pub num_objects: u64,
}

impl Geometry {
    pub fn new(size: u64, obj_size: u64) -> Self {
        Self {
            size,
            obj_size,
            num_objects: size.div_ceil(obj_size),
        }
    }
    /// The last object is shorter when size is not a multiple of obj_size.
    pub fn obj_len(&self, i: u64) -> u64 {
        self.obj_size
            .min(self.size.saturating_sub(i * self.obj_size))
    }
    /// Splits [off, off+len) into (object, offset in object, length,
    /// offset in the request).
    fn segments(&self, off: u64, len: u64) -> Vec<(u64, u64, u64, u64)> {
        let mut out = Vec::new();
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let i = pos / self.obj_size;
            let o = pos % self.obj_size;
            let n = (self.obj_len(i) - o).min(end - pos);
            out.push((i, o, n, pos - off));
            pos += n;
        }
        out
    }
}

fn crashed() -> object_store::Error {
    object_store::Error::Generic {
        store: "objbacker",
        source: "simulated crash".into(),
    }
}

/// Lazy [`Geometry::segments`] (without the request offset), for ranges
/// as large as the device.
struct SegIter<'a> {
    geo: &'a Geometry,
    pos: u64,
    end: u64,
}

impl<'a> SegIter<'a> {
    fn new(geo: &'a Geometry, off: u64, len: u64) -> Self {
        Self {
            geo,
            pos: off,
            end: off + len,
        }
    }
}

impl Iterator for SegIter<'_> {
    type Item = (u64, u64, u64);
    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let i = self.pos / self.geo.obj_size;
        let o = self.pos % self.geo.obj_size;
        let n = (self.geo.obj_len(i) - o).min(self.end - self.pos);
        self.pos += n;
        Some((i, o, n))
    }
}

/// Why an operation failed; mapped to an NVMe status by the bdev layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EngErr {
    Store,
    Corrupt,
}

pub(crate) struct Inner {
    pub geo: Geometry,
    pub buckets: Vec<Bucket>,
    pub retry: Retrier,
    state: Mutex<State>,
    /// Any object finished a mutation, a prefetch landed, or buffer space
    /// was freed. Waiters re-check their condition.
    changed: Notify,
    /// Wakes the background flusher.
    kick: Notify,
    writeback_bytes: u64,
    writeback_delay: Duration,
    readahead_bytes: u64,
    max_in_flight: usize,
    /// The write cache refused a whole-object write for lack of room
    /// (logged once).
    cache_full_logged: std::sync::atomic::AtomicBool,
    /// Runtime for read-ahead tasks: reads are noted on the submitting
    /// reactor's thread, which runs a different runtime.
    rt: tokio::runtime::Handle,
    retry_budget: Duration,
    trim_parallelism: usize,
    orphan_deadline: Duration,
    /// Test hook: once set, no store mutation starts (simulated kill -9).
    crashed: std::sync::atomic::AtomicBool,
    /// Test hooks: flusher passes and objects it picked.
    flusher_passes: std::sync::atomic::AtomicU64,
    flusher_picks: std::sync::atomic::AtomicU64,
    /// Ourselves, for tasks that must outlive the request that started
    /// them (waiting for an unanswered mutation).
    me: Weak<Inner>,
}

type R<T> = Result<T, EngErr>;

impl Inner {
    pub fn new(cfg: &ObjBackerConfig, buckets: Vec<Bucket>, retry: Retrier) -> Arc<Self> {
        let geo = Geometry::new(cfg.size_bytes, cfg.object_size);
        let tracked = geo.num_objects <= MAX_TRACKED_OBJECTS;
        let maybe_stored = tracked.then(|| Bits::new(geo.num_objects, true));
        let put_since_scan = tracked.then(|| Bits::new(geo.num_objects, false));
        Arc::new_cyclic(|me| Self {
            geo,
            buckets,
            retry,
            state: Mutex::new(State {
                objs: HashMap::new(),
                dirty_bytes: 0,
                next_ver: 0,
                fail_seq: 0,
                busy_count: 0,
                cache: HashMap::new(),
                cache_served: HashMap::new(),
                cache_order: VecDeque::new(),
                fetching: HashMap::new(),
                prefetches: 0,
                streams: Vec::new(),
                stream_ids: 0,
                tick: 0,
                write_streams: VecDeque::new(),
                store_ok: true,
                maybe_stored,
                put_since_scan,
                scan_done: !tracked,
                peak_objs: 0,
            }),
            changed: Notify::new(),
            kick: Notify::new(),
            writeback_bytes: cfg.writeback_bytes,
            writeback_delay: cfg.writeback_delay,
            readahead_bytes: cfg.readahead_bytes.min(crate::config::MAX_READAHEAD_BYTES),
            max_in_flight: cfg.max_in_flight,
            cache_full_logged: Default::default(),
            rt: tokio::runtime::Handle::current(),
            retry_budget: cfg.retry_budget,
            trim_parallelism: cfg.trim_parallelism,
            orphan_deadline: cfg.orphan_deadline,
            crashed: Default::default(),
            flusher_passes: Default::default(),
            flusher_picks: Default::default(),
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in
        // a way that matters more than refusing all further I/O would.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bucket(&self, i: u64) -> &Bucket {
        &self.buckets[(i % self.buckets.len() as u64) as usize]
    }

    pub fn crash(&self) {
        self.crashed.store(true, Relaxed);
    }

    /// The write-back buffer's bound.
    pub fn writeback_capacity(&self) -> u64 {
        self.writeback_bytes
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.lock().dirty_bytes
    }

    /// Test hooks: the attach-time LIST has finished; most object entries
    /// ever tracked at once.
    pub fn scan_done(&self) -> bool {
        self.lock().scan_done
    }
    pub fn peak_objs(&self) -> usize {
        self.lock().peak_objs
    }
    pub fn prefetches_in_flight(&self) -> usize {
        self.lock().prefetches
    }
    pub fn kick_flusher(&self) {
        self.kick.notify_one();
    }
    pub fn flusher_counters(&self) -> (u64, u64) {
        (
            self.flusher_passes.load(Relaxed),
            self.flusher_picks.load(Relaxed),
        )
    }

    /// Seeds `maybe_stored` from one LIST of every bucket, so a TRIM of
    /// never-written objects costs no DELETE. Until it finishes every
    /// object counts as maybe stored; on any error it stays that way.
    /// Whether this engine uses bucket `b`: overlapping URLs (one a
    /// prefix of the other), and for `memory://` (where every store is its
    /// own bucket whatever its URL) the same store.
    pub fn holds_bucket(&self, b: &Bucket) -> bool {
        let overlap = |x: &str, y: &str| {
            let (x, y) = (x.trim_end_matches('/'), y.trim_end_matches('/'));
            x == y
                || y.strip_prefix(x).is_some_and(|r| r.starts_with('/'))
                || x.strip_prefix(y).is_some_and(|r| r.starts_with('/'))
        };
        self.buckets.iter().any(|mine| {
            overlap(&mine.url, &b.url)
                && (!b.url.starts_with("memory:")
                    || std::ptr::addr_eq(Arc::as_ptr(&mine.store), Arc::as_ptr(&b.store)))
        })
    }

    pub async fn scan_stored(weak: Weak<Self>) {
        let Some(me) = weak.upgrade() else { return };
        let n = me.geo.num_objects;
        let nb = me.buckets.len() as u64;
        let mut listed = Bits::new(n, false);
        for (k, b) in me.buckets.iter().enumerate() {
            let prefix = (!b.prefix.as_ref().is_empty()).then_some(&b.prefix);
            let mut keys = b.store.list(prefix);
            while let Some(m) = keys.next().await {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(
                            "objbacker: listing {} failed ({e}); every TRIM will DELETE",
                            b.url
                        );
                        let mut st = me.lock();
                        st.put_since_scan = None;
                        st.scan_done = true;
                        return;
                    }
                };
                let idx = crate::superblock::leaf(b, &m.location)
                    .and_then(|l| crate::superblock::data_index(&l));
                // Misplaced keys are fsck's business; a DELETE of the right
                // key never touches them.
                if let Some(i) = idx.filter(|&i| i < n && i % nb == k as u64) {
                    listed.set(i, true);
                }
            }
        }
        let mut st = me.lock();
        if let (Some(since), Some(maybe)) = (st.put_since_scan.take(), st.maybe_stored.as_mut()) {
            for ((m, l), p) in maybe.0.iter_mut().zip(&listed.0).zip(&since.0) {
                // Listed, or PUT since the LIST began. A DELETE that finished
                // after the LIST saw the object leaves a stale 1: harmless.
                *m = *l | *p;
            }
        }
        st.scan_done = true;
    }

    async fn store_put(&self, i: u64, data: Bytes) -> Result<(), MutFail> {
        if self.crashed.load(Relaxed) {
            return Err(MutFail::Answered(crashed()));
        }
        let b = self.bucket(i);
        self.retry.put_tracked(b, &b.data_key(i), data).await
    }

    async fn store_delete(&self, i: u64) -> Result<(), MutFail> {
        if self.crashed.load(Relaxed) {
            return Err(MutFail::Answered(crashed()));
        }
        let b = self.bucket(i);
        self.retry.delete_tracked(b, &b.data_key(i)).await
    }

    /// Runs the PUT/DELETE of busy object `i` at generation `ver` and
    /// finishes it. If the store never answered within the retry budget the
    /// caller gets an error now, while the object stays busy (and
    /// `unanswered`) until the request resolves: no newer PUT or DELETE of
    /// it is sent before then, so the old one cannot overtake it.
    async fn mutate(&self, i: u64, ver: u64, kind: MutKind, op: MutOp) -> R<()> {
        let delete = matches!(op, MutOp::Delete);
        let res = match op {
            MutOp::Put(b) => self.store_put(i, b).await,
            MutOp::Delete => self.store_delete(i).await,
        };
        match res {
            Ok(()) => {
                self.finish_mutation(i, ver, kind, delete, true);
                Ok(())
            }
            Err(MutFail::Answered(_)) => {
                self.finish_mutation(i, ver, kind, delete, false);
                Err(EngErr::Store)
            }
            Err(MutFail::Unanswered(attempt)) => {
                {
                    let mut st = self.lock();
                    st.fail_seq += 1;
                    st.store_ok = false;
                    let seq = st.fail_seq;
                    if let Some(o) = st.objs.get_mut(&i) {
                        o.unanswered = true;
                        o.last_fail_seq = seq;
                    }
                }
                self.changed.notify_waiters();
                if let Some(me) = self.me.upgrade() {
                    tokio::spawn(me.await_unanswered(i, ver, kind, delete, attempt));
                }
                Err(EngErr::Store)
            }
        }
    }

    /// Keeps object `i` busy until its unanswered mutation resolves;
    /// poisons it past `orphan_deadline`.
    async fn await_unanswered(
        self: Arc<Self>,
        i: u64,
        ver: u64,
        kind: MutKind,
        delete: bool,
        mut attempt: tokio::task::JoinHandle<Result<(), object_store::Error>>,
    ) {
        let key = self.bucket(i).data_key(i);
        let wait = self.orphan_deadline.saturating_sub(self.retry_budget);
        let res = match tokio::time::timeout(wait, &mut attempt).await {
            Ok(r) => r,
            Err(_) => {
                tracing::error!(
                    "objbacker: {} of {key} unanswered for {:?}: object poisoned, \
                     writes to it fail until the store answers or the device is re-attached",
                    if delete { "DELETE" } else { "PUT" },
                    self.orphan_deadline
                );
                if let Some(o) = self.lock().objs.get_mut(&i) {
                    o.poisoned = true;
                }
                self.changed.notify_waiters();
                attempt.await
            }
        };
        let mut ok = matches!(res, Ok(Ok(())));
        if ok && let Some(root) = &self.bucket(i).local_root {
            ok = crate::store::sync_local(root, &key, !delete).await.is_ok();
        }
        tracing::info!(
            "objbacker: unanswered {} of {key} resolved: {}",
            if delete { "DELETE" } else { "PUT" },
            if ok { "it landed" } else { "it failed" }
        );
        if ok && !delete {
            // Counted like any PUT that succeeded.
            self.retry.stats.puts.fetch_add(1, Relaxed);
        }
        self.finish_mutation(i, ver, kind, delete, ok);
    }

    /// Bookkeeping when a PUT/DELETE of busy object `i` has resolved.
    fn finish_mutation(&self, i: u64, ver: u64, kind: MutKind, delete: bool, ok: bool) {
        let len = self.geo.obj_len(i);
        let mut st = self.lock();
        st.busy_count = st.busy_count.saturating_sub(1);
        // A failed direct PUT is reported by its own write; the object was
        // clean before, so nothing acknowledged is lost and FLUSH owes
        // nothing for it.
        let fail_seq = st.fail_seq + 1;
        if !ok && kind == MutKind::Writeback {
            st.fail_seq = fail_seq;
        }
        st.store_ok = ok;
        if ok && delete {
            // Busy until now, so no PUT of it started meanwhile.
            if let Some(b) = &mut st.maybe_stored {
                b.set(i, false);
            }
        }
        let mut freed = false;
        if let Some(o) = st.objs.get_mut(&i) {
            o.busy = false;
            o.inflight = None;
            o.unanswered = false;
            o.poisoned = false;
            if ok {
                o.durable_ver = o.durable_ver.max(ver);
                if o.ver == ver {
                    freed = o.dirty.take().is_some_and(|l| l.holds_bytes());
                } else if kind == MutKind::Writeback {
                    // Written again during the PUT: those writes age
                    // from now, like any other dirty data.
                    o.dirty_since = Instant::now();
                }
            } else if kind == MutKind::Writeback {
                o.last_fail_seq = fail_seq;
            }
        }
        if freed {
            st.dirty_bytes = st.dirty_bytes.saturating_sub(len);
        }
        st.cleanup(i);
        if st.objs.contains_key(&i) {
            self.kick.notify_one();
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Whole object as stored; None if never written.
    async fn store_get_whole(&self, i: u64) -> R<Option<Bytes>> {
        let b = self.bucket(i);
        let len = self.geo.obj_len(i);
        match self.retry.get(b, &b.data_key(i), 0..len, true).await {
            Ok(Some(v)) if v.len() as u64 != len => {
                tracing::error!(
                    "objbacker: object {} is {} bytes, expected {len}: not written by this device",
                    b.data_key(i),
                    v.len()
                );
                Err(EngErr::Corrupt)
            }
            Ok(v) => Ok(v),
            Err(_) => Err(EngErr::Store),
        }
    }

    // ---------------------------------------------------------------- write

    pub async fn write(self: &Arc<Self>, off: u64, data: Bytes, fua: bool) -> R<()> {
        self.retry
            .stats
            .bytes_written
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let segs = self.geo.segments(off, data.len() as u64);
        let (start_seq, behind) = {
            let mut st = self.lock();
            let healthy = st.store_ok;
            let behind: Vec<bool> = segs
                .iter()
                .map(|&(i, o, n, _)| {
                    let whole = o == 0 && n == self.geo.obj_len(i);
                    whole && st.note_whole_write(i) && healthy && !fua
                })
                .collect();
            (st.fail_seq, behind)
        };
        let results = join_all(segs.into_iter().zip(behind).map(|((i, o, n, d), behind)| {
            let piece = data.slice(d as usize..(d + n) as usize);
            async move {
                if behind && let Some(g) = self.cache_whole(i, &piece)? {
                    return Ok(Some(g));
                }
                if o == 0 && n == self.geo.obj_len(i) {
                    self.write_whole(i, piece).await
                } else {
                    self.write_partial(i, o, &piece).await.map(Some)
                }
            }
        }))
        .await;
        let mut pending = Vec::new();
        for r in results {
            if let Some(g) = r? {
                pending.push(g);
            }
        }
        if fua {
            let waits = join_all(
                pending
                    .into_iter()
                    .map(|(i, g)| self.ensure_durable(i, g, start_seq)),
            );
            for r in waits.await {
                r?;
            }
        }
        Ok(())
    }

    /// Write-behind of a whole-object write that continues a sequential
    /// writer: the host's buffer becomes the dirty layer and its PUT starts
    /// now, without the write waiting for it; FLUSH (or FUA) waits. This
    /// keeps a QD1 writer's PUTs pipelined. Isolated whole-object writes,
    /// and every write while the store is failing, stay write-through so
    /// the host sees store errors per command, not only at FLUSH. Returns
    /// None when the write cache is full: the caller writes through.
    fn cache_whole(&self, i: u64, data: &Bytes) -> R<Option<(u64, u64)>> {
        let len = self.geo.obj_len(i);
        let (ver, start) = {
            let mut st = self.lock();
            if st.poisoned(i) {
                return Err(self.poisoned_err(i));
            }
            let holds = st
                .objs
                .get(&i)
                .and_then(|o| o.dirty.as_ref())
                .is_some_and(Layer::holds_bytes);
            if !holds && st.dirty_bytes + len > self.writeback_bytes {
                if !self.cache_full_logged.swap(true, Relaxed) {
                    tracing::info!(
                        "objbacker: write cache full ({} bytes dirty): whole-object writes \
                         wait for their own PUT until it drains (logged once)",
                        st.dirty_bytes
                    );
                }
                return Ok(None);
            }
            if !holds {
                st.dirty_bytes += len;
            }
            let room = st.busy_count < self.max_in_flight;
            let (ver, o) = st.touch(i);
            if o.dirty.is_none() {
                o.dirty_since = Instant::now();
            }
            o.dirty = Some(Layer::Whole(data.clone()));
            o.eager = true;
            (ver, room && !o.busy)
        };
        match self.me.upgrade() {
            Some(me) if start => {
                tokio::spawn(async move {
                    // Failures stay in the object's state for FLUSH/FUA.
                    let _ = me.writeback(i).await;
                });
            }
            // Past max_in_flight, or an older PUT of it is still running:
            // the flusher takes it when that finishes.
            _ => self.kick.notify_one(),
        }
        Ok(Some((i, ver)))
    }

    /// A whole, aligned object: PUT straight from the host buffer when the
    /// object is clean and idle. Returns (object, ver) if it was buffered
    /// instead and so is not durable yet.
    async fn write_whole(&self, i: u64, data: Bytes) -> R<Option<(u64, u64)>> {
        let ver = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            let buffered = {
                let mut st = self.lock();
                if st.poisoned(i) {
                    return Err(self.poisoned_err(i));
                }
                let state = st
                    .objs
                    .get(&i)
                    .map(|o| (o.dirty.is_some() || o.unanswered, o.busy));
                match state {
                    None | Some((false, false)) => {
                        let (ver, o) = st.touch(i);
                        o.busy = true;
                        o.inflight = Some(Inflight::Put(data.clone()));
                        st.busy_count += 1;
                        st.note_put(i);
                        st.invalidate(i);
                        break ver;
                    }
                    // An older dirty layer exists: overlay it so the write
                    // supersedes it in one place, and let write-back PUT it.
                    // Same while an unanswered request holds the object: the
                    // buffer keeps the write until that request resolves.
                    Some((true, _)) => true,
                    // Only a PUT/DELETE in flight: wait for it, so this
                    // newer PUT cannot be overtaken by it.
                    Some((false, true)) => {
                        notified.as_mut().enable();
                        false
                    }
                }
            };
            if buffered {
                // Superseding a dirty layer in place: no copy, and no
                // more buffer room than it already takes.
                if let Some(g) = self.cache_whole(i, &data)? {
                    return Ok(Some(g));
                }
                return self.write_partial(i, 0, &data).await.map(Some);
            }
            notified.await;
        };
        self.mutate(i, ver, MutKind::Direct, MutOp::Put(data))
            .await
            .map(|()| None)
    }

    fn poisoned_err(&self, i: u64) -> EngErr {
        tracing::error!(
            "objbacker: object {} is poisoned (a request to the store was never answered); refusing to change it",
            self.bucket(i).data_key(i)
        );
        EngErr::Store
    }

    /// Copies into the write-back buffer, waiting (bounded) for space.
    async fn write_partial(&self, i: u64, off: u64, data: &[u8]) -> R<(u64, u64)> {
        let len = self.geo.obj_len(i);
        let deadline = tokio::time::Instant::now() + self.retry_budget;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            {
                let mut st = self.lock();
                if st.poisoned(i) {
                    return Err(self.poisoned_err(i));
                }
                let has_buf = st
                    .objs
                    .get(&i)
                    .and_then(|o| o.dirty.as_ref())
                    .is_some_and(Layer::holds_bytes);
                if has_buf || st.dirty_bytes + len <= self.writeback_bytes {
                    if !has_buf {
                        st.dirty_bytes += len;
                    }
                    let (ver, o) = st.touch(i);
                    let was_clean = o.dirty.is_none();
                    let layer = o.dirty.get_or_insert(Layer::Buf {
                        data: Vec::new(),
                        cov: Coverage::default(),
                    });
                    match layer {
                        Layer::Zero => {
                            *layer = Layer::Buf {
                                data: Vec::new(),
                                cov: Coverage::full(len),
                            }
                        }
                        Layer::Whole(b) => {
                            *layer = Layer::Buf {
                                data: b.to_vec(),
                                cov: Coverage::full(len),
                            }
                        }
                        Layer::Buf { .. } => {}
                    }
                    let Layer::Buf { data: buf, cov } = layer else {
                        return Err(EngErr::Corrupt);
                    };
                    if buf.is_empty() {
                        buf.resize(len as usize, 0);
                    }
                    let was_complete = cov.covers(0, len);
                    buf[off as usize..off as usize + data.len()].copy_from_slice(data);
                    cov.insert(off, off + data.len() as u64);
                    let complete = cov.covers(0, len);
                    if was_clean {
                        o.dirty_since = Instant::now();
                    }
                    if complete && !was_complete {
                        o.eager = true;
                    }
                    let eager_now = o.eager && !o.busy;
                    // An object the host just completed needs no
                    // read-modify-write: write it back now; this is what
                    // turns sequential small writes into one PUT per object.
                    let over = st.dirty_bytes > self.writeback_bytes / 2;
                    if eager_now || over {
                        self.kick.notify_one();
                    }
                    return Ok((i, ver));
                }
                // Back-pressure: the buffer is full. Write-back frees it.
                self.kick.notify_one();
                notified.as_mut().enable();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    "objbacker: write-back buffer full for {:?}",
                    self.retry_budget
                );
                return Err(EngErr::Store);
            }
        }
    }

    // ----------------------------------------------------------- write-back

    /// Makes the current dirty layer of `i` durable. Returns Ok(false) if
    /// another task is already writing it back.
    async fn writeback(&self, i: u64) -> R<bool> {
        enum Op {
            Put(Bytes),
            Delete,
            Rmw,
        }
        let len = self.geo.obj_len(i);
        let (mut op, mut ver) = {
            let mut st = self.lock();
            let Some(o) = st.objs.get_mut(&i) else {
                return Ok(true);
            };
            if o.busy {
                return Ok(false);
            }
            let op = match &o.dirty {
                None => return Ok(true),
                Some(Layer::Zero) => Op::Delete,
                Some(Layer::Whole(b)) => Op::Put(b.clone()),
                Some(Layer::Buf { data, cov }) if cov.covers(0, len) => {
                    Op::Put(Bytes::copy_from_slice(data))
                }
                Some(Layer::Buf { .. }) => Op::Rmw,
            };
            o.busy = true;
            o.eager = false;
            let ver = o.ver;
            st.busy_count += 1;
            (op, ver)
        };
        if let Op::Rmw = op {
            // Partial object: fetch what the store has to fill the gaps.
            // Writes landing meanwhile go into the buffer; only bytes still
            // uncovered when the GET returns are taken from it.
            self.retry.stats.rmw_gets.fetch_add(1, Relaxed);
            let base = self.store_get_whole(i).await;
            let mut st = self.lock();
            let base = match base {
                Ok(b) => b,
                Err(e) => {
                    st.busy_count = st.busy_count.saturating_sub(1);
                    st.fail_seq += 1;
                    st.store_ok = false;
                    let seq = st.fail_seq;
                    if let Some(o) = st.objs.get_mut(&i) {
                        o.busy = false;
                        o.last_fail_seq = seq;
                    }
                    drop(st);
                    self.changed.notify_waiters();
                    return Err(e);
                }
            };
            let Some(o) = st.objs.get_mut(&i) else {
                return Err(EngErr::Corrupt);
            };
            ver = o.ver;
            op = match &mut o.dirty {
                Some(Layer::Buf { data, cov }) => {
                    if let Some(base) = base {
                        for (a, b) in cov.gaps(0, len) {
                            data[a as usize..b as usize]
                                .copy_from_slice(&base[a as usize..b as usize]);
                        }
                    }
                    *cov = Coverage::full(len);
                    Op::Put(Bytes::copy_from_slice(data))
                }
                // Overwritten whole or trimmed while we were fetching.
                Some(Layer::Whole(b)) => Op::Put(b.clone()),
                Some(Layer::Zero) => Op::Delete,
                // Only the busy holder (us) removes the dirty layer.
                None => {
                    o.busy = false;
                    st.busy_count = st.busy_count.saturating_sub(1);
                    st.cleanup(i);
                    drop(st);
                    self.changed.notify_waiters();
                    return Ok(true);
                }
            };
        }
        let skip = {
            let mut st = self.lock();
            let skip = matches!(op, Op::Delete) && !st.may_be_stored(i);
            if let Some(o) = st.objs.get_mut(&i) {
                o.inflight = Some(match &op {
                    Op::Put(b) => Inflight::Put(b.clone()),
                    _ => Inflight::Delete,
                });
            }
            if let Op::Put(_) = op {
                st.note_put(i);
            }
            st.invalidate(i);
            skip
        };
        if skip {
            // Known not to be in the store: nothing to DELETE.
            self.retry.stats.deletes_skipped.fetch_add(1, Relaxed);
            self.finish_mutation(i, ver, MutKind::Writeback, true, true);
            return Ok(true);
        }
        let op = match op {
            Op::Put(b) => MutOp::Put(b),
            _ => MutOp::Delete,
        };
        self.mutate(i, ver, MutKind::Writeback, op)
            .await
            .map(|()| true)
    }

    /// Returns once generation `g` of object `i` (or a newer one) is in the
    /// store, doing the write-back itself if nobody else is.
    async fn ensure_durable(&self, i: u64, g: u64, start_seq: u64) -> R<()> {
        // How long this operation waits for an unanswered request of the
        // object to resolve (it may never): then it reports an error.
        let deadline = tokio::time::Instant::now() + self.retry_budget;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            let unanswered = {
                let st = self.lock();
                let Some(o) = st.objs.get(&i) else {
                    return Ok(());
                };
                if o.durable_ver >= g {
                    return Ok(());
                }
                // Someone's write-back of this object failed after we began:
                // the retry budget is spent, so report instead of retrying.
                if o.last_fail_seq > start_seq {
                    return Err(EngErr::Store);
                }
                notified.as_mut().enable();
                if !o.busy && o.dirty.is_none() {
                    // Only a failed direct PUT leaves this: that write was
                    // never acknowledged, so nothing is owed.
                    return Ok(());
                }
                // A request the store has not answered holds the object:
                // whether g reached the store is unknown until it resolves.
                o.unanswered
            };
            if unanswered {
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err(EngErr::Store);
                }
                continue;
            }
            if self.writeback(i).await? {
                continue;
            }
            notified.await;
        }
    }

    /// FLUSH: everything acknowledged before now becomes durable.
    pub async fn flush(&self) -> R<()> {
        let (snapshot, start_seq) = {
            let st = self.lock();
            let snap: Vec<(u64, u64)> = st.objs.iter().map(|(&i, o)| (i, o.ver)).collect();
            (snap, st.fail_seq)
        };
        let results = join_all(
            snapshot
                .into_iter()
                .map(|(i, g)| self.ensure_durable(i, g, start_seq)),
        )
        .await;
        results.into_iter().collect()
    }

    // -------------------------------------------------------------- zeroing

    /// Deallocate / Write Zeroes. Whole objects become DELETEs (done before
    /// completion, so a TRIM frees store space); partial ranges are zeros
    /// written through the buffer. Objects are processed lazily with at most
    /// `trim_parallelism` at once, so a range of any size costs memory for
    /// that many objects, not for the range; objects known not to be in the
    /// store and not dirty cost nothing at all. After the first failure no
    /// new object is started (the ones running finish), so a dead store
    /// fails the command in about one retry budget.
    pub async fn zero(&self, off: u64, len: u64) -> R<()> {
        let start_seq = self.lock().fail_seq;
        let failed = std::sync::atomic::AtomicBool::new(false);
        let failed = &failed;
        let jobs = SegIter::new(&self.geo, off, len)
            .take_while(|_| !failed.load(Relaxed))
            .map(|(i, o, n)| async move {
                let r = self.zero_obj(i, o, n, start_seq).await;
                if r.is_err() {
                    failed.store(true, Relaxed);
                }
                r
            });
        let mut running = futures::stream::iter(jobs).buffer_unordered(self.trim_parallelism);
        let mut res = Ok(());
        while let Some(r) = running.next().await {
            if r.is_err() {
                res = r;
            }
        }
        res
    }

    async fn zero_obj(&self, i: u64, o: u64, n: u64, start_seq: u64) -> R<()> {
        if o != 0 || n != self.geo.obj_len(i) {
            let zeros = vec![0u8; n as usize];
            return self.write_partial(i, o, &zeros).await.map(|_| ());
        }
        let ver = {
            let mut st = self.lock();
            if st.poisoned(i) {
                return Err(self.poisoned_err(i));
            }
            if !st.objs.contains_key(&i) && !st.may_be_stored(i) {
                // Clean and not in the store: already reads as zeros.
                self.retry.stats.deletes_skipped.fetch_add(1, Relaxed);
                return Ok(());
            }
            let (ver, obj) = st.touch(i);
            let was_clean = obj.dirty.is_none();
            let old = obj.dirty.replace(Layer::Zero);
            if was_clean {
                obj.dirty_since = Instant::now();
            }
            if old.as_ref().is_some_and(Layer::holds_bytes) {
                st.dirty_bytes = st.dirty_bytes.saturating_sub(self.geo.obj_len(i));
            }
            ver
        };
        self.changed.notify_waiters();
        self.ensure_durable(i, ver, start_seq).await
    }

    // ----------------------------------------------------------------- read

    /// Notes a read starting at `off` in its stream and starts the stream's
    /// read-ahead. Called when the read is submitted, in submission order,
    /// before any of it runs: what the host has already asked for is never
    /// read ahead.
    pub fn begin_read(self: &Arc<Self>, off: u64, len: u64) -> ReadTicket {
        let mut ticket = ReadTicket {
            inner: self.clone(),
            stream: None,
        };
        if self.readahead_bytes == 0 || len == 0 {
            return ticket;
        }
        let obj = self.geo.obj_size;
        let window = self.readahead_bytes.div_ceil(obj).max(1);
        let cap = (4 * window).min((MAX_READAHEAD_CACHE_BYTES / obj).max(2)) as usize;
        // Reads of one stream may arrive a little out of order; one window
        // either side still counts as the same stream.
        let near = window * obj;
        let end = off.saturating_add(len);
        let mut todo = Vec::new();
        {
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            let found = st.streams.iter().position(|s| {
                off <= s.next_off.saturating_add(near) && s.next_off <= off.saturating_add(near)
            });
            let k = match found {
                Some(k) => k,
                None => {
                    if st.streams.len() >= MAX_STREAMS
                        && let Some(lru) =
                            (0..st.streams.len()).min_by_key(|&k| st.streams[k].last_use)
                    {
                        st.streams.swap_remove(lru);
                    }
                    st.stream_ids += 1;
                    let id = st.stream_ids;
                    st.streams.push(Stream {
                        id,
                        next_off: off,
                        ra_end: 0,
                        demand_bytes: 0,
                        hits: 0,
                        last_use: tick,
                    });
                    st.streams.len() - 1
                }
            };
            let s = &mut st.streams[k];
            if off == s.next_off && found.is_some() {
                s.hits = s.hits.saturating_add(1);
            }
            s.next_off = s.next_off.max(end);
            s.demand_bytes += len;
            s.last_use = tick;
            ticket.stream = Some((s.id, len));
            if s.hits == 0 {
                return ticket;
            }
            let head = s.next_off / obj;
            let ahead = window.saturating_sub(s.demand_bytes.div_ceil(obj));
            let want = head.saturating_add(ahead).min(self.geo.num_objects);
            let from = s.ra_end.max(head);
            let mut reached = from;
            for j in from..want {
                let st = &mut *st;
                let fetching = st
                    .fetching
                    .get(&j)
                    .is_some_and(|f| f.prefetch.is_some() || f.whole > 0);
                if !(fetching || st.cache.contains_key(&j) || st.objs.contains_key(&j)) {
                    if st.cache.len() + st.prefetches >= cap {
                        // Make room by the oldest cached object; with none,
                        // the window waits for the next read.
                        let Some(old) = st.cache_order.pop_front() else {
                            break;
                        };
                        st.cache.remove(&old);
                        st.cache_served.remove(&old);
                    }
                    st.fetching.entry(j).or_default().prefetch = Some(true);
                    st.prefetches += 1;
                    todo.push(j);
                }
                reached = j + 1;
            }
            let s = &mut st.streams[k];
            s.ra_end = s.ra_end.max(reached);
        }
        for j in todo {
            let me = self.clone();
            self.rt.spawn(async move {
                let res = me.store_get_whole(j).await;
                me.retry.stats.readahead_gets.fetch_add(1, Relaxed);
                {
                    let mut st = me.lock();
                    st.prefetches = st.prefetches.saturating_sub(1);
                    let valid = match st.fetching.get_mut(&j) {
                        Some(f) => {
                            let valid = f.prefetch.take() == Some(true);
                            if f.demand == 0 {
                                st.fetching.remove(&j);
                            }
                            valid
                        }
                        None => false,
                    };
                    if let (true, Ok(v)) = (valid, res) {
                        st.uncache(j);
                        st.cache.insert(j, v.map_or(Cached::Zero, Cached::Data));
                        st.cache_order.push_back(j);
                    }
                }
                me.changed.notify_waiters();
            });
        }
        ticket
    }

    pub async fn read(&self, off: u64, out: &mut [u8]) -> R<()> {
        let segs = self.geo.segments(off, out.len() as u64);
        let mut pieces = Vec::with_capacity(segs.len());
        let mut rest = out;
        for &(i, o, n, _) in &segs {
            let (head, tail) = rest.split_at_mut(n as usize);
            pieces.push((i, o, head));
            rest = tail;
        }
        let results = join_all(
            pieces
                .into_iter()
                .map(|(i, o, buf)| self.read_obj(i, o, buf)),
        )
        .await;
        results.into_iter().collect()
    }

    async fn read_obj(&self, i: u64, a: u64, out: &mut [u8]) -> R<()> {
        let b = a + out.len() as u64;
        let len = self.geo.obj_len(i);
        let (gaps, _demand) = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            {
                let mut st = self.lock();
                let st = &mut *st;
                let o = st.objs.get(&i);
                let mut gaps = vec![(a, b)];
                match o.and_then(|o| o.dirty.as_ref()) {
                    Some(Layer::Zero) => {
                        out.fill(0);
                        return Ok(());
                    }
                    Some(Layer::Whole(data)) => {
                        out.copy_from_slice(&data[a as usize..b as usize]);
                        return Ok(());
                    }
                    Some(Layer::Buf { data, cov }) => {
                        for (x, y) in cov.within(a, b) {
                            out[(x - a) as usize..(y - a) as usize]
                                .copy_from_slice(&data[x as usize..y as usize]);
                        }
                        gaps = cov.gaps(a, b);
                    }
                    None => {}
                }
                if gaps.is_empty() {
                    return Ok(());
                }
                let from_cache = o.is_none_or(|o| o.inflight.is_none());
                let base: Option<&[u8]> = match o.and_then(|o| o.inflight.as_ref()) {
                    Some(Inflight::Put(bytes)) => Some(bytes),
                    Some(Inflight::Delete) => Some(&[][..]),
                    None => match st.cache.get(&i) {
                        Some(Cached::Data(bytes)) => Some(bytes),
                        Some(Cached::Zero) => Some(&[][..]),
                        None => None,
                    },
                };
                if let Some(base) = base {
                    for (x, y) in gaps {
                        let dst = &mut out[(x - a) as usize..(y - a) as usize];
                        match base.get(x as usize..y as usize) {
                            Some(src) => dst.copy_from_slice(src),
                            None => dst.fill(0),
                        }
                    }
                    if from_cache {
                        self.retry.stats.cache_hits.fetch_add(1, Relaxed);
                        // A sequential reader is done with the object once it
                        // has read all of it: free the room for read-ahead.
                        // Not at its last byte: at QD > 1 the read of the end
                        // may run before the reads of the middle.
                        let served = st.cache_served.entry(i).or_default();
                        *served += b - a;
                        if *served >= len {
                            st.uncache(i);
                        }
                    }
                    return Ok(());
                }
                let f = st.fetching.entry(i).or_default();
                // A read-ahead GET for this object is coming: wait for it
                // rather than fetching the same bytes twice.
                if f.prefetch == Some(true) {
                    notified.as_mut().enable();
                } else {
                    let whole = gaps[..] == [(0, len)];
                    f.demand += 1;
                    f.whole += u32::from(whole);
                    break (
                        gaps,
                        DemandGuard {
                            inner: self,
                            i,
                            whole,
                        },
                    );
                }
            }
            notified.await;
        };
        let (lo, hi) = (gaps[0].0, gaps[gaps.len() - 1].1);
        let bk = self.bucket(i);
        let key = bk.data_key(i);
        let whole = lo == 0 && hi == len;
        if let [(x, y)] = gaps[..] {
            // One contiguous gap: GET straight into the command's buffer.
            let dst = &mut out[(x - a) as usize..(y - a) as usize];
            let got = self
                .retry
                .get_into(bk, &key, lo..hi, whole, dst)
                .await
                .map_err(|_| EngErr::Store)?;
            return match got {
                None => {
                    dst.fill(0);
                    Ok(())
                }
                Some(n) if n == dst.len() => Ok(()),
                Some(n) => {
                    tracing::error!(
                        "objbacker: object {key}: GET of {lo}..{hi} returned {n} bytes: not written by this device"
                    );
                    Err(EngErr::Corrupt)
                }
            };
        }
        let got = self
            .retry
            .get(bk, &key, lo..hi, whole)
            .await
            .map_err(|_| EngErr::Store)?;
        for (x, y) in gaps {
            let dst = &mut out[(x - a) as usize..(y - a) as usize];
            match &got {
                None => dst.fill(0),
                Some(g) => match g.get((x - lo) as usize..(y - lo) as usize) {
                    Some(src) => dst.copy_from_slice(src),
                    None => {
                        tracing::error!("objbacker: object {key} shorter than expected");
                        return Err(EngErr::Corrupt);
                    }
                },
            }
        }
        Ok(())
    }

    // ---------------------------------------------------- background flusher

    /// Writes back complete objects at once, partial ones when the buffer
    /// passes half full or they are older than writeback_delay.
    pub async fn flusher(weak: Weak<Self>, max_in_flight: usize) {
        let tick = {
            let Some(me) = weak.upgrade() else { return };
            (me.writeback_delay / 2).max(Duration::from_millis(20))
        };
        loop {
            let kicked = {
                let Some(me) = weak.upgrade() else { return };
                let kick = async move {
                    me.kick.notified().await;
                };
                tokio::time::timeout(tick, kick).await.is_ok()
            };
            let _ = kicked;
            let Some(me) = weak.upgrade() else { return };
            let picks = {
                let st = me.lock();
                let room = max_in_flight.saturating_sub(st.busy_count);
                let now = Instant::now();
                let mut cands: Vec<(bool, Instant, u64, u64)> = st
                    .objs
                    .iter()
                    .filter(|(_, o)| !o.busy && o.dirty.is_some())
                    .map(|(&i, o)| {
                        // Eager objects go now; everything else waits for
                        // its delay or for buffer pressure.
                        // A Zero layer's TRIM does its own DELETE (with its
                        // own parallelism bound); the flusher only picks up
                        // one left behind by a failed TRIM, once aged.
                        let holds = o.dirty.as_ref().is_some_and(Layer::holds_bytes);
                        let complete = holds && o.eager;
                        let bytes = if holds { me.geo.obj_len(i) } else { 0 };
                        (!complete, o.dirty_since, i, bytes)
                    })
                    .collect();
                cands.sort();
                let mut projected = st.dirty_bytes;
                let high = me.writeback_bytes / 2;
                let mut picks = Vec::new();
                for (partial, since, i, bytes) in cands {
                    if picks.len() >= room {
                        break;
                    }
                    let aged = now.duration_since(since) >= me.writeback_delay;
                    if !partial || aged || projected > high {
                        picks.push(i);
                        projected = projected.saturating_sub(bytes);
                    }
                }
                picks
            };
            me.flusher_picks.fetch_add(picks.len() as u64, Relaxed);
            me.flusher_passes.fetch_add(1, Relaxed);
            for i in picks {
                let me2 = me.clone();
                tokio::spawn(async move {
                    // Failures are kept in the object's state and reported
                    // by FLUSH/FUA; a later pass retries.
                    let _ = me2.writeback(i).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_and_gaps() {
        let mut c = Coverage::default();
        c.insert(10, 20);
        c.insert(30, 40);
        c.insert(20, 30);
        assert_eq!(c.0, vec![(10, 40)]);
        c.insert(0, 5);
        c.insert(50, 60);
        assert_eq!(c.gaps(0, 100), vec![(5, 10), (40, 50), (60, 100)]);
        assert!(c.covers(12, 40));
        assert!(!c.covers(12, 41));
        c.insert(4, 55);
        assert_eq!(c.0, vec![(0, 60)]);
        assert!(c.gaps(0, 60).is_empty());
    }

    #[test]
    fn segments_handle_short_last_object() {
        let g = Geometry::new(3 * 131072 + 4096, 131072);
        assert_eq!(g.num_objects, 4);
        assert_eq!(g.obj_len(3), 4096);
        let s = g.segments(131072 - 512, 131072 * 3 + 512 + 4096 - 131072);
        assert_eq!(s[0], (0, 131072 - 512, 512, 0));
        assert_eq!(s.last().copied(), Some((3, 0, 4096, 512 + 2 * 131072)));
    }
}
