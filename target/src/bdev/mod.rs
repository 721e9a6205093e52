//! Block devices (bdevs), the layer every namespace sits on.
//!
//! A bdev is shared by all reactors; each queue opens its own
//! [`BdevChannel`], owned by one reactor, so the I/O path needs no lock.
//! Submission never blocks: completions come back through
//! [`BdevChannel::poll_completions`], which registers the reactor's waker.
//! RAM completes inline, io_uring completes from its CQ, and the object-backed
//! device, tiered namespace and HA mirror are each one more implementation.
//!
//! Buffers are [`IoBuf`]s: 4 KiB-aligned (O_DIRECT-ready), owned, handed to
//! the bdev with the request and handed back with the completion, so data is
//! never copied between the socket buffer and the device.

mod iobuf;
pub mod ram;
#[cfg(test)]
mod testutil;
pub mod uring;

pub use iobuf::{BufPool, IoBuf};

use std::sync::Arc;
use std::task::{Context, Poll};

/// What a namespace needs to know about its device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BdevInfo {
    pub name: String,
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    pub num_blocks: u64,
    /// The device has a volatile write cache: FLUSH (and FUA) do real work.
    pub volatile_write_cache: bool,
    /// Largest single I/O the device accepts, in bytes (0 = no limit).
    pub max_io_bytes: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write {
        fua: bool,
    },
    Flush,
    WriteZeroes,
    /// Dataset Management deallocate (TRIM) of one range.
    Deallocate,
}

/// One request. `tag` is the submitter's; the bdev returns it untouched.
#[derive(Debug)]
pub struct BdevIo {
    pub tag: u32,
    pub op: IoOp,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    /// Read: filled by the device (len = num_blocks * block_size).
    /// Write: the data. Other ops: None.
    pub buf: Option<IoBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// The device failed to persist the data (NVMe Write Fault).
    WriteFault,
    /// The device failed to return the data (NVMe Unrecovered Read Error).
    ReadError,
    /// The range lies outside the device.
    OutOfRange,
    /// The device is unreachable now and may come back (path/transient).
    Unavailable,
    /// Anything else (NVMe Internal Error).
    Internal,
    /// The device refused the request because this node may no longer
    /// write (or read) it: a fencing epoch moved or a lease expired (a
    /// mirror whose peer holds a newer epoch, a store that refused a
    /// conditional write). Answered with the ANA status of the namespace's
    /// group, without DNR, so the host retries on another path.
    Fenced,
}

#[derive(Debug)]
pub struct BdevCompletion {
    pub tag: u32,
    pub result: Result<(), IoError>,
    /// The buffer submitted with the request, given back for reuse.
    pub buf: Option<IoBuf>,
}

pub trait Bdev: Send + Sync + 'static {
    fn info(&self) -> &BdevInfo;
    /// Opens a per-queue channel. Called on the reactor that will own it.
    fn open_channel(self: Arc<Self>) -> std::io::Result<Box<dyn BdevChannel>>;
}

pub trait BdevChannel {
    /// Queues one request. Never blocks; errors arrive as completions.
    fn submit(&mut self, io: BdevIo);
    /// Makes queued submissions visible to the device, once per batch
    /// (one `io_uring_enter` for everything submitted since the last call).
    fn flush_submissions(&mut self) {}
    /// Moves finished requests into `out`. Returns `Ready` if it moved any;
    /// otherwise registers `cx`'s waker and returns `Pending`.
    fn poll_completions(&mut self, cx: &mut Context<'_>, out: &mut Vec<BdevCompletion>)
    -> Poll<()>;
    /// Requests in flight on this channel.
    fn in_flight(&self) -> usize;
}

/// Checks a request against the device geometry; shared by implementations.
pub fn check_range(info: &BdevInfo, offset_blocks: u64, num_blocks: u64) -> Result<(), IoError> {
    match offset_blocks.checked_add(num_blocks) {
        Some(end) if end <= info.num_blocks => Ok(()),
        _ => Err(IoError::OutOfRange),
    }
}
