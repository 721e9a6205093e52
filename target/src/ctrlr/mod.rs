//! The sans-IO NVMe controller: Fabrics Connect, the admin command set,
//! Keep Alive, asynchronous events and the I/O path's view of namespaces.
//!
//! One [`Ctrlr`] is shared by its admin connection and its I/O connections,
//! which run on different threads. Admin state sits behind a `Mutex` (the
//! admin queue is cold); what the I/O path reads per batch (destroyed,
//! enabled, the namespace view generation) is atomic and, in steady state,
//! only read.
//!
//! No cache line is written by more than one queue per I/O:
//! * Keep-alive activity is one slot per queue ([`ActivitySlot`], indexed by
//!   QID), each on its own cache line and written only by its queue with a
//!   plain load and store. The keep-alive check, which runs about once a
//!   second, reads every slot; the I/O path, which runs per batch, writes one.
//! * The view generation is per controller: it moves only when this
//!   controller's view of its namespaces changes (a reconfiguration that
//!   changes what it sees, or its own teardown), so nothing done to another
//!   controller, in this subsystem or another, makes its queues rebuild.
//!
//! Decisions worth knowing:
//! * Keep Alive: KATO is kept with 1 s granularity (KAS = 10 × 100 ms, as
//!   nvmet) and expires strictly after KATO without any admin command, Keep
//!   Alive or I/O on any of its queues ([`Ctrlr::touch`]), as SPDK does. No extra grace: the host
//!   sends Keep Alive every KATO/2, which already leaves half a period of
//!   slack, and counting I/O as activity (like nvmet's traffic-based keep
//!   alive) covers hosts whose Keep Alive is stuck behind I/O.
//!   A discovery controller connected with KATO 0 gets 120 s, as nvmet does,
//!   so abandoned discovery sessions are reaped.
//! * Abort is the minimal implementation the spec allows: it completes with
//!   DW0 bit 0 set ("command not aborted"); every admin command here completes
//!   immediately except AERs, which complete only with an event (a
//!   controller reset or teardown drops them; the host aborts its own).

mod admin;
mod fence;
mod target;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;

use crate::bdev::Bdev;
use crate::spec::{
    CONNECT_DATA_LEN, ConnectData, DISCOVERY_NQN, NvmeCmd, NvmeCpl, Status, admin_opc, fctype,
};
use crate::subsystem::{AnaState, TargetConfig};
pub use fence::{FenceError, FenceState, FenceTicket, Outstanding, QueueName, QuiesceError};
pub(crate) use fence::{FenceTable, LocalFence, readable, writable};
use target::lock;
pub use target::{CNTLID_MAX, CNTLID_MIN, Target};

/// In-capsule data the transport accepts with a command (IOCCSZ derives
/// from it).
pub const IN_CAPSULE_DATA_SIZE: u32 = 8192;
/// Largest H2CData PDU the transport advertises in ICResp.
pub const MAXH2CDATA: u32 = 131072;
/// Largest data transfer of one command (MDTS = 8 with a 4 KiB CAP.MPSMIN).
pub const MDTS_BYTES: u32 = 1 << 20;
/// I/O queue pairs one controller may have.
pub const MAX_IO_QUEUES: u16 = 127;
/// CAP.MQES: maximum I/O queue entries, 0's based.
pub const MQES: u16 = 1023;
/// Outstanding Asynchronous Event Requests, 0's based (AERL).
pub const AERL: u8 = 3;
/// KAS in 100 ms units: Keep Alive granularity of one second.
pub const KAS: u16 = 10;
/// Keep Alive granularity in ms, from KAS.
pub const KATO_GRANULARITY_MS: u64 = KAS as u64 * 100;
/// KATO of a discovery controller whose host asked for none (nvmet's value).
pub const DISCOVERY_DEFAULT_KATO_MS: u64 = 120_000;
/// NVMe version 1.4.
pub const NVME_VERSION: u32 = 0x0001_0400;

/// Result of a Fabrics Connect.
pub enum Connected {
    Admin {
        ctrlr: Arc<Ctrlr>,
    },
    Io {
        ctrlr: Arc<Ctrlr>,
        qid: u16,
        sqsize: u16,
    },
}

pub enum AdminResult {
    /// Send `cpl`; if `data` is non-empty, send it to the host first as C2H
    /// data (the caller truncates it to the command's SGL length).
    Complete { cpl: NvmeCpl, data: Vec<u8> },
    /// An Asynchronous Event Request was parked; its completion will come
    /// from `take_events`.
    Deferred,
}

/// The I/O path's view of the namespaces of one controller.
pub struct IoView {
    pub generation: u64,
    /// Sorted by nsid.
    pub namespaces: Vec<IoNamespace>,
}

impl IoView {
    pub fn get(&self, nsid: u32) -> Option<&IoNamespace> {
        self.namespaces
            .binary_search_by_key(&nsid, |n| n.nsid)
            .ok()
            .map(|i| &self.namespaces[i])
    }
}

pub struct IoNamespace {
    pub nsid: u32,
    pub bdev: Arc<dyn Bdev>,
    /// ANA state of its group on this controller's port.
    pub ana_state: AnaState,
    /// Its ANA group (effective ANAGRPID), whose fence the I/O path checks.
    pub anagrpid: u32,
}

/// Asynchronous event kinds this controller reports, each a Notice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    NsAttrChanged,
    AnaChange,
    DiscoveryLogChange,
}

/// Asynchronous Event Type "Notice".
const AER_TYPE_NOTICE: u32 = 2;

impl Event {
    /// The bit enabling it in Asynchronous Event Configuration (and in OAES).
    pub(crate) fn aec_bit(self) -> u32 {
        match self {
            Event::NsAttrChanged => 1 << 8,
            Event::AnaChange => 1 << 11,
            Event::DiscoveryLogChange => 1 << 31,
        }
    }
    fn info(self) -> u32 {
        match self {
            Event::NsAttrChanged => 0x00,
            Event::AnaChange => 0x03,
            Event::DiscoveryLogChange => 0xF0,
        }
    }
    pub(crate) fn log_page(self) -> u8 {
        match self {
            Event::NsAttrChanged => crate::spec::lid::CHANGED_NS_LIST,
            Event::AnaChange => crate::spec::lid::ANA,
            Event::DiscoveryLogChange => crate::spec::lid::DISCOVERY,
        }
    }
    /// Completion DW0 of the AER reporting it.
    fn dw0(self) -> u32 {
        AER_TYPE_NOTICE | (self.info() << 8) | (u32::from(self.log_page()) << 16)
    }
}

/// Mutable admin-queue state.
pub(crate) struct AdminState {
    pub(crate) cc: u32,
    pub(crate) csts: u32,
    /// I/O queue pairs granted by Set Features Number of Queues.
    pub(crate) io_queues_granted: Option<u16>,
    pub(crate) io_qids: BTreeSet<u16>,
    pub(crate) aec: u32,
    pub(crate) vwc_enabled: bool,
    pub(crate) temp_over: u16,
    pub(crate) temp_under: u16,
    pub(crate) connect_kato_ms: u64,
    /// CIDs of parked AERs, oldest first.
    pub(crate) parked_aers: VecDeque<u16>,
    /// Events waiting for an AER.
    pub(crate) pending: VecDeque<Event>,
    /// Events reported (or queued) whose log page has not been read yet: the
    /// spec masks further events of that type until then.
    pub(crate) masked: u32,
    /// Completions of parked AERs, for `take_events`.
    pub(crate) ready: Vec<NvmeCpl>,
    pub(crate) waker: Option<Waker>,
    pub(crate) changed_ns: Vec<u32>,
    pub(crate) changed_ns_overflow: bool,
}

/// One queue's latest activity (ms), alone on its cache line. 128 bytes,
/// not 64: x86's adjacent-line prefetcher fetches lines in pairs, so two
/// queues' slots 64 bytes apart would still contend.
#[repr(align(128))]
#[derive(Default)]
struct ActivitySlot(AtomicU64);

pub struct Ctrlr {
    target: Weak<Target>,
    /// Moves when this controller's [`IoView`] must be rebuilt.
    generation: AtomicU64,
    cntlid: u16,
    subnqn: String,
    hostnqn: String,
    hostid: [u8; 16],
    port_id: u16,
    discovery: bool,
    kato_ms: AtomicU64,
    /// Indexed by QID: 0 is the admin queue, 1..=MAX_IO_QUEUES the I/O
    /// queues. Each queue writes only its own slot.
    activity: Box<[ActivitySlot]>,
    destroyed: AtomicBool,
    enabled: AtomicBool,
    state: Mutex<AdminState>,
    io_view: Mutex<Arc<IoView>>,
    /// The host's address on the admin connection, for management listings.
    host_addr: std::sync::OnceLock<std::net::SocketAddr>,
}

/// Connect response DW0 for an invalid parameter in the Connect data
/// (IATTR = 1) at byte offset `ipo`: bits 23:16 IATTR, bits 15:0 IPO.
fn ipo_data(ipo: u16) -> u32 {
    (1 << 16) | u32::from(ipo)
}

/// Connect response DW0 for an invalid parameter in the SQE (IATTR = 0).
fn ipo_sqe(ipo: u16) -> u32 {
    u32::from(ipo)
}

/// Byte offsets in the Connect command and its data, for IPO.
const SQE_OFF_QID: u16 = 42;
const SQE_OFF_SQSIZE: u16 = 44;
const DATA_OFF_HOSTID: u16 = 0;
const DATA_OFF_CNTLID: u16 = 16;
const DATA_OFF_SUBNQN: u16 = 256;
const DATA_OFF_HOSTNQN: u16 = 512;
/// Connect data CNTLID asking for the dynamic controller model.
const CNTLID_DYNAMIC: u16 = 0xFFFF;

fn cpl(cid: u16, status: Status, dw0: u32) -> NvmeCpl {
    NvmeCpl {
        dw0,
        ..NvmeCpl::new(cid, status)
    }
}

/// Handles Fabrics Connect (opc 0x7F, fctype 0x01) arriving on a new queue
/// through port `port_id`. `data` is the 1024-byte Connect data (in-capsule).
///
/// Dynamic controller model: admin Connect with cntlid 0xFFFF allocates a
/// cntlid unique within the subsystem (1..=0xFFEF) from the registry shared by
/// all connections; I/O Connect names that cntlid and must come from the same
/// hostnqn/hostid through the same port, on a qid <= the number of I/O queues
/// granted by Set Features 0x07, after CC.EN=1. The discovery subsystem is
/// connectable on any port and yields a discovery controller.
///
/// Errors return the CQE to send, with DNR and, for Invalid Parameters,
/// DW0 = IATTR << 16 | IPO as nvmet reports them.
pub fn connect(
    target: &Arc<Target>,
    port_id: u16,
    cmd: &NvmeCmd,
    data: &[u8],
    now_ms: u64,
) -> Result<(Connected, NvmeCpl), NvmeCpl> {
    connect_explained(target, port_id, cmd, data, now_ms).map_err(|r| r.cpl)
}

/// A refused Connect: the CQE to send and, for the operator's log, the
/// reason in words and the NQNs the host presented.
#[derive(Clone, Debug)]
pub struct ConnectRefusal {
    pub cpl: NvmeCpl,
    pub reason: &'static str,
    pub subnqn: String,
    pub hostnqn: String,
}

/// Largest admin SQSIZE (0's based) accepted: MQES bounds I/O queues only,
/// so the admin queue needs its own bound (SPDK's max_aq_depth is 128; the
/// Linux host asks for 32).
pub const MAX_ADMIN_SQSIZE: u16 = 127;

/// [`connect`], with the reason for a refusal.
pub fn connect_explained(
    target: &Arc<Target>,
    port_id: u16,
    cmd: &NvmeCmd,
    data: &[u8],
    now_ms: u64,
) -> Result<(Connected, NvmeCpl), ConnectRefusal> {
    let cid = cmd.cid();
    let mut nqns = (String::new(), String::new());
    let fail = |nqns: &(String, String), status: Status, dw0: u32, reason: &'static str| {
        Err(ConnectRefusal {
            cpl: cpl(cid, status.dnr(), dw0),
            reason,
            subnqn: nqns.0.clone(),
            hostnqn: nqns.1.clone(),
        })
    };
    if cmd.opcode() != admin_opc::FABRICS || cmd.fctype() != fctype::CONNECT {
        return fail(&nqns, Status::INVALID_OPCODE, 0, "not a Connect command");
    }
    let recfmt = cmd.cdw10() as u16;
    let qid = (cmd.cdw10() >> 16) as u16;
    let sqsize = cmd.cdw11() as u16;
    let kato = cmd.cdw12();
    if recfmt != 0 {
        return fail(
            &nqns,
            Status::CONNECT_INCOMPATIBLE_FORMAT,
            0,
            "RECFMT is not 0",
        );
    }
    if data.len() < CONNECT_DATA_LEN {
        return fail(
            &nqns,
            Status::DATA_SGL_LENGTH_INVALID,
            0,
            "Connect data shorter than 1024 bytes",
        );
    }
    let d = match ConnectData::decode(data) {
        Ok(d) => d,
        Err(off) => {
            let reason = if off == DATA_OFF_SUBNQN {
                "subsystem NQN empty, too long or not UTF-8"
            } else {
                "host NQN too long or not UTF-8"
            };
            return fail(&nqns, Status::CONNECT_INVALID_PARAM, ipo_data(off), reason);
        }
    };
    nqns = (d.subnqn.clone(), d.hostnqn.clone());
    let discovery = d.subnqn == DISCOVERY_NQN;
    // Registry before config (the lock order), and held throughout so a
    // concurrent `apply` either sees this controller or it sees the new config.
    let mut reg = lock(&target.registry);
    let cfg = target.snapshot();
    if !discovery {
        let Some(sub) = cfg.subsystem_on_port(&d.subnqn, port_id) else {
            return fail(
                &nqns,
                Status::CONNECT_INVALID_PARAM,
                ipo_data(DATA_OFF_SUBNQN),
                "subsystem NQN not served on this port",
            );
        };
        // An empty HOSTNQN (SPDK's tools send one by default) identifies
        // nobody: fine where any host may connect, never on an allow-list.
        if d.hostnqn.is_empty() && !sub.allow_any_host {
            return fail(
                &nqns,
                Status::CONNECT_INVALID_HOST,
                ipo_data(DATA_OFF_HOSTNQN),
                "empty host NQN on a subsystem with an allow-list",
            );
        }
        if !sub.host_allowed(&d.hostnqn) {
            return fail(
                &nqns,
                Status::CONNECT_INVALID_HOST,
                ipo_data(DATA_OFF_HOSTNQN),
                "host NQN not allowed",
            );
        }
    }
    if qid == 0 {
        if d.cntlid != CNTLID_DYNAMIC {
            return fail(
                &nqns,
                Status::CONNECT_INVALID_PARAM,
                ipo_data(DATA_OFF_CNTLID),
                "admin queue asked for a static controller ID (only the dynamic model, FFFFh, is served)",
            );
        }
        if let Some(reason) = sqsize_problem(sqsize, MAX_ADMIN_SQSIZE, "admin SQSIZE above 127") {
            return fail(
                &nqns,
                Status::CONNECT_INVALID_PARAM,
                ipo_sqe(SQE_OFF_SQSIZE),
                reason,
            );
        }
        let Some(cntlid) = reg.alloc_cntlid(&d.subnqn) else {
            return fail(
                &nqns,
                Status::CONNECT_CTRL_BUSY,
                0,
                "no free controller ID in this subsystem",
            );
        };
        let mut kato_ms = u64::from(kato);
        if discovery && kato_ms == 0 {
            kato_ms = DISCOVERY_DEFAULT_KATO_MS;
        }
        let kato_ms = round_kato(kato_ms);
        let ctrlr = Arc::new(Ctrlr::new(target, &d, cntlid, port_id, kato_ms, now_ms));
        reg.ctrls.insert((d.subnqn.clone(), cntlid), ctrlr.clone());
        drop(reg);
        tracing::info!(cntlid, subnqn = %d.subnqn, hostnqn = %d.hostnqn, port_id, "controller created");
        return Ok((
            Connected::Admin { ctrlr },
            cpl(cid, Status::SUCCESS, u32::from(cntlid)),
        ));
    }

    if discovery {
        return fail(
            &nqns,
            Status::CONNECT_INVALID_PARAM,
            ipo_sqe(SQE_OFF_QID),
            "I/O queue to the discovery controller",
        );
    }
    let ctrlr = match reg.ctrls.get(&(d.subnqn.clone(), d.cntlid)) {
        Some(c) if c.hostnqn == d.hostnqn && c.port_id == port_id && !c.is_destroyed() => c.clone(),
        _ => {
            return fail(
                &nqns,
                Status::CONNECT_INVALID_PARAM,
                ipo_data(DATA_OFF_CNTLID),
                "unknown controller ID (for this host and port)",
            );
        }
    };
    drop(reg);
    if ctrlr.hostid != d.hostid {
        return fail(
            &nqns,
            Status::CONNECT_INVALID_PARAM,
            ipo_data(DATA_OFF_HOSTID),
            "host ID differs from the admin queue's",
        );
    }
    let mut st = lock(&ctrlr.state);
    if !ctrlr.is_enabled() {
        return fail(
            &nqns,
            Status::COMMAND_SEQUENCE_ERROR,
            0,
            "I/O queue before the controller is enabled",
        );
    }
    if qid > st.io_queues_granted.unwrap_or(0) {
        return fail(
            &nqns,
            Status::CONNECT_INVALID_PARAM,
            ipo_sqe(SQE_OFF_QID),
            "QID beyond the I/O queues granted",
        );
    }
    if let Some(reason) = sqsize_problem(sqsize, MQES, "SQSIZE above MQES (1023)") {
        return fail(
            &nqns,
            Status::CONNECT_INVALID_PARAM,
            ipo_sqe(SQE_OFF_SQSIZE),
            reason,
        );
    }
    if !st.io_qids.insert(qid) {
        return fail(
            &nqns,
            Status::COMMAND_SEQUENCE_ERROR,
            0,
            "QID already connected",
        );
    }
    drop(st);
    ctrlr.touch(qid, now_ms);
    let dw0 = u32::from(ctrlr.cntlid);
    Ok((
        Connected::Io { ctrlr, qid, sqsize },
        cpl(cid, Status::SUCCESS, dw0),
    ))
}

/// Why a Connect's SQSIZE (0's based) is refused, if it is: 0, or above
/// the queue's bound.
fn sqsize_problem(sqsize: u16, max: u16, above: &'static str) -> Option<&'static str> {
    if sqsize == 0 {
        Some("SQSIZE 0")
    } else if sqsize > max {
        Some(above)
    } else {
        None
    }
}

/// Rounds a KATO up to the granularity KAS advertises.
fn round_kato(ms: u64) -> u64 {
    ms.div_ceil(KATO_GRANULARITY_MS)
        .saturating_mul(KATO_GRANULARITY_MS)
}

impl Ctrlr {
    fn new(
        target: &Arc<Target>,
        d: &ConnectData,
        cntlid: u16,
        port_id: u16,
        kato_ms: u64,
        now_ms: u64,
    ) -> Self {
        let discovery = d.subnqn == DISCOVERY_NQN;
        let activity: Box<[ActivitySlot]> = (0..=MAX_IO_QUEUES)
            .map(|_| ActivitySlot::default())
            .collect();
        activity[0].0.store(now_ms, Ordering::Relaxed);
        Ctrlr {
            target: Arc::downgrade(target),
            generation: AtomicU64::new(1),
            cntlid,
            subnqn: d.subnqn.clone(),
            hostnqn: d.hostnqn.clone(),
            hostid: d.hostid,
            port_id,
            discovery,
            kato_ms: AtomicU64::new(kato_ms),
            activity,
            destroyed: AtomicBool::new(false),
            enabled: AtomicBool::new(false),
            state: Mutex::new(AdminState::new(discovery, kato_ms)),
            io_view: Mutex::new(Arc::new(IoView {
                generation: 0,
                namespaces: Vec::new(),
            })),
            host_addr: std::sync::OnceLock::new(),
        }
    }

    /// Recorded once, by the admin queue that created this controller.
    pub fn set_host_addr(&self, addr: std::net::SocketAddr) {
        let _ = self.host_addr.set(addr);
    }

    pub fn host_addr(&self) -> Option<std::net::SocketAddr> {
        self.host_addr.get().copied()
    }

    /// I/O queues connected now.
    pub fn io_queues(&self) -> usize {
        lock(&self.state).io_qids.len()
    }

    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }
    pub fn subnqn(&self) -> &str {
        &self.subnqn
    }
    pub fn hostnqn(&self) -> &str {
        &self.hostnqn
    }
    pub fn hostid(&self) -> [u8; 16] {
        self.hostid
    }
    pub fn port_id(&self) -> u16 {
        self.port_id
    }
    pub fn is_discovery(&self) -> bool {
        self.discovery
    }

    fn snapshot(&self) -> Arc<TargetConfig> {
        self.target
            .upgrade()
            .map(|t| t.snapshot())
            .unwrap_or_default()
    }

    /// Executes one admin-queue command: Admin opcodes AND Fabrics Property
    /// Get/Set and Disconnect. Connect on an established admin queue →
    /// COMMAND_SEQUENCE_ERROR. `data_in` = host-to-controller data that came
    /// with the command (may be empty; no supported command takes any).
    /// Resets the keep-alive timer.
    pub fn exec_admin(&self, cmd: &NvmeCmd, _data_in: &[u8], now_ms: u64) -> AdminResult {
        self.touch(0, now_ms);
        if self.is_destroyed() {
            return AdminResult::Complete {
                cpl: NvmeCpl::new(cmd.cid(), Status::ABORTED_SQ_DELETION),
                data: Vec::new(),
            };
        }
        // Taken before the state lock: see the lock order in `target`.
        let cfg = self.snapshot();
        let ana_chgcnt = self
            .target
            .upgrade()
            .map(|t| t.ana_chgcnt.load(Ordering::Acquire))
            .unwrap_or(0);
        let disc_genctr = self
            .target
            .upgrade()
            .map(|t| t.disc_genctr.load(Ordering::Acquire))
            .unwrap_or(0);
        let ctx = admin::Ctx {
            cfg: &cfg,
            ana_chgcnt,
            disc_genctr,
        };
        let mut st = lock(&self.state);
        let r = self.dispatch(&mut st, &ctx, cmd);
        self.enabled.store(st.is_ready(), Ordering::Release);
        r
    }

    /// AERs accepted and not yet sent: parked, or completed and waiting in
    /// [`Ctrlr::take_events`]. The admin queue's completion accounting
    /// counts them as legitimately in flight.
    pub fn aers_outstanding(&self) -> usize {
        let st = lock(&self.state);
        st.parked_aers.len() + st.ready.len()
    }

    /// Completions for parked AERs that now have an event to report (the
    /// admin connection sends them).
    pub fn take_events(&self) -> Vec<NvmeCpl> {
        std::mem::take(&mut lock(&self.state).ready)
    }

    /// The admin connection's waker; `wake()`d when take_events has
    /// something, and when the controller is destroyed.
    pub fn set_event_waker(&self, waker: Waker) {
        let mut st = lock(&self.state);
        let wake_now = !st.ready.is_empty() || self.is_destroyed();
        st.waker = Some(waker.clone());
        drop(st);
        if wake_now {
            waker.wake();
        }
    }

    /// Command activity on queue `qid` (0 = admin; I/O queues call this
    /// once per batch). Never moves the timer backwards. A queue is the only
    /// writer of its slot, so a load and a store do what a `fetch_max` did
    /// without a read-modify-write, and the store is skipped within the same
    /// millisecond.
    pub fn touch(&self, qid: u16, now_ms: u64) {
        if let Some(slot) = self.activity.get(usize::from(qid))
            && slot.0.load(Ordering::Relaxed) < now_ms
        {
            slot.0.store(now_ms, Ordering::Relaxed);
        }
    }

    /// The latest activity on any queue.
    fn last_activity_ms(&self) -> u64 {
        self.activity
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// KATO in ms (0 = disabled).
    pub fn kato_ms(&self) -> u64 {
        self.kato_ms.load(Ordering::Relaxed)
    }

    /// True if KATO is enabled and nothing (admin command, Keep Alive or I/O
    /// `touch` on any queue) arrived for longer than KATO. No grace beyond
    /// KATO (see the module docs).
    pub fn kato_expired(&self, now_ms: u64) -> bool {
        let kato = self.kato_ms();
        kato != 0 && now_ms.saturating_sub(self.last_activity_ms()) > kato
    }

    /// Removes the controller from the registry (host went silent, admin
    /// queue closed, or subsystem/host removed). Idempotent.
    pub fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.enabled.store(false, Ordering::Release);
        self.view_changed();
        if let Some(t) = self.target.upgrade() {
            t.unregister(&self.subnqn, self.cntlid);
        }
        self.wake();
        tracing::info!(cntlid = self.cntlid, subnqn = %self.subnqn, "controller destroyed");
    }

    /// Destruction decided by the target while it holds the registry.
    pub(crate) fn mark_destroyed(&self) {
        if !self.destroyed.swap(true, Ordering::AcqRel) {
            self.enabled.store(false, Ordering::Release);
            self.view_changed();
            self.wake();
            tracing::info!(cntlid = self.cntlid, subnqn = %self.subnqn, "controller removed by reconfiguration");
        }
    }

    pub fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }

    /// CC.EN=1 && CSTS.RDY=1 && not shut down (and not destroyed).
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire) && !self.is_destroyed()
    }

    /// The generation the current `io_view` must match.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// This controller's view must be rebuilt: called after the state it is
    /// built from (the config snapshot, `destroyed`) is stored, so a view is
    /// never newer-tagged than its data.
    pub(crate) fn view_changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// An I/O queue of this controller closed; its QID may be connected again.
    pub fn release_io_queue(&self, qid: u16) {
        lock(&self.state).io_qids.remove(&qid);
    }

    /// The I/O path's view of namespaces for this controller's subsystem and
    /// port. Rebuilt only when this controller's generation moved.
    pub fn io_view(&self) -> Arc<IoView> {
        // Generation before config: the config is stored before the
        // generation is bumped, so a view is never newer-tagged than its data.
        let generation = self.generation();
        let mut cached = lock(&self.io_view);
        if cached.generation == generation {
            return cached.clone();
        }
        let cfg = self.snapshot();
        let mut namespaces = Vec::new();
        if !self.discovery && !self.is_destroyed() {
            for (ns, ana_state) in cfg.io_namespaces(&self.subnqn, self.port_id) {
                namespaces.push(IoNamespace {
                    nsid: ns.nsid,
                    bdev: ns.bdev.clone(),
                    ana_state,
                    anagrpid: ns.effective_anagrpid(),
                });
            }
        }
        let view = Arc::new(IoView {
            generation,
            namespaces,
        });
        *cached = view.clone();
        view
    }

    fn wake(&self) {
        let w = lock(&self.state).waker.clone();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Namespaces changed: record them in the Changed Namespace List and
    /// raise Namespace Attribute Changed.
    pub(crate) fn notice_ns_changed(&self, nsids: &[u32]) {
        {
            let mut st = lock(&self.state);
            for &n in nsids {
                if st.changed_ns_overflow || st.changed_ns.contains(&n) {
                    continue;
                }
                if st.changed_ns.len() >= crate::spec::log::CHANGED_NS_LIST_ENTRIES {
                    st.changed_ns_overflow = true;
                    st.changed_ns.clear();
                } else {
                    st.changed_ns.push(n);
                }
            }
        }
        self.raise(Event::NsAttrChanged);
    }

    pub(crate) fn notice_ana_change(&self) {
        self.raise(Event::AnaChange);
    }

    pub(crate) fn notice_disc_change(&self) {
        self.raise(Event::DiscoveryLogChange);
    }

    /// Queues an event unless the host disabled it or one of its type is
    /// still unacknowledged (its log page unread), and completes the oldest
    /// parked AER with it.
    fn raise(&self, ev: Event) {
        let mut st = lock(&self.state);
        let bit = ev.aec_bit();
        if st.aec & bit == 0 || st.masked & bit != 0 {
            return;
        }
        st.masked |= bit;
        st.pending.push_back(ev);
        let fired = st.deliver();
        let waker = if fired { st.waker.clone() } else { None };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl AdminState {
    fn new(discovery: bool, kato_ms: u64) -> Self {
        AdminState {
            cc: 0,
            csts: 0,
            io_queues_granted: None,
            io_qids: BTreeSet::new(),
            aec: admin::oaes(discovery),
            vwc_enabled: true,
            temp_over: admin::DEFAULT_TEMP_OVER_K,
            temp_under: 0,
            connect_kato_ms: kato_ms,
            parked_aers: VecDeque::new(),
            pending: VecDeque::new(),
            masked: 0,
            ready: Vec::new(),
            waker: None,
            changed_ns: Vec::new(),
            changed_ns_overflow: false,
        }
    }

    /// Pairs pending events with parked AERs; true if any completed.
    fn deliver(&mut self) -> bool {
        let mut fired = false;
        while !self.pending.is_empty() && !self.parked_aers.is_empty() {
            if let (Some(ev), Some(cid)) = (self.pending.pop_front(), self.parked_aers.pop_front())
            {
                self.ready.push(cpl(cid, Status::SUCCESS, ev.dw0()));
                fired = true;
            }
        }
        fired
    }

    pub(crate) fn is_ready(&self) -> bool {
        admin::cc_en(self.cc)
            && self.csts & admin::CSTS_RDY != 0
            && self.csts & admin::CSTS_SHST_MASK == 0
    }
}
