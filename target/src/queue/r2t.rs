//! Solicited write data: R2T issue under a byte budget, and H2CData checks.
//!
//! Exists because the memory a queue commits to host data is bounded here
//! and only here: a solicited write gets its buffer with its R2T, so
//! `QueueLimits::max_r2t_bytes` bounds what waits for the host.
//!
//! Invariants:
//! * R2Ts go out in arrival order (`r2t_wait` is FIFO); one transfer is
//!   always allowed, so a budget below MDTS cannot stall.
//! * `r2t_bytes` is the sum of `r2t_held` over all slots.
//! * H2CData must name a slot awaiting it (TTAG, CCCID), arrive in order,
//!   stay inside the R2T, and set LAST exactly on the final PDU; anything
//!   else ends the connection.

use super::*;
use rx::{AfterData, DataDest};
use tx::encode_into;

impl QueuePair {
    /// Queues a solicited write for its R2T, behind every write already
    /// waiting, so R2Ts go out in arrival order.
    pub(super) fn await_r2t(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        s.state = SlotState::AwaitingR2T;
        let xfer = s.xfer_len;
        if !self.r2t_wait.is_empty()
            || (self.r2t_bytes > 0 && self.r2t_bytes + xfer as usize > self.limits.max_r2t_bytes)
        {
            self.stats.r2t_deferred += 1;
            self.log_limit_once(
                Limit::R2tBytes,
                "R2T budget in use: writes wait for their R2T",
            );
        }
        self.r2t_wait.push_back(slot);
        self.pump_r2t();
    }

    /// Sends R2Ts to waiting writes, oldest first, while the budget allows.
    /// One transfer is always allowed, so a budget below MDTS cannot stall.
    pub(super) fn pump_r2t(&mut self) {
        while let Some(&slot) = self.r2t_wait.front() {
            let s = &self.slots[slot as usize];
            let xfer = s.xfer_len as usize;
            if self.r2t_bytes > 0 && self.r2t_bytes + xfer > self.limits.max_r2t_bytes {
                return;
            }
            self.r2t_wait.pop_front();
            self.start_r2t(slot);
        }
    }

    fn start_r2t(&mut self, slot: u32) {
        let buf = self.pool.get(self.slots[slot as usize].xfer_len as usize);
        let now = self.now_ms;
        let s = &mut self.slots[slot as usize];
        s.buf = Some(buf);
        s.state = SlotState::AwaitingH2C;
        s.r2t_held = s.xfer_len;
        s.r2t_ms = now;
        self.r2t_bytes += s.xfer_len as usize;
        let (cid, len) = (s.cmd.cid(), s.xfer_len);
        self.send_r2t(cid, slot as u16, len);
    }

    pub(super) fn on_h2c_data(
        &mut self,
        h: pdu::H2CData,
        skip: usize,
        data_len: usize,
        has_ddgst: bool,
    ) {
        let idx = h.ttag as u32;
        let ok = self
            .slots
            .get(idx as usize)
            .is_some_and(|s| s.state == SlotState::AwaitingH2C && s.cmd.cid() == h.cccid);
        if !ok {
            return self.terminate(FatalErrorStatus::InvalidHeaderField, 10);
        }
        let s = &self.slots[idx as usize];
        // Data must arrive in order and inside what the R2T asked for.
        if h.datao != s.received
            || u64::from(h.datao) + u64::from(h.datal) > u64::from(s.xfer_len)
            || h.datal as usize != data_len
        {
            return self.terminate(FatalErrorStatus::DataOutOfRange, 12);
        }
        let end = h.datao + h.datal;
        let last = end == s.xfer_len;
        if h.last != last {
            return self.terminate(FatalErrorStatus::InvalidHeaderField, 1);
        }
        self.slots[idx as usize].received = end;
        if last {
            self.slots[idx as usize].state = SlotState::InCapsuleData;
        }
        self.start_payload(
            skip,
            data_len,
            has_ddgst,
            DataDest::Slot {
                slot: idx,
                off: h.datao,
            },
            AfterData::H2C { slot: idx, last },
        )
    }

    fn send_r2t(&mut self, cccid: u16, ttag: u16, len: u32) {
        let r2t = pdu::R2T {
            cccid,
            ttag,
            r2to: 0,
            r2tl: len,
        };
        let mut v = [0u8; 128];
        let n = encode_into(&mut v, |out| pdu::encode_r2t(&r2t, self.hdgst, out));
        self.push_inline(&v[..n]);
    }
}
