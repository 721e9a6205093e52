//! Shared by the integration tests: a `strata serve` process on free ports,
//! and a raw NVMe/TCP client built on the target's own codec for sending
//! exactly the bytes a test wants (well-formed or not).
#![allow(dead_code)]

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_target::pdu::{self, DecodeConfig, ICReq, PduHeader, Role};
use strata_target::spec::{self, ConnectData, NvmeCmd, NvmeCpl, SglDescriptor};

/// Makes `cmd` safe to spawn from a test: the child leads its own process
/// group (so [`kill_and_reap`] reaches anything it spawns in turn), and on
/// Linux it gets SIGKILL when the spawning thread's process dies abruptly
/// (PR_SET_PDEATHSIG), so a crashed or killed test run leaves no server.
///
/// PR_SET_PDEATHSIG fires when the *thread* that spawned the child exits:
/// spawn from a thread that outlives the child (the test's own thread, or a
/// helper thread that is joined only after the child is dropped).
pub fn guard_command(cmd: &mut Command) -> &mut Command {
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died between fork and prctl: nobody will kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    cmd
}

/// Whether `child` exited, without reaping it (waitid WNOWAIT): until it is
/// reaped, its pid — also its process group's id — cannot be reused, so
/// [`kill_and_reap`] can still kill the group safely. Use this (or
/// [`Server::wait_exit`]) instead of `child.try_wait()`, which reaps.
pub fn has_exited(child: &Child) -> bool {
    peek(child) != Peek::Running
}

#[derive(PartialEq)]
enum Peek {
    Running,
    Exited,
    /// Already reaped (by std): the pid is no longer ours.
    Reaped,
}

fn peek(child: &Child) -> Peek {
    // SAFETY: waitid(2) with WNOWAIT on our own child; siginfo_t is plain
    // data.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            child.id() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        match (r, info.si_pid()) {
            (0, 0) => Peek::Running,
            (0, _) => Peek::Exited,
            _ => Peek::Reaped,
        }
    }
}

/// SIGKILLs the process group `child` leads (see [`guard_command`]) and
/// reaps the child; returns its exit status. Idempotent (once the child is
/// reaped its group is not signalled again: the pid is no longer ours).
pub fn kill_and_reap(child: &mut Child) -> Option<std::process::ExitStatus> {
    if peek(child) != Peek::Reaped {
        // SAFETY: kill(2) on the group our own, unreaped child leads.
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = child.kill();
    }
    child.wait().ok()
}

/// A spawned child that is killed with its process group and reaped on
/// drop, also when the test panics.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `cmd` with [`guard_command`] applied.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<ChildGuard> {
        guard_command(cmd).spawn().map(ChildGuard)
    }

    /// Waits up to `limit` for the child to exit; kills it (and fails the
    /// test) if it does not.
    pub fn wait_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let done = wait_until(limit, || has_exited(&self.0));
        let status = kill_and_reap(&mut self.0).expect("wait for child");
        assert!(done, "child {} did not exit within {limit:?}", self.0.id());
        status
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        kill_and_reap(&mut self.0);
    }
}

/// Polls `cond` every 10 ms until it holds (true) or `limit` passes (false,
/// after one last check). Tests wait for events with this instead of
/// sleeping a fixed time.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `cmd`'s stdout and stderr once it exits; the child is killed (and the
/// test fails) if it runs longer than `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = ChildGuard::spawn(cmd).expect("spawn");
    let status = child.wait_within(limit);
    std::process::Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

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

/// A running `strata serve`, spawned with [`guard_command`]: killed
/// (SIGKILL, with its process group) and reaped on drop, and killed by the
/// kernel if the test process dies. Keep it owned by the test (not in a
/// static, nor in an `Arc` held by a thread that never ends — see
/// [`trigger_server`]), so the drop runs.
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
        let child = guard_command(&mut cmd).spawn().expect("spawn strata serve");
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

    /// SIGKILL (the whole process group) and reap.
    pub fn kill9(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// Waits up to `limit` for the process to exit on its own; then kills
    /// what is left of its process group and reaps it. `None` if it was
    /// still running at the deadline (it is killed then, too).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let exited = wait_until(limit, || has_exited(&self.child));
        let st = kill_and_reap(&mut self.child);
        if exited { st } else { None }
    }

    /// Waits up to `limit` for `needle` to appear in the log.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        wait_until(limit, || self.log_text().contains(needle))
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
        let child = guard_command(&mut Command::new(env!("CARGO_BIN_EXE_strata")))
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
///
/// The returned [`Trigger`] prints as its port (for the guest script). Its
/// drop stops and joins the serving thread, which drops `act` and whatever
/// it holds — e.g. an `Arc` of the test's [`Server`]. (A thread that served
/// forever kept such a server alive past the end of its test, and as the
/// process exits without running destructors, the `strata serve` it held
/// was orphaned.) Declare it after what `act` holds, so it drops first.
pub fn trigger_server(act: impl Fn(&str) -> String + Send + 'static) -> Trigger {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        for s in l.incoming() {
            if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
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
    Trigger {
        port,
        stop,
        thread: Some(thread),
    }
}

/// The serving thread of [`trigger_server`]; stopped and joined on drop.
pub struct Trigger {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.port)
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
