//! Store faults seen through the whole stack (`strata serve`, NVMe/TCP,
//! objbacker, a real store):
//!
//! * injected 503s and timeouts (`inject_error_rate`, `inject_timeout_rate`)
//!   are retried: every byte reads back right, before and after a kill -9;
//! * a store that stays down (connections refused, then black-holed: the
//!   port accepts but never answers) turns WRITE, FLUSH and READ into NVMe
//!   errors (WRITE FAULT / UNRECOVERED READ ERROR) within the retry budget,
//!   not hangs; when the store is back, data flushed before the outage
//!   reads back, a FLUSH makes the writes acknowledged during the outage
//!   durable, and all of it survives a kill -9 of `strata serve`.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use strata_target::spec::{self, NvmeCmd, NvmeCpl, Status};
use support::objstores::{self, S3s};
use support::{Client, Server, free_port, pattern};

const NQN: &str = "nqn.2026-11.dev.strata:faults";
const HOSTNQN: &str = "nqn.2026-11.dev.strata:faults-host";
const BS: usize = 4096;
const MIB: usize = 1 << 20;

fn connect(port: u16) -> (Client, Client) {
    let (admin, cntlid) = Client::admin(port, NQN, HOSTNQN);
    let q = Client::io(port, NQN, HOSTNQN, cntlid, 1);
    // Bounds every wait below: an I/O that has not completed by then is a
    // hang, and the test fails on it.
    q.s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    (admin, q)
}

fn flush(q: &mut Client) -> NvmeCpl {
    let mut cmd = NvmeCmd::default();
    cmd.set_opcode(spec::io_opc::FLUSH);
    cmd.set_nsid(1);
    q.exec(cmd, &[]).0
}

fn same_status(a: Status, b: Status) -> bool {
    a.sct == b.sct && a.sc == b.sc
}

fn config(dir: &Path, port: u16, namespace: &str) -> std::path::PathBuf {
    let p = dir.join("strata.toml");
    std::fs::write(
        &p,
        format!(
            "[target]\nreactors = 1\n[[listener]]\nname = \"a\"\naddr = \"127.0.0.1:{port}\"\n[[subsystem]]\nnqn = \"{NQN}\"\n[[subsystem.namespace]]\nnsid = 1\ntype = \"objbacker\"\nblock_size = 4096\nobject_size = \"1MiB\"\nauto_format = true\n{namespace}"
        ),
    )
    .unwrap();
    p
}

fn read_all(q: &mut Client, bytes: usize, what: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes);
    for off in (0..bytes).step_by(MIB) {
        let (c, d) = q.read((off / BS) as u64, (MIB / BS) as u32, BS);
        assert!(c.status.is_success(), "{what}: READ at {off}: {c:?}");
        out.extend_from_slice(&d);
    }
    out
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} (block {})", i / BS);
    }
}

#[test]
fn injected_5xx_and_timeouts_are_retried_through_serve() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (port, dport) = (free_port(), free_port());
    const DEV: usize = 48 * MIB;
    let cfg = config(
        dir.path(),
        port,
        &format!(
            "size = \"48MiB\"\nbuckets = [{}]\ninject_error_rate = 0.2\ninject_timeout_rate = 0.05\nrequest_timeout_ms = 300\n",
            (0..3)
                .map(|k| format!("\"file://{}/bucket-{k}\"", dir.path().display()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let log = "info,strata_objbacker=debug";
    let mut srv = Server::start_with_log(&cfg, dir.path(), port, dport, log);
    let (_a, mut q) = connect(port);
    let mut model = vec![0u8; DEV];
    let mut rng = StdRng::seed_from_u64(7);
    let put = |q: &mut Client, off: usize, data: Vec<u8>, model: &mut Vec<u8>| {
        let c = q.write((off / BS) as u64, &data, BS);
        assert!(c.status.is_success(), "WRITE at {off}: {c:?}");
        model[off..off + data.len()].copy_from_slice(&data);
    };
    // Whole objects (direct PUTs), unaligned 1 MiB writes and 4 KiB writes
    // (write-back with read-modify-write GETs), FLUSH every so often.
    for i in 0..16 {
        put(&mut q, i * 2 * MIB, pattern(MIB, i as u64), &mut model);
    }
    for i in 0..6u64 {
        let off = rng.gen_range(0..(DEV - MIB) / BS) * BS;
        put(&mut q, off, pattern(MIB, 100 + i), &mut model);
    }
    for i in 0..96u64 {
        let off = rng.gen_range(0..DEV / BS) * BS;
        put(&mut q, off, pattern(BS, 1000 + i), &mut model);
        if i % 32 == 31 {
            let c = flush(&mut q);
            assert!(c.status.is_success(), "FLUSH: {c:?}");
        }
    }
    let c = flush(&mut q);
    assert!(c.status.is_success(), "FLUSH: {c:?}");
    assert_same(&read_all(&mut q, DEV, "read back"), &model, "read back");
    drop(q);
    // Everything was flushed: it survives a kill -9.
    srv.kill9();
    let text = srv.log_text();
    let retried = text.matches("failed, retrying in").count();
    let timeouts = text.matches("no answer within").count();
    assert!(!text.contains("panicked"), "{text}");
    assert!(
        !text.contains("retry budget"),
        "an operation ran out of retries:\n{text}"
    );
    assert!(retried > 0, "no store request was retried; log:\n{text}");
    let srv = Server::start_with_log(&cfg, dir.path(), port, dport, log);
    let (_a, mut q) = connect(port);
    assert_same(
        &read_all(&mut q, DEV, "after kill -9"),
        &model,
        "after kill -9 and restart",
    );
    let retried2 = srv.log_text().matches("failed, retrying in").count();
    eprintln!(
        "injected faults: {retried} store requests retried ({timeouts} of them timed out) during writes+reads, {retried2} more after the restart; {DEV} bytes correct twice; {:?}",
        t0.elapsed()
    );
}

#[test]
fn store_down_gives_nvme_errors_not_hangs_and_flushed_data_survives() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let s3_root = dir.path().join("s3");
    for k in 0..3 {
        std::fs::create_dir_all(s3_root.join(format!("strata-{k}"))).unwrap();
    }
    let mut s3 = S3s::start(&s3_root, true);
    let (port, dport) = (free_port(), free_port());
    // Read-ahead 4 MiB: the outage reads below must need the store, and
    // the default window (32 MiB) would hold this whole 32 MiB device in
    // the read-ahead cache after the verifying reads.
    let cfg = config(
        dir.path(),
        port,
        &format!(
            "size = \"32MiB\"\nbuckets = [{}]\nstore_options = {}\nrequest_timeout_ms = 1000\nretry_budget_ms = 1500\nreadahead = \"4MiB\"\n",
            (0..3)
                .map(|k| format!("\"s3://strata-{k}/vol\""))
                .collect::<Vec<_>>()
                .join(", "),
            objstores::s3_options_toml(&s3.endpoint())
        ),
    );
    let log = "info,strata_objbacker=debug";
    let mut srv = Server::start_with_log(&cfg, dir.path(), port, dport, log);
    let (_a, mut q) = connect(port);

    // Before the outage: objects 0..4 whole, one 4 KiB block in object 5,
    // FLUSH.
    let before: Vec<Vec<u8>> = (0..4).map(|i| pattern(MIB, 10 + i)).collect();
    for (i, d) in before.iter().enumerate() {
        assert!(q.write((i * MIB / BS) as u64, d, BS).status.is_success());
    }
    let small = pattern(BS, 99);
    let small_lba = (5 * MIB / BS + 3) as u64;
    assert!(q.write(small_lba, &small, BS).status.is_success());
    assert!(flush(&mut q).status.is_success(), "FLUSH before the outage");

    let mut outage_small_acked = Vec::new();
    let mut timings = Vec::new();
    // Phase 1: connection refused. Phase 2: black hole (the port accepts
    // connections and never answers, so only request_timeout ends them).
    for phase in ["refused", "black hole"] {
        s3.stop();
        let _hole = (phase == "black hole").then(|| {
            std::net::TcpListener::bind(s3.addr).expect("black-hole listener on the S3 port")
        });
        let t = Instant::now();
        let c = q.write((8 * MIB / BS) as u64, &pattern(MIB, 50), BS);
        assert!(
            same_status(c.status, Status::WRITE_FAULT),
            "{phase}: whole-object WRITE must fail with WRITE FAULT: {c:?}"
        );
        let t_write = t.elapsed();
        // A 4 KiB write goes to the volatile write cache: it may be
        // acknowledged; then the FLUSH must fail.
        let lba = (9 * MIB / BS) as u64 + outage_small_acked.len() as u64;
        let data = pattern(BS, 200 + lba);
        let c = q.write(lba, &data, BS);
        if c.status.is_success() {
            outage_small_acked.push((lba, data));
        } else {
            assert!(same_status(c.status, Status::WRITE_FAULT), "{phase}: {c:?}");
        }
        let t = Instant::now();
        let c = flush(&mut q);
        assert!(
            same_status(c.status, Status::WRITE_FAULT),
            "{phase}: FLUSH must fail with WRITE FAULT: {c:?}"
        );
        let t_flush = t.elapsed();
        let t = Instant::now();
        // Phase 1 reads flushed data (object 2); phase 2 a never-written
        // object, because the reads after phase 1 may have put object 2 in
        // the read-ahead cache. Either needs the store.
        let obj = if phase == "refused" { 2 } else { 16 };
        let (c, _) = q.read((obj * MIB / BS) as u64, 16, BS);
        assert!(
            same_status(c.status, Status::UNRECOVERED_READ_ERROR),
            "{phase}: READ must fail with UNRECOVERED READ ERROR: {c:?}"
        );
        let t_read = t.elapsed();
        timings.push(format!(
            "{phase}: WRITE FAULT after {t_write:?}, FLUSH WRITE FAULT after {t_flush:?}, UNRECOVERED READ ERROR after {t_read:?}"
        ));
        // The store comes back on the same port and directory.
        drop(_hole);
        s3.restart();
        // Data from before the outage reads back through the same process.
        for (i, d) in before.iter().enumerate() {
            let (c, got) = q.read((i * MIB / BS) as u64, (MIB / BS) as u32, BS);
            assert!(c.status.is_success(), "{phase}: read after recovery: {c:?}");
            assert_same(&got, d, &format!("{phase}: object {i} after recovery"));
        }
        let (c, got) = q.read(small_lba, 1, BS);
        assert!(c.status.is_success());
        assert_same(
            &got,
            &small,
            &format!("{phase}: 4 KiB block after recovery"),
        );
        // A FLUSH now makes what was acknowledged during the outage durable.
        let c = flush(&mut q);
        assert!(
            c.status.is_success(),
            "{phase}: FLUSH after recovery: {c:?}"
        );
    }
    drop(q);
    srv.kill9();
    let text = srv.log_text();
    assert!(!text.contains("panicked"), "{text}");
    assert!(
        text.contains("retry budget"),
        "no operation ran out of retries?\n{text}"
    );

    // And all of it survives a kill -9 of strata serve.
    let _srv = Server::start_with_log(&cfg, dir.path(), port, dport, log);
    let (_a, mut q) = connect(port);
    for (i, d) in before.iter().enumerate() {
        let (c, got) = q.read((i * MIB / BS) as u64, (MIB / BS) as u32, BS);
        assert!(c.status.is_success(), "read after restart: {c:?}");
        assert_same(&got, d, &format!("object {i} after kill -9"));
    }
    let (c, got) = q.read(small_lba, 1, BS);
    assert!(c.status.is_success());
    assert_same(
        &got,
        &small,
        "4 KiB flushed before the outage, after kill -9",
    );
    for (lba, data) in &outage_small_acked {
        let (c, got) = q.read(*lba, 1, BS);
        assert!(c.status.is_success());
        assert_same(
            &got,
            data,
            "4 KiB acknowledged during the outage, flushed after it",
        );
    }
    for t in &timings {
        eprintln!("store down, {t}");
    }
    eprintln!(
        "store down: {} 4 KiB writes acknowledged during the outage made durable after it; {:?}",
        outage_small_acked.len(),
        t0.elapsed()
    );
}
