//! RAM bdev: one anonymous mapping shared by every reactor.
//!
//! The mapping is `MAP_NORESERVE`, so a large namespace costs nothing until
//! written, and deallocated pages are handed back to the kernel. Requests
//! complete inline on the submitting thread.

use std::collections::VecDeque;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::{Bdev, BdevChannel, BdevCompletion, BdevInfo, BdevIo, IoError, IoOp, check_range};

/// Completions a channel holds before its queue has to grow; matches the
/// deepest queue a host is expected to keep on one channel.
const COMPLETION_QUEUE_CAPACITY: usize = 256;

pub struct RamBdev {
    info: BdevInfo,
    base: NonNull<u8>,
    len: usize,
    page_size: usize,
}

// SAFETY: the mapping is owned by the RamBdev for its whole life and is only
// ever accessed through raw-pointer copies (never through Rust references),
// so sharing it between threads creates no aliasing `&mut`. Concurrent
// overlapping requests from different reactors race on the bytes exactly like
// concurrent commands on a real disk: NVMe gives them no defined order, and
// the host must not issue them if it cares about the result.
unsafe impl Send for RamBdev {}
// SAFETY: see `Send` above.
unsafe impl Sync for RamBdev {}

impl RamBdev {
    pub fn new(name: &str, size_bytes: u64, block_size: u32) -> io::Result<Arc<RamBdev>> {
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "ram bdev {name}: block size {block_size} must be a power of two in 512..=65536"
                ),
            ));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(u64::from(block_size)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "ram bdev {name}: size {size_bytes} bytes must be a non-zero multiple of \
                     the block size {block_size}"
                ),
            ));
        }
        let len = usize::try_from(size_bytes).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ram bdev {name}: size {size_bytes} bytes exceeds the address space"),
            )
        })?;
        // SAFETY: an anonymous mapping at a kernel-chosen address touches no
        // existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(
                err.kind(),
                format!("ram bdev {name}: mmap of {size_bytes} bytes failed: {err}"),
            ));
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => 4096,
        };
        Ok(Arc::new(RamBdev {
            info: BdevInfo {
                name: name.to_string(),
                block_size,
                num_blocks: size_bytes / u64::from(block_size),
                volatile_write_cache: false,
                max_io_bytes: 0,
            },
            base,
            len,
            page_size,
        }))
    }

    /// Byte range of a request already checked by `check_range`; the
    /// multiplication cannot overflow because the range fits in `self.len`.
    fn byte_range(&self, offset_blocks: u64, num_blocks: u64) -> (usize, usize) {
        let bs = self.info.block_size as usize;
        (offset_blocks as usize * bs, num_blocks as usize * bs)
    }

    /// Zeroes `[start, start+len)`. Whole pages go back to the kernel (they
    /// then read as zeros and stop costing memory); only the ragged ends are
    /// written.
    fn zero(&self, start: usize, len: usize) {
        let end = start + len;
        let page_start = start.next_multiple_of(self.page_size);
        let page_end = end - end % self.page_size;
        if page_start < page_end {
            // SAFETY: the range is inside our own private anonymous mapping,
            // so MADV_DONTNEED only replaces those pages with zero-fill pages;
            // no Rust reference into the mapping exists to observe the change.
            let rc = unsafe {
                libc::madvise(
                    self.base.as_ptr().add(page_start).cast(),
                    page_end - page_start,
                    libc::MADV_DONTNEED,
                )
            };
            if rc == 0 {
                self.write_zeros(start, page_start - start);
                self.write_zeros(page_end, end - page_end);
                return;
            }
        }
        self.write_zeros(start, len);
    }

    fn write_zeros(&self, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        // SAFETY: in bounds of the mapping (callers pass checked ranges); see
        // the `Send` impl for why unsynchronised writes are acceptable.
        unsafe { std::ptr::write_bytes(self.base.as_ptr().add(start), 0, len) }
    }

    fn execute(&self, io: &mut BdevIo) -> Result<(), IoError> {
        if io.op != IoOp::Flush {
            check_range(&self.info, io.offset_blocks, io.num_blocks)?;
        }
        match io.op {
            IoOp::Read | IoOp::Write { .. } => {
                let (start, len) = self.byte_range(io.offset_blocks, io.num_blocks);
                let buf = io.buf.as_mut().ok_or(IoError::Internal)?;
                if buf.len() != len {
                    return Err(IoError::Internal);
                }
                debug_assert!(start + len <= self.len);
                // SAFETY: `check_range` keeps `[start, start+len)` inside the
                // mapping and the buffer holds exactly `len` bytes; a private
                // heap buffer never overlaps our mapping. Unsynchronised
                // copies are the disk-like race described on `Send`.
                unsafe {
                    let dev = self.base.as_ptr().add(start);
                    if io.op == IoOp::Read {
                        std::ptr::copy_nonoverlapping(dev, buf.as_mut_ptr(), len);
                    } else {
                        std::ptr::copy_nonoverlapping(buf.as_ptr(), dev, len);
                    }
                }
                Ok(())
            }
            // Nothing is cached: every write is already as durable as RAM gets.
            IoOp::Flush => Ok(()),
            IoOp::WriteZeroes | IoOp::Deallocate => {
                let (start, len) = self.byte_range(io.offset_blocks, io.num_blocks);
                self.zero(start, len);
                Ok(())
            }
        }
    }
}

impl Drop for RamBdev {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this length and every
        // channel holds an Arc, so nothing can touch it after this point.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

impl Bdev for RamBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(self: Arc<Self>) -> io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(RamChannel {
            bdev: self,
            done: VecDeque::with_capacity(COMPLETION_QUEUE_CAPACITY),
        }))
    }
}

/// A per-queue handle. Requests complete during `submit`, so nothing ever
/// wakes a pending `poll_completions`: the caller must poll after submitting,
/// which the queue layer does after every batch.
pub struct RamChannel {
    bdev: Arc<RamBdev>,
    done: VecDeque<BdevCompletion>,
}

impl BdevChannel for RamChannel {
    fn submit(&mut self, mut io: BdevIo) {
        let result = self.bdev.execute(&mut io);
        self.done.push_back(BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        });
    }

    fn poll_completions(
        &mut self,
        _cx: &mut Context<'_>,
        out: &mut Vec<BdevCompletion>,
    ) -> Poll<()> {
        if self.done.is_empty() {
            return Poll::Pending;
        }
        out.extend(self.done.drain(..));
        Poll::Ready(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::testutil;

    #[test]
    fn rejects_bad_geometry() {
        let err = RamBdev::new("r", 4096 + 512, 4096)
            .err()
            .expect("must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("multiple"), "{err}");
        assert!(RamBdev::new("r", 0, 512).is_err());
        assert!(RamBdev::new("r", 4096, 1000).is_err());
    }

    #[test]
    fn large_namespace_is_lazily_backed() {
        // 1 GiB must map instantly and not be touched by creation.
        let b = RamBdev::new("big", 1 << 30, 4096).unwrap();
        assert_eq!(b.info().num_blocks, (1 << 30) / 4096);
        assert!(!b.info().volatile_write_cache);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn conformance_512() {
        let b = RamBdev::new("ram512", 8 << 20, 512).unwrap();
        testutil::conformance(b).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn conformance_4096() {
        let b = RamBdev::new("ram4k", 8 << 20, 4096).unwrap();
        testutil::conformance(b).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn many_in_flight() {
        let b = RamBdev::new("ram", 4 << 20, 4096).unwrap();
        testutil::many_in_flight(b, 256).await;
    }

    #[test]
    fn channels_on_several_threads_share_data() {
        let b = RamBdev::new("ram", 1 << 20, 4096).unwrap();
        let handles: Vec<_> = (0..4u8)
            .map(|i| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let mut ch = b.open_channel().unwrap();
                        let data = vec![i + 1; 4096];
                        let c =
                            testutil::one(&mut *ch, testutil::write(0, u64::from(i), &data, 4096))
                                .await;
                        assert_eq!(c.result, Ok(()));
                    })
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut ch = b.open_channel().unwrap();
            for i in 0..4u8 {
                let got = testutil::read_blocks(&mut *ch, u64::from(i), 1, 4096).await;
                assert!(got.iter().all(|&x| x == i + 1));
            }
        });
    }
}
