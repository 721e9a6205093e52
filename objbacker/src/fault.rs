//! A wrapper around any `ObjectStore` that adds per-request latency and
//! injected failures, for tests and benchmarks.
//!
//! Failures are injected before the request reaches the inner store, so an
//! injected PUT failure never half-applies: it models a request that was
//! rejected (5xx) or never answered (timeout), not a torn write.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use rand::Rng;

/// Added latency per request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Latency {
    None,
    Fixed(Duration),
    /// Uniform between the two bounds.
    Uniform(Duration, Duration),
    /// Exponential with this mean, capped at 10x the mean: a cheap model of
    /// the long tail seen on real object stores.
    Exponential(Duration),
}

impl Latency {
    fn sample(&self) -> Duration {
        let mut rng = rand::thread_rng();
        match *self {
            Latency::None => Duration::ZERO,
            Latency::Fixed(d) => d,
            Latency::Uniform(a, b) if b > a => rng.gen_range(a..=b),
            Latency::Uniform(a, _) => a,
            Latency::Exponential(mean) => {
                let u: f64 = rng.gen_range(f64::EPSILON..1.0);
                mean.mul_f64((-u.ln()).min(10.0))
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultConfig {
    pub latency: Latency,
    /// Fraction of requests answered with an injected 503.
    pub error_rate: f64,
    /// Fraction of requests that hang for `hang` and then fail, which the
    /// device sees as a timeout when `hang` exceeds its request_timeout.
    pub timeout_rate: f64,
    pub hang: Duration,
    /// Models the HTTP client's own request timeout: an injected hang
    /// fails after this long (if shorter than `hang`), as a real client
    /// gives up on a request the network does not answer. `None`: the hang
    /// lasts `hang`. Either way a hang caused by `black_hole` ends as soon
    /// as the black hole is lifted (the connection resets). Set to the
    /// device's `request_timeout` when the config wraps real clients.
    pub client_timeout: Option<Duration>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            latency: Latency::None,
            error_rate: 0.0,
            timeout_rate: 0.0,
            hang: Duration::from_secs(60),
            client_timeout: None,
        }
    }
}

/// Runtime switches shared between a test and its wrapped store.
#[derive(Debug, Default)]
pub struct FaultControl {
    /// While set, every request fails (the store is "down").
    pub down: AtomicBool,
    /// While set, every request hangs for `hang` (the network black-holes).
    pub black_hole: AtomicBool,
    pub injected_errors: AtomicU64,
    pub injected_timeouts: AtomicU64,
    pub requests: AtomicU64,
}

pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    cfg: FaultConfig,
    ctl: Arc<FaultControl>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, cfg: FaultConfig) -> Self {
        Self {
            inner,
            cfg,
            ctl: Arc::default(),
        }
    }
    pub fn control(&self) -> Arc<FaultControl> {
        self.ctl.clone()
    }

    async fn before(&self, op: &'static str) -> Result<()> {
        self.ctl.requests.fetch_add(1, Relaxed);
        let lat = self.cfg.latency.sample();
        if !lat.is_zero() {
            tokio::time::sleep(lat).await;
        }
        let (err_roll, to_roll): (f64, f64) = {
            let mut rng = rand::thread_rng();
            (rng.r#gen(), rng.r#gen())
        };
        let holed = self.ctl.black_hole.load(Relaxed);
        if holed || to_roll < self.cfg.timeout_rate {
            self.ctl.injected_timeouts.fetch_add(1, Relaxed);
            let hang = self
                .cfg
                .client_timeout
                .map_or(self.cfg.hang, |t| t.min(self.cfg.hang));
            let end = tokio::time::Instant::now() + hang;
            // The request never reached the inner store, so it cannot land
            // later; it only ends (with an error) after the hang.
            while tokio::time::Instant::now() < end {
                if holed && !self.ctl.black_hole.load(Relaxed) {
                    break;
                }
                let step = end - tokio::time::Instant::now();
                tokio::time::sleep(step.min(Duration::from_millis(10))).await;
            }
            return Err(injected(op, "timeout"));
        }
        if self.ctl.down.load(Relaxed) || err_roll < self.cfg.error_rate {
            self.ctl.injected_errors.fetch_add(1, Relaxed);
            return Err(injected(op, "503 Service Unavailable"));
        }
        Ok(())
    }
}

fn injected(op: &'static str, what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultyStore",
        source: format!("injected {what} on {op}").into(),
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({:?}, {:?})", self.inner, self.cfg)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.before("PUT").await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.before("PUT multipart").await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.before("GET").await?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.before("GET").await?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let me = Arc::new(FaultyStore {
            inner: self.inner.clone(),
            cfg: self.cfg,
            ctl: self.ctl.clone(),
        });
        let checked = locations
            .then(move |loc| {
                let me = me.clone();
                async move {
                    let loc = loc?;
                    me.before("DELETE").await?;
                    Ok(loc)
                }
            })
            .boxed();
        self.inner.delete_stream(checked)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.before("LIST").await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.before("COPY").await?;
        self.inner.copy_opts(from, to, options).await
    }
}
