//! The `Bdev` face of the device.
//!
//! A channel lives on a reactor's current_thread runtime; each request is
//! spawned onto the device's shared runtime and its completion comes back
//! through an unbounded mpsc queue whose receiver `poll_completions` polls,
//! registering the reactor's waker. One task, one queue slot and (for
//! writes) one `Arc` per request are allocated: negligible next to the
//! milliseconds an object store request takes.
//!
//! Error mapping: a read that cannot get its data from the store within the
//! retry budget completes with `ReadError` (Unrecovered Read Error); a
//! write, FUA write, FLUSH or deallocate that cannot make its data durable
//! completes with `WriteFault`. `Unavailable` is not used: the host must
//! treat a failed FLUSH as lost durability, not as a path to retry on.

use std::sync::Arc;
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
        }))
    }
}

struct ObjChannel {
    dev: Arc<ObjBacker>,
    tx: mpsc::UnboundedSender<BdevCompletion>,
    rx: mpsc::UnboundedReceiver<BdevCompletion>,
    in_flight: usize,
}

/// Lets a write's IoBuf back a `Bytes` for PUT without copying, and be
/// recovered afterwards to hand back with the completion.
struct SharedBuf(Arc<IoBuf>);

impl AsRef<[u8]> for SharedBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
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
                self.dev.handle.spawn(async move {
                    let shared = Arc::new(buf);
                    let bytes = Bytes::from_owner(SharedBuf(shared.clone())).slice(..len as usize);
                    let r = inner.write(off, bytes, fua).await;
                    // Network stores drop the PUT payload once sent, so the
                    // buffer comes back. A store that keeps the payload
                    // (InMemory) keeps this memory too; the submitter then
                    // gets a fresh buffer of the same size instead.
                    let buf = Arc::try_unwrap(shared).unwrap_or_else(|kept| {
                        let mut fresh = IoBuf::new(kept.capacity());
                        fresh.set_len(kept.len());
                        fresh
                    });
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
