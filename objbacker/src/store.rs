//! Buckets: one object_store client per bucket URL, the key layout, bounded
//! retries and request counters.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use rand::Rng;
use tokio::sync::Semaphore;

use strata_target::stats::SharedHistogram;

use crate::config::ObjBackerConfig;
use crate::{ObjError, SUPERBLOCK_NAME};

pub(crate) struct Bucket {
    pub url: String,
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix inside the bucket (URL path). Empty for file:// because
    /// the store itself is rooted at the directory.
    pub prefix: Path,
    /// Set for file:// buckets: object_store's LocalFileSystem renames a
    /// temp file into place but never fsyncs, so FLUSH would only survive a
    /// process crash, not a power loss. We fsync after each PUT/DELETE.
    pub local_root: Option<PathBuf>,
}

impl Bucket {
    pub fn data_key(&self, index: u64) -> Path {
        self.prefix.clone().join(format!("{index:08}"))
    }
    pub fn superblock_key(&self) -> Path {
        self.prefix.clone().join(SUPERBLOCK_NAME)
    }
}

/// The path component of a bucket URL, used as the key prefix.
pub(crate) fn url_prefix(url: &str) -> Result<Path, ObjError> {
    let u = url::Url::parse(url).map_err(|e| ObjError::Store {
        url: url.into(),
        message: format!("not a URL: {e}"),
    })?;
    Path::parse(u.path().trim_matches('/')).map_err(|e| ObjError::Store {
        url: url.into(),
        message: format!("bad key prefix: {e}"),
    })
}

/// Opens every bucket of `cfg` with the scheme's builder, credentials from
/// the environment, then `cfg.store_options` on top.
pub(crate) fn open_buckets(cfg: &ObjBackerConfig) -> Result<Vec<Bucket>, ObjError> {
    crate::install_crypto_provider();
    cfg.buckets.iter().map(|u| open_bucket(cfg, u)).collect()
}

fn open_bucket(cfg: &ObjBackerConfig, url: &str) -> Result<Bucket, ObjError> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};

    let store_err = |message: String| ObjError::Store {
        url: url.into(),
        message,
    };
    let parsed = url::Url::parse(url).map_err(|e| store_err(format!("not a URL: {e}")))?;
    // object_store's own retries handle HTTP-level 5xx and connection resets
    // cheaply; our outer loop (Retrier) covers everything else and enforces
    // the total budget, so keep the inner one short.
    let retry = RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: cfg.retry_initial_backoff,
            max_backoff: cfg.retry_max_backoff,
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: cfg.retry_budget,
    };
    let client = ClientOptions::new().with_timeout(cfg.request_timeout);
    let opt_err = |k: &str, e: object_store::Error| {
        store_err(format!(
            "store_options key `{k}` is not valid for this scheme: {e}"
        ))
    };
    let bucket_name = parsed.host_str().unwrap_or_default().to_string();
    let (store, local_root): (Arc<dyn ObjectStore>, _) = match parsed.scheme() {
        "s3" | "s3a" => {
            let mut b = AmazonS3Builder::from_env()
                .with_client_options(client)
                .with_retry(retry)
                .with_bucket_name(&bucket_name);
            for (k, v) in &cfg.store_options {
                let key: AmazonS3ConfigKey = k.parse().map_err(|e| opt_err(k, e))?;
                b = b.with_config(key, v);
            }
            (
                Arc::new(b.build().map_err(|e| store_err(e.to_string()))?),
                None,
            )
        }
        "gs" | "gcs" => {
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_client_options(client)
                .with_retry(retry)
                .with_bucket_name(&bucket_name);
            for (k, v) in &cfg.store_options {
                let key: GoogleConfigKey = k.parse().map_err(|e| opt_err(k, e))?;
                b = b.with_config(key, v);
            }
            (
                Arc::new(b.build().map_err(|e| store_err(e.to_string()))?),
                None,
            )
        }
        "az" | "azure" => {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_client_options(client)
                .with_retry(retry)
                .with_container_name(&bucket_name);
            for (k, v) in &cfg.store_options {
                let key: AzureConfigKey = k.parse().map_err(|e| opt_err(k, e))?;
                b = b.with_config(key, v);
            }
            (
                Arc::new(b.build().map_err(|e| store_err(e.to_string()))?),
                None,
            )
        }
        "file" => {
            let dir = parsed
                .to_file_path()
                .map_err(|()| store_err("file URL must be an absolute path: file:///dir".into()))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| store_err(format!("cannot create {}: {e}", dir.display())))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| store_err(e.to_string()))?;
            (Arc::new(fs), Some(dir))
        }
        "memory" => (Arc::new(object_store::memory::InMemory::new()), None),
        other => return Err(store_err(format!("unsupported scheme `{other}`"))),
    };
    let prefix = if local_root.is_some() {
        Path::default()
    } else {
        url_prefix(url)?
    };
    // Injected latency and errors (benchmarks, fault tests) wrap the real
    // client, so everything above it runs the production path.
    // The real client below gives up on a request after request_timeout
    // (ClientOptions above); an injected hang models a network that does
    // not answer, so it ends the same way unless the config says otherwise.
    let store: Arc<dyn ObjectStore> = match cfg.fault {
        Some(f) => Arc::new(crate::FaultyStore::new(
            store,
            crate::FaultConfig {
                client_timeout: f.client_timeout.or(Some(cfg.request_timeout)),
                ..f
            },
        )),
        None => store,
    };
    Ok(Bucket {
        url: url.into(),
        store,
        prefix,
        local_root,
    })
}

/// Counters for benchmarks and tests. All monotonic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjBackerStats {
    pub puts: u64,
    pub gets: u64,
    pub deletes: u64,
    pub bytes_put: u64,
    pub bytes_got: u64,
    /// Attempts repeated after a retryable failure or timeout.
    pub retries: u64,
    /// Operations that failed after exhausting the retry budget.
    pub failures: u64,
    /// GETs done to fill the unwritten part of a partial object before PUT.
    pub rmw_gets: u64,
    /// Objects fetched by read-ahead.
    pub readahead_gets: u64,
    /// Read segments served from the read-ahead cache.
    pub cache_hits: u64,
    /// PUT/DELETE attempts unanswered after `request_timeout` (waited for,
    /// never re-sent while unanswered).
    pub slow_mutations: u64,
    /// PUT/DELETEs still unanswered when their retry budget ran out (the
    /// object stayed busy until they resolved).
    pub unanswered: u64,
    /// Whole-object TRIMs that needed no DELETE: the object is known not
    /// to be in the store.
    pub deletes_skipped: u64,
    /// Bytes the host wrote; `bytes_put / bytes_written` is the write
    /// amplification.
    pub bytes_written: u64,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub deletes: AtomicU64,
    pub bytes_put: AtomicU64,
    pub bytes_got: AtomicU64,
    pub retries: AtomicU64,
    pub failures: AtomicU64,
    pub rmw_gets: AtomicU64,
    pub readahead_gets: AtomicU64,
    pub cache_hits: AtomicU64,
    pub slow_mutations: AtomicU64,
    pub unanswered: AtomicU64,
    pub deletes_skipped: AtomicU64,
    /// Bytes the host wrote (WRITE commands), against which `bytes_put`
    /// is the write amplification.
    pub bytes_written: AtomicU64,
    /// Latency of each GET, PUT and DELETE, retries included (what the
    /// device waited, not one attempt).
    pub get_latency: SharedHistogram,
    pub put_latency: SharedHistogram,
    pub delete_latency: SharedHistogram,
}

impl Stats {
    pub fn snapshot(&self) -> ObjBackerStats {
        ObjBackerStats {
            puts: self.puts.load(Relaxed),
            gets: self.gets.load(Relaxed),
            deletes: self.deletes.load(Relaxed),
            bytes_put: self.bytes_put.load(Relaxed),
            bytes_got: self.bytes_got.load(Relaxed),
            retries: self.retries.load(Relaxed),
            failures: self.failures.load(Relaxed),
            rmw_gets: self.rmw_gets.load(Relaxed),
            readahead_gets: self.readahead_gets.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            slow_mutations: self.slow_mutations.load(Relaxed),
            unanswered: self.unanswered.load(Relaxed),
            deletes_skipped: self.deletes_skipped.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
        }
    }
}

fn elapsed_ns(t0: Instant) -> u64 {
    t0.elapsed().as_nanos() as u64
}

/// Errors that will not go away by asking again.
fn permanent(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    matches!(
        e,
        E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::InvalidPath { .. }
            | E::UnknownConfigurationKey { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
    )
}

/// Bounded retry with exponential backoff and jitter, plus the in-flight
/// limit. Every store request of the device goes through here.
pub(crate) struct Retrier {
    pub sem: Semaphore,
    pub request_timeout: Duration,
    pub budget: Duration,
    pub init_backoff: Duration,
    pub max_backoff: Duration,
    pub stats: Stats,
}

impl Retrier {
    pub fn new(cfg: &ObjBackerConfig) -> Self {
        Self {
            sem: Semaphore::new(cfg.max_in_flight),
            request_timeout: cfg.request_timeout,
            budget: cfg.retry_budget,
            init_backoff: cfg.retry_initial_backoff,
            max_backoff: cfg.retry_max_backoff,
            stats: Stats::default(),
        }
    }

    pub async fn run<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, object_store::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        // The budget starts at the first attempt, not at queueing for a
        // permit: a busy device must not turn its own queue into errors.
        let mut deadline: Option<Instant> = None;
        let mut backoff = self.init_backoff;
        loop {
            let res = {
                let _permit = self.sem.acquire().await;
                deadline.get_or_insert_with(|| Instant::now() + self.budget);
                tokio::time::timeout(self.request_timeout, f()).await
            };
            let e = match res {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if permanent(&e) => return Err(e),
                Ok(Err(e)) => e,
                Err(_) => object_store::Error::Generic {
                    store: "objbacker",
                    source: format!("{what}: no answer within {:?}", self.request_timeout).into(),
                },
            };
            // Equal jitter: half fixed, half random, so retries of many
            // objects that failed together do not arrive together.
            let half = backoff / 2;
            let sleep = half + rand::thread_rng().gen_range(Duration::ZERO..=half);
            let past_budget = deadline.is_none_or(|d| Instant::now() + sleep >= d);
            if past_budget {
                self.stats.failures.fetch_add(1, Relaxed);
                tracing::warn!(
                    "objbacker: {what} failed, retry budget {:?} spent: {e}",
                    self.budget
                );
                return Err(e);
            }
            self.stats.retries.fetch_add(1, Relaxed);
            tracing::debug!("objbacker: {what} failed, retrying in {sleep:?}: {e}");
            tokio::time::sleep(sleep).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    /// GET a range of an object; `None` when the object was never written.
    pub async fn get(
        &self,
        b: &Bucket,
        key: &Path,
        range: std::ops::Range<u64>,
        whole: bool,
    ) -> Result<Option<Bytes>, object_store::Error> {
        let t0 = Instant::now();
        let res = self
            .run("GET", || async {
                if whole {
                    b.store.get(key).await?.bytes().await
                } else {
                    b.store.get_range(key, range.clone()).await
                }
            })
            .await;
        self.stats.get_latency.record(elapsed_ns(t0));
        self.stats.gets.fetch_add(1, Relaxed);
        match res {
            Ok(v) => {
                self.stats.bytes_got.fetch_add(v.len() as u64, Relaxed);
                Ok(Some(v))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// GET a range of an object straight into `out`: the body's chunks are
    /// copied once, from the HTTP client's buffers into the command's
    /// buffer, instead of being gathered into one `Bytes` first. Returns
    /// the body's length (which may differ from `out.len()`: the caller
    /// treats that as corruption; bytes past `out` are not written), or
    /// `None` when the object was never written.
    pub async fn get_into(
        &self,
        b: &Bucket,
        key: &Path,
        range: std::ops::Range<u64>,
        whole: bool,
        out: &mut [u8],
    ) -> Result<Option<usize>, object_store::Error> {
        use futures::StreamExt;
        // Attempts run one after another (a timed-out one is dropped
        // before the next starts), so the lock is never contended; it only
        // lets each attempt's future borrow the buffer.
        let out = tokio::sync::Mutex::new(out);
        let out = &out;
        let t0 = Instant::now();
        let res = self
            .run("GET", || {
                let range = range.clone();
                async move {
                    let mut out = out.lock().await;
                    let opts = if whole {
                        object_store::GetOptions::new()
                    } else {
                        object_store::GetOptions::new().with_range(Some(range))
                    };
                    let mut body = b.store.get_opts(key, opts).await?.into_stream();
                    let mut n = 0usize;
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk?;
                        let end = n + chunk.len();
                        if let Some(dst) = out.get_mut(n..end) {
                            dst.copy_from_slice(&chunk);
                        }
                        n = end;
                    }
                    Ok(n)
                }
            })
            .await;
        self.stats.get_latency.record(elapsed_ns(t0));
        self.stats.gets.fetch_add(1, Relaxed);
        match res {
            Ok(n) => {
                self.stats.bytes_got.fetch_add(n as u64, Relaxed);
                Ok(Some(n))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// PUT for the superblock and other callers that do not track an
    /// object's busy state: an unanswered attempt is reported as an error
    /// (and keeps running in the background).
    pub async fn put(
        &self,
        b: &Bucket,
        key: &Path,
        data: Bytes,
    ) -> Result<(), object_store::Error> {
        self.put_tracked(b, key, data)
            .await
            .map_err(MutFail::into_error)
    }

    pub async fn delete(&self, b: &Bucket, key: &Path) -> Result<(), object_store::Error> {
        self.delete_tracked(b, key)
            .await
            .map_err(MutFail::into_error)
    }

    /// PUT whose outcome the caller tracks: see [`Retrier::mutate`].
    pub async fn put_tracked(&self, b: &Bucket, key: &Path, data: Bytes) -> Result<(), MutFail> {
        let len = data.len() as u64;
        let store = b.store.clone();
        let k = key.clone();
        let t0 = Instant::now();
        let res = self
            .mutate("PUT", move || {
                let (store, k) = (store.clone(), k.clone());
                let payload = PutPayload::from(data.clone());
                async move { store.put(&k, payload).await.map(|_| ()) }
            })
            .await;
        self.stats.put_latency.record(elapsed_ns(t0));
        res?;
        self.stats.puts.fetch_add(1, Relaxed);
        self.stats.bytes_put.fetch_add(len, Relaxed);
        if let Some(root) = &b.local_root {
            sync_local(root, key, true)
                .await
                .map_err(MutFail::Answered)?;
        }
        Ok(())
    }

    pub async fn delete_tracked(&self, b: &Bucket, key: &Path) -> Result<(), MutFail> {
        let store = b.store.clone();
        let k = key.clone();
        let t0 = Instant::now();
        let res = self
            .mutate("DELETE", move || {
                let (store, k) = (store.clone(), k.clone());
                async move {
                    match store.delete(&k).await {
                        Err(object_store::Error::NotFound { .. }) => Ok(()),
                        r => r,
                    }
                }
            })
            .await;
        self.stats.delete_latency.record(elapsed_ns(t0));
        res?;
        self.stats.deletes.fetch_add(1, Relaxed);
        if let Some(root) = &b.local_root {
            sync_local(root, key, false)
                .await
                .map_err(MutFail::Answered)?;
        }
        Ok(())
    }

    /// A store mutation (PUT/DELETE) with the retry budget, under the rule
    /// that makes "an older PUT never overtakes a newer one" hold at the
    /// store: **an attempt is never abandoned**. Each attempt runs as its
    /// own task; a retry is issued only after the previous attempt has
    /// resolved (the store answered, or the client library gave up and
    /// returned). An attempt still unanswered after `request_timeout` is
    /// waited for, not dropped and re-sent; when the budget runs out with
    /// it still unanswered, the caller gets [`MutFail::Unanswered`] with the
    /// attempt, and must keep the object busy until it resolves.
    pub async fn mutate<F, Fut>(&self, what: &'static str, mut f: F) -> Result<(), MutFail>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), object_store::Error>> + Send + 'static,
    {
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut backoff = self.init_backoff;
        loop {
            let (res, attempt) = {
                let _permit = self.sem.acquire().await;
                let deadline =
                    *deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.budget);
                let mut attempt = tokio::spawn(f());
                let slow = tokio::time::Instant::now() + self.request_timeout;
                let mut res = tokio::time::timeout_at(slow.min(deadline), &mut attempt).await;
                if res.is_err() && slow < deadline {
                    self.stats.slow_mutations.fetch_add(1, Relaxed);
                    tracing::debug!(
                        "objbacker: {what} unanswered after {:?}; waiting for it before any retry",
                        self.request_timeout
                    );
                    res = tokio::time::timeout_at(deadline, &mut attempt).await;
                }
                (res, attempt)
            };
            let e = match res {
                Ok(Ok(Ok(()))) => return Ok(()),
                Ok(Ok(Err(e))) if permanent(&e) => return Err(MutFail::Answered(e)),
                Ok(Ok(Err(e))) => e,
                // The attempt task panicked or was cancelled: it is over.
                Ok(Err(join)) => object_store::Error::Generic {
                    store: "objbacker",
                    source: Box::new(join),
                },
                Err(_) => {
                    self.stats.failures.fetch_add(1, Relaxed);
                    self.stats.unanswered.fetch_add(1, Relaxed);
                    tracing::warn!(
                        "objbacker: {what} still unanswered when the retry budget {:?} ran out; \
                         the object stays busy until the store answers",
                        self.budget
                    );
                    return Err(MutFail::Unanswered(attempt));
                }
            };
            let half = backoff / 2;
            let sleep = half + rand::thread_rng().gen_range(Duration::ZERO..=half);
            let past_budget = deadline.is_none_or(|d| tokio::time::Instant::now() + sleep >= d);
            if past_budget {
                self.stats.failures.fetch_add(1, Relaxed);
                tracing::warn!(
                    "objbacker: {what} failed, retry budget {:?} spent: {e}",
                    self.budget
                );
                return Err(MutFail::Answered(e));
            }
            self.stats.retries.fetch_add(1, Relaxed);
            tracing::debug!("objbacker: {what} failed, retrying in {sleep:?}: {e}");
            tokio::time::sleep(sleep).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}

/// How a tracked mutation failed.
pub(crate) enum MutFail {
    /// Every attempt was answered (or failed on the client side) and none
    /// succeeded: nothing of this mutation is still on its way.
    Answered(object_store::Error),
    /// The budget ran out while an attempt was still unanswered. It may
    /// still land; the caller owns it and keeps the object busy until then.
    Unanswered(tokio::task::JoinHandle<Result<(), object_store::Error>>),
}

impl MutFail {
    fn into_error(self) -> object_store::Error {
        match self {
            MutFail::Answered(e) => e,
            MutFail::Unanswered(_) => object_store::Error::Generic {
                store: "objbacker",
                source: "no answer within the retry budget".into(),
            },
        }
    }
}

/// fsync the object file (after PUT) and its directory (PUT renames into it,
/// DELETE unlinks from it), so a FLUSH on file:// survives power loss.
pub(crate) async fn sync_local(
    root: &std::path::Path,
    key: &Path,
    file: bool,
) -> Result<(), object_store::Error> {
    let path = key
        .parts()
        .fold(root.to_path_buf(), |p, part| p.join(part.as_ref()));
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if file {
            std::fs::File::open(&path)?.sync_all()?;
        }
        if let Some(dir) = path.parent() {
            match std::fs::File::open(dir) {
                Ok(d) => d.sync_all()?,
                // DELETE of a never-written object in a never-created dir.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| object_store::Error::Generic {
        store: "objbacker",
        source: Box::new(e),
    })?
    .map_err(|e| object_store::Error::Generic {
        store: "objbacker",
        source: format!("fsync: {e}").into(),
    })
}
