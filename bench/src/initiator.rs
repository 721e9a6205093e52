//! Userspace NVMe/TCP initiator: the admin queue ([`Controller`]) and I/O
//! queues ([`IoQueue`]), one TCP connection each.
//!
//! Bring-up follows the minimal sequence the Linux host uses (see
//! `shared/notes/linux-host-expectations.md`): ICReq, Connect (cntlid
//! 0xFFFF), Property Get CAP, Property Set CC, poll CSTS.RDY, Identify
//! Controller, Set Features Number of Queues, Identify Namespace; then per
//! I/O queue ICReq + Connect(qid, cntlid).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use strata_target::host;
use strata_target::pdu::{H2CData, PduHeader};
use strata_target::spec::{ConnectData, NvmeCmd, NvmeCpl, Status, admin_opc, io_opc, prop};

use crate::conn::Conn;

/// NVMe/TCP fixes the admin queue's in-capsule data size at 8 KiB.
const ADMIN_IN_CAPSULE: usize = 8192;

#[derive(Clone, Debug)]
pub struct ConnectOpts {
    pub addr: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub nsid: u32,
    pub hdgst: bool,
    pub ddgst: bool,
    /// Keep Alive Timeout sent in Connect, milliseconds (0 disables).
    pub kato_ms: u32,
    /// Bound on every wait for the target during bring-up and teardown.
    pub timeout: Duration,
}

impl ConnectOpts {
    pub fn new(addr: SocketAddr, subnqn: impl Into<String>) -> Self {
        Self {
            addr,
            subnqn: subnqn.into(),
            hostnqn: "nqn.2024-01.io.strata:bench".into(),
            hostid: *b"strata-bench\0\0\0\x01",
            nsid: 1,
            hdgst: false,
            ddgst: false,
            // Linux's NVME_DEFAULT_KATO.
            kato_ms: 5000,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What Identify told us, in the units the load generator needs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ControllerInfo {
    pub cntlid: u16,
    /// CAP.MQES + 1: the most entries an I/O queue may have.
    pub max_queue_entries: u32,
    /// In-capsule data bytes an I/O command may carry ((IOCCSZ*16) - 64).
    pub in_capsule_data: u32,
    /// Largest transfer in bytes (MDTS); None = no limit.
    pub max_transfer: Option<u32>,
    pub io_queues: u16,
    pub maxh2cdata: u32,
    pub nsid: u32,
    pub lba_size: u32,
    pub ns_blocks: u64,
    pub model: String,
    pub serial: String,
}

fn text_field(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// Runs one command to completion on an otherwise idle connection (admin
/// queue, or an I/O queue before its load starts). Not a hot path.
fn exec_sync(
    conn: &mut Conn,
    mut cmd: NvmeCmd,
    data_out: &[u8],
    data_in: &mut [u8],
    in_capsule_max: usize,
    timeout: Duration,
) -> Result<NvmeCpl> {
    let cid = cmd.cid();
    let (hd, dd) = (conn.cfg.hdgst, conn.cfg.ddgst);
    let in_capsule = !data_out.is_empty() && data_out.len() <= in_capsule_max;
    let len = data_out.len().max(data_in.len()) as u32;
    cmd.set_sgl(if in_capsule {
        host::in_capsule_sgl(len)
    } else {
        host::transport_sgl(len)
    });
    let icd = if in_capsule { data_out } else { &[] };
    host::encode_capsule(&cmd, icd, hd, dd, &mut conn.tx);
    conn.flush_blocking(timeout)?;
    let deadline = Instant::now() + timeout;
    loop {
        let p = conn.next_pdu_blocking(deadline)?;
        match p.header {
            PduHeader::CapsuleResp(cpl) => {
                ensure!(
                    cpl.cid == cid,
                    "completion for unknown command id {} (expected {cid})",
                    cpl.cid
                );
                return Ok(cpl);
            }
            PduHeader::C2HData(h) => {
                ensure!(h.cccid == cid, "C2HData for unknown command id {}", h.cccid);
                let off = h.datao as usize;
                let n = p.data.len();
                let total = data_in.len();
                let dst = data_in.get_mut(off..off + n).ok_or_else(|| {
                    anyhow!("C2HData [{off}, +{n}) outside the {total} byte transfer")
                })?;
                dst.copy_from_slice(&conn.rx_bytes()[p.data]);
                if h.last && h.success {
                    return Ok(NvmeCpl::success(cid));
                }
            }
            PduHeader::R2T(r) => {
                ensure!(r.cccid == cid, "R2T for unknown command id {}", r.cccid);
                send_h2c(conn, data_out, r.cccid, r.ttag, r.r2to, r.r2tl)?;
                conn.flush_blocking(timeout)?;
            }
            other => bail!(
                "unexpected {:?} from target during admin command",
                other.pdu_type()
            ),
        }
    }
}

/// Queues H2CData PDUs answering one R2T, each at most MAXH2CDATA long.
fn send_h2c(conn: &mut Conn, data: &[u8], cid: u16, ttag: u16, off: u32, len: u32) -> Result<()> {
    let end = off as usize + len as usize;
    ensure!(
        end <= data.len() && len > 0,
        "R2T for cid {cid} asks for [{off}, +{len}) outside the {} byte write",
        data.len()
    );
    let (hd, dd) = (conn.cfg.hdgst, conn.cfg.ddgst);
    let mut pos = off as usize;
    while pos < end {
        let n = (end - pos).min(conn.maxh2cdata as usize);
        let h = H2CData {
            cccid: cid,
            ttag,
            datao: pos as u32,
            datal: n as u32,
            last: pos + n == end,
        };
        host::encode_h2c(&h, &data[pos..pos + n], hd, dd, &mut conn.tx);
        pos += n;
    }
    Ok(())
}

fn check(cpl: NvmeCpl, what: &str) -> Result<NvmeCpl> {
    if cpl.status.is_success() {
        Ok(cpl)
    } else {
        Err(anyhow!("{what} failed: {:?}", cpl.status))
    }
}

/// The admin queue of one association.
pub struct Controller {
    conn: Conn,
    opts: ConnectOpts,
    pub info: ControllerInfo,
    next_cid: u16,
    last_keep_alive: Instant,
}

impl Controller {
    /// Connects the admin queue, enables the controller and identifies it
    /// and the namespace. `io_queues` is how many I/O queues to ask for.
    pub fn connect(opts: ConnectOpts, io_queues: u16) -> Result<Self> {
        let conn = Conn::connect(opts.addr, opts.hdgst, opts.ddgst, 1 << 20, opts.timeout)
            .context("admin queue")?;
        let mut c = Self {
            conn,
            info: ControllerInfo {
                cntlid: 0,
                max_queue_entries: 0,
                in_capsule_data: 0,
                max_transfer: None,
                io_queues: 0,
                maxh2cdata: 0,
                nsid: opts.nsid,
                lba_size: 512,
                ns_blocks: 0,
                model: String::new(),
                serial: String::new(),
            },
            opts,
            next_cid: 0,
            last_keep_alive: Instant::now(),
        };
        c.info.maxh2cdata = c.conn.maxh2cdata;
        let cd = ConnectData {
            hostid: c.opts.hostid,
            cntlid: host::CNTLID_DYNAMIC,
            subnqn: c.opts.subnqn.clone(),
            hostnqn: c.opts.hostnqn.clone(),
        }
        .encode();
        let cpl = c.exec(
            host::connect_cmd(0, host::ADMIN_SQSIZE, c.opts.kato_ms),
            &cd,
            &mut [],
        )?;
        let cpl = check(cpl, "Connect (admin queue)")?;
        c.info.cntlid = (cpl.dw0 & 0xffff) as u16;

        let cap = c.prop_get(prop::CAP, true)?;
        c.info.max_queue_entries = (cap & 0xffff) as u32 + 1;
        let to_ms = ((cap >> 24) & 0xff).max(1) * 500;
        let mpsmin = 4096u64 << ((cap >> 48) & 0xf);
        c.prop_set(prop::CC, host::CC_ENABLE)?;
        let deadline = Instant::now() + Duration::from_millis(to_ms);
        loop {
            let csts = c.prop_get(prop::CSTS, false)?;
            ensure!(csts & 2 == 0, "controller fatal status (CSTS.CFS) set");
            if csts & 1 == 1 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "controller not ready after {to_ms} ms (CAP.TO)"
            );
            std::thread::sleep(Duration::from_millis(1));
        }

        let mut id = vec![0u8; 4096];
        let cmd = host::identify_cmd(1, 0);
        check(c.exec(cmd, &[], &mut id)?, "Identify Controller")?;
        let id_cntlid = u16::from_le_bytes([id[78], id[79]]);
        ensure!(
            id_cntlid == c.info.cntlid,
            "Identify cntlid {id_cntlid} != Connect cntlid {}",
            c.info.cntlid
        );
        let ioccsz = u32::from_le_bytes(id[1792..1796].try_into()?);
        ensure!(ioccsz >= 4, "Identify IOCCSZ {ioccsz} < 4");
        c.info.in_capsule_data = ioccsz * 16 - 64;
        let mdts = id[77];
        c.info.max_transfer = (mdts != 0).then(|| (mpsmin << mdts).min(u32::MAX as u64) as u32);
        c.info.serial = text_field(&id[4..24]);
        c.info.model = text_field(&id[24..64]);

        let want = io_queues.max(1) - 1;
        let cmd = host::set_features_number_of_queues(want, want);
        let cpl = check(c.exec(cmd, &[], &mut [])?, "Set Features Number of Queues")?;
        let nsqa = (cpl.dw0 & 0xffff) as u16;
        let ncqa = (cpl.dw0 >> 16) as u16;
        c.info.io_queues = nsqa.min(ncqa).saturating_add(1);

        let mut ns = vec![0u8; 4096];
        let cmd = host::identify_cmd(0, c.opts.nsid);
        check(c.exec(cmd, &[], &mut ns)?, "Identify Namespace")?;
        let nsze = u64::from_le_bytes(ns[0..8].try_into()?);
        ensure!(nsze > 0, "namespace {} is empty or inactive", c.opts.nsid);
        let flbas = ns[26];
        let idx = usize::from((flbas & 0xf) | ((flbas >> 1) & 0x30));
        let lbaf = u32::from_le_bytes(ns[128 + 4 * idx..132 + 4 * idx].try_into()?);
        let lbads = (lbaf >> 16) & 0xff;
        ensure!(
            (9..=16).contains(&lbads),
            "namespace LBA data size 2^{lbads} unsupported"
        );
        c.info.lba_size = 1 << lbads;
        c.info.ns_blocks = nsze;
        c.last_keep_alive = Instant::now();
        Ok(c)
    }

    fn exec(&mut self, mut cmd: NvmeCmd, out: &[u8], inp: &mut [u8]) -> Result<NvmeCpl> {
        self.next_cid = self.next_cid.wrapping_add(1);
        cmd.set_cid(self.next_cid);
        exec_sync(
            &mut self.conn,
            cmd,
            out,
            inp,
            ADMIN_IN_CAPSULE,
            self.opts.timeout,
        )
    }

    pub fn prop_get(&mut self, ofst: u32, eight: bool) -> Result<u64> {
        let cmd = host::property_get_cmd(ofst, eight);
        let cpl = check(self.exec(cmd, &[], &mut [])?, "Property Get")?;
        Ok(u64::from(cpl.dw0) | (u64::from(cpl.dw1) << 32))
    }

    pub fn prop_set(&mut self, ofst: u32, val: u32) -> Result<()> {
        let cmd = host::property_set_cmd(ofst, val);
        check(self.exec(cmd, &[], &mut [])?, "Property Set")?;
        Ok(())
    }

    /// Sends Keep Alive if half the timeout has passed since the last one,
    /// as the Linux host does without traffic-based keep-alive.
    pub fn keep_alive_if_due(&mut self) -> Result<()> {
        if self.opts.kato_ms == 0
            || self.last_keep_alive.elapsed()
                < Duration::from_millis(u64::from(self.opts.kato_ms) / 2)
        {
            return Ok(());
        }
        self.keep_alive()
    }

    pub fn keep_alive(&mut self) -> Result<()> {
        check(
            self.exec(host::admin_cmd(admin_opc::KEEP_ALIVE), &[], &mut [])?,
            "Keep Alive",
        )?;
        self.last_keep_alive = Instant::now();
        Ok(())
    }

    pub fn opts(&self) -> &ConnectOpts {
        &self.opts
    }

    /// Opens I/O queue `qid` for `qd` commands in flight.
    pub fn connect_io_queue(&self, qid: u16, qd: u32, max_io: u32) -> Result<IoQueue> {
        IoQueue::connect(&self.opts, &self.info, qid, qd, max_io)
    }

    /// Normal shutdown (CC.SHN=01b), waits for CSTS.SHST=complete, closes.
    /// Problems are reported but the socket is closed either way.
    pub fn disconnect(mut self) -> Result<()> {
        let r = (|| {
            self.prop_set(prop::CC, host::CC_ENABLE | host::CC_SHN_NORMAL)?;
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let csts = self.prop_get(prop::CSTS, false)?;
                if (csts >> 2) & 3 == 2 {
                    return Ok(());
                }
                ensure!(
                    Instant::now() < deadline,
                    "shutdown did not complete (CSTS {csts:#x})"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        })();
        self.conn.shutdown();
        r
    }
}

/// Result of polling an I/O queue: who completed and how.
pub trait Completions {
    /// Read data for `cid` arrived at byte `offset` of the transfer.
    fn c2h_data(&mut self, cid: u16, offset: u32, data: &[u8]) -> Result<()>;
    /// The write buffer of `cid`, for answering R2T.
    fn write_data(&self, cid: u16) -> Option<&[u8]>;
    fn complete(&mut self, cid: u16, status: Status) -> Result<()>;
}

/// One I/O queue: one TCP connection driven by exactly one thread.
pub struct IoQueue {
    conn: Conn,
    pub qid: u16,
    pub nsid: u32,
    pub lba_shift: u32,
    pub in_capsule_data: u32,
    pub entries: u32,
    timeout: Duration,
}

impl IoQueue {
    /// Opens I/O queue `qid` for `qd` commands in flight (the SQ gets one
    /// spare entry: NVMe calls a queue full at entries-1).
    pub fn connect(
        opts: &ConnectOpts,
        info: &ControllerInfo,
        qid: u16,
        qd: u32,
        max_io: u32,
    ) -> Result<Self> {
        ensure!(
            qd >= 1 && qd < info.max_queue_entries,
            "queue depth {qd} needs {} entries; the controller allows {} (CAP.MQES+1)",
            qd + 1,
            info.max_queue_entries
        );
        if let Some(m) = info.max_transfer {
            ensure!(
                max_io <= m,
                "I/O size {max_io} exceeds the controller's MDTS ({m} bytes)"
            );
        }
        let mut conn = Conn::connect(
            opts.addr,
            opts.hdgst,
            opts.ddgst,
            max_io.max(4096),
            opts.timeout,
        )
        .with_context(|| format!("I/O queue {qid}"))?;
        let cd = ConnectData {
            hostid: opts.hostid,
            cntlid: info.cntlid,
            subnqn: opts.subnqn.clone(),
            hostnqn: opts.hostnqn.clone(),
        }
        .encode();
        // SQSIZE is 0's based, so qd here means qd+1 entries.
        let mut cmd = host::connect_cmd(qid, qd.min(65535) as u16, 0);
        cmd.set_cid(0);
        let cpl = exec_sync(&mut conn, cmd, &cd, &mut [], ADMIN_IN_CAPSULE, opts.timeout)?;
        check(cpl, &format!("Connect (I/O queue {qid})"))?;
        Ok(Self {
            conn,
            qid,
            nsid: opts.nsid,
            lba_shift: info.lba_size.trailing_zeros(),
            in_capsule_data: info.in_capsule_data,
            entries: qd + 1,
            timeout: opts.timeout,
        })
    }

    /// Queues a read or write of `len` bytes at `slba`. Writes that fit go
    /// in-capsule; larger ones wait for the target's R2T. Nothing is sent
    /// until [`IoQueue::poll`] or [`IoQueue::flush`].
    pub fn submit(&mut self, cid: u16, opcode: u8, slba: u64, len: u32, wdata: &[u8]) {
        let in_capsule = opcode == io_opc::WRITE && len <= self.in_capsule_data;
        let nlb = len >> self.lba_shift;
        let mut cmd = host::rw_cmd(opcode, self.nsid, slba, nlb, len, in_capsule);
        cmd.set_cid(cid);
        let data = if in_capsule {
            &wdata[..len as usize]
        } else {
            &[]
        };
        let (hd, dd) = (self.conn.cfg.hdgst, self.conn.cfg.ddgst);
        host::encode_capsule(&cmd, data, hd, dd, &mut self.conn.tx);
    }

    pub fn flush(&mut self) -> Result<()> {
        self.conn.flush_nonblocking()
    }

    /// Sends queued commands, waits up to `timeout` for bytes from the
    /// target and hands every complete PDU to `sink`. Returns whether
    /// anything arrived.
    pub fn poll(&mut self, sink: &mut impl Completions, timeout: Duration) -> Result<bool> {
        if !self.conn.fill(timeout)? {
            return Ok(false);
        }
        while let Some(p) = self.conn.next_pdu()? {
            match p.header {
                PduHeader::CapsuleResp(cpl) => sink.complete(cpl.cid, cpl.status)?,
                PduHeader::C2HData(h) => {
                    let data = &self.conn.rx_bytes()[p.data];
                    sink.c2h_data(h.cccid, h.datao, data)?;
                    if h.last && h.success {
                        sink.complete(h.cccid, Status::SUCCESS)?;
                    }
                }
                PduHeader::R2T(r) => {
                    let data = sink.write_data(r.cccid).ok_or_else(|| {
                        anyhow!(
                            "R2T for command id {} that is not a write in flight",
                            r.cccid
                        )
                    })?;
                    send_h2c(&mut self.conn, data, r.cccid, r.ttag, r.r2to, r.r2tl)?;
                }
                other => bail!(
                    "unexpected {:?} from target on I/O queue {}",
                    other.pdu_type(),
                    self.qid
                ),
            }
        }
        Ok(true)
    }

    pub fn tx_pending(&self) -> bool {
        self.conn.tx_pending()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Closes the connection; the caller has drained its commands.
    pub fn disconnect(mut self) {
        self.conn.shutdown();
    }
}
