//! A blocking NVMe/TCP host connection for tests: one TCP stream, the
//! target's own codec, and the commands from `strata_target::host`, so a
//! test can send exactly the bytes it wants (well-formed or not) and see
//! each PDU the target answers with.
//!
//! Everything panics on the unexpected: a test wants the failure where it
//! happened, not an error to thread through.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use strata_target::host;
use strata_target::pdu::{self, DecodeConfig, PduHeader, Role};
use strata_target::spec::{self, ConnectData, NvmeCmd, NvmeCpl};

/// Host ID the kit's Connect commands carry.
pub const HOSTID: [u8; 16] = [3; 16];

/// What the target sent.
#[derive(Debug)]
pub enum Rsp {
    /// A completion; an ICResp shows up as one too, with MAXH2CDATA in
    /// `dw0`.
    Cpl(NvmeCpl),
    C2H(pdu::C2HData, Vec<u8>),
    R2T(pdu::R2T),
    Term(pdu::TermReq),
    Closed,
}

/// One NVMe/TCP connection with blocking I/O and a short read timeout.
pub struct Client {
    pub s: TcpStream,
    buf: Vec<u8>,
    cfg: DecodeConfig,
    pub hdgst: bool,
    pub ddgst: bool,
    cid: u16,
}

impl Client {
    /// TCP only: nothing is sent yet.
    pub fn connect_tcp(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            s,
            buf: Vec::new(),
            cfg: DecodeConfig::initial(Role::Host),
            hdgst: false,
            ddgst: false,
            cid: 0,
        }
    }

    /// Ignores write errors: a test that sends into a connection the target
    /// already closed checks the close, not the write.
    pub fn send_raw(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    /// Reads one PDU; `Closed` when the target closed the connection.
    pub fn recv(&mut self) -> Rsp {
        loop {
            match pdu::parse_header(&self.buf, &self.cfg) {
                Ok(Some(p)) if self.buf.len() >= p.plen => {
                    let data = self.buf[p.data_offset..p.data_offset + p.data_len].to_vec();
                    self.buf.drain(..p.plen);
                    return match p.header {
                        PduHeader::ICResp(r) => {
                            self.cfg =
                                DecodeConfig::established(Role::Host, r.hdgst, r.ddgst, 1 << 24);
                            Rsp::Cpl(NvmeCpl {
                                dw0: r.maxh2cdata,
                                ..Default::default()
                            })
                        }
                        PduHeader::CapsuleResp(c) => Rsp::Cpl(c),
                        PduHeader::C2HData(h) => Rsp::C2H(h, data),
                        PduHeader::R2T(r) => Rsp::R2T(r),
                        PduHeader::C2HTermReq(t) => Rsp::Term(t),
                        other => panic!("unexpected PDU from target: {other:?}"),
                    };
                }
                Ok(_) => {}
                Err(e) => panic!("target sent a malformed PDU: {e:?}"),
            }
            let mut tmp = [0u8; 65536];
            match self.s.read(&mut tmp) {
                Ok(0) => return Rsp::Closed,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Rsp::Closed,
                Err(e) => panic!("read from target: {e}"),
            }
        }
    }

    /// ICReq with these digests, and the ICResp.
    pub fn icreq(&mut self, hdgst: bool, ddgst: bool) {
        let mut b = Vec::new();
        host::encode_icreq(hdgst, ddgst, &mut b);
        self.send_raw(&b);
        match self.recv() {
            Rsp::Cpl(_) => {}
            other => panic!("no ICResp: {other:?}"),
        }
        self.hdgst = hdgst;
        self.ddgst = ddgst;
    }

    /// Sends `cmd` with the next command ID and `data` in-capsule; returns
    /// the command ID.
    pub fn capsule(&mut self, mut cmd: NvmeCmd, data: &[u8]) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        cmd.set_cid(self.cid);
        let mut b = Vec::new();
        host::encode_capsule(&cmd, data, self.hdgst, self.ddgst, &mut b);
        self.send_raw(&b);
        self.cid
    }

    /// Sends a command and returns its completion plus any C2H data.
    pub fn exec(&mut self, cmd: NvmeCmd, data: &[u8]) -> (NvmeCpl, Vec<u8>) {
        self.capsule(cmd, data);
        let mut got = Vec::new();
        loop {
            match self.recv() {
                Rsp::Cpl(c) => return (c, got),
                Rsp::C2H(_, d) => got.extend_from_slice(&d),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Fabrics Connect of queue `qid` (SQSIZE 31, KATO 30 s).
    pub fn connect(&mut self, qid: u16, cntlid: u16, subnqn: &str, hostnqn: &str) -> NvmeCpl {
        self.connect_kato(qid, cntlid, subnqn, hostnqn, 30_000)
    }

    pub fn connect_kato(
        &mut self,
        qid: u16,
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
        kato_ms: u32,
    ) -> NvmeCpl {
        let d = ConnectData {
            hostid: HOSTID,
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
        };
        let (c, d) = host::connect(qid, host::ADMIN_SQSIZE, kato_ms, &d);
        self.exec(c, &d).0
    }

    /// ICReq, admin Connect, CC.EN=1, Number of Queues (4 each); returns
    /// the connection and the cntlid.
    pub fn admin(port: u16, subnqn: &str, hostnqn: &str) -> (Client, u16) {
        let mut a = Client::connect_tcp(port);
        a.icreq(false, false);
        let c = a.connect(0, host::CNTLID_DYNAMIC, subnqn, hostnqn);
        assert!(c.status.is_success(), "admin connect: {c:?}");
        a.enable();
        let nq = host::set_features_number_of_queues(3, 3);
        assert!(a.exec(nq, &[]).0.status.is_success());
        (a, c.dw0 as u16)
    }

    /// Property Set CC.EN=1 (with the I/O queue entry sizes); asserts
    /// success.
    pub fn enable(&mut self) {
        let en = host::property_set_cmd(spec::prop::CC, host::CC_ENABLE);
        let (c, _) = self.exec(en, &[]);
        assert!(c.status.is_success(), "CC.EN=1: {c:?}");
    }

    /// ICReq and Connect of I/O queue `qid` to controller `cntlid`.
    pub fn io(port: u16, subnqn: &str, hostnqn: &str, cntlid: u16, qid: u16) -> Client {
        let mut q = Client::connect_tcp(port);
        q.icreq(false, false);
        let c = q.connect(qid, cntlid, subnqn, hostnqn);
        assert!(c.status.is_success(), "io connect: {c:?}");
        q
    }

    /// Writes `data` at `slba` of namespace 1: in-capsule up to 8 KiB,
    /// otherwise through R2T and H2CData of at most 128 KiB each.
    pub fn write(&mut self, slba: u64, data: &[u8], block: usize) -> NvmeCpl {
        let nlb = (data.len() / block) as u32;
        if data.len() <= 8192 {
            let c = host::rw_cmd(spec::io_opc::WRITE, 1, slba, nlb, data.len() as u32, true);
            return self.exec(c, data).0;
        }
        let c = rw(spec::io_opc::WRITE, slba, nlb, data.len() as u32);
        self.capsule(c, &[]);
        let Rsp::R2T(r2t) = self.recv() else {
            panic!("expected R2T")
        };
        let mut off = 0usize;
        while off < data.len() {
            let n = (data.len() - off).min(128 * 1024);
            let h = pdu::H2CData {
                cccid: r2t.cccid,
                ttag: r2t.ttag,
                datao: off as u32,
                datal: n as u32,
                last: off + n == data.len(),
            };
            let mut b = Vec::new();
            host::encode_h2c(&h, &data[off..off + n], self.hdgst, self.ddgst, &mut b);
            self.send_raw(&b);
            off += n;
        }
        match self.recv() {
            Rsp::Cpl(c) => c,
            other => panic!("{other:?}"),
        }
    }

    /// Reads `nlb` blocks at `slba` of namespace 1.
    pub fn read(&mut self, slba: u64, nlb: u32, block: usize) -> (NvmeCpl, Vec<u8>) {
        self.exec(rw(spec::io_opc::READ, slba, nlb, nlb * block as u32), &[])
    }
}

/// A read or write (`opc`) of `nlb` blocks at `slba` of namespace 1 whose
/// `len` data bytes move by R2T/H2CData or C2HData.
pub fn rw(opc: u8, slba: u64, nlb: u32, len: u32) -> NvmeCmd {
    host::rw_cmd(opc, 1, slba, nlb, len, false)
}
