//! Output: the transmit queue of responses, R2Ts and C2HData, drained by
//! the driver with one vectored write, and the bound on what the host owes.
//!
//! Exists so that every PDU the queue sends is accounted in one place
//! (`tx_bytes`, `stats.pdus_out`, `stats.responses`).
//!
//! Invariants:
//! * `tx_bytes` is the number of unsent bytes in `tx`.
//! * Read data is owned by its segment until sent, then returns to the pool.
//! * Input stops ([`QueuePair::wants_input`]) while queued output plus reads
//!   in devices exceed `QueueLimits::max_pending_output`.

use std::io::IoSlice;

use super::*;
use crate::spec::NvmeCpl;

/// One segment of the transmit queue.
pub(super) enum TxSeg {
    /// A PDU header, a data digest or a small PDU, stored inline so queueing
    /// a response allocates nothing.
    Inline { bytes: [u8; 128], len: u8, pos: u8 },
    /// Read data, owned until sent, then returned to the buffer pool.
    Data { buf: IoBuf, pos: u32, end: u32 },
    /// Admin data (cold path).
    Owned { data: Vec<u8>, pos: usize },
}

impl TxSeg {
    pub(super) fn remaining(&self) -> &[u8] {
        match self {
            TxSeg::Inline { bytes, len, pos } => &bytes[*pos as usize..*len as usize],
            TxSeg::Data { buf, pos, end } => &buf[*pos as usize..*end as usize],
            TxSeg::Owned { data, pos } => &data[*pos..],
        }
    }
}

pub(super) fn encode_into(dst: &mut [u8; 128], f: impl FnOnce(&mut Vec<u8>)) -> usize {
    // Header encoders append to a Vec; a small stack-sized Vec would still be
    // a heap allocation, so encode into a reusable thread-local scratch.
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(256));
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        s.clear();
        f(&mut s);
        let n = s.len().min(128);
        dst[..n].copy_from_slice(&s[..n]);
        n
    })
}

impl QueuePair {
    /// False while the host owes the queue too much output (or the queue is
    /// closing): the driver then reads nothing more from the socket, and
    /// `handle_input` stops at the next PDU boundary.
    pub fn wants_input(&self) -> bool {
        !self.stop_rx && self.tx_bytes + self.read_bytes_in_flight <= self.limits.max_pending_output
    }

    pub(super) fn push_inline(&mut self, data: &[u8]) {
        self.tx_bytes += data.len();
        let mut bytes = [0u8; 128];
        bytes[..data.len()].copy_from_slice(data);
        self.tx.push_back(TxSeg::Inline {
            bytes,
            len: data.len() as u8,
            pos: 0,
        });
        self.stats.pdus_out += 1;
    }

    pub(super) fn push_owned(&mut self, data: Vec<u8>) {
        self.tx_bytes += data.len();
        self.tx.push_back(TxSeg::Owned { data, pos: 0 });
        self.stats.pdus_out += 1;
    }

    pub(super) fn send_cpl(&mut self, mut cpl: NvmeCpl) {
        self.stats.responses += 1;
        cpl.sqhd = self.sqhd;
        cpl.sqid = self.qid().unwrap_or(0);
        let mut v = [0u8; 128];
        let n = encode_into(&mut v, |out| {
            pdu::encode_capsule_resp(&cpl, self.hdgst, out)
        });
        self.push_inline(&v[..n]);
    }

    pub(super) fn complete_err(&mut self, cmd: &NvmeCmd, status: Status) {
        self.stats.errors += 1;
        tracing::debug!(?cmd, ?status, "command failed");
        self.send_cpl(NvmeCpl::new(cmd.cid(), status));
    }

    fn c2h_header(&self, cccid: u16, len: u32) -> ([u8; 128], usize) {
        let h = pdu::C2HData {
            cccid,
            datao: 0,
            datal: len,
            last: true,
            success: self.sqflow_disabled,
        };
        let mut v = [0u8; 128];
        let n = encode_into(&mut v, |out| {
            pdu::encode_c2h_data(&h, self.hdgst, self.ddgst, out)
        });
        (v, n)
    }

    pub(super) fn send_read_data(&mut self, cccid: u16, buf: IoBuf, len: u32) {
        let (h, n) = self.c2h_header(cccid, len);
        self.push_inline(&h[..n]);
        let crc = self.ddgst.then(|| pdu::crc32c(&buf[..len as usize]));
        self.tx_bytes += len as usize;
        self.tx.push_back(TxSeg::Data {
            buf,
            pos: 0,
            end: len,
        });
        if let Some(crc) = crc {
            self.push_inline(&crc.to_le_bytes());
            self.stats.pdus_out -= 1;
        }
    }

    pub(super) fn send_c2h_owned(&mut self, cccid: u16, data: Vec<u8>) {
        let (h, n) = self.c2h_header(cccid, data.len() as u32);
        self.push_inline(&h[..n]);
        let crc = self.ddgst.then(|| pdu::crc32c(&data));
        self.tx_bytes += data.len();
        self.tx.push_back(TxSeg::Owned { data, pos: 0 });
        if let Some(crc) = crc {
            self.push_inline(&crc.to_le_bytes());
            self.stats.pdus_out -= 1;
        }
    }

    pub fn has_tx(&self) -> bool {
        !self.tx.is_empty()
    }

    /// Fills `out` with the pending transmit segments, in order, for one
    /// vectored write. Returns how many slices were filled.
    pub fn tx_slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (seg, slot) in self.tx.iter().zip(out.iter_mut()) {
            *slot = IoSlice::new(seg.remaining());
            n += 1;
        }
        n
    }

    /// Records that the first `n` bytes of the transmit queue were written.
    pub fn tx_advance(&mut self, mut n: usize) {
        let n0 = n.min(self.tx_bytes);
        self.tx_bytes -= n0;
        if n0 > 0 {
            self.tx_moved_ms = self.now_ms;
        }
        while n > 0 {
            let Some(seg) = self.tx.front_mut() else {
                return;
            };
            let rem = seg.remaining().len();
            if n < rem {
                match seg {
                    TxSeg::Inline { pos, .. } => *pos += n as u8,
                    TxSeg::Data { pos, .. } => *pos += n as u32,
                    TxSeg::Owned { pos, .. } => *pos += n,
                }
                return;
            }
            n -= rem;
            if let Some(TxSeg::Data { buf, .. }) = self.tx.pop_front() {
                self.pool.put(buf);
            }
        }
        // Zero-length segments (none are queued today) would be dropped here.
        while self.tx.front().is_some_and(|s| s.remaining().is_empty()) {
            if let Some(TxSeg::Data { buf, .. }) = self.tx.pop_front() {
                self.pool.put(buf);
            }
        }
    }

    /// Copies every pending transmit byte out (tests and the in-process
    /// benchmark use this instead of a socket).
    pub fn drain_tx(&mut self, out: &mut Vec<u8>) {
        let mut n = 0;
        for s in &self.tx {
            out.extend_from_slice(s.remaining());
            n += s.remaining().len();
        }
        self.tx_advance(n);
    }
}
