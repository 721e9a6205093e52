//! The NVMe/TCP queue pair: one TCP connection, as a sans-IO state machine.
//!
//! Bytes from the socket go in through [`QueuePair::handle_input`]; bdev
//! completions through [`QueuePair::poll_completions`]; what must be sent
//! comes out as a list of segments ([`QueuePair::tx_slices`] /
//! [`QueuePair::tx_advance`]) that the driver writes with one `writev`.
//! The queue never reads a clock (time arrives as `now_ms`) and never touches
//! a socket, so every path, including every malformed input, is unit-tested
//! against an in-memory peer.
//!
//! Each command occupies a [`Slot`] whose index is the bdev tag and the R2T
//! transfer tag, so completions and H2CData find their command without a map.
//! Slots, the transmit queue and data buffers are allocated once and reused:
//! steady-state I/O allocates nothing.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::bdev::{BdevChannel, BdevCompletion, BdevIo, BufPool, IoBuf, IoError, IoOp};
use crate::ctrlr::{self, AdminResult, Connected, Ctrlr, IoView};
use crate::pdu::{self, DecodeConfig, FatalErrorStatus, PduError, PduHeader, PduType, Role};
use crate::spec::{
    NvmeCmd, NvmeCpl, SGL_ID_DATA_BLOCK_OFFSET, SGL_ID_TRANSPORT_DATA_BLOCK, Status, admin_opc,
    fctype, io_opc,
};
use crate::subsystem::{AnaState, Target};

/// Payloads at least this large are read from the socket straight into
/// their command's buffer; smaller ones are cheaper to copy from the
/// receive buffer than to read with a syscall of their own.
const DIRECT_RX_MIN: usize = 16 * 1024;

/// Limits every queue pair enforces; the controller advertises the same
/// values in Identify and ICResp.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub in_capsule_data: u32,
    pub maxh2cdata: u32,
    pub mdts_bytes: u32,
    /// Commands a queue may hold beyond its SQ size before it is a protocol
    /// violation (hosts may briefly exceed it while a completion is in
    /// flight on the wire).
    pub max_slots: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            in_capsule_data: ctrlr::IN_CAPSULE_DATA_SIZE,
            maxh2cdata: ctrlr::MAXH2CDATA,
            mdts_bytes: ctrlr::MDTS_BYTES,
            max_slots: 4096,
        }
    }
}

/// One segment of the transmit queue.
enum TxSeg {
    /// A PDU header, a data digest or a small PDU, stored inline so queueing
    /// a response allocates nothing.
    Inline { bytes: [u8; 128], len: u8, pos: u8 },
    /// Read data, owned until sent, then returned to the buffer pool.
    Data { buf: IoBuf, pos: u32, end: u32 },
    /// Admin data (cold path).
    Owned { data: Vec<u8>, pos: usize },
}

impl TxSeg {
    fn remaining(&self) -> &[u8] {
        match self {
            TxSeg::Inline { bytes, len, pos } => &bytes[*pos as usize..*len as usize],
            TxSeg::Data { buf, pos, end } => &buf[*pos as usize..*end as usize],
            TxSeg::Owned { data, pos } => &data[*pos..],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Capsule received; in-capsule data still arriving.
    InCapsuleData,
    /// R2T sent; H2CData arriving.
    AwaitingH2C,
    /// Submitted to the bdev; `pending` completions outstanding.
    Executing,
}

struct Slot {
    state: SlotState,
    cmd: NvmeCmd,
    buf: Option<IoBuf>,
    xfer_len: u32,
    received: u32,
    pending: u32,
    status: Status,
    /// Index into `channels` of the namespace the command targets.
    chan: usize,
}

impl Slot {
    fn free() -> Self {
        Self {
            state: SlotState::Free,
            cmd: NvmeCmd::default(),
            buf: None,
            xfer_len: 0,
            received: 0,
            pending: 0,
            status: Status::SUCCESS,
            chan: 0,
        }
    }
}

/// Where the payload of the PDU being received goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataDest {
    /// Into the slot's buffer at this offset.
    Slot { slot: u32, off: u32 },
    /// Into `small_data` (Connect data, admin and DSM payloads).
    Small,
    /// Thrown away (a command already failed), digest still checked.
    Discard,
}

/// What to do once a payload (and its digest) has been received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterData {
    /// In-capsule data of a command that waits in `pending_capsule`.
    Capsule,
    /// H2CData for `slot`; `last` says the transfer is complete.
    H2C { slot: u32, last: bool },
    /// Nothing (TermReq payload, discarded data of a failed command).
    Nothing,
}

enum Rx {
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

enum Role2 {
    /// Before ICReq.
    AwaitIcReq,
    /// ICReq done; the next capsule must be Connect.
    AwaitConnect,
    Admin {
        ctrlr: Arc<Ctrlr>,
    },
    Io {
        ctrlr: Arc<Ctrlr>,
        qid: u16,
        view: Arc<IoView>,
    },
}

/// A per-queue bdev channel for one namespace.
struct NsChannel {
    nsid: u32,
    block_size: u32,
    num_blocks: u64,
    ana_state: AnaState,
    /// Identity of the bdev, to notice a namespace swapped by a reload.
    bdev_id: usize,
    chan: Box<dyn BdevChannel>,
    /// Still has I/O in flight but no longer serves new commands.
    retired: bool,
}

/// Counters the driver exports and the tests assert on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub commands: u64,
    pub errors: u64,
    pub pdus_in: u64,
    pub pdus_out: u64,
}

/// Why a queue pair ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The host sent a malformed PDU; a C2HTermReq was queued.
    Fatal(PduError),
    /// The host sent an H2CTermReq.
    HostTerminated,
    /// Disconnect command, controller destroyed, or keep-alive expiry.
    Disconnected(&'static str),
}

pub struct QueuePair {
    target: Arc<Target>,
    port_id: u16,
    limits: QueueLimits,
    role: Role2,
    dcfg: DecodeConfig,
    hdgst: bool,
    ddgst: bool,
    /// The host disabled SQ flow control: reads may complete with
    /// C2HData's SUCCESS flag and no CapsuleResp.
    sqflow_disabled: bool,
    sqsize: u16,
    sqhd: u16,
    rx: Rx,
    /// Capsule whose in-capsule data is being received.
    pending_capsule: Option<NvmeCmd>,
    pending_capsule_slot: Option<u32>,
    small_data: Vec<u8>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    channels: Vec<NsChannel>,
    pool: BufPool,
    tx: VecDeque<TxSeg>,
    completions: Vec<BdevCompletion>,
    close: Option<CloseReason>,
    /// After a fatal error nothing more is parsed; the TermReq drains and the
    /// driver closes.
    stop_rx: bool,
    pub stats: QueueStats,
}

fn dir_h2c(opcode: u8) -> bool {
    opcode & 0x3 == 0x1
}

impl QueuePair {
    pub fn new(target: Arc<Target>, port_id: u16, limits: QueueLimits) -> Self {
        Self {
            target,
            port_id,
            limits,
            role: Role2::AwaitIcReq,
            dcfg: DecodeConfig::initial(Role::Target),
            hdgst: false,
            ddgst: false,
            sqflow_disabled: false,
            sqsize: 31,
            sqhd: 0,
            rx: Rx::Header,
            pending_capsule: None,
            pending_capsule_slot: None,
            small_data: Vec::with_capacity(limits.in_capsule_data as usize),
            slots: Vec::new(),
            free_slots: Vec::new(),
            channels: Vec::new(),
            pool: BufPool::new(256),
            tx: VecDeque::with_capacity(256),
            completions: Vec::with_capacity(256),
            close: None,
            stop_rx: false,
            stats: QueueStats::default(),
        }
    }

    /// The controller this queue belongs to, once connected.
    pub fn ctrlr(&self) -> Option<&Arc<Ctrlr>> {
        match &self.role {
            Role2::Admin { ctrlr } | Role2::Io { ctrlr, .. } => Some(ctrlr),
            _ => None,
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self.role, Role2::Admin { .. })
    }

    pub fn qid(&self) -> Option<u16> {
        match &self.role {
            Role2::Admin { .. } => Some(0),
            Role2::Io { qid, .. } => Some(*qid),
            _ => None,
        }
    }

    /// Set once the queue must end. The driver sends what is queued (a
    /// TermReq or the last completion), then closes the socket.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.close.as_ref()
    }

    /// Requests still owned by a bdev; the driver waits for these before it
    /// drops the queue, because the device may still write into the buffers.
    pub fn in_flight(&self) -> usize {
        self.channels.iter().map(|c| c.chan.in_flight()).sum()
    }

    /// Data buffer allocations so far; flat once the queue is warm.
    pub fn buffer_allocations(&self) -> u64 {
        self.pool.allocations()
    }

    // ------------------------------------------------------------------
    // Input.

    /// Consumes bytes from the socket. Returns how many were used; the
    /// driver keeps the rest (an incomplete header) and calls again with
    /// more appended.
    pub fn handle_input(&mut self, mut buf: &[u8], now_ms: u64) -> usize {
        let total = buf.len();
        while !buf.is_empty() && !self.stop_rx {
            let used = match self.rx {
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
        if let Some(c) = self.ctrlr() {
            c.touch(now_ms);
        }
        self.flush_submissions();
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

    fn start_payload(
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

    /// Ends the connection for a PDU that was well-formed but violated the
    /// protocol state (sequence, transfer tags, data ranges).
    fn terminate(&mut self, fes: FatalErrorStatus, fei: u32) {
        self.fatal(PduError { fes, fei }, Vec::new());
    }

    fn fatal(&mut self, e: PduError, hdr: Vec<u8>) {
        tracing::warn!(port = self.port_id, fes = ?e.fes, fei = e.fei, "malformed PDU from host: terminating connection");
        let mut out = Vec::with_capacity(128);
        pdu::encode_term_req(
            PduType::C2HTermReq,
            &pdu::TermReq {
                fes: e.fes,
                fei: e.fei,
                hdr,
            },
            &mut out,
        );
        self.push_owned(out);
        self.close = Some(CloseReason::Fatal(e));
        self.stop_rx = true;
    }

    fn on_icreq(&mut self, req: pdu::ICReq) {
        if !matches!(self.role, Role2::AwaitIcReq) {
            return self.terminate(FatalErrorStatus::PduSequenceError, 0);
        }
        if req.pfv != 0 {
            return self.terminate(FatalErrorStatus::UnsupportedParameter, 8);
        }
        // We place C2H data right after the header (PDO = HLEN + HDGST), which
        // satisfies only HPDA 0; every host we know sends 0.
        if req.hpda != 0 {
            return self.terminate(FatalErrorStatus::UnsupportedParameter, 10);
        }
        self.hdgst = req.hdgst;
        self.ddgst = req.ddgst;
        let resp = pdu::ICResp {
            pfv: 0,
            cpda: 0,
            hdgst: req.hdgst,
            ddgst: req.ddgst,
            maxh2cdata: self.limits.maxh2cdata,
        };
        let mut b = [0u8; 128];
        let mut v = Vec::with_capacity(128);
        pdu::encode_icresp(&resp, &mut v);
        b[..v.len()].copy_from_slice(&v);
        self.push_inline(&b[..v.len()]);
        self.dcfg = DecodeConfig {
            role: Role::Target,
            hdgst: req.hdgst,
            ddgst: req.ddgst,
            max_data: self.limits.in_capsule_data.max(self.limits.maxh2cdata),
            connected: true,
        };
        self.role = Role2::AwaitConnect;
    }

    // ------------------------------------------------------------------
    // Capsules.

    fn on_capsule(
        &mut self,
        cmd: NvmeCmd,
        skip: usize,
        data_len: usize,
        has_ddgst: bool,
        now_ms: u64,
    ) {
        self.stats.commands += 1;
        self.sqhd = if self.sqsize == 0 {
            0
        } else {
            (self.sqhd + 1) % (self.sqsize + 1)
        };
        // The codec bounds every payload by the larger of the two limits;
        // capsules have the smaller one.
        if data_len > self.limits.in_capsule_data as usize {
            return self.terminate(FatalErrorStatus::DataLimitExceeded, 0);
        }
        let sgl = cmd.sgl();
        // In-capsule data must be described by an offset data block SGL of
        // exactly that length; anything else is a malformed command whose
        // data we still consume so the stream stays in sync.
        if data_len > 0
            && (sgl.id != SGL_ID_DATA_BLOCK_OFFSET || sgl.len as usize != data_len || sgl.addr != 0)
        {
            self.complete_err(&cmd, Status::INVALID_SGL_DESCRIPTOR.dnr());
            return self.start_payload(
                skip,
                data_len,
                has_ddgst,
                DataDest::Discard,
                AfterData::Nothing,
            );
        }
        match &self.role {
            Role2::AwaitIcReq => unreachable_state(),
            Role2::AwaitConnect => {
                if cmd.opcode() != admin_opc::FABRICS || cmd.fctype() != fctype::CONNECT {
                    self.complete_err(&cmd, Status::COMMAND_SEQUENCE_ERROR.dnr());
                    return self.start_payload(
                        skip,
                        data_len,
                        has_ddgst,
                        DataDest::Discard,
                        AfterData::Nothing,
                    );
                }
                if data_len == 0 {
                    // Connect data always fits in-capsule; a host that asks
                    // for an R2T is not following the transport binding.
                    self.complete_err(&cmd, Status::DATA_SGL_LENGTH_INVALID.dnr());
                    return;
                }
                self.small_data.clear();
                self.pending_capsule = Some(cmd);
                let _ = now_ms;
                self.start_payload(
                    skip,
                    data_len,
                    has_ddgst,
                    DataDest::Small,
                    AfterData::Capsule,
                )
            }
            Role2::Admin { .. } => {
                if data_len > 0 {
                    self.small_data.clear();
                    self.pending_capsule = Some(cmd);
                    return self.start_payload(
                        skip,
                        data_len,
                        has_ddgst,
                        DataDest::Small,
                        AfterData::Capsule,
                    );
                }
                if dir_h2c(cmd.opcode()) && sgl.len > 0 && !is_fabrics_without_data(&cmd) {
                    // Admin commands with host data larger than in-capsule
                    // do not exist in the command set we implement.
                    return self.complete_err(&cmd, Status::INVALID_FIELD.dnr());
                }
                self.exec_admin(&cmd, &[], now_ms);
            }
            Role2::Io { .. } => self.on_io_capsule(cmd, skip, data_len, has_ddgst),
        }
    }

    /// Runs after a payload (and its digest) has fully arrived.
    fn after_data(&mut self, then: AfterData, digest_ok: bool) {
        match then {
            AfterData::Nothing => {}
            AfterData::Capsule => {
                let Some(cmd) = self.pending_capsule.take() else {
                    return;
                };
                let slot = self.pending_capsule_slot.take();
                if !digest_ok {
                    // SPDK's answer, and what the host retries: the command
                    // fails with a transient transport error, the connection lives.
                    if let Some(s) = slot {
                        self.release_slot(s);
                    }
                    return self.complete_err(&cmd, Status::TRANSIENT_TRANSPORT_ERROR);
                }
                match slot {
                    Some(s) => self.submit_io(s),
                    None => {
                        let data = std::mem::take(&mut self.small_data);
                        match self.role {
                            Role2::AwaitConnect => self.on_connect(&cmd, &data),
                            Role2::Admin { .. } => self.exec_admin(&cmd, &data, 0),
                            Role2::Io { .. } => self.exec_dsm(&cmd, &data),
                            Role2::AwaitIcReq => {}
                        }
                        self.small_data = data;
                        self.small_data.clear();
                    }
                }
            }
            AfterData::H2C { slot, last } => {
                if !digest_ok {
                    let cmd = self.slots[slot as usize].cmd;
                    self.release_slot(slot);
                    return self.complete_err(&cmd, Status::TRANSIENT_TRANSPORT_ERROR);
                }
                if last {
                    self.submit_io(slot);
                }
            }
        }
    }

    fn on_connect(&mut self, cmd: &NvmeCmd, data: &[u8]) {
        match ctrlr::connect(&self.target, self.port_id, cmd, data, 0) {
            Ok((connected, mut cpl)) => {
                self.sqsize = (cmd.cdw11() & 0xffff) as u16;
                self.sqflow_disabled = (cmd.cdw11() >> 16) & 0x4 != 0;
                self.sqhd = 1 % (self.sqsize.max(1) + 1);
                let depth = (self.sqsize as usize + 1).min(self.limits.max_slots);
                self.slots = (0..depth).map(|_| Slot::free()).collect();
                self.free_slots = (0..depth as u32).rev().collect();
                self.role = match connected {
                    Connected::Admin { ctrlr } => {
                        tracing::info!(
                            cntlid = ctrlr.cntlid(),
                            subnqn = ctrlr.subnqn(),
                            hostnqn = ctrlr.hostnqn(),
                            port = self.port_id,
                            "admin queue connected"
                        );
                        Role2::Admin { ctrlr }
                    }
                    Connected::Io { ctrlr, qid, .. } => {
                        tracing::debug!(cntlid = ctrlr.cntlid(), qid, "I/O queue connected");
                        let view = ctrlr.io_view();
                        Role2::Io { ctrlr, qid, view }
                    }
                };
                cpl.cid = cmd.cid();
                self.send_cpl(cpl);
            }
            Err(mut cpl) => {
                tracing::warn!(status = ?cpl.status, "connect refused");
                cpl.cid = cmd.cid();
                self.stats.errors += 1;
                self.send_cpl(cpl);
            }
        }
    }

    fn exec_admin(&mut self, cmd: &NvmeCmd, data: &[u8], now_ms: u64) {
        let Role2::Admin { ctrlr } = &self.role else {
            return;
        };
        let ctrlr = ctrlr.clone();
        match ctrlr.exec_admin(cmd, data, now_ms) {
            AdminResult::Complete { mut cpl, data } => {
                cpl.cid = cmd.cid();
                if !cpl.status.is_success() {
                    // What hosts ask for that we do not do: the interop
                    // suite collects these lines.
                    tracing::info!(
                        opc = format_args!("{:#04x}", cmd.opcode()),
                        fctype = cmd.fctype(),
                        cdw10 = format_args!("{:#x}", cmd.cdw10()),
                        status = ?cpl.status,
                        "admin command refused"
                    );
                }
                if !data.is_empty() && cpl.status.is_success() {
                    let want = cmd.sgl().len as usize;
                    let mut data = data;
                    data.truncate(want);
                    if !data.is_empty() {
                        self.send_c2h_owned(cmd.cid(), data);
                    }
                }
                let disconnect =
                    cmd.opcode() == admin_opc::FABRICS && cmd.fctype() == fctype::DISCONNECT;
                self.send_cpl(cpl);
                if disconnect {
                    self.close = Some(CloseReason::Disconnected("Disconnect command"));
                    self.stop_rx = true;
                }
            }
            AdminResult::Deferred => {}
        }
    }

    // ------------------------------------------------------------------
    // I/O commands.

    fn refresh_view(&mut self) {
        let Role2::Io { ctrlr, view, .. } = &mut self.role else {
            return;
        };
        if view.generation == self.target.generation() {
            return;
        }
        *view = ctrlr.io_view();
        let view = view.clone();
        for ch in &mut self.channels {
            match view.get(ch.nsid) {
                Some(ns) if Arc::as_ptr(&ns.bdev) as *const () as usize == ch.bdev_id => {
                    ch.ana_state = ns.ana_state;
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
    fn channel_for(&mut self, nsid: u32) -> Result<usize, Status> {
        if let Some(i) = self
            .channels
            .iter()
            .position(|c| c.nsid == nsid && !c.retired)
        {
            return Ok(i);
        }
        let Role2::Io { view, .. } = &self.role else {
            return Err(Status::INVALID_OPCODE.dnr());
        };
        let ns = view.get(nsid).ok_or(Status::INVALID_NAMESPACE.dnr())?;
        let info = ns.bdev.info().clone();
        let bdev_id = Arc::as_ptr(&ns.bdev) as *const () as usize;
        let ana_state = ns.ana_state;
        let chan = ns.bdev.clone().open_channel().map_err(|e| {
            tracing::error!(nsid, error = %e, "cannot open bdev channel");
            Status::INTERNAL_ERROR
        })?;
        self.channels.push(NsChannel {
            nsid,
            block_size: info.block_size,
            num_blocks: info.num_blocks,
            ana_state,
            bdev_id,
            chan,
            retired: false,
        });
        Ok(self.channels.len() - 1)
    }

    fn alloc_slot(&mut self, cmd: NvmeCmd) -> Option<u32> {
        let idx = match self.free_slots.pop() {
            Some(i) => i,
            None if self.slots.len() < self.limits.max_slots => {
                self.slots.push(Slot::free());
                (self.slots.len() - 1) as u32
            }
            None => return None,
        };
        let s = &mut self.slots[idx as usize];
        debug_assert_eq!(s.state, SlotState::Free);
        s.cmd = cmd;
        s.received = 0;
        s.pending = 0;
        s.status = Status::SUCCESS;
        Some(idx)
    }

    fn release_slot(&mut self, idx: u32) {
        let s = &mut self.slots[idx as usize];
        if s.state == SlotState::Free {
            return;
        }
        s.state = SlotState::Free;
        if let Some(b) = s.buf.take() {
            self.pool.put(b);
        }
        self.free_slots.push(idx);
    }

    fn on_io_capsule(&mut self, cmd: NvmeCmd, skip: usize, data_len: usize, has_ddgst: bool) {
        self.refresh_view();
        match self.check_io(&cmd, data_len) {
            Err(st) => {
                self.complete_err(&cmd, st);
                self.start_payload(
                    skip,
                    data_len,
                    has_ddgst,
                    DataDest::Discard,
                    AfterData::Nothing,
                )
            }
            Ok(IoPlan::Dsm) => {
                if data_len == 0 {
                    return self.complete_err(&cmd, Status::DATA_SGL_LENGTH_INVALID.dnr());
                }
                self.small_data.clear();
                self.pending_capsule = Some(cmd);
                self.start_payload(
                    skip,
                    data_len,
                    has_ddgst,
                    DataDest::Small,
                    AfterData::Capsule,
                )
            }
            Ok(IoPlan::Disconnect) => {
                self.send_cpl(NvmeCpl::success(cmd.cid()));
                self.close = Some(CloseReason::Disconnected("Disconnect command"));
                self.stop_rx = true;
            }
            Ok(IoPlan::Bdev { chan, xfer }) => {
                let Some(slot) = self.alloc_slot(cmd) else {
                    self.terminate(FatalErrorStatus::PduSequenceError, 0);
                    return;
                };
                let buf = if xfer > 0 {
                    Some(self.pool.get(xfer as usize))
                } else {
                    None
                };
                let s = &mut self.slots[slot as usize];
                s.chan = chan;
                s.buf = buf;
                s.xfer_len = xfer;
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
                        s.state = SlotState::AwaitingH2C;
                        self.send_r2t(cmd.cid(), slot as u16, xfer);
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
        let ch = &self.channels[chan];
        match ch.ana_state {
            AnaState::Optimized | AnaState::NonOptimized => {}
            AnaState::Inaccessible => return Err(Status::ANA_INACCESSIBLE),
            AnaState::PersistentLoss => return Err(Status::ANA_PERSISTENT_LOSS),
            AnaState::Change => return Err(Status::ANA_TRANSITION),
        }
        match opc {
            io_opc::FLUSH => Ok(IoPlan::Bdev { chan, xfer: 0 }),
            io_opc::DATASET_MANAGEMENT => Ok(IoPlan::Dsm),
            _ => {
                let nlb = u64::from(cmd.nlb());
                match cmd.slba().checked_add(nlb) {
                    Some(end) if end <= ch.num_blocks => {}
                    _ => return Err(Status::LBA_OUT_OF_RANGE.dnr()),
                }
                if opc == io_opc::WRITE_ZEROES {
                    return Ok(IoPlan::Bdev { chan, xfer: 0 });
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
                })
            }
        }
    }

    fn on_h2c_data(&mut self, h: pdu::H2CData, skip: usize, data_len: usize, has_ddgst: bool) {
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

    fn submit_io(&mut self, slot: u32) {
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
        ch.chan.submit(BdevIo {
            tag: slot,
            op,
            offset_blocks,
            num_blocks,
            buf: s.buf.take(),
        });
    }

    fn exec_dsm(&mut self, cmd: &NvmeCmd, data: &[u8]) {
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
            ranges[n] = (slba, len);
            n += 1;
        }
        if !deallocate || n == 0 {
            return self.send_cpl(NvmeCpl::success(cmd.cid()));
        }
        let Some(slot) = self.alloc_slot(*cmd) else {
            return self.complete_err(cmd, Status::INTERNAL_ERROR);
        };
        let s = &mut self.slots[slot as usize];
        s.chan = chan;
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

    /// Makes every request queued since the last call visible to the
    /// devices: one syscall per channel per batch.
    pub fn flush_submissions(&mut self) {
        for c in &mut self.channels {
            c.chan.flush_submissions();
        }
    }

    // ------------------------------------------------------------------
    // Completions and events.

    /// Drains bdev completions and controller events into the transmit
    /// queue. Registers `cx` with every source that has nothing ready.
    pub fn poll_completions(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut done = std::mem::take(&mut self.completions);
        for c in &mut self.channels {
            if let Poll::Ready(()) = c.chan.poll_completions(cx, &mut done) {
                progress = true;
            }
        }
        for comp in done.drain(..) {
            self.on_bdev_completion(comp);
        }
        self.completions = done;
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

    fn on_bdev_completion(&mut self, c: BdevCompletion) {
        let Some(s) = self.slots.get_mut(c.tag as usize) else {
            tracing::error!(tag = c.tag, "completion for unknown slot");
            return;
        };
        if let Some(b) = c.buf {
            s.buf = Some(b);
        }
        if let Err(e) = c.result {
            s.status = io_error_status(e, s.cmd.opcode());
        }
        s.pending = s.pending.saturating_sub(1);
        if s.pending > 0 {
            return;
        }
        let cmd = s.cmd;
        let status = s.status;
        if status.is_success() && cmd.opcode() == io_opc::READ {
            let buf = s.buf.take().expect("read completion carries its buffer");
            let len = s.xfer_len;
            self.release_slot(c.tag);
            self.send_read_data(cmd.cid(), buf, len);
            if self.sqflow_disabled {
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

    /// Periodic checks the driver runs about once a second.
    pub fn on_tick(&mut self, now_ms: u64) {
        match &self.role {
            Role2::Admin { ctrlr } => {
                if ctrlr.kato_expired(now_ms) {
                    tracing::warn!(
                        cntlid = ctrlr.cntlid(),
                        hostnqn = ctrlr.hostnqn(),
                        "keep-alive timeout: destroying controller"
                    );
                    ctrlr.destroy();
                    self.close = Some(CloseReason::Disconnected("keep-alive timeout"));
                    self.stop_rx = true;
                } else if ctrlr.is_destroyed() {
                    self.close = Some(CloseReason::Disconnected("controller destroyed"));
                    self.stop_rx = true;
                }
            }
            Role2::Io { ctrlr, .. } => {
                if ctrlr.is_destroyed() {
                    self.close = Some(CloseReason::Disconnected("controller destroyed"));
                    self.stop_rx = true;
                } else {
                    self.refresh_view();
                }
            }
            _ => {}
        }
    }

    /// The connection went away: a dynamic controller lives exactly as long
    /// as its admin queue.
    pub fn on_disconnect(&mut self) {
        match &self.role {
            Role2::Admin { ctrlr } => {
                tracing::info!(
                    cntlid = ctrlr.cntlid(),
                    hostnqn = ctrlr.hostnqn(),
                    "admin queue closed: controller released"
                );
                ctrlr.destroy();
            }
            // Frees the QID so the host can reconnect it after a transport error.
            Role2::Io { ctrlr, qid, .. } => ctrlr.release_io_queue(*qid),
            _ => {}
        }
    }

    // ------------------------------------------------------------------
    // Output.

    fn push_inline(&mut self, data: &[u8]) {
        let mut bytes = [0u8; 128];
        bytes[..data.len()].copy_from_slice(data);
        self.tx.push_back(TxSeg::Inline {
            bytes,
            len: data.len() as u8,
            pos: 0,
        });
        self.stats.pdus_out += 1;
    }

    fn push_owned(&mut self, data: Vec<u8>) {
        self.tx.push_back(TxSeg::Owned { data, pos: 0 });
        self.stats.pdus_out += 1;
    }

    fn send_cpl(&mut self, mut cpl: NvmeCpl) {
        cpl.sqhd = self.sqhd;
        cpl.sqid = self.qid().unwrap_or(0);
        let mut v = [0u8; 128];
        let n = encode_into(&mut v, |out| {
            pdu::encode_capsule_resp(&cpl, self.hdgst, out)
        });
        self.push_inline(&v[..n]);
    }

    fn complete_err(&mut self, cmd: &NvmeCmd, status: Status) {
        self.stats.errors += 1;
        tracing::debug!(?cmd, ?status, "command failed");
        self.send_cpl(NvmeCpl::new(cmd.cid(), status));
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

    fn send_read_data(&mut self, cccid: u16, buf: IoBuf, len: u32) {
        let (h, n) = self.c2h_header(cccid, len);
        self.push_inline(&h[..n]);
        let crc = self.ddgst.then(|| pdu::crc32c(&buf[..len as usize]));
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

    fn send_c2h_owned(&mut self, cccid: u16, data: Vec<u8>) {
        let (h, n) = self.c2h_header(cccid, data.len() as u32);
        self.push_inline(&h[..n]);
        let crc = self.ddgst.then(|| pdu::crc32c(&data));
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

enum IoPlan {
    Bdev { chan: usize, xfer: u32 },
    Dsm,
    Disconnect,
}

fn is_fabrics_without_data(cmd: &NvmeCmd) -> bool {
    cmd.opcode() == admin_opc::FABRICS
        && matches!(
            cmd.fctype(),
            fctype::PROPERTY_SET | fctype::PROPERTY_GET | fctype::DISCONNECT
        )
}

fn io_error_status(e: IoError, opcode: u8) -> Status {
    match e {
        IoError::OutOfRange => Status::LBA_OUT_OF_RANGE.dnr(),
        IoError::ReadError => Status::UNRECOVERED_READ_ERROR,
        IoError::WriteFault => Status::WRITE_FAULT,
        // A transient path problem: the host may retry, or fail over.
        IoError::Unavailable => Status::NS_NOT_READY,
        IoError::Internal => {
            if opcode == io_opc::READ {
                Status::UNRECOVERED_READ_ERROR
            } else {
                Status::INTERNAL_ERROR
            }
        }
    }
}

fn encode_into(dst: &mut [u8; 128], f: impl FnOnce(&mut Vec<u8>)) -> usize {
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

fn unreachable_state() {
    // The codec only passes capsules after the IC exchange.
    tracing::error!("capsule before ICReq passed the codec");
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

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
