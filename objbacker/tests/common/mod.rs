//! Shared helpers: a host that drives a device through the Bdev API, store
//! inspection, patterns.
#![allow(dead_code)]

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use strata_objbacker::{ObjBacker, ObjBackerConfig};
use strata_target::bdev::{Bdev, BdevChannel, BdevCompletion, BdevIo, IoBuf, IoError, IoOp};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// A config for tests: long write-back delay, so only the triggers under
/// test (FLUSH, FUA, pressure, complete objects) write back.
pub fn test_cfg(buckets: Vec<String>, size: u64, obj: u64) -> ObjBackerConfig {
    ObjBackerConfig {
        buckets,
        size_bytes: size,
        object_size: obj,
        block_size: 4096,
        max_in_flight: 32,
        writeback_bytes: 16 * obj,
        writeback_delay: Duration::from_secs(3600),
        readahead_bytes: 0,
        request_timeout: Duration::from_secs(5),
        retry_budget: Duration::from_secs(5),
        retry_initial_backoff: Duration::from_millis(10),
        retry_max_backoff: Duration::from_millis(200),
        max_io_bytes: 16 << 20,
        ..Default::default()
    }
}

pub fn mem_urls(n: usize) -> Vec<String> {
    (0..n).map(|k| format!("memory://b{k}/dev")).collect()
}

/// Deterministic pattern: byte at device offset `off` for generation `g`.
pub fn pat(off: u64, g: u8) -> u8 {
    ((off / 4096).wrapping_mul(31) as u8) ^ (off as u8) ^ g.wrapping_mul(97)
}

pub fn pattern(off: u64, len: u64, g: u8) -> Vec<u8> {
    (off..off + len).map(|o| pat(o, g)).collect()
}

/// The NVMe side: one channel, requests one at a time or in batches.
pub struct Host {
    pub ch: Box<dyn BdevChannel>,
    pub bs: u64,
    next_tag: u32,
}

impl Host {
    pub fn new(dev: &Arc<ObjBacker>) -> Self {
        let bs = u64::from(dev.info().block_size);
        Self {
            ch: dev.clone().open_channel().expect("channel"),
            bs,
            next_tag: 0,
        }
    }

    /// Submits all, returns completions in tag order.
    pub async fn batch(
        &mut self,
        ios: Vec<(IoOp, u64, u64, Option<IoBuf>)>,
    ) -> Vec<BdevCompletion> {
        let n = ios.len();
        let first = self.next_tag;
        for (op, off, len, buf) in ios {
            let tag = self.next_tag;
            self.next_tag += 1;
            self.ch.submit(BdevIo {
                tag,
                op,
                offset_blocks: off / self.bs,
                num_blocks: len / self.bs,
                buf,
            });
        }
        self.ch.flush_submissions();
        let mut got = Vec::new();
        poll_fn(|cx| {
            let mut out = Vec::new();
            while self.ch.poll_completions(cx, &mut out).is_ready() {}
            got.append(&mut out);
            if got.len() >= n {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        got.sort_by_key(|c| c.tag);
        assert_eq!(got.first().map(|c| c.tag), Some(first));
        got
    }

    pub async fn one(
        &mut self,
        op: IoOp,
        off: u64,
        len: u64,
        buf: Option<IoBuf>,
    ) -> BdevCompletion {
        self.batch(vec![(op, off, len, buf)]).await.remove(0)
    }

    pub async fn write(&mut self, off: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        let c = self
            .one(
                IoOp::Write { fua },
                off,
                data.len() as u64,
                Some(IoBuf::from_slice(data)),
            )
            .await;
        assert!(c.buf.is_some(), "write buffer handed back");
        c.result
    }

    pub async fn read(&mut self, off: u64, len: u64) -> Result<Vec<u8>, IoError> {
        let c = self
            .one(IoOp::Read, off, len, Some(IoBuf::new(len as usize)))
            .await;
        c.result?;
        let buf = c.buf.expect("read buffer handed back");
        Ok(buf[..len as usize].to_vec())
    }

    pub async fn flush(&mut self) -> Result<(), IoError> {
        self.one(IoOp::Flush, 0, 0, None).await.result
    }

    pub async fn trim(&mut self, off: u64, len: u64) -> Result<(), IoError> {
        self.one(IoOp::Deallocate, off, len, None).await.result
    }
}

#[allow(unused_imports)]
pub use strata_testkit::objstores::{get, list};

/// Asserts `got` equals `want`, reporting the first differing offset.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (got {}, want {})",
            got[i], want[i]
        );
    }
}

/// Polls `cond` until it holds, failing the test after `limit`: tests wait
/// for the event they need, not for a fixed time.
pub async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[allow(unused_imports)]
pub use probe::{Probe, ProbeStore};

mod probe {
    use std::collections::HashMap;
    use std::fmt;
    use std::ops::Range;
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    use bytes::Bytes;
    use futures::stream::{BoxStream, StreamExt};
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
    };
    use tokio::sync::Semaphore;

    /// Observations and knobs shared between a test and its [`ProbeStore`].
    pub struct Probe {
        /// Delay the `n`th (1-based) PUT of `key`: by the duration, or (None)
        /// until [`Probe::release`]. The delayed PUT is already "sent": it
        /// lands even if the client stops waiting for it, as a request that
        /// reached the server does.
        pub delay_put: Mutex<Option<(String, usize, Option<Duration>)>>,
        put_counts: Mutex<HashMap<String, usize>>,
        release: Semaphore,
        /// The delayed PUT reached the inner store.
        pub landed: AtomicBool,
        pub put_latency: Mutex<Duration>,
        pub delete_latency: Mutex<Duration>,
        pub puts_in_flight: AtomicUsize,
        pub puts_done: AtomicU64,
        pub deletes_in_flight: AtomicUsize,
        pub max_deletes_in_flight: AtomicUsize,
        pub deletes_done: AtomicU64,
    }

    impl Probe {
        pub fn release(&self) {
            self.release.add_permits(1);
        }
        pub fn puts_in_flight(&self) -> usize {
            self.puts_in_flight.load(SeqCst)
        }
        pub fn landed(&self) -> bool {
            self.landed.load(SeqCst)
        }
    }

    pub struct ProbeStore {
        inner: Arc<dyn ObjectStore>,
        pub probe: Arc<Probe>,
    }

    impl ProbeStore {
        pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
            Self {
                inner,
                probe: Arc::new(Probe {
                    delay_put: Mutex::new(None),
                    put_counts: Mutex::default(),
                    release: Semaphore::new(0),
                    landed: AtomicBool::new(false),
                    put_latency: Mutex::new(Duration::ZERO),
                    delete_latency: Mutex::new(Duration::ZERO),
                    puts_in_flight: AtomicUsize::new(0),
                    puts_done: AtomicU64::new(0),
                    deletes_in_flight: AtomicUsize::new(0),
                    max_deletes_in_flight: AtomicUsize::new(0),
                    deletes_done: AtomicU64::new(0),
                }),
            }
        }
    }

    impl fmt::Display for ProbeStore {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "ProbeStore({})", self.inner)
        }
    }
    impl fmt::Debug for ProbeStore {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "ProbeStore({:?})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for ProbeStore {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> Result<PutResult> {
            let key = location.to_string();
            let n = {
                let mut c = self.probe.put_counts.lock().unwrap();
                let n = c.entry(key.clone()).or_default();
                *n += 1;
                *n
            };
            let delay = match &*self.probe.delay_put.lock().unwrap() {
                Some((k, nth, d)) if *k == key && *nth == n => Some(*d),
                _ => None,
            };
            let latency = *self.probe.put_latency.lock().unwrap();
            let (inner, probe, loc) = (self.inner.clone(), self.probe.clone(), location.clone());
            probe.puts_in_flight.fetch_add(1, SeqCst);
            // Runs to the end whatever the caller does with its future.
            let sent = tokio::spawn(async move {
                match delay {
                    Some(Some(d)) => tokio::time::sleep(d).await,
                    Some(None) => probe.release.acquire().await.unwrap().forget(),
                    None => tokio::time::sleep(latency).await,
                }
                let r = inner.put_opts(&loc, payload, opts).await;
                if delay.is_some() {
                    probe.landed.store(true, SeqCst);
                }
                probe.puts_done.fetch_add(1, SeqCst);
                probe.puts_in_flight.fetch_sub(1, SeqCst);
                r
            });
            sent.await.expect("put task")
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
            self.inner.get_ranges(location, ranges).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, Result<Path>>,
        ) -> BoxStream<'static, Result<Path>> {
            let (inner, probe) = (self.inner.clone(), self.probe.clone());
            locations
                .then(move |loc| {
                    let (inner, probe) = (inner.clone(), probe.clone());
                    async move {
                        let loc = loc?;
                        let now = probe.deletes_in_flight.fetch_add(1, SeqCst) + 1;
                        probe.max_deletes_in_flight.fetch_max(now, SeqCst);
                        let latency = *probe.delete_latency.lock().unwrap();
                        tokio::time::sleep(latency).await;
                        let r = inner.delete(&loc).await;
                        probe.deletes_in_flight.fetch_sub(1, SeqCst);
                        probe.deletes_done.fetch_add(1, SeqCst);
                        r.map(|()| loc)
                    }
                })
                .boxed()
        }

        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }
}
