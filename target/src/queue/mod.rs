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
//!
//! One file per concept, as SPDK's lib/nvmf keeps them, so that work on one
//! concern (mirroring, QoS, fencing) has one place to go:
//!
//! | file | concept |
//! |---|---|
//! | `mod.rs` | the [`QueuePair`] state, its public API, command slots, lifecycle (ticks, timeouts, disconnect, how it ends) |
//! | `rx.rs` | PDU receive: header/payload/digest reassembly, direct reads into command buffers |
//! | `connect.rs` | ICReq/ICResp and Fabrics Connect: how a connection becomes an admin or I/O queue |
//! | `dispatch.rs` | routing a capsule by queue role: admin and Fabrics commands, or the I/O path |
//! | `io.rs` | I/O command checks, bdev channels and the namespace view, submission and completion |
//! | `r2t.rs` | solicited write data: R2T budget, H2CData ordering and bounds |
//! | `dsm.rs` | Dataset Management |
//! | `tx.rs` | the transmit queue: responses, C2HData, the pending-output bound |
//!
//! Invariants every file keeps:
//! * Completion accounting ([`QueuePair::check_completions`]): each accepted
//!   capsule gets exactly one response, or the connection ends.
//! * A slot is either free (in `free_slots`) or counted in `slots_busy`;
//!   only `alloc_slot` and `release_slot` move it between the two, and
//!   `release_slot` gives back its R2T budget and buffer.
//! * After `close` is set with `stop_rx`, nothing more is parsed.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bdev::{BdevCompletion, BufPool, IoBuf};
use crate::ctrlr::{self, Ctrlr, IoView, Target};
use crate::pdu::{self, DecodeConfig, FatalErrorStatus, PduError, PduType, Role};
use crate::spec::{NvmeCmd, Status};
use crate::stats;

mod connect;
mod dispatch;
mod dsm;
mod io;
mod r2t;
mod rx;
mod tx;

use io::NsChannel;
use rx::Rx;
use tx::TxSeg;

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
    /// not read its answers stops being read. The default, 32 MiB, lets a
    /// queue keep 32 MDTS-sized reads in the device: a store 20 ms away
    /// needs bandwidth × latency in flight (8 MiB held an objbacker
    /// namespace at QD16 × 1 MiB to 0.71× of the raw client).
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
            max_pending_output: 32 << 20,
            max_r2t_bytes: 16 << 20,
            data_phase_timeout_ms: 30_000,
            tx_stall_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            pool_retain_bytes: 8 << 20,
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
    /// When the capsule arrived, on the driver's clock (the latency
    /// histogram runs from here).
    start_ns: u64,
    /// The ANA group of the command's namespace.
    grp: u32,
    /// The group's fence word the command was admitted under.
    fence_word: u64,
    /// A write-class command inside a bdev, counted in `fence`.
    in_bdev_write: bool,
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
            start_ns: 0,
            grp: 0,
            fence_word: 0,
            in_bdev_write: false,
        }
    }
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
    /// Time of the driver's current pass ([`QueuePair::set_now_ns`]).
    now_ns: u64,
    /// Read once per batch of completions; `None` (tests): `now_ns`.
    clock: Option<fn() -> u64>,
    /// When the current batch of completions was reaped.
    done_ns: u64,
    /// This listener's connection counters (per connection, not per I/O).
    listener_stats: Arc<stats::ListenerStats>,
    /// Counted in `listener_stats` as a live admin (false) or I/O (true)
    /// queue, until `on_disconnect`.
    counted_queue: Option<bool>,
    /// An I/O queue's fencing counters and what it publishes for the
    /// quiesce barrier (`ctrlr::fence`).
    fence: Option<ctrlr::LocalFence>,
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
            now_ns: 0,
            clock: None,
            done_ns: 0,
            listener_stats: stats::registry().listener(port_id, ""),
            counted_queue: None,
            fence: None,
        }
    }

    /// The time of the driver's pass, in nanoseconds on the clock given to
    /// [`set_clock`](Self::set_clock): commands that arrive in this pass
    /// are stamped with it.
    pub fn set_now_ns(&mut self, ns: u64) {
        self.now_ns = ns;
    }

    /// The clock read once per batch of completions, for the latency
    /// histograms (the driver's, e.g. [`stats::now_ns`]). Without one the
    /// queue uses the last [`set_now_ns`](Self::set_now_ns), so tests stay
    /// deterministic.
    pub fn set_clock(&mut self, clock: fn() -> u64) {
        self.clock = Some(clock);
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

    /// Data buffer allocations so far; flat once the queue is warm.
    pub fn buffer_allocations(&self) -> u64 {
        self.pool.allocations()
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
        s.in_bdev_write = false;
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
                    stats::registry()
                        .subsystem(ctrlr.subnqn())
                        .keepalive_expiries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        if let Some(io) = self.counted_queue.take() {
            let g = if io {
                &self.listener_stats.io_queues
            } else {
                &self.listener_stats.admin_queues
            };
            g.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        self.on_disconnect();
        // After the driver's drain, so the slot leaves the barrier only
        // once nothing this queue submitted can still land.
        if let Some(f) = self.fence.take() {
            self.target.fence.unregister(&f);
        }
    }
}

#[cfg(test)]
mod tests;
