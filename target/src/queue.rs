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
use crate::spec::identify::NvmLimits;
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
    /// Output the queue may owe the host (queued PDUs plus reads still in
    /// the device) before it stops taking new commands: a host that does
    /// not read its answers stops being read.
    pub max_pending_output: usize,
    /// Write data the queue may have solicited with R2T and not yet written
    /// to the device; further writes wait for their R2T in order.
    pub max_r2t_bytes: usize,
    /// A solicited transfer that does not finish within this time ends the
    /// connection (a host withholding its last H2CData PDU).
    pub data_phase_timeout_ms: u64,
    /// Output that makes no progress for this long ends the connection (a
    /// host that stopped reading).
    pub tx_stall_timeout_ms: u64,
    /// A connection that has not finished ICReq and Connect within this
    /// time is closed.
    pub connect_timeout_ms: u64,
    /// Idle data buffers a queue keeps for reuse; an idle queue trims to a
    /// sixteenth of it.
    pub pool_retain_bytes: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            in_capsule_data: ctrlr::IN_CAPSULE_DATA_SIZE,
            maxh2cdata: ctrlr::MAXH2CDATA,
            mdts_bytes: ctrlr::MDTS_BYTES,
            max_slots: 4096,
            max_pending_output: 8 << 20,
            max_r2t_bytes: 16 << 20,
            data_phase_timeout_ms: 30_000,
            tx_stall_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            pool_retain_bytes: 8 << 20,
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
    /// Waiting for R2T budget (`QueueLimits::max_r2t_bytes`).
    AwaitingR2T,
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
    /// Bytes of R2T budget this command holds until it completes.
    r2t_held: u32,
    /// When the R2T went out (the data-phase timeout runs from here).
    r2t_ms: u64,
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
            r2t_held: 0,
            r2t_ms: 0,
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
    /// Capsules accepted (every CapsuleCmd PDU that parsed).
    pub commands: u64,
    /// Responses sent: CapsuleResps, and C2HData PDUs with SUCCESS set.
    pub responses: u64,
    pub errors: u64,
    pub pdus_in: u64,
    pub pdus_out: u64,
    /// Times input stopped because the host owed too much output.
    pub input_paused: u64,
    /// Writes that waited for R2T budget.
    pub r2t_deferred: u64,
}

/// The limits a queue hit, each logged once per connection.
#[derive(Clone, Copy)]
enum Limit {
    PendingOutput = 1,
    R2tBytes = 2,
    Slots = 4,
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
    /// A resource limit or a timeout ended the connection; nothing more is
    /// sent (the host may not be reading).
    Cut(&'static str),
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
    /// Bytes queued in `tx`.
    tx_bytes: usize,
    /// Bytes of reads submitted to a device whose data is not yet in `tx`.
    read_bytes_in_flight: usize,
    /// R2T budget in use (see `QueueLimits::max_r2t_bytes`).
    r2t_bytes: usize,
    /// Writes waiting for R2T budget, oldest first.
    r2t_wait: VecDeque<u32>,
    /// Slots not free: commands executing or in their data phase.
    slots_busy: usize,
    /// Latest time the queue was told (`handle_input`, `on_tick`).
    now_ms: u64,
    /// First time the queue was told; the IC/Connect timeout runs from here.
    born_ms: Option<u64>,
    /// When output last moved (or was empty).
    tx_moved_ms: u64,
    /// Any command since the last tick (an idle queue trims its pool).
    active_since_tick: bool,
    /// Limits already logged on this connection (`Limit` bits).
    logged: u8,
    /// `on_disconnect` ran (it runs once, from the driver or from `Drop`).
    disconnected: bool,
    peer: Option<std::net::SocketAddr>,
    pub stats: QueueStats,
}

/// PSDT 11b is reserved (NVMe Base 4.2, Figure 91): Invalid Field.
const PSDT_RESERVED: u8 = 0b11;

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
            pool: BufPool::new(256).with_max_bytes(limits.pool_retain_bytes),
            tx: VecDeque::with_capacity(256),
            completions: Vec::with_capacity(256),
            close: None,
            stop_rx: false,
            tx_bytes: 0,
            read_bytes_in_flight: 0,
            r2t_bytes: 0,
            r2t_wait: VecDeque::new(),
            slots_busy: 0,
            now_ms: 0,
            born_ms: None,
            tx_moved_ms: 0,
            active_since_tick: false,
            logged: 0,
            disconnected: false,
            peer: None,
            stats: QueueStats::default(),
        }
    }

    /// The host's address, for log lines.
    pub fn set_peer(&mut self, peer: std::net::SocketAddr) {
        self.peer = Some(peer);
    }

    fn peer_str(&self) -> String {
        self.peer.map_or_else(|| "-".to_string(), |p| p.to_string())
    }

    fn log_limit_once(&mut self, l: Limit, what: &str) {
        if self.logged & l as u8 == 0 {
            self.logged |= l as u8;
            tracing::warn!(peer = %self.peer_str(), qid = ?self.qid(), "{what} (logged once per connection)");
        }
    }

    /// False while the host owes the queue too much output (or the queue is
    /// closing): the driver then reads nothing more from the socket, and
    /// `handle_input` stops at the next PDU boundary.
    pub fn wants_input(&self) -> bool {
        !self.stop_rx && self.tx_bytes + self.read_bytes_in_flight <= self.limits.max_pending_output
    }

    /// The connection must close now, without draining output.
    pub fn must_close_now(&self) -> bool {
        matches!(self.close, Some(CloseReason::Cut(_)))
    }

    /// Commands accepted that have not had their response yet and are
    /// legitimately in flight: in their data phase, in a device, or parked
    /// AERs.
    pub fn commands_in_flight(&self) -> u64 {
        let capsule =
            u64::from(self.pending_capsule.is_some() && self.pending_capsule_slot.is_none());
        let aers = match &self.role {
            Role2::Admin { ctrlr } => ctrlr.aers_outstanding() as u64,
            _ => 0,
        };
        self.slots_busy as u64 + capsule + aers
    }

    /// The rule every queue keeps: each accepted capsule gets exactly one
    /// response, or the connection ends. Until it ends, commands in =
    /// responses out + commands in flight.
    pub fn check_completions(&self) -> Result<(), String> {
        if self.close.is_some() {
            return Ok(());
        }
        let inflight = self.commands_in_flight();
        if self.stats.commands == self.stats.responses + inflight {
            Ok(())
        } else {
            Err(format!(
                "completion invariant broken: {} commands in, {} responses out, {} in flight",
                self.stats.commands, self.stats.responses, inflight
            ))
        }
    }

    fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if let Err(e) = self.check_completions() {
            panic!("{e}");
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
        self.now_ms = self.now_ms.max(now_ms);
        self.born_ms.get_or_insert(now_ms);
        // One generation check per batch of input, not per command: the
        // I/O path's only shared read.
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
        if let Some(c) = self.ctrlr() {
            c.touch(now_ms);
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
        self.active_since_tick = true;
        // u32: SQSIZE is bounded at Connect, but this must not be able to
        // overflow whatever a host sent.
        self.sqhd = ((u32::from(self.sqhd) + 1) % (u32::from(self.sqsize) + 1)) as u16;
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
            Role2::AwaitIcReq => {
                // The codec only passes capsules after the IC exchange; if
                // that ever breaks, the connection ends rather than leave a
                // command unanswered.
                tracing::error!("capsule before ICReq passed the codec");
                self.terminate(FatalErrorStatus::PduSequenceError, 0)
            }
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
            Role2::Admin { .. } if cmd.flags() >> 6 == PSDT_RESERVED => {
                self.complete_err(&cmd, Status::INVALID_FIELD.dnr());
                self.start_payload(
                    skip,
                    data_len,
                    has_ddgst,
                    DataDest::Discard,
                    AfterData::Nothing,
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
                    tracing::error!("in-capsule data without a pending capsule");
                    return self.terminate(FatalErrorStatus::PduSequenceError, 0);
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
                            Role2::AwaitIcReq => {
                                self.terminate(FatalErrorStatus::PduSequenceError, 0)
                            }
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
        match ctrlr::connect_explained(&self.target, self.port_id, cmd, data, self.now_ms) {
            Ok((connected, mut cpl)) => {
                self.sqsize = (cmd.cdw11() & 0xffff) as u16;
                self.sqflow_disabled = (cmd.cdw11() >> 16) & 0x4 != 0;
                let entries = u32::from(self.sqsize.max(1)) + 1;
                self.sqhd = (1 % entries) as u16;
                let depth = (entries as usize).min(self.limits.max_slots);
                self.slots = (0..depth).map(|_| Slot::free()).collect();
                self.free_slots = (0..depth as u32).rev().collect();
                self.role = match connected {
                    Connected::Admin { ctrlr } => {
                        tracing::info!(
                            cntlid = ctrlr.cntlid(),
                            subnqn = ctrlr.subnqn(),
                            hostnqn = ctrlr.hostnqn(),
                            port = self.port_id,
                            peer = %self.peer_str(),
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
            Err(r) => {
                tracing::warn!(
                    reason = r.reason,
                    hostnqn = %r.hostnqn,
                    subnqn = %r.subnqn,
                    peer = %self.peer_str(),
                    port = self.port_id,
                    qid = cmd.cdw10() >> 16,
                    status = ?r.cpl.status,
                    "connect refused: {}",
                    r.reason
                );
                let mut cpl = r.cpl;
                cpl.cid = cmd.cid();
                self.stats.errors += 1;
                self.send_cpl(cpl);
            }
        }
    }

    fn exec_admin(&mut self, cmd: &NvmeCmd, data: &[u8], now_ms: u64) {
        let Role2::Admin { ctrlr } = &self.role else {
            return self.complete_err(cmd, Status::INVALID_OPCODE.dnr());
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
        s.r2t_held = 0;
        // Marked busy at once: the caller sets the real state.
        s.state = SlotState::Executing;
        self.slots_busy += 1;
        Some(idx)
    }

    fn release_slot(&mut self, idx: u32) {
        let s = &mut self.slots[idx as usize];
        if s.state == SlotState::Free {
            return;
        }
        if s.state == SlotState::AwaitingR2T {
            self.r2t_wait.retain(|&w| w != idx);
        }
        s.state = SlotState::Free;
        self.r2t_bytes -= s.r2t_held as usize;
        s.r2t_held = 0;
        if let Some(b) = s.buf.take() {
            self.pool.put(b);
        }
        self.slots_busy -= 1;
        self.free_slots.push(idx);
    }

    /// Sends R2Ts to waiting writes, oldest first, while the budget allows.
    /// One transfer is always allowed, so a budget below MDTS cannot stall.
    fn pump_r2t(&mut self) {
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

    fn on_io_capsule(&mut self, cmd: NvmeCmd, skip: usize, data_len: usize, has_ddgst: bool) {
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
                        s.state = SlotState::AwaitingR2T;
                        if !self.r2t_wait.is_empty()
                            || (self.r2t_bytes > 0
                                && self.r2t_bytes + xfer as usize > self.limits.max_r2t_bytes)
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
                    if nlb * u64::from(ch.block_size) > NvmLimits::TARGET.write_zeroes_bytes() {
                        return Err(Status::INVALID_FIELD.dnr());
                    }
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

    /// Periodic checks the driver runs about once a second.
    pub fn on_tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let born = *self.born_ms.get_or_insert(now_ms);
        if self.tx.is_empty() {
            self.tx_moved_ms = self.now_ms;
        }
        if self.close.is_none() {
            self.check_timeouts(born);
        }
        if !std::mem::take(&mut self.active_since_tick) && self.slots_busy == 0 {
            self.pool.trim(self.limits.pool_retain_bytes / 16);
        }
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

    fn check_timeouts(&mut self, born: u64) {
        let now = self.now_ms;
        let l = self.limits;
        let cut = if matches!(self.role, Role2::AwaitIcReq | Role2::AwaitConnect)
            && now.saturating_sub(born) > l.connect_timeout_ms
        {
            Some("no ICReq and Connect within the connect timeout")
        } else if !self.tx.is_empty()
            && now.saturating_sub(self.tx_moved_ms) > l.tx_stall_timeout_ms
        {
            Some("host stopped reading its responses")
        } else if self.slots.iter().any(|s| {
            s.state == SlotState::AwaitingH2C
                && now.saturating_sub(s.r2t_ms) > l.data_phase_timeout_ms
        }) {
            Some("host did not finish a solicited data transfer (H2CData) in time")
        } else {
            None
        };
        if let Some(why) = cut {
            tracing::warn!(
                peer = %self.peer_str(),
                qid = ?self.qid(),
                hostnqn = self.ctrlr().map(|c| c.hostnqn()).unwrap_or(""),
                "closing connection: {why}"
            );
            self.close = Some(CloseReason::Cut(why));
            self.stop_rx = true;
        }
    }

    /// The connection went away: a dynamic controller lives exactly as long
    /// as its admin queue. Runs once; `Drop` calls it too, so a connection
    /// task that panics still releases its controller.
    pub fn on_disconnect(&mut self) {
        if std::mem::replace(&mut self.disconnected, true) {
            return;
        }
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

    fn push_owned(&mut self, data: Vec<u8>) {
        self.tx_bytes += data.len();
        self.tx.push_back(TxSeg::Owned { data, pos: 0 });
        self.stats.pdus_out += 1;
    }

    fn send_cpl(&mut self, mut cpl: NvmeCpl) {
        self.stats.responses += 1;
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

    fn send_c2h_owned(&mut self, cccid: u16, data: Vec<u8>) {
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

impl Drop for QueuePair {
    fn drop(&mut self) {
        self.on_disconnect();
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
