//! Configuration of an object-backed device and its validation.
//!
//! Validation errors name the field and say how to fix it, because the
//! config usually comes from a TOML file or CLI flags typed by an operator.

use std::time::Duration;

/// Smallest and largest object sizes. Below 128 KiB the per-request cost of
/// object stores dominates; above 16 MiB a 4 KiB write costs a 16 MiB
/// read-modify-write and single PUTs get slow enough to hit request timeouts.
pub const MIN_OBJECT_SIZE: u64 = 128 << 10;
pub const MAX_OBJECT_SIZE: u64 = 16 << 20;
pub const DEFAULT_OBJECT_SIZE: u64 = 1 << 20;
/// Read-ahead of one sequential stream. 32 MiB: measured against s3fs-fuse
/// through a 20 ms proxy (docs/objbacker.md), a QD1 reader streamed at
/// 0.27× s3fs with 4 MiB, 0.84× with 16, 1.18× with 32 and 1.13× with 64
/// (which fetches more past the end of a stream); s3fs itself keeps
/// 5 × 10 MiB in flight.
pub const DEFAULT_READAHEAD_BYTES: u64 = 32 << 20;
/// Upper bound of one stream's read-ahead window.
pub const MAX_READAHEAD_BYTES: u64 = 64 << 20;

#[derive(Clone, Debug)]
pub struct ObjBackerConfig {
    /// Bdev name reported to the target.
    pub name: String,
    /// One URL per bucket; object `i` lives in bucket `i % buckets.len()`.
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`,
    /// `file:///dir` or `memory:///prefix` (memory only via
    /// [`crate::ObjBacker::attach_with_stores`]).
    pub buckets: Vec<String>,
    /// Extra object_store builder settings applied to every bucket, e.g.
    /// `("aws_endpoint", "http://127.0.0.1:9000")`, `("allow_http", "true")`.
    /// Credentials otherwise come from the usual environment variables.
    pub store_options: Vec<(String, String)>,
    pub size_bytes: u64,
    /// Power of two in 128 KiB..=16 MiB.
    pub object_size: u64,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Store requests (GET/PUT/DELETE) in flight at once, over all buckets.
    pub max_in_flight: usize,
    /// Write-back buffer size. Each partially written object holds a whole
    /// object-sized buffer, so this / object_size objects can be dirty.
    pub writeback_bytes: u64,
    /// A dirty partial object is written back after this long even without
    /// FLUSH, so a quiet device does not keep data only in memory.
    pub writeback_delay: Duration,
    /// Bytes kept in flight ahead of a sequential reader, counting the
    /// reads the host already has in flight (0 disables). Rounded up to
    /// whole objects; at most 64 MiB. Sized in bytes, not objects, because
    /// what hides the store's latency is bytes in flight: at QD1 a cold
    /// GET of 60–80 ms needs 8–16 MiB ahead to stream at 100–200 MB/s.
    pub readahead_bytes: u64,
    /// Time limit for one store request; a hung request counts as a failure
    /// and is retried.
    pub request_timeout: Duration,
    /// Total time one store operation may spend retrying before the host
    /// gets an error. Worst case per operation: retry_budget + request_timeout.
    pub retry_budget: Duration,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    /// Whole-object DELETEs (and partial-object zeroings) one Deallocate /
    /// Write Zeroes command runs at once. The store-wide `max_in_flight`
    /// still bounds all requests together.
    pub trim_parallelism: usize,
    /// How long a PUT/DELETE that the store never answered may keep its
    /// object busy before the object is declared poisoned: its content in
    /// the store is unknown (the request may still land), so writes,
    /// zeroing and FLUSH of it fail loudly until the request resolves or
    /// the device is re-attached. At least `retry_budget`.
    pub orphan_deadline: Duration,
    /// Largest single I/O accepted (reported as the bdev's max_io_bytes).
    pub max_io_bytes: u32,
    /// Wrap every bucket's client in a [`crate::FaultyStore`]: per-request
    /// latency and injected errors, for benchmarks and fault tests.
    pub fault: Option<crate::FaultConfig>,
}

impl Default for ObjBackerConfig {
    fn default() -> Self {
        Self {
            name: "objbacker0".into(),
            buckets: Vec::new(),
            store_options: Vec::new(),
            size_bytes: 0,
            object_size: DEFAULT_OBJECT_SIZE,
            block_size: 4096,
            max_in_flight: 64,
            writeback_bytes: 64 << 20,
            writeback_delay: Duration::from_secs(1),
            readahead_bytes: DEFAULT_READAHEAD_BYTES,
            request_timeout: Duration::from_secs(30),
            retry_budget: Duration::from_secs(30),
            retry_initial_backoff: Duration::from_millis(50),
            retry_max_backoff: Duration::from_secs(2),
            max_io_bytes: 8 << 20,
            trim_parallelism: 32,
            orphan_deadline: Duration::from_secs(300),
            fault: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("objbacker config field `{field}`: {problem}")]
pub struct ConfigError {
    pub field: &'static str,
    pub problem: String,
}

fn err(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        problem: problem.into(),
    }
}

pub(crate) const SCHEMES: &[&str] = &["s3", "s3a", "gs", "gcs", "az", "azure", "file", "memory"];

impl ObjBackerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.buckets.is_empty() {
            return Err(err(
                "buckets",
                "no bucket URL given; add at least one, e.g. s3://bucket/prefix or file:///var/lib/strata/obj",
            ));
        }
        for (i, u) in self.buckets.iter().enumerate() {
            let parsed = url::Url::parse(u).map_err(|e| {
                err(
                    "buckets",
                    format!(
                        "bucket {i} `{u}` is not a URL ({e}); write it as scheme://bucket/prefix"
                    ),
                )
            })?;
            if !SCHEMES.contains(&parsed.scheme()) {
                return Err(err(
                    "buckets",
                    format!(
                        "bucket {i} `{u}` has unsupported scheme `{}`; use one of s3, gs, az, file, memory",
                        parsed.scheme()
                    ),
                ));
            }
            if self.buckets[..i].contains(u) {
                return Err(err(
                    "buckets",
                    format!(
                        "bucket {i} `{u}` is listed twice; each stripe needs its own bucket or prefix"
                    ),
                ));
            }
        }
        if !self.object_size.is_power_of_two()
            || !(MIN_OBJECT_SIZE..=MAX_OBJECT_SIZE).contains(&self.object_size)
        {
            return Err(err(
                "object_size",
                format!(
                    "{} is not a power of two between 131072 (128 KiB) and 16777216 (16 MiB); the default is 1048576",
                    self.object_size
                ),
            ));
        }
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(err(
                "block_size",
                format!("{} is not supported; use 512 or 4096", self.block_size),
            ));
        }
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(u64::from(self.block_size)) {
            return Err(err(
                "size_bytes",
                format!(
                    "{} must be a non-zero multiple of block_size {}",
                    self.size_bytes, self.block_size
                ),
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 4096 {
            return Err(err(
                "max_in_flight",
                format!(
                    "{} is out of range; use 1..=4096 (default 64)",
                    self.max_in_flight
                ),
            ));
        }
        if self.writeback_bytes < self.object_size {
            return Err(err(
                "writeback_bytes",
                format!(
                    "{} is smaller than one object ({}); a partial write needs a whole object buffer, so use at least object_size (default 64 MiB)",
                    self.writeback_bytes, self.object_size
                ),
            ));
        }
        if self.readahead_bytes > MAX_READAHEAD_BYTES {
            return Err(err(
                "readahead_bytes",
                format!(
                    "{} is more than {MAX_READAHEAD_BYTES} (64 MiB); use 0 (off) up to 64 MiB (default 32 MiB)",
                    self.readahead_bytes
                ),
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(err("request_timeout", "must be non-zero (default 30s)"));
        }
        if self.retry_budget.is_zero() {
            return Err(err("retry_budget", "must be non-zero (default 30s)"));
        }
        if self.retry_initial_backoff.is_zero()
            || self.retry_max_backoff < self.retry_initial_backoff
        {
            return Err(err(
                "retry_initial_backoff",
                "must be non-zero and not larger than retry_max_backoff",
            ));
        }
        if self.trim_parallelism == 0 || self.trim_parallelism > 4096 {
            return Err(err(
                "trim_parallelism",
                format!(
                    "{} is out of range; use 1..=4096 (default 32)",
                    self.trim_parallelism
                ),
            ));
        }
        if self.orphan_deadline < self.retry_budget {
            return Err(err(
                "orphan_deadline",
                format!(
                    "{:?} is shorter than retry_budget {:?}; use at least retry_budget (default 300s)",
                    self.orphan_deadline, self.retry_budget
                ),
            ));
        }
        if self.max_io_bytes < self.block_size {
            return Err(err(
                "max_io_bytes",
                format!(
                    "{} is smaller than block_size {}",
                    self.max_io_bytes, self.block_size
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> ObjBackerConfig {
        ObjBackerConfig {
            buckets: vec!["memory:///a".into()],
            size_bytes: 1 << 30,
            ..Default::default()
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert!(ok().validate().is_ok());
        let cases: Vec<(ObjBackerConfig, &str)> = vec![
            (
                ObjBackerConfig {
                    buckets: vec![],
                    ..ok()
                },
                "buckets",
            ),
            (
                ObjBackerConfig {
                    buckets: vec!["ftp://x/y".into()],
                    ..ok()
                },
                "buckets",
            ),
            (
                ObjBackerConfig {
                    buckets: vec!["memory:///a".into(), "memory:///a".into()],
                    ..ok()
                },
                "buckets",
            ),
            (
                ObjBackerConfig {
                    object_size: 3 << 20,
                    ..ok()
                },
                "object_size",
            ),
            (
                ObjBackerConfig {
                    object_size: 64 << 10,
                    ..ok()
                },
                "object_size",
            ),
            (
                ObjBackerConfig {
                    object_size: 32 << 20,
                    ..ok()
                },
                "object_size",
            ),
            (
                ObjBackerConfig {
                    block_size: 1024,
                    ..ok()
                },
                "block_size",
            ),
            (
                ObjBackerConfig {
                    size_bytes: 4097,
                    ..ok()
                },
                "size_bytes",
            ),
            (
                ObjBackerConfig {
                    size_bytes: 0,
                    ..ok()
                },
                "size_bytes",
            ),
            (
                ObjBackerConfig {
                    max_in_flight: 0,
                    ..ok()
                },
                "max_in_flight",
            ),
            (
                ObjBackerConfig {
                    writeback_bytes: 1,
                    ..ok()
                },
                "writeback_bytes",
            ),
            (
                ObjBackerConfig {
                    readahead_bytes: MAX_READAHEAD_BYTES + 1,
                    ..ok()
                },
                "readahead_bytes",
            ),
            (
                ObjBackerConfig {
                    retry_budget: Duration::ZERO,
                    ..ok()
                },
                "retry_budget",
            ),
            (
                ObjBackerConfig {
                    trim_parallelism: 0,
                    ..ok()
                },
                "trim_parallelism",
            ),
            (
                ObjBackerConfig {
                    orphan_deadline: Duration::from_secs(1),
                    ..ok()
                },
                "orphan_deadline",
            ),
        ];
        for (c, field) in cases {
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(field));
        }
    }
}
