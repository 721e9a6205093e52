//! The I/O path: checks NVM commands, keeps this queue's bdev channels and
//! its view of the controller's namespaces, submits to the bdevs and turns
//! their completions into responses.
//!
//! Exists so that the per-I/O hot path is one file: everything it writes
//! per command is queue-local (channels, slots); what it reads of the shared
//! controller (the view generation once per batch in `refresh_view`,
//! enabled per command) is written only on reconfiguration or teardown.
//!
//! Invariants:
//! * A command reaches a bdev only after `check_io` accepted its opcode,
//!   namespace, ANA state, LBA range and transfer length.
//! * Fencing (`ctrlr::fence`): a write-class command (Write, Write Zeroes,
//!   Dataset Management, Flush) reaches a bdev only if its group's fence
//!   word is the one it was admitted under and writable, and completes
//!   with success only if it still is when the bdev completes it; a read
//!   needs the read bit when checked and when it completes. The fence is
//!   one load of a line no queue writes; the in-flight counts it needs are
//!   this queue's own (`LocalFence`).
//! * A channel whose namespace left the view is retired, not dropped, until
//!   its requests complete (the device may still write into their buffers).
//! * `read_bytes_in_flight` counts exactly the reads in devices, so the
//!   pending-output bound covers data not yet queued for sending.

use std::task::{Context, Poll};

use super::*;
use crate::bdev::{BdevChannel, BdevIo, IoError, IoOp};
use crate::spec::identify::NvmLimits;
use crate::spec::{NvmeCpl, SGL_ID_TRANSPORT_DATA_BLOCK, admin_opc, fctype, io_opc};
use crate::stats::{self, IoKind};
use crate::subsystem::AnaState;
use rx::{AfterData, DataDest};

/// A per-queue bdev channel for one namespace.
pub(super) struct NsChannel {
    nsid: u32,
    block_size: u32,
    pub(super) num_blocks: u64,
    ana_state: AnaState,
    /// Identity of the bdev, to notice a namespace swapped by a reload.
    bdev_id: usize,
    /// The namespace's ANA group: whose fence its commands check.
    anagrpid: u32,
    pub(super) chan: Box<dyn BdevChannel>,
    /// Still has I/O in flight but no longer serves new commands.
    retired: bool,
    /// This queue's counters for the namespace (written only here).
    stats: stats::NsStatsHandle,
}

enum IoPlan {
    Bdev {
        chan: usize,
        xfer: u32,
        grp: u32,
        /// The group's fence word at admission.
        word: u64,
    },
    Dsm,
    Disconnect,
}

/// Commands that change what the namespace holds (or, for Flush, vouch
/// that it holds it): the ones a fence must stop.
fn is_write_class(opc: u8) -> bool {
    matches!(
        opc,
        io_opc::WRITE | io_opc::WRITE_ZEROES | io_opc::DATASET_MANAGEMENT | io_opc::FLUSH
    )
}

fn io_error_status(e: IoError, opcode: u8) -> Status {
    match e {
        IoError::OutOfRange => Status::LBA_OUT_OF_RANGE.dnr(),
        IoError::ReadError => Status::UNRECOVERED_READ_ERROR,
        IoError::WriteFault => Status::WRITE_FAULT,
        // A transient path problem: the host may retry, or fail over.
        IoError::Unavailable => Status::NS_NOT_READY,
        // Mapped to the group's ANA status by the caller, which knows the
        // group; this is only the fallback (retryable, never DNR).
        IoError::Fenced => Status::ANA_TRANSITION,
        IoError::Internal => {
            if opcode == io_opc::READ {
                Status::UNRECOVERED_READ_ERROR
            } else {
                Status::INTERNAL_ERROR
            }
        }
    }
}

impl NsChannel {
    pub(super) fn anagrpid(&self) -> u32 {
        self.anagrpid
    }
}

impl QueuePair {
    /// Requests still owned by a bdev; the driver waits for these before it
    /// drops the queue, because the device may still write into the buffers.
    pub fn in_flight(&self) -> usize {
        self.channels.iter().map(|c| c.chan.in_flight()).sum()
    }

    pub(super) fn refresh_view(&mut self) {
        let Role2::Io { ctrlr, view, .. } = &mut self.role else {
            return;
        };
        if view.generation == ctrlr.generation() {
            return;
        }
        *view = ctrlr.io_view();
        let view = view.clone();
        for ch in &mut self.channels {
            match view.get(ch.nsid) {
                Some(ns) if Arc::as_ptr(&ns.bdev) as *const () as usize == ch.bdev_id => {
                    ch.ana_state = ns.ana_state;
                    ch.anagrpid = ns.anagrpid;
                    let info = ns.bdev.info();
                    ch.num_blocks = info.num_blocks;
                }
                _ => ch.retired = true,
            }
        }
        self.channels
            .retain(|c| !c.retired || c.chan.in_flight() > 0);
    }

    /// Finds (opening on first use) this queue's channel for `nsid`.
    pub(super) fn channel_for(&mut self, nsid: u32) -> Result<usize, Status> {
        if let Some(i) = self
            .channels
            .iter()
            .position(|c| c.nsid == nsid && !c.retired)
        {
            return Ok(i);
        }
        let Role2::Io { view, ctrlr, .. } = &self.role else {
            return Err(Status::INVALID_OPCODE.dnr());
        };
        let ns = view.get(nsid).ok_or(Status::INVALID_NAMESPACE.dnr())?;
        let info = ns.bdev.info().clone();
        let bdev_id = Arc::as_ptr(&ns.bdev) as *const () as usize;
        let ana_state = ns.ana_state;
        let anagrpid = ns.anagrpid;
        let chan = ns.bdev.clone().open_channel().map_err(|e| {
            tracing::error!(nsid, error = %e, "cannot open bdev channel");
            Status::INTERNAL_ERROR
        })?;
        let stats = stats::registry().ns_block(ctrlr.subnqn(), nsid);
        self.channels.push(NsChannel {
            nsid,
            block_size: info.block_size,
            num_blocks: info.num_blocks,
            ana_state,
            bdev_id,
            anagrpid,
            chan,
            retired: false,
            stats,
        });
        Ok(self.channels.len() - 1)
    }

    pub(super) fn on_io_capsule(
        &mut self,
        cmd: NvmeCmd,
        skip: usize,
        data_len: usize,
        has_ddgst: bool,
    ) {
        match self.check_io(&cmd, data_len) {
            Err(st) => self.refuse_capsule(&cmd, st, skip, data_len, has_ddgst),
            Ok(IoPlan::Dsm) => {
                if data_len == 0 {
                    return self.complete_err(&cmd, Status::DATA_SGL_LENGTH_INVALID.dnr());
                }
                self.receive_small_capsule(cmd, skip, data_len, has_ddgst)
            }
            Ok(IoPlan::Disconnect) => {
                self.send_cpl(NvmeCpl::success(cmd.cid()));
                self.close = Some(CloseReason::Disconnected("Disconnect command"));
                self.stop_rx = true;
            }
            Ok(IoPlan::Bdev {
                chan,
                xfer,
                grp,
                word,
            }) => {
                let Some(slot) = self.alloc_slot(cmd) else {
                    self.log_limit_once(
                        Limit::Slots,
                        "host sent more commands than its queue holds: terminating",
                    );
                    self.terminate(FatalErrorStatus::PduSequenceError, 0);
                    return;
                };
                let solicited = cmd.opcode() == io_opc::WRITE && data_len == 0;
                // A solicited write gets its buffer with its R2T, so the R2T
                // budget bounds the memory waiting for host data.
                let buf = if xfer > 0 && !solicited {
                    Some(self.pool.get(xfer as usize))
                } else {
                    None
                };
                let s = &mut self.slots[slot as usize];
                s.chan = chan;
                s.start_ns = self.now_ns;
                s.buf = buf;
                s.xfer_len = xfer;
                s.grp = grp;
                s.fence_word = word;
                if cmd.opcode() == io_opc::WRITE {
                    if data_len > 0 {
                        s.state = SlotState::InCapsuleData;
                        s.received = data_len as u32;
                        self.pending_capsule = Some(cmd);
                        self.pending_capsule_slot = Some(slot);
                        self.start_payload(
                            skip,
                            data_len,
                            has_ddgst,
                            DataDest::Slot { slot, off: 0 },
                            AfterData::Capsule,
                        )
                    } else {
                        self.await_r2t(slot);
                    }
                } else {
                    self.submit_io(slot);
                }
            }
        }
    }

    fn check_io(&mut self, cmd: &NvmeCmd, data_len: usize) -> Result<IoPlan, Status> {
        let opc = cmd.opcode();
        if opc == admin_opc::FABRICS {
            return match cmd.fctype() {
                fctype::DISCONNECT => Ok(IoPlan::Disconnect),
                fctype::CONNECT => Err(Status::COMMAND_SEQUENCE_ERROR.dnr()),
                _ => Err(Status::INVALID_OPCODE.dnr()),
            };
        }
        if !matches!(
            opc,
            io_opc::READ
                | io_opc::WRITE
                | io_opc::FLUSH
                | io_opc::WRITE_ZEROES
                | io_opc::DATASET_MANAGEMENT
        ) {
            return Err(Status::INVALID_OPCODE.dnr());
        }
        if let Role2::Io { ctrlr, .. } = &self.role
            && !ctrlr.is_enabled()
        {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        }
        let nsid = cmd.nsid();
        if opc == io_opc::FLUSH && nsid == 0xffff_ffff {
            return Err(Status::INVALID_NAMESPACE.dnr());
        }
        let chan = self.channel_for(nsid)?;
        match self.channels[chan].ana_state {
            AnaState::Optimized | AnaState::NonOptimized => {}
            AnaState::Inaccessible => return Err(Status::ANA_INACCESSIBLE),
            AnaState::PersistentLoss => return Err(Status::ANA_PERSISTENT_LOSS),
            AnaState::Change => return Err(Status::ANA_TRANSITION),
        }
        let grp = self.channels[chan].anagrpid;
        let word = self.fence_word(grp);
        let allowed = if is_write_class(opc) {
            ctrlr::writable(word)
        } else {
            ctrlr::readable(word)
        };
        if !allowed {
            return Err(self.target.fence.fenced_status(grp));
        }
        let ch = &self.channels[chan];
        match opc {
            io_opc::FLUSH => Ok(IoPlan::Bdev {
                chan,
                xfer: 0,
                grp,
                word,
            }),
            io_opc::DATASET_MANAGEMENT => Ok(IoPlan::Dsm),
            _ => {
                let nlb = u64::from(cmd.nlb());
                match cmd.slba().checked_add(nlb) {
                    Some(end) if end <= ch.num_blocks => {}
                    _ => return Err(Status::LBA_OUT_OF_RANGE.dnr()),
                }
                if opc == io_opc::WRITE_ZEROES {
                    if nlb * u64::from(ch.block_size) > NvmLimits::TARGET.write_zeroes_bytes() {
                        return Err(Status::INVALID_FIELD.dnr());
                    }
                    return Ok(IoPlan::Bdev {
                        chan,
                        xfer: 0,
                        grp,
                        word,
                    });
                }
                let xfer = nlb * u64::from(ch.block_size);
                if xfer > u64::from(self.limits.mdts_bytes) {
                    return Err(Status::INVALID_FIELD.dnr());
                }
                let sgl = cmd.sgl();
                if u64::from(sgl.len) != xfer {
                    return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
                }
                if data_len > 0 {
                    if opc != io_opc::WRITE || data_len as u64 != xfer {
                        return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
                    }
                } else if sgl.id != SGL_ID_TRANSPORT_DATA_BLOCK {
                    return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID.dnr());
                }
                Ok(IoPlan::Bdev {
                    chan,
                    xfer: xfer as u32,
                    grp,
                    word,
                })
            }
        }
    }

    /// The group's fence word; observing it (for the barrier) if it moved.
    #[inline]
    pub(super) fn fence_word(&mut self, grp: u32) -> u64 {
        match &mut self.fence {
            Some(f) => f.load(&self.target.fence, grp),
            None => self.target.fence.word(grp),
        }
    }

    /// A write-class command goes into a bdev only under the fence it was
    /// admitted under (its R2T data may have taken long enough for an
    /// ownership change to pass). Counts it for the barrier if it goes.
    #[inline]
    pub(super) fn admit_write(&mut self, slot: u32) -> Result<(), Status> {
        let (grp, word) = {
            let s = &self.slots[slot as usize];
            (s.grp, s.fence_word)
        };
        let now = self.fence_word(grp);
        if now != word || !ctrlr::writable(now) {
            return Err(self.target.fence.fenced_status(grp));
        }
        if let Some(f) = &mut self.fence {
            f.write_submitted(grp);
        }
        self.slots[slot as usize].in_bdev_write = true;
        Ok(())
    }

    pub(super) fn submit_io(&mut self, slot: u32) {
        if is_write_class(self.slots[slot as usize].cmd.opcode())
            && let Err(st) = self.admit_write(slot)
        {
            let cmd = self.slots[slot as usize].cmd;
            self.release_slot(slot);
            return self.complete_err(&cmd, st);
        }
        let s = &mut self.slots[slot as usize];
        let cmd = s.cmd;
        let ch = &mut self.channels[s.chan];
        let op = match cmd.opcode() {
            io_opc::READ => IoOp::Read,
            io_opc::WRITE => IoOp::Write { fua: cmd.fua() },
            io_opc::FLUSH => IoOp::Flush,
            io_opc::WRITE_ZEROES => {
                // DEAC (CDW12 bit 25) lets us deallocate, which reads back as
                // zeros on every bdev we have.
                if cmd.cdw12() & (1 << 25) != 0 {
                    IoOp::Deallocate
                } else {
                    IoOp::WriteZeroes
                }
            }
            _ => IoOp::Flush,
        };
        let (offset_blocks, num_blocks) = match op {
            IoOp::Flush => (0, 0),
            _ => (cmd.slba(), u64::from(cmd.nlb())),
        };
        s.state = SlotState::Executing;
        s.pending = 1;
        if matches!(op, IoOp::Read) {
            self.read_bytes_in_flight += s.xfer_len as usize;
        }
        ch.chan.submit(BdevIo {
            tag: slot,
            op,
            offset_blocks,
            num_blocks,
            buf: s.buf.take(),
        });
    }

    /// Makes every request queued since the last call visible to the
    /// devices: one syscall per channel per batch.
    pub fn flush_submissions(&mut self) {
        for c in &mut self.channels {
            c.chan.flush_submissions();
        }
    }

    /// Drains bdev completions and controller events into the transmit
    /// queue. Registers `cx` with every source that has nothing ready.
    pub fn poll_completions(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        if let Some(f) = &mut self.fence {
            f.poll(&self.target.fence, cx.waker());
        }
        let mut done = std::mem::take(&mut self.completions);
        for c in &mut self.channels {
            if let Poll::Ready(()) = c.chan.poll_completions(cx, &mut done) {
                progress = true;
            }
        }
        if !done.is_empty() {
            // One clock read per batch, not per command.
            self.done_ns = self.clock.map_or(self.now_ns, |c| c());
        }
        for comp in done.drain(..) {
            self.on_bdev_completion(comp);
        }
        self.completions = done;
        // Completions give back R2T budget. Writes waiting for it must get
        // their R2T now: when every command the host has queued is either
        // in the device or waiting here, the host sends nothing more, and
        // the receive path (the other place that pumps) never runs again.
        self.pump_r2t();
        self.channels
            .retain(|c| !c.retired || c.chan.in_flight() > 0);
        if let Role2::Admin { ctrlr } = &self.role {
            let events = ctrlr.take_events();
            if !events.is_empty() {
                progress = true;
                for cpl in events {
                    self.send_cpl(cpl);
                }
            }
        }
        progress
    }

    /// Success stands only if the fence still allows it: for a write, the
    /// word it was submitted under, still writable (it may have reached the
    /// medium, but this node can no longer vouch for it: the host retries
    /// it on the new owner, and the barrier waited for it); for a read, the
    /// read bit.
    fn fence_completion(&mut self, tag: u32) {
        let s = &mut self.slots[tag as usize];
        let (grp, word, opc) = (s.grp, s.fence_word, s.cmd.opcode());
        let was_write = std::mem::take(&mut s.in_bdev_write);
        let now = self.fence_word(grp);
        if was_write && let Some(f) = &mut self.fence {
            f.write_done(&self.target.fence, grp, word);
        }
        let allowed = if was_write {
            now == word && ctrlr::writable(now)
        } else {
            opc != io_opc::READ || ctrlr::readable(now)
        };
        let s = &mut self.slots[tag as usize];
        if !allowed && s.status.is_success() {
            s.status = self.target.fence.fenced_status(grp);
        }
    }

    fn on_bdev_completion(&mut self, c: BdevCompletion) {
        let Some(s) = self.slots.get_mut(c.tag as usize) else {
            tracing::error!(tag = c.tag, "completion for unknown slot");
            return;
        };
        if let Some(b) = c.buf {
            s.buf = Some(b);
        }
        match c.result {
            Ok(()) => {}
            Err(IoError::Fenced) => s.status = self.target.fence.fenced_status(s.grp),
            Err(e) => s.status = io_error_status(e, s.cmd.opcode()),
        }
        s.pending = s.pending.saturating_sub(1);
        if s.pending > 0 {
            return;
        }
        self.fence_completion(c.tag);
        let s = &mut self.slots[c.tag as usize];
        let cmd = s.cmd;
        let status = s.status;
        let kind = match cmd.opcode() {
            io_opc::READ => IoKind::Read,
            io_opc::WRITE => IoKind::Write,
            io_opc::FLUSH => IoKind::Flush,
            io_opc::DATASET_MANAGEMENT => IoKind::Trim,
            _ => IoKind::WriteZeroes,
        };
        if let Some(ch) = self.channels.get(s.chan) {
            ch.stats.block().record(
                kind,
                u64::from(s.xfer_len),
                status.is_success(),
                self.done_ns.saturating_sub(s.start_ns),
            );
        }
        if cmd.opcode() == io_opc::READ {
            self.read_bytes_in_flight -= s.xfer_len as usize;
        }
        if status.is_success() && cmd.opcode() == io_opc::READ {
            let Some(buf) = s.buf.take() else {
                tracing::error!(tag = c.tag, "read completion without its buffer");
                self.release_slot(c.tag);
                return self.complete_err(&cmd, Status::INTERNAL_ERROR);
            };
            let len = s.xfer_len;
            self.release_slot(c.tag);
            self.send_read_data(cmd.cid(), buf, len);
            if self.sqflow_disabled {
                // C2HData with SUCCESS is this command's response.
                self.stats.responses += 1;
                return;
            }
            return self.send_cpl(NvmeCpl::success(cmd.cid()));
        }
        self.release_slot(c.tag);
        if status.is_success() {
            self.send_cpl(NvmeCpl::success(cmd.cid()));
        } else {
            self.complete_err(&cmd, status);
        }
    }
}
