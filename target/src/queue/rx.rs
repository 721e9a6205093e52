//! PDU receive: turns the byte stream into headers, payloads and digests.
//!
//! Exists so that framing is one state machine ([`Rx`]) with one owner:
//! every other part of the queue sees whole PDUs (`on_header`) and whole
//! payloads (`after_data`), never partial bytes.
//!
//! Invariants:
//! * Input is consumed only up to a PDU boundary while
//!   [`QueuePair::wants_input`] is false, so a host that does not read its
//!   answers stops being read.
//! * A payload goes to exactly one [`DataDest`]; a payload's digest is
//!   checked even when the data is discarded, so the stream stays in sync.
//! * `direct_rx` hands out only the unreceived rest of a slot's buffer.

use super::*;
use crate::pdu::PduHeader;

/// Payloads at least this large are read from the socket straight into
/// their command's buffer; smaller ones are cheaper to copy from the
/// receive buffer than to read with a syscall of their own.
pub(super) const DIRECT_RX_MIN: usize = 16 * 1024;

/// Where the payload of the PDU being received goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DataDest {
    /// Into the slot's buffer at this offset.
    Slot { slot: u32, off: u32 },
    /// Into `small_data` (Connect data, admin and DSM payloads).
    Small,
    /// Thrown away (a command already failed), digest still checked.
    Discard,
}

/// What to do once a payload (and its digest) has been received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AfterData {
    /// In-capsule data of a command that waits in `pending_capsule`.
    Capsule,
    /// H2CData for `slot`; `last` says the transfer is complete.
    H2C { slot: u32, last: bool },
    /// Nothing (TermReq payload, discarded data of a failed command).
    Nothing,
}

pub(super) enum Rx {
    Header,
    /// Skipping `skip` bytes of padding before the payload.
    Payload {
        skip: usize,
        remaining: usize,
        dest: DataDest,
        crc: u32,
        ddgst: bool,
        then: AfterData,
    },
    Digest {
        crc: u32,
        got: [u8; 4],
        have: usize,
        then: AfterData,
    },
}

/// Bytes of a PDU up to the end of its header digest: what the header state
/// consumes before padding (to PDO) and payload.
fn header_end(h: &PduHeader, hdgst: bool) -> usize {
    let dg = if hdgst { pdu::DIGEST_LEN } else { 0 };
    match h {
        PduHeader::ICReq(_) | PduHeader::ICResp(_) => pdu::ICREQ_LEN,
        // TermReqs never carry digests.
        PduHeader::H2CTermReq(_) | PduHeader::C2HTermReq(_) => pdu::TERM_REQ_HLEN,
        PduHeader::CapsuleCmd(_) => pdu::CAPSULE_CMD_HLEN + dg,
        PduHeader::CapsuleResp(_) => pdu::CAPSULE_RESP_HLEN + dg,
        PduHeader::H2CData(_) | PduHeader::C2HData(_) => pdu::DATA_HLEN + dg,
        PduHeader::R2T(_) => pdu::R2T_HLEN + dg,
    }
}

impl QueuePair {
    /// Consumes bytes from the socket. Returns how many were used; the
    /// driver keeps the rest (an incomplete header) and calls again with
    /// more appended.
    pub fn handle_input(&mut self, mut buf: &[u8], now_ms: u64) -> usize {
        let total = buf.len();
        self.now_ms = self.now_ms.max(now_ms);
        self.born_ms.get_or_insert(now_ms);
        // One view-generation check per batch of input, not per command.
        self.refresh_view();
        while !buf.is_empty() && !self.stop_rx {
            let used = match self.rx {
                Rx::Header if !self.wants_input() => {
                    self.stats.input_paused += 1;
                    self.log_limit_once(
                        Limit::PendingOutput,
                        "host owes too much output: input paused until it reads",
                    );
                    break;
                }
                Rx::Header => match pdu::parse_header(buf, &self.dcfg) {
                    Ok(None) => break,
                    Ok(Some(p)) => {
                        self.stats.pdus_in += 1;
                        let hend = header_end(&p.header, self.dcfg.hdgst);
                        let skip = p.data_offset.saturating_sub(hend);
                        self.on_header(p.header, skip, p.data_len, p.has_ddgst, now_ms);
                        hend
                    }
                    Err(e) => {
                        let n = buf.len().min(pdu::MAX_TERM_REQ_DATA);
                        let hdr = buf[..n].to_vec();
                        self.fatal(e, hdr);
                        break;
                    }
                },
                Rx::Payload { .. } | Rx::Digest { .. } => self.on_payload_bytes(buf),
            };
            buf = &buf[used..];
        }
        if let (Some(c), Some(qid)) = (self.ctrlr(), self.qid()) {
            c.touch(qid, now_ms);
        }
        self.pump_r2t();
        self.flush_submissions();
        self.debug_check();
        total - buf.len()
    }

    fn on_payload_bytes(&mut self, buf: &[u8]) -> usize {
        match &mut self.rx {
            Rx::Payload {
                skip,
                remaining,
                dest,
                crc,
                ddgst,
                ..
            } => {
                if *skip > 0 {
                    let n = (*skip).min(buf.len());
                    *skip -= n;
                    return n;
                }
                let n = (*remaining).min(buf.len());
                let chunk = &buf[..n];
                if *ddgst {
                    *crc = pdu::crc32c_append(*crc, chunk);
                }
                match dest {
                    DataDest::Slot { slot, off } => {
                        if let Some(b) = self
                            .slots
                            .get_mut(*slot as usize)
                            .and_then(|s| s.buf.as_mut())
                        {
                            let o = *off as usize;
                            b[o..o + n].copy_from_slice(chunk);
                        }
                        *off += n as u32;
                    }
                    DataDest::Small => self.small_data.extend_from_slice(chunk),
                    DataDest::Discard => {}
                }
                self.payload_advanced(n);
                n
            }
            Rx::Digest {
                crc,
                got,
                have,
                then,
            } => {
                let n = (4 - *have).min(buf.len());
                got[*have..*have + n].copy_from_slice(&buf[..n]);
                *have += n;
                if *have == 4 {
                    let ok = u32::from_le_bytes(*got) == *crc;
                    let then = *then;
                    self.rx = Rx::Header;
                    self.after_data(then, ok);
                }
                n
            }
            Rx::Header => 0,
        }
    }

    /// `n` payload bytes are in place (copied by `on_payload_bytes`, or read
    /// straight into the buffer through `direct_rx`).
    fn payload_advanced(&mut self, n: usize) {
        let Rx::Payload {
            remaining,
            crc,
            ddgst,
            then,
            ..
        } = &mut self.rx
        else {
            return;
        };
        *remaining -= n;
        if *remaining > 0 {
            return;
        }
        let then = *then;
        if *ddgst {
            let crc = *crc;
            self.rx = Rx::Digest {
                crc,
                got: [0; 4],
                have: 0,
                then,
            };
        } else {
            self.rx = Rx::Header;
            self.after_data(then, true);
        }
    }

    /// Where the socket may write payload bytes directly, skipping the
    /// receive buffer: the rest of a large data transfer into a command's
    /// buffer. `None` when the next bytes are headers, padding, digests or
    /// small payloads, which go through `handle_input`.
    pub fn direct_rx(&mut self) -> Option<&mut [u8]> {
        let Rx::Payload {
            skip: 0,
            remaining,
            dest: DataDest::Slot { slot, off },
            ..
        } = &self.rx
        else {
            return None;
        };
        if *remaining < DIRECT_RX_MIN {
            return None;
        }
        let (o, n) = (*off as usize, *remaining);
        let b = self.slots.get_mut(*slot as usize)?.buf.as_mut()?;
        b.get_mut(o..o + n)
    }

    /// Records that `n` bytes were read into the slice `direct_rx` gave.
    pub fn direct_rx_done(&mut self, n: usize) {
        let Rx::Payload {
            dest: DataDest::Slot { slot, off },
            crc,
            ddgst,
            remaining,
            ..
        } = &mut self.rx
        else {
            return;
        };
        let n = n.min(*remaining);
        if *ddgst && let Some(b) = self.slots.get(*slot as usize).and_then(|s| s.buf.as_ref()) {
            let o = *off as usize;
            *crc = pdu::crc32c_append(*crc, &b[o..o + n]);
        }
        *off += n as u32;
        self.payload_advanced(n);
        self.flush_submissions();
    }

    /// Fails `cmd` and still consumes its in-capsule data (digest
    /// checked), so the stream stays framed.
    pub(super) fn refuse_capsule(
        &mut self,
        cmd: &NvmeCmd,
        status: Status,
        skip: usize,
        len: usize,
        ddgst: bool,
    ) {
        self.complete_err(cmd, status);
        self.start_payload(skip, len, ddgst, DataDest::Discard, AfterData::Nothing);
    }

    /// Receives `cmd`'s in-capsule data into `small_data`; `after_data`
    /// runs the command once it (and its digest) arrived.
    pub(super) fn receive_small_capsule(
        &mut self,
        cmd: NvmeCmd,
        skip: usize,
        len: usize,
        ddgst: bool,
    ) {
        self.small_data.clear();
        self.pending_capsule = Some(cmd);
        self.start_payload(skip, len, ddgst, DataDest::Small, AfterData::Capsule);
    }

    pub(super) fn start_payload(
        &mut self,
        skip: usize,
        len: usize,
        ddgst: bool,
        dest: DataDest,
        then: AfterData,
    ) {
        if len == 0 {
            self.rx = Rx::Header;
            self.after_data(then, true);
            return;
        }
        self.rx = Rx::Payload {
            skip,
            remaining: len,
            dest,
            crc: 0,
            ddgst,
            then,
        };
    }

    fn on_header(
        &mut self,
        hdr: PduHeader,
        skip: usize,
        data_len: usize,
        has_ddgst: bool,
        now_ms: u64,
    ) {
        match hdr {
            PduHeader::ICReq(req) => self.on_icreq(req),
            PduHeader::CapsuleCmd(cmd) => self.on_capsule(cmd, skip, data_len, has_ddgst, now_ms),
            PduHeader::H2CData(h) => self.on_h2c_data(h, skip, data_len, has_ddgst),
            PduHeader::H2CTermReq(t) => {
                tracing::warn!(port = self.port_id, fes = ?t.fes, fei = t.fei, "host terminated the connection");
                self.close = Some(CloseReason::HostTerminated);
                self.stop_rx = true;
            }
            // The codec rejects every other type for the target role.
            other => {
                tracing::error!(?other, "codec passed a PDU type the target cannot receive");
                self.terminate(FatalErrorStatus::InvalidHeaderField, 0);
            }
        }
    }
}
