//! A tiny in-process NVMe/TCP target built on the shared PDU codec.
//!
//! It exists for two reasons. It is the *null path* that the initiator's
//! overhead is measured against: it answers every command at once from a
//! blocking loop, so what remains is the initiator's own cost plus loopback
//! TCP. And it lets the initiator be tested before (and independently of)
//! `strata serve`: with a file backend a test can corrupt data behind the
//! target's back and watch verify mode find it.
//!
//! It implements only what the initiator uses: one namespace, the bring-up
//! admin commands, Keep Alive, Read and Write (in-capsule and R2T).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use strata_target::pdu::{
    self, C2HData, DecodeConfig, ICResp, PduHeader, R2T, Role, TermReq, crc32c,
};
use strata_target::spec::{NvmeCmd, NvmeCpl, Status, admin_opc, fctype, feat, io_opc, prop};

use crate::stats::thread_cpu_ns;

const IN_CAPSULE: usize = 8192;
const MAXH2CDATA: u32 = 128 * 1024;
const CNTLID: u16 = 1;

/// Where namespace data lives.
pub enum Backend {
    /// Reads return zeros, writes are dropped: the cheapest possible target.
    Null,
    Memory(Mutex<Vec<u8>>),
    File(File),
}

#[derive(Clone, Debug)]
pub struct MiniTargetConfig {
    pub subnqn: String,
    pub ns_bytes: u64,
    pub lba_size: u32,
    /// Split read data into C2HData PDUs of at most this many bytes.
    pub c2h_chunk: u32,
    /// Set SUCCESS on the last C2HData instead of sending a CapsuleResp.
    pub c2h_success: bool,
    /// Bytes asked for per R2T, so large writes take several.
    pub r2t_chunk: u32,
}

impl Default for MiniTargetConfig {
    fn default() -> Self {
        Self {
            subnqn: "nqn.2024-01.io.strata:null".into(),
            ns_bytes: 1 << 30,
            lba_size: 512,
            c2h_chunk: 128 * 1024,
            c2h_success: true,
            r2t_chunk: 256 * 1024,
        }
    }
}

struct Shared {
    cfg: MiniTargetConfig,
    backend: Backend,
    cc: AtomicU64,
    stop: AtomicBool,
    cpu_ns: AtomicU64,
    ios: AtomicU64,
}

pub struct MiniTarget {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl MiniTarget {
    pub fn spawn(cfg: MiniTargetConfig, backend: Backend) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cfg,
            backend,
            cc: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            cpu_ns: AtomicU64::new(0),
            ios: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("minitarget-accept".into())
            .spawn(move || {
                for s in listener.incoming() {
                    if sh.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(s) = s else { continue };
                    let sh = sh.clone();
                    let _ = std::thread::Builder::new()
                        .name("minitarget-conn".into())
                        .spawn(move || {
                            let t0 = thread_cpu_ns();
                            // A connection error only ends that connection;
                            // the initiator side reports what it saw.
                            let _ = serve_conn(s, &sh);
                            sh.cpu_ns
                                .fetch_add(thread_cpu_ns().saturating_sub(t0), Ordering::Relaxed);
                        });
                }
            })?;
        Ok(Self {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    pub fn null() -> Result<Self> {
        Self::spawn(MiniTargetConfig::default(), Backend::Null)
    }

    pub fn subnqn(&self) -> &str {
        &self.shared.cfg.subnqn
    }

    /// CPU time spent by finished connections, nanoseconds.
    pub fn cpu_ns(&self) -> u64 {
        self.shared.cpu_ns.load(Ordering::Relaxed)
    }

    pub fn ios(&self) -> u64 {
        self.shared.ios.load(Ordering::Relaxed)
    }
}

impl Drop for MiniTarget {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

struct PendingWrite {
    slba: u64,
    buf: Vec<u8>,
    got: usize,
    asked: usize,
}

struct ConnState<'a> {
    sh: &'a Shared,
    cfg: DecodeConfig,
    tx: Vec<u8>,
    writes: HashMap<u16, PendingWrite>,
    next_ttag: u16,
}

fn serve_conn(mut s: TcpStream, sh: &Shared) -> Result<()> {
    s.set_nodelay(true)?;
    let mut st = ConnState {
        sh,
        cfg: DecodeConfig::initial(Role::Target),
        tx: Vec::with_capacity(256 * 1024),
        writes: HashMap::new(),
        next_ttag: 0,
    };
    let mut buf = vec![0u8; 2 * (MAXH2CDATA as usize + IN_CAPSULE + 1024)];
    let (mut pos, mut len) = (0usize, 0usize);
    loop {
        loop {
            let parsed = match pdu::parse_header(&buf[pos..len], &st.cfg) {
                Ok(Some(p)) if len - pos >= p.plen => p,
                Ok(_) => break,
                Err(e) => {
                    let hdr = buf[pos..len.min(pos + 128)].to_vec();
                    let t = TermReq {
                        fes: e.fes,
                        fei: e.fei,
                        hdr,
                    };
                    pdu::encode_term_req(pdu::PduType::C2HTermReq, &t, &mut st.tx);
                    s.write_all(&st.tx)?;
                    bail!("bad PDU from host: {e}");
                }
            };
            let d0 = pos + parsed.data_offset;
            let data = &buf[d0..d0 + parsed.data_len];
            if parsed.has_ddgst {
                let got = u32::from_le_bytes(buf[d0 + data.len()..d0 + data.len() + 4].try_into()?);
                if got != crc32c(data) {
                    bail!("data digest mismatch from host");
                }
            }
            st.handle(parsed.header, data)?;
            pos += parsed.plen;
        }
        if !st.tx.is_empty() {
            s.write_all(&st.tx)?;
            st.tx.clear();
        }
        if pos == len {
            pos = 0;
            len = 0;
        } else if pos > buf.len() / 2 {
            buf.copy_within(pos..len, 0);
            len -= pos;
            pos = 0;
        }
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
}

impl ConnState<'_> {
    fn resp(&mut self, cpl: NvmeCpl) {
        pdu::encode_capsule_resp(&cpl, self.cfg.hdgst, &mut self.tx);
    }

    fn handle(&mut self, h: PduHeader, data: &[u8]) -> Result<()> {
        match h {
            PduHeader::ICReq(req) => {
                pdu::validate_icreq(&req).map_err(|e| anyhow!("{e}"))?;
                let r = ICResp {
                    pfv: 0,
                    cpda: 0,
                    hdgst: req.hdgst,
                    ddgst: req.ddgst,
                    maxh2cdata: MAXH2CDATA,
                };
                pdu::encode_icresp(&r, &mut self.tx);
                self.cfg = DecodeConfig {
                    role: Role::Target,
                    hdgst: req.hdgst,
                    ddgst: req.ddgst,
                    max_data: MAXH2CDATA.max(IN_CAPSULE as u32 + 1024),
                    connected: true,
                };
            }
            PduHeader::CapsuleCmd(cmd) => self.command(&cmd, data)?,
            PduHeader::H2CData(d) => {
                let Some(w) = self.writes.get_mut(&d.cccid) else {
                    bail!("H2CData for unknown cid {}", d.cccid);
                };
                let off = d.datao as usize;
                let dst = w
                    .buf
                    .get_mut(off..off + data.len())
                    .ok_or_else(|| anyhow!("H2CData out of range"))?;
                dst.copy_from_slice(data);
                w.got += data.len();
                if w.got == w.buf.len() {
                    let w = self.writes.remove(&d.cccid).expect("present");
                    let st = self.write(w.slba, &w.buf);
                    self.resp(NvmeCpl::new(d.cccid, st));
                } else if w.got == w.asked {
                    self.ask_more(d.cccid);
                }
            }
            PduHeader::H2CTermReq(t) => bail!("host terminated: {:?}", t.fes),
            other => bail!("unexpected {:?}", other.pdu_type()),
        }
        Ok(())
    }

    fn ask_more(&mut self, cid: u16) {
        let chunk = self.sh.cfg.r2t_chunk as usize;
        let w = self.writes.get_mut(&cid).expect("present");
        let n = (w.buf.len() - w.asked).min(chunk);
        let r = R2T {
            cccid: cid,
            ttag: self.next_ttag,
            r2to: w.asked as u32,
            r2tl: n as u32,
        };
        w.asked += n;
        self.next_ttag = self.next_ttag.wrapping_add(1);
        pdu::encode_r2t(&r, self.cfg.hdgst, &mut self.tx);
    }

    fn ns_blocks(&self) -> u64 {
        self.sh.cfg.ns_bytes / u64::from(self.sh.cfg.lba_size)
    }

    fn range(&self, cmd: &NvmeCmd) -> Result<(u64, usize), Status> {
        let (slba, nlb) = (cmd.slba(), u64::from(cmd.nlb()));
        if slba.checked_add(nlb).is_none_or(|e| e > self.ns_blocks()) {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        Ok((
            slba * u64::from(self.sh.cfg.lba_size),
            (nlb * u64::from(self.sh.cfg.lba_size)) as usize,
        ))
    }

    fn write(&self, slba: u64, data: &[u8]) -> Status {
        self.sh.ios.fetch_add(1, Ordering::Relaxed);
        let off = slba * u64::from(self.sh.cfg.lba_size);
        match &self.sh.backend {
            Backend::Null => Status::SUCCESS,
            Backend::Memory(m) => {
                let mut m = m.lock().expect("poisoned");
                m[off as usize..off as usize + data.len()].copy_from_slice(data);
                Status::SUCCESS
            }
            Backend::File(f) => match f.write_all_at(data, off) {
                Ok(()) => Status::SUCCESS,
                Err(_) => Status::WRITE_FAULT,
            },
        }
    }

    fn command(&mut self, cmd: &NvmeCmd, data: &[u8]) -> Result<()> {
        let cid = cmd.cid();
        match cmd.opcode() {
            io_opc::READ => {
                self.sh.ios.fetch_add(1, Ordering::Relaxed);
                let (off, len) = match self.range(cmd) {
                    Ok(r) => r,
                    Err(st) => {
                        self.resp(NvmeCpl::new(cid, st));
                        return Ok(());
                    }
                };
                let chunk = self.sh.cfg.c2h_chunk as usize;
                let mut pos = 0;
                while pos < len {
                    let n = (len - pos).min(chunk);
                    let last = pos + n == len;
                    let h = C2HData {
                        cccid: cid,
                        datao: pos as u32,
                        datal: n as u32,
                        last,
                        success: last && self.sh.cfg.c2h_success,
                    };
                    pdu::encode_c2h_data(&h, self.cfg.hdgst, self.cfg.ddgst, &mut self.tx);
                    let at = self.tx.len();
                    self.tx.resize(at + n, 0);
                    let dst = &mut self.tx[at..];
                    match &self.sh.backend {
                        Backend::Null => {}
                        Backend::Memory(m) => {
                            let m = m.lock().expect("poisoned");
                            let o = off as usize + pos;
                            dst.copy_from_slice(&m[o..o + n]);
                        }
                        Backend::File(f) => f.read_exact_at(dst, off + pos as u64)?,
                    }
                    if self.cfg.ddgst {
                        let c = crc32c(&self.tx[at..]);
                        pdu::encode_ddgst(c, &mut self.tx);
                    }
                    pos += n;
                }
                if !self.sh.cfg.c2h_success {
                    self.resp(NvmeCpl::success(cid));
                }
            }
            io_opc::WRITE => {
                let (_, len) = match self.range(cmd) {
                    Ok(r) => r,
                    Err(st) => {
                        self.resp(NvmeCpl::new(cid, st));
                        return Ok(());
                    }
                };
                if !data.is_empty() {
                    if data.len() != len {
                        self.resp(NvmeCpl::new(cid, Status::DATA_SGL_LENGTH_INVALID));
                        return Ok(());
                    }
                    let st = self.write(cmd.slba(), data);
                    self.resp(NvmeCpl::new(cid, st));
                } else {
                    self.writes.insert(
                        cid,
                        PendingWrite {
                            slba: cmd.slba(),
                            buf: vec![0; len],
                            got: 0,
                            asked: 0,
                        },
                    );
                    self.ask_more(cid);
                }
            }
            admin_opc::FABRICS => self.fabrics(cmd)?,
            admin_opc::IDENTIFY => self.identify(cmd),
            admin_opc::SET_FEATURES if cmd.cdw10() & 0xff == u32::from(feat::NUMBER_OF_QUEUES) => {
                let mut c = NvmeCpl::success(cid);
                c.dw0 = 63 | (63 << 16);
                self.resp(c);
            }
            admin_opc::KEEP_ALIVE => self.resp(NvmeCpl::success(cid)),
            _ => self.resp(NvmeCpl::new(cid, Status::INVALID_OPCODE.dnr())),
        }
        Ok(())
    }

    fn fabrics(&mut self, cmd: &NvmeCmd) -> Result<()> {
        let cid = cmd.cid();
        let mut c = NvmeCpl::success(cid);
        match cmd.fctype() {
            fctype::CONNECT => c.dw0 = u32::from(CNTLID),
            fctype::PROPERTY_GET => {
                let cc = self.sh.cc.load(Ordering::Relaxed);
                let v: u64 = match cmd.cdw11() {
                    // MQES 1023, CQR, TO = 1 (500 ms), CSS NVM.
                    prop::CAP => 1023 | (1 << 16) | (1 << 24) | (1 << 37),
                    prop::VS => 0x0001_0400,
                    prop::CC => cc,
                    prop::CSTS => (cc & 1) | if (cc >> 14) & 3 != 0 { 2 << 2 } else { 0 },
                    _ => {
                        self.resp(NvmeCpl::new(cid, Status::INVALID_FIELD.dnr()));
                        return Ok(());
                    }
                };
                c.dw0 = v as u32;
                c.dw1 = (v >> 32) as u32;
            }
            fctype::PROPERTY_SET if cmd.cdw11() == prop::CC => {
                self.sh.cc.store(u64::from(cmd.cdw12()), Ordering::Relaxed);
            }
            _ => c = NvmeCpl::new(cid, Status::INVALID_FIELD.dnr()),
        }
        self.resp(c);
        Ok(())
    }

    fn identify(&mut self, cmd: &NvmeCmd) {
        let mut b = [0u8; 4096];
        match cmd.cdw10() & 0xff {
            1 => {
                b[4..8].copy_from_slice(b"0001");
                b[24..38].copy_from_slice(b"strata-minitgt");
                b[77] = 8; // MDTS: 1 MiB
                b[78..80].copy_from_slice(&CNTLID.to_le_bytes());
                b[320..322].copy_from_slice(&1u16.to_le_bytes()); // KAS
                b[514..516].copy_from_slice(&1024u16.to_le_bytes()); // MAXCMD
                b[516..520].copy_from_slice(&1u32.to_le_bytes()); // NN
                b[536..540].copy_from_slice(&1u32.to_le_bytes()); // SGLS
                let n = self.sh.cfg.subnqn.as_bytes();
                b[768..768 + n.len().min(256)].copy_from_slice(&n[..n.len().min(256)]);
                let ioccsz = ((IN_CAPSULE + 64) / 16) as u32;
                b[1792..1796].copy_from_slice(&ioccsz.to_le_bytes());
                b[1796..1800].copy_from_slice(&1u32.to_le_bytes());
            }
            0 if cmd.nsid() == 1 => {
                let n = self.ns_blocks();
                b[0..8].copy_from_slice(&n.to_le_bytes());
                b[8..16].copy_from_slice(&n.to_le_bytes());
                b[16..24].copy_from_slice(&n.to_le_bytes());
                let lbads = self.sh.cfg.lba_size.trailing_zeros();
                b[128..132].copy_from_slice(&(lbads << 16).to_le_bytes());
            }
            _ => {
                self.resp(NvmeCpl::new(cmd.cid(), Status::INVALID_FIELD.dnr()));
                return;
            }
        }
        let h = C2HData {
            cccid: cmd.cid(),
            datao: 0,
            datal: 4096,
            last: true,
            success: false,
        };
        pdu::encode_c2h_data(&h, self.cfg.hdgst, self.cfg.ddgst, &mut self.tx);
        self.tx.extend_from_slice(&b);
        if self.cfg.ddgst {
            pdu::encode_ddgst(crc32c(&b), &mut self.tx);
        }
        self.resp(NvmeCpl::success(cmd.cid()));
    }
}

/// Opens (creating if needed) a file of `bytes` as a file backend.
pub fn file_backend(path: &std::path::Path, bytes: u64) -> Result<Backend> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.set_len(bytes)?;
    Ok(Backend::File(f))
}
