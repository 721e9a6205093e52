//! File and block-device bdev on io_uring, O_DIRECT where the filesystem
//! allows it.
//!
//! Every channel owns its own ring, so the hot path never shares a ring and
//! never locks. The ring signals an eventfd registered with the reactor, which
//! is how a pending `poll_completions` gets woken. Requests live in a slab of
//! `queue_depth` slots indexed by `user_data`; with at most one SQE in flight
//! per slot, neither the SQ nor the CQ (twice the SQ size) can overflow, and
//! requests beyond the depth wait in a FIFO until a slot frees up.
//!
//! Dropping a channel never waits for the kernel (a hung device would
//! stall every connection of the reactor): a ring with requests still in
//! flight goes, with the buffers those requests point at, to one reaper
//! thread that waits for their completions and only then frees them.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::task::{Context, Poll};

use io_uring::{IoUring, opcode, types};
use tokio::io::unix::AsyncFd;

use super::iobuf::IOBUF_ALIGN;
use super::{
    Bdev, BdevChannel, BdevCompletion, BdevInfo, BdevIo, IoBuf, IoError, IoOp, check_range,
};

/// `_IOR(0x12, 114, u64)`; libc does not export it. The direction bits sit
/// differently on the few architectures with a 3-bit direction field.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::Ioctl = 0x4008_1272u32 as libc::Ioctl;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272u32 as libc::Ioctl;

/// Source of zero-writes when the filesystem cannot zero or punch a range:
/// large enough that a fallback costs few SQEs, small enough to not matter.
const ZERO_BUF_BYTES: usize = 1 << 20;

/// Largest ring we create; deeper queues wait in the overflow FIFO anyway.
const MAX_QUEUE_DEPTH: u32 = 4096;

/// CQEs reaped per CQ borrow; a stack array keeps reaping allocation-free.
const REAP_BATCH: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UringOptions {
    /// Logical block size exposed to the host: 512 or 4096.
    pub block_size: u32,
    /// Creates or extends a regular file to this size and exposes exactly
    /// this many bytes. Required if the file does not exist.
    pub size_bytes: Option<u64>,
    /// Bypass the page cache (O_DIRECT) when the filesystem supports it.
    pub direct: bool,
    /// Ring entries per channel (rounded up to a power of two).
    pub queue_depth: u32,
}

impl Default for UringOptions {
    fn default() -> Self {
        Self {
            block_size: 4096,
            size_bytes: None,
            direct: true,
            queue_depth: 128,
        }
    }
}

pub struct UringBdev {
    info: BdevInfo,
    file: File,
    direct: bool,
    queue_depth: u32,
    /// Read-only source for zero-writes; shared by every channel's rings.
    zeros: IoBuf,
    /// Sticky: once the file says EOPNOTSUPP, skip straight to zero-writes.
    no_zero_range: AtomicBool,
    no_punch_hole: AtomicBool,
}

fn annotate(err: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {what}: {err}", path.display()))
}

fn invalid(path: &Path, msg: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {msg}", path.display()),
    )
}

fn open_file(path: &Path, create: bool, direct: bool) -> io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .custom_flags(flags)
        .open(path)
}

/// O_DIRECT alignment (memory, file offset) the kernel reports, if it can.
fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated empty path with AT_EMPTY_PATH, and a
    // live out-pointer of the right type.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is live.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn block_device_sector_size(file: &File) -> Option<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is live.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    (rc == 0).then_some(size as u32)
}

impl UringBdev {
    pub fn open(path: &Path, opts: UringOptions) -> io::Result<Arc<UringBdev>> {
        let bs = opts.block_size;
        if bs != 512 && bs != 4096 {
            return Err(invalid(
                path,
                format!("block size {bs} must be 512 or 4096"),
            ));
        }
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(annotate(e, path, "stat")),
        };
        let is_blk = meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        match &meta {
            Some(m) if !is_blk && !m.is_file() => {
                return Err(invalid(
                    path,
                    "not a regular file or block device".to_string(),
                ));
            }
            None if opts.size_bytes.is_none() => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{}: does not exist and no size was given to create it",
                        path.display()
                    ),
                ));
            }
            _ => {}
        }
        let create = !is_blk && opts.size_bytes.is_some();

        let mut direct = opts.direct;
        let mut file = match open_file(path, create, direct) {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "O_DIRECT not supported here; falling back to buffered I/O through the page cache"
                );
                direct = false;
                open_file(path, create, false)
            }
            r => r,
        }
        .map_err(|e| annotate(e, path, "open"))?;
        if direct {
            let aligned = match dio_alignment(&file) {
                Some((_, 0)) => Err("the filesystem does not support O_DIRECT on it".to_string()),
                Some((mem, off)) if off > bs || mem as usize > IOBUF_ALIGN => Err(format!(
                    "O_DIRECT needs {off}-byte offsets and {mem}-byte memory alignment, \
                     more than the {bs}-byte block size allows"
                )),
                Some(_) => Ok(()),
                None => match is_blk.then(|| block_device_sector_size(&file)).flatten() {
                    Some(sector) if sector > bs => Err(format!(
                        "the device's {sector}-byte sectors exceed the {bs}-byte block size"
                    )),
                    _ => Ok(()),
                },
            };
            if let Err(why) = aligned {
                tracing::warn!(
                    path = %path.display(),
                    "{why}; falling back to buffered I/O through the page cache"
                );
                direct = false;
                file = open_file(path, false, false).map_err(|e| annotate(e, path, "open"))?;
            }
        }

        let dev_bytes = if is_blk {
            block_device_size(&file).map_err(|e| annotate(e, path, "BLKGETSIZE64"))?
        } else {
            let len = file
                .metadata()
                .map_err(|e| annotate(e, path, "stat"))?
                .len();
            match opts.size_bytes {
                Some(want) if want > len => {
                    file.set_len(want)
                        .map_err(|e| annotate(e, path, "extend"))?;
                    want
                }
                _ => len,
            }
        };
        let bytes = match opts.size_bytes {
            Some(want) if want > dev_bytes => {
                return Err(invalid(
                    path,
                    format!("size {want} exceeds the device's {dev_bytes} bytes"),
                ));
            }
            Some(want) => want,
            None => dev_bytes,
        };
        let num_blocks = bytes / u64::from(bs);
        if num_blocks == 0 {
            return Err(invalid(
                path,
                format!("{bytes} bytes hold no {bs}-byte block"),
            ));
        }
        Ok(Arc::new(UringBdev {
            info: BdevInfo {
                name: path.display().to_string(),
                block_size: bs,
                num_blocks,
                // The page cache or the disk's own cache may hold writes:
                // FLUSH and FUA must reach stable storage.
                volatile_write_cache: true,
                max_io_bytes: 0,
            },
            file,
            direct,
            queue_depth: opts
                .queue_depth
                .clamp(1, MAX_QUEUE_DEPTH)
                .next_power_of_two(),
            zeros: IoBuf::new(ZERO_BUF_BYTES),
            no_zero_range: AtomicBool::new(false),
            no_punch_hole: AtomicBool::new(false),
        }))
    }

    /// Whether I/O bypasses the page cache (false after a fallback).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    #[cfg(test)]
    fn force_zero_writes(&self) {
        self.no_zero_range.store(true, Ordering::Relaxed);
        self.no_punch_hole.store(true, Ordering::Relaxed);
    }

    fn fallocate_unsupported(&self, op: IoOp) -> &AtomicBool {
        if op == IoOp::Deallocate {
            &self.no_punch_hole
        } else {
            &self.no_zero_range
        }
    }
}

impl Bdev for UringBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    /// Must run inside the owning reactor's tokio runtime, with I/O enabled:
    /// the ring's eventfd registers with that reactor.
    fn open_channel(self: Arc<Self>) -> io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(UringChannel::new(self)?))
    }
}

/// One request occupying a ring slot. At most one SQE per slot is in flight.
struct Slot {
    tag: u32,
    op: IoOp,
    /// Byte offset and length of the whole request.
    offset: u64,
    len: u64,
    /// Bytes finished so far (short reads/writes and zero-write chunks).
    done: u64,
    buf: Option<IoBuf>,
    /// WriteZeroes/Deallocate being done by writing zeros.
    zero_fill: bool,
}

impl Slot {
    const EMPTY: Slot = Slot {
        tag: 0,
        op: IoOp::Flush,
        offset: 0,
        len: 0,
        done: 0,
        buf: None,
        zero_fill: false,
    };
}

pub struct UringChannel {
    bdev: Arc<UringBdev>,
    /// Taken by `Drop`: dropped there when idle, else handed to the reaper.
    ring: ManuallyDrop<IoUring>,
    eventfd: AsyncFd<OwnedFd>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Requests waiting for a slot, in arrival order.
    overflow: VecDeque<BdevIo>,
    done: VecDeque<BdevCompletion>,
    /// SQEs pushed but not yet handed to the kernel.
    queued: u32,
    #[cfg(test)]
    watch: Arc<ReapWatch>,
}

impl UringChannel {
    fn new(bdev: Arc<UringBdev>) -> io::Result<Self> {
        let depth = bdev.queue_depth;
        let ring = IoUring::new(depth)?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is
        // checked before it is wrapped.
        let raw: RawFd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other(
                "io_uring channels must be opened on a tokio runtime (with I/O enabled)",
            ));
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and is the
        // same descriptor until the AsyncFd drops it.
        let eventfd =
            unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
        // Slot accounting is what keeps the SQ from overflowing, so there are
        // never more slots than SQ entries.
        let nslots = ring.params().sq_entries().min(depth) as usize;
        Ok(Self {
            bdev,
            ring: ManuallyDrop::new(ring),
            eventfd,
            slots: (0..nslots).map(|_| Slot::EMPTY).collect(),
            free: (0..nslots as u32).rev().collect(),
            overflow: VecDeque::with_capacity(nslots * 2),
            done: VecDeque::with_capacity(nslots * 2),
            queued: 0,
            #[cfg(test)]
            watch: Arc::default(),
        })
    }

    fn validate(&self, io: &BdevIo) -> Result<(), IoError> {
        let info = &self.bdev.info;
        if io.op == IoOp::Flush {
            return Ok(());
        }
        check_range(info, io.offset_blocks, io.num_blocks)?;
        if matches!(io.op, IoOp::Read | IoOp::Write { .. }) {
            let want = io.num_blocks * u64::from(info.block_size);
            match &io.buf {
                Some(buf) if buf.len() as u64 == want && want <= u64::from(u32::MAX) => {}
                _ => return Err(IoError::Internal),
            }
        }
        Ok(())
    }

    /// Completes without touching the ring. Nothing in the ring will wake
    /// the reactor for it, so poke our own eventfd; this is off the hot path
    /// (errors and empty requests only).
    fn complete_inline(&mut self, io: BdevIo, result: Result<(), IoError>) {
        self.done.push_back(BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        });
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe {
            libc::write(
                self.eventfd.get_ref().as_raw_fd(),
                (&raw const one).cast(),
                8,
            );
        }
    }

    fn start(&mut self, io: BdevIo, idx: u32) {
        let bs = u64::from(self.bdev.info.block_size);
        let zero_fill = matches!(io.op, IoOp::WriteZeroes | IoOp::Deallocate)
            && self
                .bdev
                .fallocate_unsupported(io.op)
                .load(Ordering::Relaxed);
        self.slots[idx as usize] = Slot {
            tag: io.tag,
            op: io.op,
            offset: io.offset_blocks * bs,
            len: io.num_blocks * bs,
            done: 0,
            buf: io.buf,
            zero_fill,
        };
        self.push_sqe(idx);
    }

    /// Pushes the next SQE for the slot (its first, or the remainder after a
    /// short transfer, or the next zero chunk).
    fn push_sqe(&mut self, idx: u32) {
        let fd = types::Fd(self.bdev.file.as_raw_fd());
        let slot = &mut self.slots[idx as usize];
        let pos = slot.offset + slot.done;
        let rest = slot.len - slot.done;
        let entry = match slot.op {
            _ if slot.zero_fill => {
                let chunk = rest.min(self.bdev.zeros.len() as u64) as u32;
                opcode::Write::new(fd, self.bdev.zeros.as_ptr(), chunk)
                    .offset(pos)
                    .build()
            }
            IoOp::Read | IoOp::Write { .. } => {
                let Some(buf) = slot.buf.as_mut() else {
                    return self.finish(idx, Err(IoError::Internal));
                };
                // SAFETY: `done < len == buf.len()`, so the pointer stays
                // inside the buffer.
                let ptr = unsafe { buf.as_mut_ptr().add(slot.done as usize) };
                // `validate` bounds Read/Write lengths by u32::MAX.
                let rest = rest as u32;
                match slot.op {
                    IoOp::Write { fua } => opcode::Write::new(fd, ptr, rest)
                        .offset(pos)
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                        .build(),
                    _ => opcode::Read::new(fd, ptr, rest).offset(pos).build(),
                }
            }
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::WriteZeroes | IoOp::Deallocate => {
                let mode = if slot.op == IoOp::Deallocate {
                    libc::FALLOC_FL_PUNCH_HOLE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                };
                opcode::Fallocate::new(fd, slot.len)
                    .offset(slot.offset)
                    .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
        };
        // SAFETY: every buffer the entry points at lives until its CQE is
        // reaped: request buffers are owned by the slot until `finish`, the
        // zero buffer by the bdev our Arc keeps alive, and `Drop` hands
        // slots with outstanding CQEs, the ring and that Arc to the reaper,
        // which frees them only after the CQEs.
        let pushed = unsafe {
            self.ring
                .submission()
                .push(&entry.user_data(u64::from(idx)))
        };
        match pushed {
            Ok(()) => self.queued += 1,
            // Unreachable while slots <= SQ entries; fail the request rather
            // than lose it.
            Err(_) => self.finish(idx, Err(IoError::Internal)),
        }
    }

    fn finish(&mut self, idx: u32, result: Result<(), IoError>) {
        let slot = &mut self.slots[idx as usize];
        self.done.push_back(BdevCompletion {
            tag: slot.tag,
            result,
            buf: slot.buf.take(),
        });
        self.free.push(idx);
    }

    fn on_cqe(&mut self, user_data: u64, res: i32) {
        let Some(slot) = usize::try_from(user_data)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            tracing::error!(user_data, "io_uring completion for an unknown slot");
            return;
        };
        let idx = user_data as u32;
        let fallocate = matches!(slot.op, IoOp::WriteZeroes | IoOp::Deallocate);
        let failure = match slot.op {
            IoOp::Read => IoError::ReadError,
            IoOp::Write { .. } | IoOp::Flush => IoError::WriteFault,
            IoOp::WriteZeroes | IoOp::Deallocate => IoError::Internal,
        };
        if fallocate && !slot.zero_fill {
            // EINVAL too: a block device rejects ranges finer than its
            // sectors, and zero-writes are always a correct substitute.
            if res == -libc::EOPNOTSUPP || res == -libc::EINVAL {
                if res == -libc::EOPNOTSUPP
                    && !self
                        .bdev
                        .fallocate_unsupported(slot.op)
                        .swap(true, Ordering::Relaxed)
                {
                    tracing::info!(
                        bdev = %self.bdev.info.name,
                        op = ?slot.op,
                        "fallocate unsupported; writing zeros instead"
                    );
                }
                slot.zero_fill = true;
                slot.done = 0;
                return self.push_sqe(idx);
            }
            return self.finish(idx, if res < 0 { Err(failure) } else { Ok(()) });
        }
        if slot.op == IoOp::Flush {
            return self.finish(idx, if res < 0 { Err(failure) } else { Ok(()) });
        }
        if res <= 0 {
            // No progress: an error, or EOF under a file shrunk behind us.
            return self.finish(idx, Err(failure));
        }
        slot.done += res as u64;
        if slot.done < slot.len {
            self.push_sqe(idx);
        } else {
            self.finish(idx, Ok(()));
        }
    }

    fn reap(&mut self) {
        let mut batch = [(0u64, 0i32); REAP_BATCH];
        loop {
            let mut n = 0;
            for cqe in self.ring.completion().take(REAP_BATCH) {
                batch[n] = (cqe.user_data(), cqe.result());
                n += 1;
            }
            for &(user_data, res) in &batch[..n] {
                self.on_cqe(user_data, res);
            }
            if n < REAP_BATCH {
                break;
            }
        }
        while !self.overflow.is_empty()
            && let Some(idx) = self.free.pop()
        {
            if let Some(io) = self.overflow.pop_front() {
                self.start(io, idx);
            }
        }
    }

    fn drain_eventfd(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our own non-blocking
        // eventfd; EAGAIN (already drained) is fine.
        unsafe {
            libc::read(
                self.eventfd.get_ref().as_raw_fd(),
                (&raw mut count).cast(),
                8,
            );
        }
    }
}

impl BdevChannel for UringChannel {
    fn submit(&mut self, io: BdevIo) {
        if let Err(e) = self.validate(&io) {
            return self.complete_inline(io, Err(e));
        }
        if io.num_blocks == 0 && io.op != IoOp::Flush {
            // Nothing to transfer; the kernel would reject a zero fallocate.
            return self.complete_inline(io, Ok(()));
        }
        if !self.overflow.is_empty() {
            return self.overflow.push_back(io);
        }
        match self.free.pop() {
            Some(idx) => self.start(io, idx),
            None => self.overflow.push_back(io),
        }
    }

    fn flush_submissions(&mut self) {
        if self.queued == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(n) => self.queued = self.queued.saturating_sub(n as u32),
            // Left queued: the next flush or poll retries. Cannot be a full
            // CQ (EBUSY) because slots never exceed the CQ.
            Err(e) => tracing::warn!(bdev = %self.bdev.info.name, "io_uring submit: {e}"),
        }
    }

    fn poll_completions(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<BdevCompletion>,
    ) -> Poll<()> {
        loop {
            self.reap();
            // Remainders of short transfers, zero-write chunks and requests
            // promoted from the overflow FIFO go out with one enter.
            self.flush_submissions();
            if !self.done.is_empty() {
                out.extend(self.done.drain(..));
                return Poll::Ready(());
            }
            match self.eventfd.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(mut guard)) => {
                    // The kernel posts a CQE before signalling, so anything
                    // signalled before this clear is seen by the next reap.
                    self.drain_eventfd();
                    guard.clear_ready();
                }
                Poll::Ready(Err(e)) => {
                    tracing::error!(bdev = %self.bdev.info.name, "eventfd poll: {e}");
                    return Poll::Pending;
                }
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.overflow.len() + self.done.len()
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        let outstanding = self.slots.len() - self.free.len();
        if outstanding == 0 {
            // SAFETY: the ring is not used again; `Drop` runs once.
            unsafe { ManuallyDrop::drop(&mut self.ring) };
            return;
        }
        // The kernel may still read from or write into slot buffers (and
        // the shared zero buffer and the file): hand the ring, those
        // buffers and the bdev to the reaper instead of waiting here.
        // SAFETY: as above; the ring moves out exactly once.
        let ring = unsafe { ManuallyDrop::take(&mut self.ring) };
        let mut in_flight = vec![true; self.slots.len()];
        for &i in &self.free {
            in_flight[i as usize] = false;
        }
        // The reaper waits on its own descriptor of the eventfd the ring
        // signals; ours stays registered with this reactor until it drops.
        // SAFETY: dup of a descriptor we own; the result is checked.
        let raw =
            unsafe { libc::fcntl(self.eventfd.get_ref().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        // SAFETY: a fresh descriptor nobody else owns.
        let eventfd = (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) });
        let abandoned = Abandoned {
            ring,
            eventfd,
            slots: std::mem::take(&mut self.slots),
            in_flight,
            outstanding,
            _bdev: self.bdev.clone(),
            #[cfg(test)]
            watch: self.watch.clone(),
        };
        #[cfg(test)]
        {
            self.watch.handed_over.store(true, Ordering::SeqCst);
            self.watch.outstanding.store(outstanding, Ordering::SeqCst);
        }
        if let Err(mpsc::SendError(a)) = reaper().send(abandoned) {
            // No reaper thread (it could not be started): leak rather than
            // free memory the kernel may still write into.
            tracing::error!(
                bdev = %self.bdev.info.name,
                "io_uring reaper unavailable; leaking a ring with {} requests in flight",
                a.outstanding
            );
            std::mem::forget(a);
        }
    }
}

/// A dropped channel's ring with requests still in the kernel, and
/// everything those requests point at. Fields drop in order: the ring
/// (all its requests completed by then) before the buffers.
struct Abandoned {
    ring: IoUring,
    eventfd: Option<OwnedFd>,
    slots: Vec<Slot>,
    in_flight: Vec<bool>,
    outstanding: usize,
    /// The file and the shared zero buffer.
    _bdev: Arc<UringBdev>,
    #[cfg(test)]
    watch: Arc<ReapWatch>,
}

impl Abandoned {
    /// Frees the buffer of every request the kernel has finished with.
    /// Requests are not continued (no remainders, no zero chunks).
    fn reap(&mut self) {
        // SQEs pushed but never submitted would never complete otherwise.
        let _ = self.ring.submit();
        for cqe in self.ring.completion() {
            let Some(i) = usize::try_from(cqe.user_data())
                .ok()
                .filter(|&i| self.in_flight.get(i) == Some(&true))
            else {
                continue;
            };
            self.in_flight[i] = false;
            drop(self.slots[i].buf.take());
            self.outstanding -= 1;
            #[cfg(test)]
            {
                self.watch.buffers_freed.fetch_add(1, Ordering::SeqCst);
                self.watch.outstanding.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if let Some(fd) = &self.eventfd {
            let mut count: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64 from a non-blocking
            // eventfd we own; EAGAIN is fine.
            unsafe { libc::read(fd.as_raw_fd(), (&raw mut count).cast(), 8) };
        }
    }
}

/// The reaper: one thread for the process, started on first use, that
/// owns abandoned rings until their last request completes. It waits on
/// the rings' eventfds (and wakes every 100 ms regardless), so one hung
/// request holds only its own ring, never a reactor or another ring.
fn reaper() -> &'static mpsc::Sender<Abandoned> {
    static REAPER: OnceLock<mpsc::Sender<Abandoned>> = OnceLock::new();
    REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Abandoned>();
        let started = std::thread::Builder::new()
            .name("uring-reaper".into())
            .spawn(move || reap_loop(rx));
        if let Err(e) = started {
            tracing::error!("cannot start the io_uring reaper thread: {e}");
        }
        tx
    })
}

fn reap_loop(rx: mpsc::Receiver<Abandoned>) {
    let mut rings: Vec<Abandoned> = Vec::new();
    loop {
        if rings.is_empty() {
            match rx.recv() {
                Ok(a) => rings.push(a),
                Err(_) => return,
            }
        }
        rings.extend(rx.try_iter());
        for a in &mut rings {
            a.reap();
        }
        rings.retain(|a| a.outstanding > 0);
        if rings.is_empty() {
            continue;
        }
        let mut fds: Vec<libc::pollfd> = rings
            .iter()
            .filter_map(|a| a.eventfd.as_ref())
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a live array of pollfd of the given length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
    }
}

/// Test view of a channel's hand-over to the reaper.
#[cfg(test)]
#[derive(Default)]
struct ReapWatch {
    handed_over: AtomicBool,
    outstanding: std::sync::atomic::AtomicUsize,
    buffers_freed: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::testutil;

    fn fs_name(dir: &Path) -> String {
        // SAFETY: statfs is plain old data; zeroed is valid.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated path and a live out-pointer.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return "unknown".into();
        }
        match st.f_type as i64 {
            0xEF53 => "ext4".into(),
            0x0102_1994 => "tmpfs".into(),
            0x5846_5342 => "xfs".into(),
            0x9123_683E => "btrfs".into(),
            0x794C_7630 => "overlayfs".into(),
            other => format!("{other:#x}"),
        }
    }

    /// A directory on the worktree's filesystem (usually a real disk, unlike
    /// a tmpfs /tmp), so O_DIRECT is exercised.
    fn real_fs_dir() -> tempfile::TempDir {
        tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    fn open(path: &Path, bs: u32, size: Option<u64>, depth: u32) -> Arc<UringBdev> {
        UringBdev::open(
            path,
            UringOptions {
                block_size: bs,
                size_bytes: size,
                queue_depth: depth,
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn report(dir: &Path, b: &UringBdev) {
        testutil::check_direct(dir, &fs_name(dir), b.is_direct());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn conformance_512_real_fs() {
        let dir = real_fs_dir();
        let b = open(&dir.path().join("ns"), 512, Some(8 << 20), 128);
        report(dir.path(), &b);
        assert!(b.info().volatile_write_cache);
        testutil::conformance(b.clone()).await;
        if matches!(fs_name(dir.path()).as_str(), "ext4" | "xfs") {
            // Both fallocate modes ran natively.
            assert!(!b.no_zero_range.load(Ordering::Relaxed));
            assert!(!b.no_punch_hole.load(Ordering::Relaxed));
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn conformance_4096_real_fs() {
        let dir = real_fs_dir();
        let b = open(&dir.path().join("ns"), 4096, Some(8 << 20), 128);
        report(dir.path(), &b);
        testutil::conformance(b).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn conformance_512_tmpdir() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir.path().join("ns"), 512, Some(8 << 20), 128);
        report(dir.path(), &b);
        testutil::conformance(b).await;
    }

    /// tmpfs: O_DIRECT only on newer kernels, otherwise the buffered fallback.
    #[tokio::test(flavor = "current_thread")]
    async fn conformance_512_shm() {
        // A missing /dev/shm fails the test: the fallback path must run.
        let dir = testutil::shm_tempdir();
        let b = open(&dir.path().join("ns"), 512, Some(8 << 20), 128);
        report(dir.path(), &b);
        testutil::conformance(b.clone()).await;
        // tmpfs punches holes but cannot zero a range: the real EOPNOTSUPP
        // path to zero-writes ran.
        assert!(b.no_zero_range.load(Ordering::Relaxed));
        assert!(!b.no_punch_hole.load(Ordering::Relaxed));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn conformance_buffered() {
        let dir = real_fs_dir();
        let b = UringBdev::open(
            &dir.path().join("ns"),
            UringOptions {
                block_size: 512,
                size_bytes: Some(8 << 20),
                direct: false,
                queue_depth: 32,
            },
        )
        .unwrap();
        assert!(!b.is_direct());
        assert!(b.info().volatile_write_cache);
        testutil::conformance(b).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn conformance_with_zero_write_fallback() {
        let dir = real_fs_dir();
        let b = open(&dir.path().join("ns"), 512, Some(8 << 20), 16);
        b.force_zero_writes();
        testutil::conformance(b).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn deep_queue_overflows_small_ring() {
        let dir = real_fs_dir();
        let b = open(&dir.path().join("ns"), 4096, Some(4 << 20), 64);
        testutil::many_in_flight(b, 256).await;
        let b = open(&dir.path().join("ns512"), 512, Some(4 << 20), 64);
        testutil::many_in_flight(b, 256).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn data_survives_reopen() {
        let dir = real_fs_dir();
        let path = dir.path().join("ns");
        let mut data = vec![0u8; 64 * 1024];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
        {
            let b = open(&path, 4096, Some(4 << 20), 32);
            let mut ch = b.open_channel().unwrap();
            let c = testutil::one(&mut *ch, testutil::write(0, 100, &data, 4096)).await;
            assert_eq!(c.result, Ok(()));
            let c = testutil::one(&mut *ch, testutil::range_op(1, IoOp::Flush, 0, 0)).await;
            assert_eq!(c.result, Ok(()));
        }
        let b = open(&path, 4096, None, 32);
        assert_eq!(b.info().num_blocks, (4 << 20) / 4096);
        let mut ch = b.open_channel().unwrap();
        let got = testutil::read_blocks(&mut *ch, 100, 16, 4096).await;
        assert!(*got == data[..]);
    }

    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn dropping_a_busy_channel_hands_it_to_the_reaper() {
        let dir = real_fs_dir();
        let b = open(&dir.path().join("ns"), 4096, Some(4 << 20), 32);
        let mut ch = UringChannel::new(b).unwrap();
        let watch = ch.watch.clone();
        for i in 0..100 {
            ch.submit(testutil::read(i, u64::from(i), 8, 4096));
        }
        // 32 in the ring (not even submitted yet), 68 waiting for a slot.
        assert_eq!(ch.in_flight(), 100);
        drop(ch);
        assert!(watch.handed_over.load(Ordering::SeqCst));
        wait_for("the reaper freed every in-flight buffer", || {
            watch.outstanding.load(Ordering::SeqCst) == 0
        })
        .await;
        assert_eq!(watch.buffers_freed.load(Ordering::SeqCst), 32);
    }

    /// A read from a FIFO nobody writes never completes: a hung request.
    /// Dropping its channel returns at once; the buffer is freed only once
    /// the kernel completes the read.
    #[tokio::test(flavor = "current_thread")]
    async fn dropping_a_channel_with_a_hung_request_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // O_RDWR: opening a FIFO does not wait for a peer.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let bdev = Arc::new(UringBdev {
            info: BdevInfo {
                name: "fifo".into(),
                block_size: 4096,
                num_blocks: 16,
                volatile_write_cache: true,
                max_io_bytes: 0,
            },
            file,
            direct: false,
            queue_depth: 8,
            zeros: IoBuf::new(4096),
            no_zero_range: AtomicBool::new(false),
            no_punch_hole: AtomicBool::new(false),
        });
        let mut ch = UringChannel::new(bdev).unwrap();
        let watch = ch.watch.clone();
        ch.submit(testutil::read(1, 0, 1, 4096));
        ch.flush_submissions();
        // The read is really stuck in the kernel.
        std::thread::sleep(std::time::Duration::from_millis(50));
        ch.reap();
        assert_eq!(ch.done.len(), 0, "the FIFO read completed early");
        let t = std::time::Instant::now();
        drop(ch);
        assert!(
            t.elapsed() < std::time::Duration::from_millis(200),
            "drop blocked for {:?}",
            t.elapsed()
        );
        assert!(watch.handed_over.load(Ordering::SeqCst));
        assert_eq!(watch.outstanding.load(Ordering::SeqCst), 1);
        // Still hung a while later: the buffer is still held.
        std::thread::sleep(std::time::Duration::from_millis(150));
        assert_eq!(watch.buffers_freed.load(Ordering::SeqCst), 0);
        // Unstick it: the read completes and only then is the buffer freed.
        let mut w = OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut w, &[1u8; 4096]).unwrap();
        wait_for("the reaper freed the buffer", || {
            watch.buffers_freed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(watch.outstanding.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn channel_outside_a_runtime_is_an_error() {
        let dir = real_fs_dir();
        let b = open(&dir.path().join("ns"), 4096, Some(1 << 20), 8);
        assert!(b.open_channel().is_err());
    }

    #[test]
    fn open_validates_and_sizes() {
        let dir = real_fs_dir();
        let missing = dir.path().join("missing");
        let err = UringBdev::open(&missing, UringOptions::default())
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("no size"), "{err}");
        let err = UringBdev::open(
            &missing,
            UringOptions {
                block_size: 1024,
                size_bytes: Some(1 << 20),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = UringBdev::open(
            dir.path(),
            UringOptions {
                size_bytes: Some(1 << 20),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("not a regular file"), "{err}");

        // An existing file without a size: its length, rounded down.
        let odd = dir.path().join("odd");
        std::fs::write(&odd, vec![1u8; 3 * 4096 + 700]).unwrap();
        let b = open(&odd, 512, None, 8);
        assert_eq!(b.info().num_blocks, (3 * 4096 + 700) / 512);
        let b = open(&odd, 4096, None, 8);
        assert_eq!(b.info().num_blocks, 3);
        // A larger size extends the file; a smaller one exposes just that.
        let b = open(&odd, 4096, Some(1 << 20), 8);
        assert_eq!(b.info().num_blocks, 256);
        assert_eq!(std::fs::metadata(&odd).unwrap().len(), 1 << 20);
        let b = open(&odd, 4096, Some(8192), 8);
        assert_eq!(b.info().num_blocks, 2);
        assert_eq!(std::fs::metadata(&odd).unwrap().len(), 1 << 20);
    }
}
