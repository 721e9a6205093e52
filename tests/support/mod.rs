//! Shared by the integration tests: a `strata serve` process on free ports,
//! and a raw NVMe/TCP client built on the target's own codec for sending
//! exactly the bytes a test wants (well-formed or not).
#![allow(dead_code)]

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_target::pdu::{self, DecodeConfig, ICReq, PduHeader, Role};
use strata_target::spec::{self, ConnectData, NvmeCmd, NvmeCpl, SglDescriptor};

pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768+), so no outgoing
    // connection can take the port between this check and the bind; unique
    // within the process, so two calls never return the same port.
    use std::sync::Mutex;
    static NEXT: Mutex<u32> = Mutex::new(0);
    let mut next = NEXT.lock().unwrap();
    if *next == 0 {
        *next = 20_000 + (std::process::id() * 7919) % 12_000;
    }
    for _ in 0..12_000 {
        let p = *next as u16;
        *next = if *next >= 31_999 { 20_000 } else { *next + 1 };
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port in 20000..32000")
}

/// A running `strata serve`; killed (SIGKILL) on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub discovery_port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Starts `strata serve --config CONFIG` with the first listener and
    /// discovery on free ports; waits until it accepts connections.
    pub fn start(config: Option<&Path>, dir: &Path) -> Server {
        Self::start_on(config, dir, free_port(), free_port())
    }

    pub fn start_on(config: Option<&Path>, dir: &Path, port: u16, discovery_port: u16) -> Server {
        let log = dir.join(format!("serve-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--discovery")
            .arg(format!("127.0.0.1:{discovery_port}"))
            .env("STRATA_LOG", "info,strata_target=debug")
            .env("STRATA_DATA_DIR", dir.join("data"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd.spawn().expect("spawn strata serve");
        let s = Server {
            child,
            port,
            discovery_port,
            log,
        };
        s.wait_ready(port);
        s
    }

    fn wait_ready(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "strata serve did not listen on {port}; log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[derive(Debug)]
pub enum Rsp {
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
                            self.recv_after_icresp(r)
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

    fn recv_after_icresp(&mut self, r: pdu::ICResp) -> Rsp {
        // Surface ICResp as a completion-less marker.
        Rsp::Cpl(NvmeCpl {
            dw0: r.maxh2cdata,
            ..Default::default()
        })
    }

    pub fn icreq(&mut self, hdgst: bool, ddgst: bool) {
        let mut b = Vec::new();
        pdu::encode_icreq(
            &ICReq {
                pfv: 0,
                hpda: 0,
                hdgst,
                ddgst,
                maxr2t: 0,
            },
            &mut b,
        );
        self.send_raw(&b);
        match self.recv() {
            Rsp::Cpl(_) => {}
            other => panic!("no ICResp: {other:?}"),
        }
        self.hdgst = hdgst;
        self.ddgst = ddgst;
    }

    pub fn capsule(&mut self, mut cmd: NvmeCmd, data: &[u8]) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        cmd.set_cid(self.cid);
        let mut b = Vec::new();
        pdu::encode_capsule_cmd(&cmd, data.len(), self.hdgst, self.ddgst, &mut b);
        b.extend_from_slice(data);
        if self.ddgst && !data.is_empty() {
            pdu::encode_ddgst(pdu::crc32c(data), &mut b);
        }
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
        let mut c = NvmeCmd::default();
        c.set_opcode(spec::admin_opc::FABRICS);
        c.0[4] = spec::fctype::CONNECT;
        c.set_cdw(10, u32::from(qid) << 16);
        c.set_cdw(11, 31);
        c.set_cdw(12, kato_ms);
        c.set_sgl(SglDescriptor {
            addr: 0,
            len: 1024,
            id: spec::SGL_ID_DATA_BLOCK_OFFSET,
        });
        let d = ConnectData {
            hostid: [3; 16],
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
        };
        self.exec(c, &d.encode()).0
    }

    /// ICReq, admin Connect, CC.EN=1, Number of Queues; returns the cntlid.
    pub fn admin(port: u16, subnqn: &str, hostnqn: &str) -> (Client, u16) {
        let mut a = Client::connect_tcp(port);
        a.icreq(false, false);
        let c = a.connect(0, 0xffff, subnqn, hostnqn);
        assert!(c.status.is_success(), "admin connect: {c:?}");
        let mut en = NvmeCmd::default();
        en.set_opcode(spec::admin_opc::FABRICS);
        en.0[4] = spec::fctype::PROPERTY_SET;
        en.set_cdw(11, spec::prop::CC);
        en.set_cdw(12, 1 | (6 << 16) | (4 << 20));
        assert!(a.exec(en, &[]).0.status.is_success());
        let mut nq = NvmeCmd::default();
        nq.set_opcode(spec::admin_opc::SET_FEATURES);
        nq.set_cdw(10, u32::from(spec::feat::NUMBER_OF_QUEUES));
        nq.set_cdw(11, 0x0003_0003);
        assert!(a.exec(nq, &[]).0.status.is_success());
        (a, c.dw0 as u16)
    }

    pub fn io(port: u16, subnqn: &str, hostnqn: &str, cntlid: u16, qid: u16) -> Client {
        let mut q = Client::connect_tcp(port);
        q.icreq(false, false);
        let c = q.connect(qid, cntlid, subnqn, hostnqn);
        assert!(c.status.is_success(), "io connect: {c:?}");
        q
    }

    pub fn write(&mut self, slba: u64, data: &[u8], block: usize) -> NvmeCpl {
        let mut c = rw(
            spec::io_opc::WRITE,
            slba,
            (data.len() / block) as u32,
            data.len() as u32,
        );
        if data.len() <= 8192 {
            c.set_sgl(SglDescriptor {
                addr: 0,
                len: data.len() as u32,
                id: spec::SGL_ID_DATA_BLOCK_OFFSET,
            });
            return self.exec(c, data).0;
        }
        self.capsule(c, &[]);
        let Rsp::R2T(r2t) = self.recv() else {
            panic!("expected R2T")
        };
        let mut off = 0usize;
        while off < data.len() {
            let n = (data.len() - off).min(128 * 1024);
            let mut b = Vec::new();
            pdu::encode_h2c_data(
                &pdu::H2CData {
                    cccid: r2t.cccid,
                    ttag: r2t.ttag,
                    datao: off as u32,
                    datal: n as u32,
                    last: off + n == data.len(),
                },
                self.hdgst,
                self.ddgst,
                &mut b,
            );
            b.extend_from_slice(&data[off..off + n]);
            self.send_raw(&b);
            off += n;
        }
        match self.recv() {
            Rsp::Cpl(c) => c,
            other => panic!("{other:?}"),
        }
    }

    pub fn read(&mut self, slba: u64, nlb: u32, block: usize) -> (NvmeCpl, Vec<u8>) {
        self.exec(rw(spec::io_opc::READ, slba, nlb, nlb * block as u32), &[])
    }
}

pub fn rw(opc: u8, slba: u64, nlb: u32, len: u32) -> NvmeCmd {
    let mut c = NvmeCmd::default();
    c.set_opcode(opc);
    c.set_nsid(1);
    c.set_cdw(10, slba as u32);
    c.set_cdw(11, (slba >> 32) as u32);
    c.set_cdw(12, nlb - 1);
    c.set_sgl(SglDescriptor {
        addr: 0,
        len,
        id: spec::SGL_ID_TRANSPORT_DATA_BLOCK,
    });
    c
}

pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
pub mod objstores;

impl Server {
    /// [`Server::start_on`] with another `STRATA_LOG` filter (e.g. to see
    /// objbacker's retry lines at debug level).
    pub fn start_with_log(
        config: &Path,
        dir: &Path,
        port: u16,
        discovery_port: u16,
        filter: &str,
    ) -> Server {
        let log = dir.join(format!("serve-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--discovery")
            .arg(format!("127.0.0.1:{discovery_port}"))
            .arg("--config")
            .arg(config)
            .env("STRATA_LOG", filter)
            .env("STRATA_DATA_DIR", dir.join("data"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn strata serve");
        let s = Server {
            child,
            port,
            discovery_port,
            log,
        };
        s.wait_ready(port);
        s
    }
}

/// Lets a QEMU guest ask the host to act mid-script: it fetches
/// `http://10.0.2.2:PORT/<action>` with busybox wget.
/// Serves `GET /<action>` from the guest; the body is `act(action)`.
pub fn trigger_server(act: impl Fn(&str) -> String + Send + 'static) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut line = String::new();
            if std::io::BufReader::new(&s).read_line(&mut line).is_err() {
                continue;
            }
            let action = line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .trim_start_matches('/')
                .to_string();
            let body = act(&action);
            let _ = s.write_all(
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    port
}
