//! Superblock, format, info and fsck.
//!
//! Every bucket holds its own copy of the superblock, recording which stripe
//! it is (`bucket_index`). Attaching with buckets listed in another order,
//! or with one bucket swapped for another device's, would otherwise
//! silently serve the wrong objects; with a copy per bucket it is refused.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::config::ObjBackerConfig;
use crate::engine::Geometry;
use crate::store::{Bucket, Retrier, open_buckets, url_prefix};
use crate::{FORMAT_VERSION, ObjError, SUPERBLOCK_NAME};

pub const MAGIC: &str = "strata-objbacker";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub magic: String,
    pub format_version: u32,
    pub uuid: String,
    pub size_bytes: u64,
    pub object_size: u64,
    pub block_size: u32,
    pub num_objects: u64,
    /// All bucket URLs in stripe order.
    pub buckets: Vec<String>,
    /// The stripe this copy lives in.
    pub bucket_index: usize,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct FormatOptions {
    /// Format over an existing device or foreign data, deleting every key
    /// under each bucket's prefix first.
    pub force: bool,
}

#[derive(Clone, Debug)]
pub struct BucketUsage {
    pub url: String,
    pub data_objects: u64,
    pub data_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct Info {
    pub superblock: Superblock,
    pub buckets: Vec<BucketUsage>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsckProblem {
    SuperblockMissing {
        bucket: String,
    },
    SuperblockUnreadable {
        bucket: String,
        detail: String,
    },
    SuperblockMismatch {
        bucket: String,
        detail: String,
    },
    /// A data object whose index is past the end of the device.
    BeyondDevice {
        bucket: String,
        key: String,
        index: u64,
    },
    /// A data object in a bucket other than `index % buckets`.
    WrongBucket {
        bucket: String,
        key: String,
        index: u64,
    },
    /// A data object whose length is not the object's length on the device.
    WrongSize {
        bucket: String,
        key: String,
        size: u64,
        expected: u64,
    },
    /// A key under the prefix that this device never writes.
    StrayKey {
        bucket: String,
        key: String,
    },
}

#[derive(Clone, Debug)]
pub struct FsckReport {
    pub superblock: Option<Superblock>,
    pub data_objects: u64,
    pub data_bytes: u64,
    pub problems: Vec<FsckProblem>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

pub(crate) fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub(crate) fn buckets_from_stores(
    cfg: &ObjBackerConfig,
    stores: Vec<Arc<dyn ObjectStore>>,
) -> Result<Vec<Bucket>, ObjError> {
    if stores.len() != cfg.buckets.len() {
        return Err(ObjError::Store {
            url: cfg.buckets.join(","),
            message: format!(
                "{} stores given for {} bucket URLs",
                stores.len(),
                cfg.buckets.len()
            ),
        });
    }
    cfg.buckets
        .iter()
        .zip(stores)
        .map(|(url, store)| {
            Ok(Bucket {
                url: url.clone(),
                store,
                prefix: url_prefix(url)?,
                local_root: None,
            })
        })
        .collect()
}

fn store_err(b: &Bucket, e: impl std::fmt::Display) -> ObjError {
    ObjError::Store {
        url: b.url.clone(),
        message: e.to_string(),
    }
}

async fn read_superblock(r: &Retrier, b: &Bucket) -> Result<Option<Superblock>, ObjError> {
    let key = b.superblock_key();
    let Some(raw) = r
        .get(b, &key, 0..0, true)
        .await
        .map_err(|e| store_err(b, e))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(|e| ObjError::BadSuperblock {
            url: b.url.clone(),
            message: format!("{key}: {e}"),
        })
}

async fn list_keys(b: &Bucket) -> Result<Vec<object_store::ObjectMeta>, ObjError> {
    let prefix = (!b.prefix.as_ref().is_empty()).then_some(&b.prefix);
    b.store
        .list(prefix)
        .try_collect()
        .await
        .map_err(|e| store_err(b, e))
}

/// Name of `key` relative to the bucket prefix, if directly under it.
pub(crate) fn leaf(b: &Bucket, key: &Path) -> Option<String> {
    let parts: Vec<_> = key.prefix_match(&b.prefix)?.collect();
    match parts.as_slice() {
        [one] => Some(one.as_ref().to_string()),
        _ => None,
    }
}

pub(crate) fn data_index(name: &str) -> Option<u64> {
    (name.len() >= 8 && name.bytes().all(|c| c.is_ascii_digit()))
        .then(|| name.parse().ok())
        .flatten()
}

pub async fn format(cfg: &ObjBackerConfig, opts: FormatOptions) -> Result<Superblock, ObjError> {
    cfg.validate()?;
    format_buckets(cfg, open_buckets(cfg)?, opts).await
}

pub async fn format_with_stores(
    cfg: &ObjBackerConfig,
    stores: Vec<Arc<dyn ObjectStore>>,
    opts: FormatOptions,
) -> Result<Superblock, ObjError> {
    cfg.validate()?;
    format_buckets(cfg, buckets_from_stores(cfg, stores)?, opts).await
}

async fn format_buckets(
    cfg: &ObjBackerConfig,
    buckets: Vec<Bucket>,
    opts: FormatOptions,
) -> Result<Superblock, ObjError> {
    let r = Retrier::new(cfg);
    for b in &buckets {
        if !opts.force {
            match read_superblock(&r, b).await {
                Ok(None) => {}
                Ok(Some(sb)) => {
                    return Err(ObjError::AlreadyFormatted {
                        url: b.url.clone(),
                        uuid: sb.uuid,
                    });
                }
                Err(ObjError::BadSuperblock { .. }) => {
                    return Err(ObjError::AlreadyFormatted {
                        url: b.url.clone(),
                        uuid: "unreadable superblock".into(),
                    });
                }
                Err(e) => return Err(e),
            }
            if let Some(first) = list_keys(b).await?.into_iter().next() {
                return Err(ObjError::NotEmpty {
                    url: b.url.clone(),
                    key: first.location.to_string(),
                });
            }
        } else {
            for m in list_keys(b).await? {
                r.delete(b, &m.location)
                    .await
                    .map_err(|e| store_err(b, e))?;
            }
        }
    }
    let geo = Geometry::new(cfg.size_bytes, cfg.object_size);
    let mut sb = Superblock {
        magic: MAGIC.into(),
        format_version: FORMAT_VERSION,
        uuid: new_uuid(),
        size_bytes: cfg.size_bytes,
        object_size: cfg.object_size,
        block_size: cfg.block_size,
        num_objects: geo.num_objects,
        buckets: cfg.buckets.clone(),
        bucket_index: 0,
    };
    // Bucket 0 last: a format interrupted half-way has no copy in bucket 0,
    // so attach and info see "not formatted" rather than a partial device.
    for (k, b) in buckets.iter().enumerate().rev() {
        sb.bucket_index = k;
        let raw = serde_json::to_vec_pretty(&sb).map_err(|e| store_err(b, e))?;
        r.put(b, &b.superblock_key(), Bytes::from(raw))
            .await
            .map_err(|e| store_err(b, e))?;
    }
    sb.bucket_index = 0;
    tracing::info!(
        name = %cfg.name,
        uuid = %sb.uuid,
        buckets = ?sb.buckets,
        object_size = sb.object_size,
        size = sb.size_bytes,
        "formatted new objbacker device"
    );
    Ok(sb)
}

/// Checks every bucket's copy against the config; the error says which
/// field differs, both values, and what to do.
pub(crate) async fn check_attach(
    cfg: &ObjBackerConfig,
    r: &Retrier,
    buckets: &[Bucket],
) -> Result<Superblock, ObjError> {
    let mut first: Option<Superblock> = None;
    for (k, b) in buckets.iter().enumerate() {
        let Some(sb) = read_superblock(r, b).await? else {
            return Err(ObjError::NotFormatted {
                url: b.url.clone(),
                key: b.superblock_key().to_string(),
            });
        };
        let mism = |what: String| {
            Err(ObjError::Mismatch(format!(
                "bucket {k} ({}): {what}",
                b.url
            )))
        };
        if sb.magic != MAGIC {
            return mism(format!(
                "superblock magic is `{}`, not `{MAGIC}`: not a strata-objbacker device",
                sb.magic
            ));
        }
        if sb.format_version != FORMAT_VERSION {
            return mism(format!(
                "format_version {} is not supported by this build (supports {FORMAT_VERSION}); use a matching strata version",
                sb.format_version
            ));
        }
        let fields: [(&str, u64, u64); 3] = [
            ("size_bytes", sb.size_bytes, cfg.size_bytes),
            ("object_size", sb.object_size, cfg.object_size),
            (
                "block_size",
                u64::from(sb.block_size),
                u64::from(cfg.block_size),
            ),
        ];
        for (name, formatted, configured) in fields {
            if formatted != configured {
                return mism(format!(
                    "{name} is {formatted} in the superblock but {configured} in the config; set {name} = {formatted}, or reformat (destroys the data)"
                ));
            }
        }
        if sb.buckets != cfg.buckets {
            return mism(format!(
                "the device was formatted with buckets {:?} but the config lists {:?}; list the same buckets in the same order",
                sb.buckets, cfg.buckets
            ));
        }
        if sb.bucket_index != k {
            return mism(format!(
                "this bucket holds stripe {} but is listed as stripe {k}; restore the formatted bucket order",
                sb.bucket_index
            ));
        }
        if let Some(f) = &first
            && f.uuid != sb.uuid
        {
            return mism(format!(
                "superblock uuid {} differs from bucket 0's {}: the buckets belong to different devices",
                sb.uuid, f.uuid
            ));
        }
        first.get_or_insert(sb);
    }
    first.ok_or_else(|| ObjError::Store {
        url: String::new(),
        message: "no buckets".into(),
    })
}

/// Superblock of bucket 0 and what each bucket holds. Needs only the
/// bucket URLs and store options of `cfg`, not the geometry.
pub async fn info(cfg: &ObjBackerConfig) -> Result<Info, ObjError> {
    info_buckets(cfg, open_buckets(cfg)?).await
}

pub async fn info_with_stores(
    cfg: &ObjBackerConfig,
    stores: Vec<Arc<dyn ObjectStore>>,
) -> Result<Info, ObjError> {
    info_buckets(cfg, buckets_from_stores(cfg, stores)?).await
}

async fn info_buckets(cfg: &ObjBackerConfig, buckets: Vec<Bucket>) -> Result<Info, ObjError> {
    let r = Retrier::new(cfg);
    let b0 = buckets.first().ok_or_else(|| ObjError::Store {
        url: String::new(),
        message: "no buckets configured".into(),
    })?;
    let superblock = read_superblock(&r, b0)
        .await?
        .ok_or_else(|| ObjError::NotFormatted {
            url: b0.url.clone(),
            key: b0.superblock_key().to_string(),
        })?;
    let mut usage = Vec::new();
    for b in &buckets {
        let mut u = BucketUsage {
            url: b.url.clone(),
            data_objects: 0,
            data_bytes: 0,
        };
        for m in list_keys(b).await? {
            if leaf(b, &m.location)
                .as_deref()
                .and_then(data_index)
                .is_some()
            {
                u.data_objects += 1;
                u.data_bytes += m.size;
            }
        }
        usage.push(u);
    }
    Ok(Info {
        superblock,
        buckets: usage,
    })
}

/// Checks the superblock copies and every key under each prefix.
/// Read-only: reports, never repairs.
pub async fn fsck(cfg: &ObjBackerConfig) -> Result<FsckReport, ObjError> {
    fsck_buckets(cfg, open_buckets(cfg)?).await
}

pub async fn fsck_with_stores(
    cfg: &ObjBackerConfig,
    stores: Vec<Arc<dyn ObjectStore>>,
) -> Result<FsckReport, ObjError> {
    fsck_buckets(cfg, buckets_from_stores(cfg, stores)?).await
}

async fn fsck_buckets(cfg: &ObjBackerConfig, buckets: Vec<Bucket>) -> Result<FsckReport, ObjError> {
    let r = Retrier::new(cfg);
    let mut problems = Vec::new();
    let mut sbs = Vec::new();
    for b in &buckets {
        match read_superblock(&r, b).await {
            Ok(Some(sb)) => sbs.push(Some(sb)),
            Ok(None) => {
                problems.push(FsckProblem::SuperblockMissing {
                    bucket: b.url.clone(),
                });
                sbs.push(None);
            }
            Err(ObjError::BadSuperblock { message, .. }) => {
                problems.push(FsckProblem::SuperblockUnreadable {
                    bucket: b.url.clone(),
                    detail: message,
                });
                sbs.push(None);
            }
            Err(e) => return Err(e),
        }
    }
    // The reference copy: bucket 0's, else the first readable one.
    let reference = sbs.iter().flatten().next().cloned();
    let mut report = FsckReport {
        superblock: reference.clone(),
        data_objects: 0,
        data_bytes: 0,
        problems: Vec::new(),
    };
    let Some(sb) = reference else {
        report.problems = problems;
        return Ok(report);
    };
    for (k, (b, copy)) in buckets.iter().zip(&sbs).enumerate() {
        if let Some(c) = copy {
            let mut detail = Vec::new();
            if c.magic != MAGIC {
                detail.push(format!("magic `{}`", c.magic));
            }
            if c.uuid != sb.uuid {
                detail.push(format!("uuid {} != {}", c.uuid, sb.uuid));
            }
            if c.bucket_index != k {
                detail.push(format!(
                    "records stripe {} but is listed as stripe {k}",
                    c.bucket_index
                ));
            }
            if (c.size_bytes, c.object_size, c.block_size, &c.buckets)
                != (sb.size_bytes, sb.object_size, sb.block_size, &sb.buckets)
            {
                detail.push("geometry or bucket list differs from the other copies".into());
            }
            if sb.buckets != cfg.buckets {
                detail.push(format!(
                    "formatted with buckets {:?}, config lists {:?}",
                    sb.buckets, cfg.buckets
                ));
            }
            if !detail.is_empty() {
                problems.push(FsckProblem::SuperblockMismatch {
                    bucket: b.url.clone(),
                    detail: detail.join("; "),
                });
            }
        }
    }
    let geo = Geometry::new(sb.size_bytes, sb.object_size);
    let nb = buckets.len() as u64;
    for (k, b) in buckets.iter().enumerate() {
        for m in list_keys(b).await? {
            let key = m.location.to_string();
            let bucket = b.url.clone();
            let Some(name) = leaf(b, &m.location) else {
                problems.push(FsckProblem::StrayKey { bucket, key });
                continue;
            };
            if name == SUPERBLOCK_NAME {
                continue;
            }
            let Some(index) = data_index(&name) else {
                problems.push(FsckProblem::StrayKey { bucket, key });
                continue;
            };
            if index >= geo.num_objects {
                problems.push(FsckProblem::BeyondDevice { bucket, key, index });
            } else if index % nb != k as u64 {
                problems.push(FsckProblem::WrongBucket { bucket, key, index });
            } else if m.size != geo.obj_len(index) {
                problems.push(FsckProblem::WrongSize {
                    bucket,
                    key,
                    size: m.size,
                    expected: geo.obj_len(index),
                });
            } else {
                report.data_objects += 1;
                report.data_bytes += m.size;
            }
        }
    }
    report.problems = problems;
    Ok(report)
}
