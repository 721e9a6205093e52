//! Dataset Management (NVM Command Set): range checks against the
//! namespace and the advertised DMRSL/DMSL, then one Deallocate per range.
//!
//! Exists apart from `io.rs` because its data is a range list parsed by the
//! queue (in-capsule, into `small_data`), not a block transfer.
//!
//! Invariants:
//! * One DSM command is one slot whatever its range count; it completes
//!   when the last range does (`Slot::pending`).
//! * Attributes other than Deallocate complete successfully without I/O
//!   (they are hints).

use super::*;
use crate::bdev::{BdevIo, IoOp};
use crate::spec::NvmeCpl;
use crate::spec::identify::NvmLimits;

impl QueuePair {
    pub(super) fn exec_dsm(&mut self, cmd: &NvmeCmd, data: &[u8]) {
        let nr = (cmd.cdw10() & 0xff) as usize + 1;
        let deallocate = cmd.cdw11() & (1 << 2) != 0;
        if data.len() < nr * 16 {
            return self.complete_err(cmd, Status::DATA_SGL_LENGTH_INVALID.dnr());
        }
        // The channel was resolved when the capsule was checked.
        let Ok(chan) = self.channel_for(cmd.nsid()) else {
            return self.complete_err(cmd, Status::INVALID_NAMESPACE.dnr());
        };
        let num_blocks = self.channels[chan].num_blocks;
        let mut ranges = [(0u64, 0u64); 256];
        let mut n = 0;
        let lim = NvmLimits::TARGET;
        let mut total = 0u64;
        for r in data[..nr * 16].chunks_exact(16) {
            let len = u64::from(u32::from_le_bytes(r[4..8].try_into().unwrap()));
            let slba = u64::from_le_bytes(r[8..16].try_into().unwrap());
            if len == 0 {
                continue;
            }
            match slba.checked_add(len) {
                Some(end) if end <= num_blocks => {}
                _ => return self.complete_err(cmd, Status::LBA_OUT_OF_RANGE.dnr()),
            }
            // The advertised DMRSL/DMSL keep one command bounded in time (an
            // objbacker TRIM is one DELETE per object).
            total += len;
            if deallocate && (len > u64::from(lim.dmrsl) || total > lim.dmsl) {
                return self.complete_err(cmd, Status::INVALID_FIELD.dnr());
            }
            ranges[n] = (slba, len);
            n += 1;
        }
        // Checked again here, not only when the capsule arrived: its data
        // may have come in later reads, across a fence change.
        let grp = self.channels[chan].anagrpid();
        let word = self.fence_word(grp);
        if !crate::ctrlr::writable(word) {
            return self.complete_err(cmd, self.target.fence.fenced_status(grp));
        }
        if !deallocate || n == 0 {
            return self.send_cpl(NvmeCpl::success(cmd.cid()));
        }
        let Some(slot) = self.alloc_slot(*cmd) else {
            return self.complete_err(cmd, Status::INTERNAL_ERROR);
        };
        let s = &mut self.slots[slot as usize];
        s.chan = chan;
        s.start_ns = self.now_ns;
        s.grp = grp;
        s.fence_word = word;
        if let Err(st) = self.admit_write(slot) {
            self.release_slot(slot);
            return self.complete_err(cmd, st);
        }
        let s = &mut self.slots[slot as usize];
        s.state = SlotState::Executing;
        s.pending = n as u32;
        for &(slba, len) in &ranges[..n] {
            self.channels[chan].chan.submit(BdevIo {
                tag: slot,
                op: IoOp::Deallocate,
                offset_blocks: slba,
                num_blocks: len,
                buf: None,
            });
        }
    }
}
