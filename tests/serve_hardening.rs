//! `strata serve` against hosts no one here wrote: every command answered
//! exactly once, bounded Connect fields, anonymous hosts, refusal reasons in
//! the log, and the resource limits (a host that never reads, one that
//! withholds its last H2CData, one that never sends ICReq), each while
//! another connection's verified I/O carries on.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use strata_target::host;
use strata_target::pdu;
use strata_target::spec::{self, ConnectData, NvmeCmd, Status};
use strata_testkit::host::HOSTID;
use support::{Client, Rsp, Server, pattern, rw};

const DEFAULT_NQN: &str = "nqn.2026-11.dev.strata:default";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

fn verified_io(io: &mut Client, round: u64) {
    let data = pattern(8192, round);
    let slba = (round % 1000) * 16;
    assert!(io.write(slba, &data, 512).status.is_success());
    let (c, back) = io.read(slba, 16, 512);
    assert!(c.status.is_success());
    assert_eq!(back, data, "other connection's data after round {round}");
}

/// Waits until `cond` holds or the deadline passes; returns whether it held.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// True if a new connection gets an ICResp (the listener is not at its limit).
fn icreq_answered(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut b = Vec::new();
    host::encode_icreq(false, false, &mut b);
    if s.write_all(&b).is_err() {
        return false;
    }
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut r = [0u8; 128];
    s.read_exact(&mut r).is_ok()
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Sends one capsule and expects exactly one response for it (a C2HData
/// may precede the CapsuleResp), within the client's read timeout.
fn one_response(c: &mut Client, cmd: NvmeCmd, what: &str) -> NvmeCplLite {
    let cid = c.capsule(cmd, &[]);
    loop {
        match c.recv() {
            Rsp::Cpl(cpl) => {
                assert_eq!(cpl.cid, cid, "{what}: response for another CID");
                return NvmeCplLite { status: cpl.status };
            }
            Rsp::C2H(h, _) => assert_eq!(h.cccid, cid, "{what}: data for another CID"),
            Rsp::R2T(r) => {
                // The target asks for data: send zeros; the answer follows.
                let mut b = Vec::new();
                let n = r.r2tl as usize;
                pdu::encode_h2c_data(
                    &pdu::H2CData {
                        cccid: r.cccid,
                        ttag: r.ttag,
                        datao: 0,
                        datal: n as u32,
                        last: true,
                    },
                    false,
                    false,
                    &mut b,
                );
                b.resize(b.len() + n, 0);
                c.send_raw(&b);
            }
            other => panic!("{what}: {other:?}"),
        }
    }
}

struct NvmeCplLite {
    status: Status,
}

#[test]
fn every_opcode_with_every_psdt_gets_exactly_one_completion() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(None, dir.path());
    let (mut admin, cntlid) = Client::admin(srv.port, DEFAULT_NQN, HOST);
    let mut io = Client::io(srv.port, DEFAULT_NQN, HOST, cntlid, 1);
    let mut other = {
        let (_a, id) = Client::admin(srv.port, DEFAULT_NQN, HOST);
        (_a, Client::io(srv.port, DEFAULT_NQN, HOST, id, 1))
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);

    // The two commands a random-command fuzzer saw left unanswered.
    for (opc, flags, cdw10, cdw11) in [
        (0xb8u8, 0xc0u8, 0xC281_B767u32, 0xA9D5_B174u32),
        (0x89, 0x00, 0xB9F0_B9BB, 0),
    ] {
        let mut c = NvmeCmd::default();
        rng.fill(&mut c.0[..]);
        c.set_opcode(opc);
        c.0[1] = flags;
        c.set_nsid(2);
        c.set_cdw(10, cdw10);
        c.set_cdw(11, cdw11);
        let r = one_response(&mut admin, c, &format!("opc {opc:#x}"));
        assert_eq!(r.status, Status::INVALID_FIELD.dnr(), "opc {opc:#x}");
    }
    let mut round = 0;
    for (qname, q) in [("admin", &mut admin), ("io", &mut io)] {
        for opc in 0..=255u8 {
            // Commands that legitimately change or end the association
            // have their own tests.
            if matches!(
                opc,
                spec::admin_opc::FABRICS
                    | spec::admin_opc::ASYNC_EVENT_REQUEST
                    | spec::admin_opc::SET_FEATURES
            ) {
                continue;
            }
            for psdt in 0..4u8 {
                let mut c = NvmeCmd::default();
                rng.fill(&mut c.0[..]);
                c.set_opcode(opc);
                c.0[1] = psdt << 6;
                c.set_nsid(rng.gen_range(0..4));
                let r = one_response(q, c, &format!("{qname} opc {opc:#x} psdt {psdt}"));
                if psdt == 0b11 && qname == "admin" {
                    assert_eq!(
                        r.status,
                        Status::INVALID_FIELD.dnr(),
                        "reserved PSDT, opc {opc:#x}"
                    );
                }
            }
            if opc % 32 == 0 {
                round += 1;
                verified_io(&mut other.1, round);
            }
        }
    }
    verified_io(&mut other.1, 999);
}

fn connect_raw(port: u16, subnqn: &str, hostnqn: &str, sqsize: u16) -> (Client, spec::NvmeCpl) {
    let mut c = Client::connect_tcp(port);
    c.icreq(false, false);
    let d = ConnectData {
        hostid: HOSTID,
        cntlid: host::CNTLID_DYNAMIC,
        subnqn: subnqn.into(),
        hostnqn: hostnqn.into(),
    };
    let (cmd, d) = host::connect(0, sqsize, 30_000, &d);
    let cpl = c.exec(cmd, &d).0;
    (c, cpl)
}

#[test]
fn admin_sqsize_ffff_is_refused_and_leaves_no_controller() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(None, dir.path());
    let (_a, cntlid) = Client::admin(srv.port, DEFAULT_NQN, HOST);
    let mut io = Client::io(srv.port, DEFAULT_NQN, HOST, cntlid, 1);
    for (i, subnqn) in [spec::DISCOVERY_NQN, DEFAULT_NQN].into_iter().enumerate() {
        for port in [srv.port, srv.discovery_port] {
            if subnqn == DEFAULT_NQN && port == srv.discovery_port {
                continue;
            }
            for _ in 0..20 {
                let (mut c, cpl) = connect_raw(port, subnqn, HOST, 0xffff);
                assert_eq!(cpl.status, Status::CONNECT_INVALID_PARAM.dnr(), "{subnqn}");
                assert_eq!(cpl.dw0, 44, "IPO names SQSIZE");
                // The connection lives on and the server answers it.
                let (_c2, ok) = connect_raw(port, subnqn, HOST, 31);
                assert!(ok.status.is_success(), "{subnqn}: {ok:?}");
                c.send_raw(&[]);
            }
            verified_io(&mut io, i as u64);
        }
    }
    let log = srv.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("admin SQSIZE above 127"),
        "the refusal says why"
    );
    // No refused Connect created a controller: only the successful ones did,
    // and each of those was released when its connection closed.
    let created = log.matches("controller created").count();
    assert_eq!(created, 1 + 20 * 3, "one per successful admin Connect");
    assert!(wait_for(Duration::from_secs(10), || {
        srv.log_text()
            .matches("admin queue closed: controller released")
            .count()
            >= 60
    }));
}

const ALLOW_LIST: &str = r#"
[[listener]]
name = "l"
addr = "127.0.0.1:4420"

[[subsystem]]
nqn = "nqn.2026-11.dev.strata:open"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "16MiB"

[[subsystem]]
nqn = "nqn.2026-11.dev.strata:listed"
hosts = ["nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"]
[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "16MiB"
"#;

#[test]
fn empty_hostnqn_and_refusals_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(&cfg, ALLOW_LIST).unwrap();
    let srv = Server::start(Some(&cfg), dir.path());
    // SPDK's tools send an empty HOSTNQN by default.
    let (_c, cpl) = connect_raw(srv.port, "nqn.2026-11.dev.strata:open", "", 31);
    assert!(cpl.status.is_success(), "{cpl:?}");
    let (_c, cpl) = connect_raw(srv.port, "nqn.2026-11.dev.strata:listed", "", 31);
    assert_eq!(cpl.status, Status::CONNECT_INVALID_HOST.dnr());
    let (_c, cpl) = connect_raw(
        srv.port,
        "nqn.2026-11.dev.strata:listed",
        "nqn.2014-08.org.example:stranger",
        31,
    );
    assert_eq!(cpl.status, Status::CONNECT_INVALID_HOST.dnr());
    let (_c, cpl) = connect_raw(srv.port, "nqn.2026-11.dev.strata:nope", HOST, 31);
    assert_eq!(cpl.status, Status::CONNECT_INVALID_PARAM.dnr());
    let (_c, cpl) = connect_raw(srv.port, "nqn.2026-11.dev.strata:open", HOST, 0);
    assert_eq!(cpl.status, Status::CONNECT_INVALID_PARAM.dnr());
    for want in [
        "empty host NQN on a subsystem with an allow-list",
        "host NQN not allowed",
        "nqn.2014-08.org.example:stranger",
        "subsystem NQN not served on this port",
        "SQSIZE 0",
        "peer=127.0.0.1:",
    ] {
        assert!(
            wait_for(Duration::from_secs(5), || srv.log_text().contains(want)),
            "log lacks {want:?}:\n{}",
            srv.log_text()
        );
    }
}

fn limits_config(extra: &str) -> String {
    format!(
        r#"
[limits]
{extra}

[[listener]]
name = "l"
addr = "127.0.0.1:4420"

[[subsystem]]
nqn = "{DEFAULT_NQN}"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "256MiB"
"#
    )
}

#[test]
fn a_host_that_never_reads_is_bounded_and_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        limits_config("tx_stall_timeout_ms = 3000\nmax_pending_output = \"4MiB\""),
    )
    .unwrap();
    let srv = Server::start(Some(&cfg), dir.path());
    let pid = srv.child.id();
    let (_a, cntlid) = Client::admin(srv.port, DEFAULT_NQN, HOST);
    let mut good = Client::io(srv.port, DEFAULT_NQN, HOST, cntlid, 1);
    let (_b, id2) = Client::admin(srv.port, DEFAULT_NQN, HOST);
    let mut bad = Client::io(srv.port, DEFAULT_NQN, HOST, id2, 1);
    // A small receive window so the host's socket fills quickly.
    bad.s.set_nonblocking(false).unwrap();
    let before = rss_kib(pid);
    // 2,000 reads of 1 MiB (2 GiB of answers), never read back.
    let mut burst = Vec::new();
    for i in 0..2000u16 {
        let mut c = rw(
            spec::io_opc::READ,
            (u64::from(i) % 200) * 2048,
            2048,
            1 << 20,
        );
        c.set_cid(i);
        pdu::encode_capsule_cmd(&c, 0, false, false, &mut burst);
    }
    bad.s
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut sent = 0;
    while sent < burst.len() {
        match bad.s.write(&burst[sent..]) {
            Ok(n) => sent += n,
            Err(_) => break, // the target stopped reading: back-pressure
        }
    }
    let mut peak = before;
    for r in 0..20 {
        verified_io(&mut good, r);
        peak = peak.max(rss_kib(pid));
    }
    assert!(
        peak.saturating_sub(before) < 96 * 1024,
        "target grew by {} KiB for a host that never reads",
        peak - before
    );
    // The stalled connection is eventually terminated.
    assert!(
        wait_for(Duration::from_secs(20), || srv
            .log_text()
            .contains("host stopped reading its responses")),
        "{}",
        srv.log_text()
    );
    let mut buf = vec![0u8; 1 << 20];
    bad.s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut closed = false;
    for _ in 0..10_000 {
        match bad.s.read(&mut buf) {
            Ok(0) | Err(_) => {
                closed = true;
                break;
            }
            Ok(_) => {}
        }
    }
    assert!(closed, "target closed the stalled connection");
    verified_io(&mut good, 100);
}

#[test]
fn withheld_h2c_and_silent_connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        limits_config(
            "data_phase_timeout_ms = 2000\nconnect_timeout_ms = 2000\nmax_r2t_bytes = \"4MiB\"\nmax_connections_per_listener = 40",
        ),
    )
    .unwrap();
    let srv = Server::start(Some(&cfg), dir.path());
    let (_a, cntlid) = Client::admin(srv.port, DEFAULT_NQN, HOST);
    let mut good = Client::io(srv.port, DEFAULT_NQN, HOST, cntlid, 1);
    let (_b, id2) = Client::admin(srv.port, DEFAULT_NQN, HOST);
    let mut bad = Client::io(srv.port, DEFAULT_NQN, HOST, id2, 1);
    // 64 writes of 1 MiB; every H2CData but the last of each is sent.
    let mut r2ts = 0;
    for i in 0..64u64 {
        bad.capsule(rw(spec::io_opc::WRITE, i * 2048, 2048, 1 << 20), &[]);
    }
    bad.s
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    loop {
        let mut b = [0u8; 24];
        match bad.s.read_exact(&mut b) {
            Ok(()) => {
                let Ok(Some(p)) = pdu::parse_header(
                    &b,
                    &pdu::DecodeConfig::established(pdu::Role::Host, false, false, 1 << 24),
                ) else {
                    panic!("not an R2T")
                };
                let pdu::PduHeader::R2T(r) = p.header else {
                    panic!("{:?}", p.header)
                };
                r2ts += 1;
                let mut out = Vec::new();
                let mut off = 0u32;
                while off + (128 << 10) < r.r2tl {
                    pdu::encode_h2c_data(
                        &pdu::H2CData {
                            cccid: r.cccid,
                            ttag: r.ttag,
                            datao: off,
                            datal: 128 << 10,
                            last: false,
                        },
                        false,
                        false,
                        &mut out,
                    );
                    out.resize(out.len() + (128 << 10), 7);
                    off += 128 << 10;
                }
                bad.send_raw(&out);
            }
            Err(_) => break,
        }
    }
    assert_eq!(
        r2ts, 4,
        "R2T budget of 4 MiB: four 1 MiB writes solicited, the rest wait"
    );
    // Connections that never send ICReq, and ones that stop after it.
    let silent: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(("127.0.0.1", srv.port)).unwrap())
        .collect();
    let half: Vec<Client> = (0..10)
        .map(|_| {
            let mut c = Client::connect_tcp(srv.port);
            c.icreq(false, false);
            c
        })
        .collect();
    for r in 0..10 {
        verified_io(&mut good, r);
    }
    for want in [
        "host did not finish a solicited data transfer (H2CData) in time",
        "no ICReq and Connect within the connect timeout",
    ] {
        assert!(
            wait_for(Duration::from_secs(20), || srv.log_text().contains(want)),
            "log lacks {want:?}:\n{}",
            srv.log_text()
        );
    }
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 8];
        assert!(
            matches!(s.read(&mut b), Ok(0) | Err(_)),
            "silent connection closed"
        );
    }
    drop(half);
    // The per-listener limit: past 40 open connections new ones are closed
    // at once (logged once), and the server lives.
    let flood: Vec<TcpStream> = (0..60)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", srv.port)).ok())
        .collect();
    assert!(wait_for(Duration::from_secs(10), || srv
        .log_text()
        .contains("connection limit reached")));
    assert_eq!(
        srv.log_text().matches("connection limit reached").count(),
        1,
        "logged once"
    );
    drop(flood);
    // Once they close, new connections are served again.
    assert!(wait_for(Duration::from_secs(15), || icreq_answered(
        srv.port
    )));
    verified_io(&mut good, 50);
    let _ = bad.s.write(&[]);
}
