//! The S3 store of `--backend s3`: one the user names (`--s3-endpoint`),
//! or, in a build with the `s3-server` feature, an embedded s3s-fs that
//! also counts the requests it serves.
//!
//! The embedded server is a test server, so the default build does not
//! carry it: that binary needs the store's address.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use object_store::ObjectStore;
use serde::Serialize;

/// Where `--backend s3` keeps its buckets.
#[derive(clap::Args, Clone, Default)]
pub struct S3Args {
    /// Endpoint of an S3 store to use instead of the embedded server, e.g.
    /// http://127.0.0.1:9000. Buckets BUCKET-0 … BUCKET-(N-1) must exist.
    /// PUTs are counted exactly only at the embedded server.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Bucket name prefix at --s3-endpoint [default: strata].
    #[arg(long, value_name = "BUCKET")]
    pub s3_bucket: Option<String>,
    /// Access key at --s3-endpoint [default: $AWS_ACCESS_KEY_ID].
    #[arg(long)]
    pub s3_access_key: Option<String>,
    /// Secret key at --s3-endpoint [default: $AWS_SECRET_ACCESS_KEY].
    #[arg(long)]
    pub s3_secret_key: Option<String>,
    /// Region at --s3-endpoint [default: $AWS_REGION, else us-east-1].
    #[arg(long)]
    pub s3_region: Option<String>,
}

// By hand, so a secret key never reaches a log or an error message.
impl std::fmt::Debug for S3Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Args")
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_bucket", &self.s3_bucket)
            .field("s3_access_key", &self.s3_access_key)
            .field("s3_secret_key", &self.s3_secret_key.as_ref().map(|_| "…"))
            .field("s3_region", &self.s3_region)
            .finish()
    }
}

/// Requests received for one key prefix (the first path segment after the
/// bucket: `/bucket/PREFIX/key`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReqCounts {
    pub puts: u64,
    /// Sum of the PUTs' Content-Length.
    pub put_bytes: u64,
    pub gets: u64,
    pub deletes: u64,
    pub other: u64,
}

impl ReqCounts {
    pub fn since(&self, before: &ReqCounts) -> ReqCounts {
        ReqCounts {
            puts: self.puts - before.puts,
            put_bytes: self.put_bytes - before.put_bytes,
            gets: self.gets - before.gets,
            deletes: self.deletes - before.deletes,
            other: self.other - before.other,
        }
    }
}

/// The S3 store a run uses.
pub struct S3Store {
    endpoint: String,
    access_key: String,
    secret_key: String,
    region: String,
    bucket_prefix: String,
    #[cfg(feature = "s3-server")]
    embedded: Option<super::s3server::S3Server>,
}

impl S3Store {
    /// The store `a` names, or the embedded server over `root` with
    /// `buckets` buckets, started on `rt`.
    pub fn open(
        a: &S3Args,
        root: &Path,
        buckets: usize,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Self> {
        if let Some(endpoint) = &a.s3_endpoint {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let (Some(access_key), Some(secret_key)) = (
                a.s3_access_key.clone().or_else(|| env("AWS_ACCESS_KEY_ID")),
                a.s3_secret_key
                    .clone()
                    .or_else(|| env("AWS_SECRET_ACCESS_KEY")),
            ) else {
                bail!(
                    "--s3-endpoint needs credentials: --s3-access-key and --s3-secret-key \
                     (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                );
            };
            return Ok(Self {
                endpoint: endpoint.clone(),
                access_key,
                secret_key,
                region: a
                    .s3_region
                    .clone()
                    .or_else(|| env("AWS_REGION"))
                    .unwrap_or_else(|| "us-east-1".into()),
                bucket_prefix: a.s3_bucket.clone().unwrap_or_else(|| "strata".into()),
                #[cfg(feature = "s3-server")]
                embedded: None,
            });
        }
        Self::embedded(root, buckets, rt)
    }

    #[cfg(feature = "s3-server")]
    fn embedded(root: &Path, buckets: usize, rt: &tokio::runtime::Runtime) -> Result<Self> {
        use super::s3server::{ACCESS_KEY, S3Server, SECRET_KEY};
        let bucket_prefix = "strata".to_string();
        for k in 0..buckets {
            std::fs::create_dir_all(root.join(format!("{bucket_prefix}-{k}")))?;
        }
        let srv = rt.block_on(S3Server::start(root))?;
        Ok(Self {
            endpoint: srv.endpoint(),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            region: "us-east-1".into(),
            bucket_prefix,
            embedded: Some(srv),
        })
    }

    #[cfg(not(feature = "s3-server"))]
    fn embedded(_: &Path, _: usize, _: &tokio::runtime::Runtime) -> Result<Self> {
        bail!(
            "--backend s3 needs the store's address: pass --s3-endpoint URL (and credentials), \
             or build strata with `--features s3-server` for an embedded S3 server; \
             --backend file needs neither"
        )
    }

    /// Name of bucket `k`.
    pub fn bucket(&self, k: usize) -> String {
        format!("{}-{k}", self.bucket_prefix)
    }

    /// object_store settings for this store (also the namespace's
    /// `store_options`).
    pub fn store_options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint.clone()),
            ("aws_allow_http", "true".into()),
            ("aws_virtual_hosted_style_request", "false".into()),
            ("aws_region", self.region.clone()),
            ("aws_access_key_id", self.access_key.clone()),
            ("aws_secret_access_key", self.secret_key.clone()),
        ]
    }

    /// A raw object_store client of bucket `k`.
    pub fn client(&self, k: usize) -> Result<Arc<dyn ObjectStore>> {
        let b = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region(&self.region)
            .with_bucket_name(self.bucket(k))
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .build()?;
        Ok(Arc::new(b))
    }

    /// Requests the store received for keys under `prefix`, when it can
    /// tell: only the embedded server counts them.
    pub fn counts(&self, prefix: &str) -> Option<ReqCounts> {
        #[cfg(feature = "s3-server")]
        if let Some(srv) = &self.embedded {
            return Some(srv.counter.get(prefix));
        }
        let _ = prefix;
        None
    }
}
