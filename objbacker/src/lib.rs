//! Object-backed block device: a bdev of N bytes stored as objects of
//! `object_size` in one or more buckets (S3, GCS, Azure Blob, a local
//! directory, or memory), all through `object_store`.
//!
//! Block `i` is object `{prefix}/{i:08}` in bucket `i % buckets`. The device
//! reports a volatile write cache: partial writes sit in a bounded
//! write-back buffer until FLUSH, FUA, buffer pressure or age push them out;
//! whole aligned objects go to one PUT each, started at once, which a
//! sequential writer does not wait for (FLUSH does). Design and invariants:
//! docs/objbacker.md.

mod bdev;
pub mod config;
mod engine;
pub mod fault;
mod store;
mod superblock;

use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use object_store::ObjectStore;
use strata_target::bdev::{BdevInfo, IoError};
use strata_target::stats::HistogramSnapshot;

pub use config::{ConfigError, ObjBackerConfig};
pub use fault::{FaultConfig, FaultControl, FaultyStore, Latency};
pub use store::ObjBackerStats;
pub use superblock::{
    BucketUsage, FormatOptions, FsckProblem, FsckReport, Info, Superblock, format,
    format_with_stores, fsck, fsck_with_stores, info, info_with_stores,
};

/// Name of the superblock object under each bucket's prefix.
pub const SUPERBLOCK_NAME: &str = "superblock.json";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ObjError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("bucket {url}: {message}")]
    Store { url: String, message: String },
    #[error(
        "{url} is not formatted: no superblock at `{key}`; run `strata objbacker format` first"
    )]
    NotFormatted { url: String, key: String },
    #[error(
        "{url} already holds a strata-objbacker device (uuid {uuid}); refusing to format over it without force"
    )]
    AlreadyFormatted { url: String, uuid: String },
    #[error(
        "{url} is not empty (`{key}` exists) and has no superblock; refusing to format over foreign data without force"
    )]
    NotEmpty { url: String, key: String },
    #[error("superblock mismatch, attach refused: {0}")]
    Mismatch(String),
    #[error("superblock of {url} is unreadable: {message}")]
    BadSuperblock { url: String, message: String },
    #[error(
        "{url} is still in use by an earlier device of this process ({name}), which has store requests in flight after {waited_ms} ms; attach refused so that none of them can land after this device's LIST or DELETEs. Retry once they finish (a request the store never answers resolves within orphan_deadline)"
    )]
    StillInUse {
        url: String,
        name: String,
        waited_ms: u64,
    },
}

/// object_store is built with `ring` and reqwest without a default TLS
/// provider (half the build time of aws-lc), so one must be installed
/// before the first client is built. Idempotent.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The device. Implements [`strata_target::bdev::Bdev`].
///
/// Store I/O runs as tasks on the tokio runtime that was current when
/// [`ObjBacker::attach`] ran, which should be a multi-thread runtime shared
/// by the process (not a reactor's current_thread runtime): channels only
/// spawn onto it and receive completions through an mpsc queue.
pub struct ObjBacker {
    pub(crate) inner: Arc<engine::Inner>,
    pub(crate) info: BdevInfo,
    pub(crate) handle: tokio::runtime::Handle,
    superblock: Superblock,
    flusher: tokio::task::JoinHandle<()>,
}

impl ObjBacker {
    /// Opens the buckets named by `cfg.buckets` and attaches to the device
    /// formatted there. Refuses a superblock that does not match `cfg`.
    pub async fn attach(cfg: ObjBackerConfig) -> Result<Arc<Self>, ObjError> {
        cfg.validate()?;
        let buckets = store::open_buckets(&cfg)?;
        Self::attach_buckets(cfg, buckets).await
    }

    /// Like [`attach`](Self::attach) with ready-made stores, one per entry
    /// of `cfg.buckets` (whose URL paths still give the key prefixes): for
    /// `InMemory`, or any store wrapped in [`FaultyStore`].
    pub async fn attach_with_stores(
        cfg: ObjBackerConfig,
        stores: Vec<Arc<dyn ObjectStore>>,
    ) -> Result<Arc<Self>, ObjError> {
        cfg.validate()?;
        let buckets = superblock::buckets_from_stores(&cfg, stores)?;
        Self::attach_buckets(cfg, buckets).await
    }

    async fn attach_buckets(
        cfg: ObjBackerConfig,
        buckets: Vec<store::Bucket>,
    ) -> Result<Arc<Self>, ObjError> {
        wait_for_earlier_engines(&cfg, &buckets).await?;
        let probe = store::Retrier::new(&cfg);
        let superblock = superblock::check_attach(&cfg, &probe, &buckets).await?;
        // Same counters as the device, so attach-time retries show in stats().
        let inner = engine::Inner::new(&cfg, buckets, probe);
        let handle = tokio::runtime::Handle::current();
        handle.spawn(engine::Inner::scan_stored(Arc::downgrade(&inner)));
        let flusher = handle.spawn(engine::Inner::flusher(
            Arc::downgrade(&inner),
            cfg.max_in_flight,
        ));
        register_device(&cfg.name, &inner);
        let info = BdevInfo {
            name: cfg.name.clone(),
            block_size: cfg.block_size,
            num_blocks: cfg.size_bytes / u64::from(cfg.block_size),
            volatile_write_cache: true,
            max_io_bytes: cfg.max_io_bytes,
        };
        Ok(Arc::new(Self {
            inner,
            info,
            handle,
            superblock,
            flusher,
        }))
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// Store request counters, e.g. PUTs caused by N small random writes.
    pub fn stats(&self) -> ObjBackerStats {
        self.inner.retry.stats.snapshot()
    }

    /// Bytes currently held by the write-back buffer.
    pub fn dirty_bytes(&self) -> u64 {
        self.inner.dirty_bytes()
    }

    /// What the metrics endpoint shows of this device.
    pub fn metrics(&self) -> DeviceMetrics {
        device_metrics(&self.info.name, &self.inner)
    }

    fn check(&self, off: u64, len: u64) -> Result<(), IoError> {
        match off.checked_add(len) {
            Some(end) if end <= self.inner.geo.size => Ok(()),
            _ => Err(IoError::OutOfRange),
        }
    }

    /// Byte-addressed read (the bdev path uses the same engine).
    pub async fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.check(off, buf.len() as u64)?;
        let _ticket = self.inner.begin_read(off, buf.len() as u64);
        self.inner
            .read(off, buf)
            .await
            .map_err(|_| IoError::ReadError)
    }

    pub async fn write_at(&self, off: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.check(off, data.len() as u64)?;
        self.inner
            .write(off, data, fua)
            .await
            .map_err(|_| IoError::WriteFault)
    }

    /// Deallocate / write zeroes of a byte range.
    pub async fn zero_at(&self, off: u64, len: u64) -> Result<(), IoError> {
        self.check(off, len)?;
        self.inner
            .zero(off, len)
            .await
            .map_err(|_| IoError::WriteFault)
    }

    pub async fn flush(&self) -> Result<(), IoError> {
        self.inner.flush().await.map_err(|_| IoError::WriteFault)
    }

    /// Test hook: the attach-time LIST that tells which objects are in the
    /// store (so TRIM can skip DELETEs of the others) has finished.
    #[doc(hidden)]
    pub fn store_scan_done(&self) -> bool {
        self.inner.scan_done()
    }

    /// Test hook: most per-object entries the engine ever held at once.
    #[doc(hidden)]
    pub fn peak_tracked_objects(&self) -> usize {
        self.inner.peak_objs()
    }

    /// Test hook: read-ahead GETs still in flight.
    #[doc(hidden)]
    pub fn prefetches_in_flight(&self) -> usize {
        self.inner.prefetches_in_flight()
    }

    /// Test hook: wake the background flusher for one pass.
    #[doc(hidden)]
    pub fn kick_flusher(&self) {
        self.inner.kick_flusher();
    }

    /// Test hook: (passes the flusher made, objects it picked to write back).
    #[doc(hidden)]
    pub fn flusher_counters(&self) -> (u64, u64) {
        self.inner.flusher_counters()
    }

    /// Test hook modelling kill -9: from now on no store mutation starts,
    /// so whatever was not durable stays lost when the device is dropped.
    #[doc(hidden)]
    pub fn simulate_crash(&self) {
        self.inner.crash();
        self.flusher.abort();
    }
}

/// One device's counters as a scrape reads them. Store requests run on the
/// object-store runtime's worker threads, so these are ordinary shared
/// atomics (`fetch_add`): a request costs milliseconds, a shared line
/// nothing measurable, and no reactor ever writes them.
#[derive(Clone, Debug)]
pub struct DeviceMetrics {
    /// The device's name (`BdevInfo::name`).
    pub name: String,
    pub stats: ObjBackerStats,
    pub get_latency: HistogramSnapshot,
    pub put_latency: HistogramSnapshot,
    pub delete_latency: HistogramSnapshot,
    /// Bytes in the write-back buffer now, and its bound.
    pub dirty_bytes: u64,
    pub writeback_capacity: u64,
}

fn device_metrics(name: &str, inner: &engine::Inner) -> DeviceMetrics {
    let st = &inner.retry.stats;
    DeviceMetrics {
        name: name.to_string(),
        stats: st.snapshot(),
        get_latency: st.get_latency.snapshot(),
        put_latency: st.put_latency.snapshot(),
        delete_latency: st.delete_latency.snapshot(),
        dirty_bytes: inner.dirty_bytes(),
        writeback_capacity: inner.writeback_capacity(),
    }
}

type DeviceList = Mutex<Vec<(String, Weak<engine::Inner>)>>;

fn devices() -> &'static DeviceList {
    static D: OnceLock<DeviceList> = OnceLock::new();
    D.get_or_init(Default::default)
}

/// A dropped device's write-back PUTs, DELETEs and retries run on until
/// they finish. One that lands after a new device on the same buckets
/// has LISTed them escapes its stored-object bitmap (a TRIM of that
/// object would skip its DELETE, and the old data would read back), and
/// one that lands after the new device's own DELETE or PUT undoes it. So
/// an attach waits, bounded by one operation's worst case, until no
/// earlier engine of this process holds any of its buckets.
async fn wait_for_earlier_engines(
    cfg: &ObjBackerConfig,
    buckets: &[store::Bucket],
) -> Result<(), ObjError> {
    let bound = cfg.request_timeout + cfg.retry_budget;
    let start = std::time::Instant::now();
    let mut logged = false;
    loop {
        let holder = {
            let mut d = devices().lock().unwrap_or_else(|p| p.into_inner());
            d.retain(|(_, w)| w.strong_count() > 0);
            d.iter().find_map(|(name, w)| {
                let inner = w.upgrade()?;
                let url = buckets.iter().find(|b| inner.holds_bucket(b))?.url.clone();
                Some((name.clone(), url))
            })
        };
        let Some((name, url)) = holder else {
            return Ok(());
        };
        let waited = start.elapsed();
        if waited >= bound {
            return Err(ObjError::StillInUse {
                url,
                name,
                waited_ms: waited.as_millis() as u64,
            });
        }
        if !logged {
            logged = true;
            tracing::info!(
                "objbacker {}: waiting for the earlier device {name} to finish its requests to {url}",
                cfg.name
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn register_device(name: &str, inner: &Arc<engine::Inner>) {
    let mut d = devices().lock().unwrap_or_else(|p| p.into_inner());
    d.retain(|(_, w)| w.strong_count() > 0);
    d.push((name.to_string(), Arc::downgrade(inner)));
}

/// Every attached device of this process (the metrics endpoint's view;
/// a device counts from its attach until it is dropped).
pub fn live_devices() -> Vec<DeviceMetrics> {
    let list: Vec<(String, Arc<engine::Inner>)> = {
        let mut d = devices().lock().unwrap_or_else(|p| p.into_inner());
        d.retain(|(_, w)| w.strong_count() > 0);
        d.iter()
            .filter_map(|(n, w)| Some((n.clone(), w.upgrade()?)))
            .collect()
    };
    list.iter().map(|(n, i)| device_metrics(n, i)).collect()
}

impl Drop for ObjBacker {
    fn drop(&mut self) {
        self.flusher.abort();
    }
}
