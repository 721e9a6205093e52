//! Shared helpers: a host that drives a device through the Bdev API, store
//! inspection, patterns.
#![allow(dead_code)]

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
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
        readahead_objects: 0,
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

/// Keys (relative to the store root) and sizes, sorted.
pub async fn list(store: &dyn ObjectStore, prefix: Option<&str>) -> Vec<(String, u64)> {
    let p = prefix.map(Path::from);
    let mut v: Vec<(String, u64)> = store
        .list(p.as_ref())
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .expect("list");
    v.sort();
    v
}

pub async fn get(store: &dyn ObjectStore, key: &str) -> Option<Vec<u8>> {
    match store.get(&Path::from(key)).await {
        Ok(r) => Some(r.bytes().await.expect("body").to_vec()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("get {key}: {e}"),
    }
}

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
