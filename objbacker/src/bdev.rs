//! The `Bdev` face of the device.
//!
//! A channel lives on a reactor's current_thread runtime; each request is
//! spawned onto the device's shared runtime and its completion comes back
//! through an unbounded mpsc queue whose receiver `poll_completions` polls,
//! registering the reactor's waker. One task, one queue slot and (for
//! writes) one `Arc` per request are allocated: negligible next to the
//! milliseconds an object store request takes.
//!
//! A write-behind write completes while its PUT still holds the host's
//! buffer, so the submitter needs another buffer for its pool. It gets one
//! whose PUT has finished ([`Spares`]) rather than a fresh allocation: a
//! fresh 1 MiB buffer costs page faults and kernel page zeroing on first
//! touch and an munmap when freed, on the same cores as the store (measured
//! in `docs/objbacker.md`, "Write-behind buffers").
//!
//! Error mapping: a read that cannot get its data from the store within the
//! retry budget completes with `ReadError` (Unrecovered Read Error); a
//! write, FUA write, FLUSH or deallocate that cannot make its data durable
//! completes with `WriteFault`. `Unavailable` is not used: the host must
//! treat a failed FLUSH as lost durability, not as a path to retry on.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use strata_target::bdev::{
    Bdev, BdevChannel, BdevCompletion, BdevInfo, BdevIo, IoBuf, IoError, IoOp, check_range,
};
use tokio::sync::mpsc;

use crate::ObjBacker;

impl Bdev for ObjBacker {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(self: Arc<Self>) -> std::io::Result<Box<dyn BdevChannel>> {
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Box::new(ObjChannel {
            dev: self,
            tx,
            rx,
            in_flight: 0,
            spares: Arc::new(Spares::default()),
        }))
    }
}

struct ObjChannel {
    dev: Arc<ObjBacker>,
    tx: mpsc::UnboundedSender<BdevCompletion>,
    rx: mpsc::UnboundedReceiver<BdevCompletion>,
    in_flight: usize,
    spares: Arc<Spares>,
}

/// Idle bytes a channel keeps in [`Spares`]; past it a buffer whose PUT
/// finished is freed. Write-behind needs a spare only between a write's
/// completion and its PUT's, so a few buffers cover the steady state.
const SPARE_BYTES: usize = 16 << 20;

/// Buffers of writes whose payload outlived the write (write-behind: the
/// PUT still ran when the write completed), returned when the payload is
/// dropped, for the next such write to hand back instead of a fresh one.
#[derive(Default)]
struct Spares {
    bufs: Mutex<Vec<IoBuf>>,
}

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<IoBuf>> {
        self.bufs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, buf: IoBuf) {
        let mut v = self.lock();
        let held: usize = v.iter().map(IoBuf::capacity).sum();
        if held + buf.capacity() <= SPARE_BYTES {
            v.push(buf);
        }
    }

    /// A buffer of capacity `cap` and length `len`: a spare if one fits,
    /// else a fresh allocation. Contents are unspecified, as for any buffer
    /// from the submitter's pool.
    fn take(&self, cap: usize, len: usize) -> IoBuf {
        let spare = {
            let mut v = self.lock();
            v.iter()
                .position(|b| b.capacity() == cap)
                .map(|p| v.swap_remove(p))
        };
        let mut b = spare.unwrap_or_else(|| IoBuf::new(cap));
        b.set_len(len);
        b
    }
}

/// Lets a write's IoBuf back a `Bytes` for PUT without copying, and be
/// recovered afterwards: by the write's task if the payload is gone when
/// the write completes, else here, when the payload is dropped (into the
/// channel's spares). `Arc::into_inner` on both sides gives the buffer to
/// exactly one of them.
struct SharedBuf {
    buf: Option<Arc<IoBuf>>,
    spares: Arc<Spares>,
}

impl AsRef<[u8]> for SharedBuf {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().map_or(&[], |b| &b[..])
    }
}

impl Drop for SharedBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take().and_then(Arc::into_inner) {
            self.spares.put(b);
        }
    }
}

impl ObjChannel {
    fn complete(&self, tag: u32, result: Result<(), IoError>, buf: Option<IoBuf>) {
        // The receiver lives in self, so sending cannot fail while we exist.
        let _ = self.tx.send(BdevCompletion { tag, result, buf });
    }
}

impl BdevChannel for ObjChannel {
    fn submit(&mut self, io: BdevIo) {
        self.in_flight += 1;
        let info = &self.dev.info;
        let bs = u64::from(info.block_size);
        let BdevIo {
            tag,
            op,
            offset_blocks,
            num_blocks,
            buf,
        } = io;
        if op != IoOp::Flush {
            if let Err(e) = check_range(info, offset_blocks, num_blocks) {
                return self.complete(tag, Err(e), buf);
            }
            if num_blocks == 0 {
                return self.complete(tag, Ok(()), buf);
            }
        }
        let off = offset_blocks * bs;
        // In range, so this cannot overflow: it is at most the device size.
        let len = num_blocks * bs;
        let inner = self.dev.inner.clone();
        let tx = self.tx.clone();
        let done = move |result, buf| {
            let _ = tx.send(BdevCompletion { tag, result, buf });
        };
        match op {
            IoOp::Read => {
                let Some(mut buf) = buf.filter(|b| b.len() as u64 >= len) else {
                    return self.complete(tag, Err(IoError::Internal), None);
                };
                // Noted here, in submission order, so stream detection
                // sees the host's order whatever order the tasks run in.
                let ticket = inner.begin_read(off, len);
                self.dev.handle.spawn(async move {
                    let r = inner.read(off, &mut buf[..len as usize]).await;
                    drop(ticket);
                    done(r.map_err(|_| IoError::ReadError), Some(buf));
                });
            }
            IoOp::Write { fua } => {
                let Some(buf) = buf.filter(|b| b.len() as u64 >= len) else {
                    return self.complete(tag, Err(IoError::Internal), None);
                };
                let spares = self.spares.clone();
                let (cap, blen) = (buf.capacity(), buf.len());
                self.dev.handle.spawn(async move {
                    let shared = Arc::new(buf);
                    let bytes = Bytes::from_owner(SharedBuf {
                        buf: Some(shared.clone()),
                        spares: spares.clone(),
                    })
                    .slice(..len as usize);
                    let r = inner.write(off, bytes, fua).await;
                    // A write-through PUT is over and network stores drop
                    // the payload once sent, so the buffer comes back. A
                    // write-behind PUT still holds it: the submitter gets a
                    // spare (a buffer whose PUT finished) or, if none fits,
                    // a fresh one. A store that keeps the payload (InMemory)
                    // keeps this memory too, and returns no spares.
                    let buf = match Arc::into_inner(shared) {
                        Some(b) => b,
                        None => spares.take(cap, blen),
                    };
                    done(r.map_err(|_| IoError::WriteFault), Some(buf));
                });
            }
            IoOp::Flush => {
                self.dev.handle.spawn(async move {
                    let r = inner.flush().await;
                    done(r.map_err(|_| IoError::WriteFault), buf);
                });
            }
            IoOp::WriteZeroes | IoOp::Deallocate => {
                self.dev.handle.spawn(async move {
                    let r = inner.zero(off, len).await;
                    done(r.map_err(|_| IoError::WriteFault), buf);
                });
            }
        }
    }

    fn poll_completions(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<BdevCompletion>,
    ) -> Poll<()> {
        let before = out.len();
        while let Poll::Ready(Some(c)) = self.rx.poll_recv(cx) {
            out.push(c);
        }
        let n = out.len() - before;
        self.in_flight = self.in_flight.saturating_sub(n);
        if n > 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(buf: IoBuf, spares: &Arc<Spares>) -> (Arc<IoBuf>, Bytes) {
        let shared = Arc::new(buf);
        let bytes = Bytes::from_owner(SharedBuf {
            buf: Some(shared.clone()),
            spares: spares.clone(),
        });
        (shared, bytes)
    }

    #[test]
    fn a_buffer_outliving_its_write_comes_back_as_a_spare() {
        let spares = Arc::new(Spares::default());
        let (shared, bytes) = payload(IoBuf::new(1 << 20), &spares);
        let ptr = shared.as_ptr();
        // The write completes while its PUT still holds the payload.
        assert!(Arc::into_inner(shared).is_none());
        assert!(spares.lock().is_empty());
        drop(bytes);
        let b = spares.take(1 << 20, 4096);
        assert_eq!(b.as_ptr(), ptr, "the PUT's buffer, not a fresh one");
        assert_eq!(b.len(), 4096);
        assert!(spares.lock().is_empty());
        // No spare of that capacity: a fresh buffer.
        assert_eq!(spares.take(1 << 20, 1 << 20).len(), 1 << 20);
    }

    #[test]
    fn a_payload_gone_before_completion_goes_straight_back() {
        let spares = Arc::new(Spares::default());
        let (shared, bytes) = payload(IoBuf::new(1 << 20), &spares);
        drop(bytes);
        assert!(Arc::into_inner(shared).is_some());
        assert!(spares.lock().is_empty());
    }

    #[test]
    fn spares_are_bounded() {
        let spares = Spares::default();
        for _ in 0..(SPARE_BYTES >> 20) + 4 {
            spares.put(IoBuf::new(1 << 20));
        }
        let held: usize = spares.lock().iter().map(IoBuf::capacity).sum();
        assert_eq!(held, SPARE_BYTES);
    }
}
