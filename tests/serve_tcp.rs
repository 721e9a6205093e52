//! `strata serve` over real TCP sockets on 127.0.0.1: malformed input, host
//! access control, live reload, durability across kill -9, clean shutdown.

mod support;

use std::time::{Duration, Instant};

use strata_target::host;
use strata_target::pdu::{self, FatalErrorStatus};
use strata_target::spec::{self, NvmeCmd, SglDescriptor, Status};
use support::{Client, Rsp, Server, pattern, rw};

const DEFAULT_NQN: &str = "nqn.2026-11.dev.strata:default";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

fn expect_term(c: &mut Client, fes: FatalErrorStatus) {
    match c.recv() {
        Rsp::Term(t) => assert_eq!(t.fes, fes, "TermReq FES"),
        other => panic!("expected C2HTermReq {fes:?}, got {other:?}"),
    }
    assert!(
        matches!(c.recv(), Rsp::Closed),
        "connection must close after C2HTermReq"
    );
}

fn good_io_still_works(io: &mut Client, round: u64) {
    let data = pattern(4096, round);
    assert!(io.write(round * 8, &data, 512).status.is_success());
    let (c, back) = io.read(round * 8, 8, 512);
    assert!(c.status.is_success());
    assert_eq!(
        back, data,
        "healthy connection's data after bad input #{round}"
    );
}

#[test]
fn malformed_input_terminates_only_the_offending_connection() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(None, dir.path());
    let (_admin, cntlid) = Client::admin(srv.port, DEFAULT_NQN, HOST);
    let mut io = Client::io(srv.port, DEFAULT_NQN, HOST, cntlid, 1);
    good_io_still_works(&mut io, 0);

    type Case = (&'static str, FatalErrorStatus, fn(&mut Client));
    let cases: Vec<Case> = vec![
        (
            "capsule before ICReq",
            FatalErrorStatus::PduSequenceError,
            |c| {
                let mut b = Vec::new();
                pdu::encode_capsule_cmd(&NvmeCmd::default(), 0, false, false, &mut b);
                c.send_raw(&b);
            },
        ),
        (
            "unknown PDU type",
            FatalErrorStatus::InvalidHeaderField,
            |c| {
                c.icreq(false, false);
                c.send_raw(&[0x0b, 0, 8, 0, 8, 0, 0, 0]);
            },
        ),
        ("wrong HLEN", FatalErrorStatus::InvalidHeaderField, |c| {
            c.icreq(false, false);
            let mut b = Vec::new();
            pdu::encode_capsule_cmd(&NvmeCmd::default(), 0, false, false, &mut b);
            b[2] = 64;
            c.send_raw(&b);
        }),
        (
            "PLEN shorter than the header",
            FatalErrorStatus::InvalidHeaderField,
            |c| {
                c.icreq(false, false);
                let mut b = Vec::new();
                pdu::encode_capsule_cmd(&NvmeCmd::default(), 0, false, false, &mut b);
                b[4..8].copy_from_slice(&16u32.to_le_bytes());
                c.send_raw(&b);
            },
        ),
        (
            "bad header digest",
            FatalErrorStatus::HeaderDigestError,
            |c| {
                c.icreq(true, true);
                let mut b = Vec::new();
                pdu::encode_capsule_cmd(&NvmeCmd::default(), 0, true, true, &mut b);
                b[75] ^= 0x5a;
                c.send_raw(&b);
            },
        ),
        ("second ICReq", FatalErrorStatus::PduSequenceError, |c| {
            c.icreq(false, false);
            let mut b = Vec::new();
            host::encode_icreq(false, false, &mut b);
            c.send_raw(&b);
        }),
        (
            "in-capsule data beyond the limit",
            FatalErrorStatus::DataLimitExceeded,
            |c| {
                c.icreq(false, false);
                let data = vec![0u8; 16384];
                let mut cmd = rw(spec::io_opc::WRITE, 0, 32, data.len() as u32);
                cmd.set_sgl(SglDescriptor {
                    addr: 0,
                    len: data.len() as u32,
                    id: spec::SGL_ID_DATA_BLOCK_OFFSET,
                });
                c.capsule(cmd, &data);
            },
        ),
        (
            "H2CData without an R2T",
            FatalErrorStatus::InvalidHeaderField,
            |c| {
                c.icreq(false, false);
                let (a, _) = (0, 0);
                let _ = a;
                let mut b = Vec::new();
                pdu::encode_h2c_data(
                    &pdu::H2CData {
                        cccid: 9,
                        ttag: 3,
                        datao: 0,
                        datal: 512,
                        last: true,
                    },
                    false,
                    false,
                    &mut b,
                );
                b.extend_from_slice(&[0; 512]);
                c.send_raw(&b);
            },
        ),
    ];
    for (i, (name, fes, send)) in cases.into_iter().enumerate() {
        let mut bad = Client::connect_tcp(srv.port);
        send(&mut bad);
        eprintln!("case: {name}");
        expect_term(&mut bad, fes);
        good_io_still_works(&mut io, i as u64 + 1);
    }

    // Data beyond MDTS: a status, not a termination.
    let (c, _) = io.read(0, 4096, 512);
    assert_eq!(c.status, Status::INVALID_FIELD.dnr());
    // A command on the wrong queue.
    let mut idf = NvmeCmd::default();
    idf.set_opcode(spec::admin_opc::IDENTIFY);
    idf.set_cdw(10, 1);
    assert_eq!(io.exec(idf, &[]).0.status, Status::INVALID_OPCODE.dnr());
    // An I/O queue beyond those granted by Set Features Number of Queues.
    let mut q = Client::connect_tcp(srv.port);
    q.icreq(false, false);
    let c = q.connect(9, cntlid, DEFAULT_NQN, HOST);
    assert!(
        !c.status.is_success(),
        "qid 9 of 3 granted must be refused: {c:?}"
    );
    // Connect with an NQN that is not ours.
    let mut q = Client::connect_tcp(srv.port);
    q.icreq(false, false);
    let c = q.connect(0, 0xffff, "nqn.2026-11.dev.strata:nope", HOST);
    assert_eq!(c.status.sc, Status::CONNECT_INVALID_PARAM.sc);
    assert_eq!((c.dw0 >> 16) & 0xff, 1, "IATTR names the Connect data");
    assert_eq!(c.dw0 & 0xffff, 256, "IPO names SUBNQN");
    good_io_still_works(&mut io, 99);
    assert!(!srv.log_text().contains("panicked"), "{}", srv.log_text());
}

fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("strata.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn unknown_host_is_refused_at_connect() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            r#"
[[listener]]
name = "a"
addr = "127.0.0.1:1"
[[subsystem]]
nqn = "nqn.2026-11.dev.strata:acl"
hosts = ["{HOST}"]
[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "16MiB"
"#
        ),
    );
    let srv = Server::start(Some(&cfg), dir.path());
    let mut c = Client::connect_tcp(srv.port);
    c.icreq(false, false);
    let r = c.connect(
        0,
        0xffff,
        "nqn.2026-11.dev.strata:acl",
        "nqn.2014-08.org.nvmexpress:uuid:intruder",
    );
    assert_eq!(r.status.sct, Status::CONNECT_INVALID_HOST.sct);
    assert_eq!(r.status.sc, Status::CONNECT_INVALID_HOST.sc);
    assert!(r.status.dnr, "the host must not retry");
    let (_a, _) = Client::admin(srv.port, "nqn.2026-11.dev.strata:acl", HOST);
}

fn identify_active_ns(a: &mut Client) -> Vec<u32> {
    let mut c = NvmeCmd::default();
    c.set_opcode(spec::admin_opc::IDENTIFY);
    c.set_cdw(10, 2);
    c.set_sgl(SglDescriptor {
        addr: 0,
        len: 4096,
        id: spec::SGL_ID_TRANSPORT_DATA_BLOCK,
    });
    let (cpl, d) = a.exec(c, &[]);
    assert!(cpl.status.is_success());
    d.chunks_exact(4)
        .map(|x| u32::from_le_bytes(x.try_into().unwrap()))
        .take_while(|&n| n != 0)
        .collect()
}

#[test]
fn sighup_applies_namespaces_and_ana_live_and_refuses_bad_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let base = r#"
[[listener]]
name = "a"
addr = "127.0.0.1:1"
[[subsystem]]
nqn = "nqn.2026-11.dev.strata:live"
[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "16MiB"
"#;
    let cfg = write_config(dir.path(), base);
    let srv = Server::start(Some(&cfg), dir.path());
    let nqn = "nqn.2026-11.dev.strata:live";
    let (mut a, cntlid) = Client::admin(srv.port, nqn, HOST);
    let mut io = Client::io(srv.port, nqn, HOST, cntlid, 1);
    let data = pattern(4096, 5);
    assert!(io.write(0, &data, 512).status.is_success());
    assert_eq!(identify_active_ns(&mut a), vec![1]);
    // Arm an AER.
    let mut aer = NvmeCmd::default();
    aer.set_opcode(spec::admin_opc::ASYNC_EVENT_REQUEST);
    let aer_cid = a.capsule(aer, &[]);

    // A broken file is refused and changes nothing.
    std::fs::write(&cfg, "[[subsystem]]\nnqn = 'bogus'\n").unwrap();
    srv.signal(libc::SIGHUP);
    assert!(
        srv.wait_log("reload refused", Duration::from_secs(10)),
        "{}",
        srv.log_text()
    );
    let (c, back) = io.read(0, 8, 512);
    assert!(
        c.status.is_success() && back == data,
        "RAM namespace kept its data"
    );

    // Add namespace 2 and make the listener's group 1 inaccessible.
    let next = base.replace(
        "addr = \"127.0.0.1:1\"",
        "addr = \"127.0.0.1:1\"\nana = { \"1\" = \"inaccessible\" }",
    ) + "[[subsystem.namespace]]\nnsid = 2\ntype = \"ram\"\nsize = \"8MiB\"\nana_group = 2\n";
    std::fs::write(&cfg, next).unwrap();
    srv.signal(libc::SIGHUP);
    match a.recv() {
        Rsp::Cpl(c) => {
            assert_eq!(c.cid, aer_cid);
            assert_eq!(c.dw0 & 0x7, 2, "notice event");
        }
        other => panic!("expected AEN, got {other:?}"),
    }
    assert_eq!(identify_active_ns(&mut a), vec![1, 2]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (c, _) = io.read(0, 8, 512);
        if c.status == Status::ANA_INACCESSIBLE {
            break;
        }
        assert!(Instant::now() < deadline, "ANA state never applied: {c:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Namespace 2 is in group 2, still optimized on this listener.
    let mut r = rw(spec::io_opc::READ, 0, 8, 4096);
    r.set_nsid(2);
    assert!(io.exec(r, &[]).0.status.is_success());
}

#[test]
fn config_errors_name_file_field_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[[subsystem]]\nnqn = \"nqn.2026-11.x:y\"\n[[subsystem.namespace]]\nnsid = 1\ntype = \"ram\"\nsize = \"lots\"\n",
    );
    // Bounded and guarded: a serve that wrongly accepted the file would
    // otherwise run (and block the test) forever.
    let out = support::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("STRATA_DATA_DIR", dir.path().join("data"))
            .env("STRATA_RUNTIME_DIR", dir.path().join("run")),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&cfg.display().to_string()), "{err}");
    assert!(err.contains("subsystem[0].namespace[0].size"), "{err}");
    assert!(err.contains("fix:"), "{err}");
}

#[test]
fn flushed_writes_to_a_file_namespace_survive_kill9() {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let img = dir.path().join("ns1.img");
    let cfg = write_config(
        dir.path(),
        &format!(
            "[[listener]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n[[subsystem]]\nnqn = \"nqn.2026-11.dev.strata:file\"\n[[subsystem.namespace]]\nnsid = 1\ntype = \"file\"\npath = \"{}\"\nsize = \"64MiB\"\nblock_size = 4096\n",
            img.display()
        ),
    );
    let nqn = "nqn.2026-11.dev.strata:file";
    let mut written = Vec::new();
    let mut srv = Server::start(Some(&cfg), dir.path());
    {
        let (_a, cntlid) = Client::admin(srv.port, nqn, HOST);
        let mut io = Client::io(srv.port, nqn, HOST, cntlid, 1);
        for i in 0..32u64 {
            let len = if i % 4 == 0 {
                1 << 20
            } else {
                4096 * (1 + i as usize % 3)
            };
            let d = pattern(len, 100 + i);
            let slba = i * 256;
            assert!(io.write(slba, &d, 4096).status.is_success());
            written.push((slba, d));
        }
        let mut f = NvmeCmd::default();
        f.set_opcode(spec::io_opc::FLUSH);
        f.set_nsid(1);
        assert!(io.exec(f, &[]).0.status.is_success());
        srv.kill9();
    }
    let srv2 = Server::start(Some(&cfg), dir.path());
    let (_a, cntlid) = Client::admin(srv2.port, nqn, HOST);
    let mut io = Client::io(srv2.port, nqn, HOST, cntlid, 1);
    for (slba, d) in &written {
        let (c, back) = io.read(*slba, (d.len() / 4096) as u32, 4096);
        assert!(c.status.is_success());
        assert!(back == *d, "block {slba} differs after kill -9");
    }
}

#[test]
fn sigterm_shuts_down_cleanly_with_connections_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start(None, dir.path());
    let (_a, cntlid) = Client::admin(srv.port, DEFAULT_NQN, HOST);
    let mut io = Client::io(srv.port, DEFAULT_NQN, HOST, cntlid, 1);
    good_io_still_works(&mut io, 1);
    srv.signal(libc::SIGTERM);
    let st = srv
        .wait_exit(Duration::from_secs(10))
        .expect("strata serve did not exit on SIGTERM");
    assert!(st.success(), "exit status {st:?}");
    assert!(matches!(io.recv(), Rsp::Closed));
}

#[test]
fn silent_host_loses_its_controller_after_kato() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(None, dir.path());
    let mut a = Client::connect_tcp(srv.port);
    a.icreq(false, false);
    let c = a.connect_kato(0, 0xffff, DEFAULT_NQN, HOST, 1000);
    assert!(c.status.is_success());
    let cntlid = c.dw0 as u16;
    a.enable();
    let nq = host::set_features_number_of_queues(0, 0);
    assert!(a.exec(nq, &[]).0.status.is_success());
    let mut io = Client::io(srv.port, DEFAULT_NQN, HOST, cntlid, 1);
    good_io_still_works(&mut io, 1);
    io.s.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    // No keep-alive from here on: the I/O queue must be torn down with its
    // controller (KATO 1 s, bounded wait).
    assert!(
        matches!(io.recv(), Rsp::Closed),
        "I/O queue outlived its controller"
    );
    assert!(matches!(a.recv(), Rsp::Closed), "admin queue outlived KATO");
    // A protocol bound (KATO 1 s plus the target's sweep), not a speed
    // figure: the socket's own 15 s read timeout would otherwise hide a
    // target that never expires the controller.
    assert!(started.elapsed() < Duration::from_secs(14));
    assert!(
        srv.wait_log("keep-alive timeout", Duration::from_secs(10)),
        "{}",
        srv.log_text()
    );
    // The host can build a new association afterwards.
    let (_a2, _) = Client::admin(srv.port, DEFAULT_NQN, HOST);
}

#[test]
fn sighup_adds_and_removes_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let extra = support::free_port();
    let base = "[[listener]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n[[subsystem]]\nnqn = \"nqn.2026-11.dev.strata:ls\"\n[[subsystem.namespace]]\nnsid = 1\ntype = \"ram\"\nsize = \"8MiB\"\n";
    let cfg = write_config(dir.path(), base);
    let srv = Server::start(Some(&cfg), dir.path());
    assert!(std::net::TcpStream::connect(("127.0.0.1", extra)).is_err());
    // --listen overrides listener a only; listener b comes from the file.
    let with_b = base.replace(
        "[[subsystem]]",
        &format!("[[listener]]\nname = \"b\"\naddr = \"127.0.0.1:{extra}\"\n[[subsystem]]"),
    );
    std::fs::write(&cfg, &with_b).unwrap();
    srv.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", extra)).is_err() {
        assert!(Instant::now() < deadline, "listener b never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_a, cntlid) = Client::admin(extra, "nqn.2026-11.dev.strata:ls", HOST);
    let mut io = Client::io(extra, "nqn.2026-11.dev.strata:ls", HOST, cntlid, 1);
    good_io_still_works(&mut io, 3);
    std::fs::write(&cfg, base).unwrap();
    srv.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", extra)).is_ok() {
        assert!(Instant::now() < deadline, "listener b was never removed");
        std::thread::sleep(Duration::from_millis(50));
    }
}
