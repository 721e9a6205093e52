//! The initiator and load generator against the in-process target (built on
//! the same codec), so they are tested without `strata serve`.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use strata_bench::initiator::{ConnectOpts, Controller};
use strata_bench::job::{JobSpec, Rw};
use strata_bench::load::{self, Progress, RunOutput, VerifyState};
use strata_bench::minitarget::{Backend, MiniTarget, MiniTargetConfig, file_backend};
use strata_bench::report::Report;
use strata_bench::verify::ErrorKind;
use strata_bench::{BenchArgs, cli_main};

fn opts(t: &MiniTarget) -> ConnectOpts {
    ConnectOpts::new(t.addr, t.subnqn())
}

fn run(o: &ConnectOpts, spec: &JobSpec, vs: Option<Arc<VerifyState>>) -> RunOutput {
    load::run(o, spec, vs, Arc::new(Progress::default()), &mut |_, _| {}).expect("run")
}

fn report(o: &ConnectOpts, out: &RunOutput) -> Report {
    Report::build(out, &o.addr.to_string(), &o.subnqn, o.hdgst, o.ddgst, 0)
}

fn short(rw: Rw, qd: u32, jobs: u32, ms: u64) -> JobSpec {
    JobSpec {
        rw,
        qd,
        jobs,
        runtime_ms: Some(ms),
        interval_ms: 50,
        ..JobSpec::default()
    }
}

/// Bring-up, the load loop and the measurements on the fastest path there is.
#[test]
fn randread_against_null_target_measures_latency_iops_and_cpu() {
    let t = MiniTarget::null().unwrap();
    let o = opts(&t);
    let out = run(&o, &short(Rw::Randread, 8, 2, 400), None);
    let r = report(&o, &out);
    assert_eq!(r.jobs.len(), 2);
    assert!(r.summary.iops > 100.0, "{}", r.table());
    let l = &r.summary.read;
    assert!(l.min_us > 0.0 && l.min_us <= l.p50_us && l.p50_us <= l.p99_us && l.p99_us <= l.max_us);
    assert!(r.summary.write.count == 0);
    assert!(r.cpu.us_per_io > 0.0 && r.cpu.initiator_cpu_s > 0.0);
    assert!(!r.timeline.iops.is_empty());
    assert!((r.summary.window_s - 0.4).abs() < 1e-6);
    assert_eq!(r.target.in_capsule_data, 8192);
    assert_eq!(r.target.model, "strata-minitgt");
}

/// Writes in-capsule and through R2T (several R2Ts, several H2CData per
/// R2T), reads in several C2HData with and without the SUCCESS shortcut,
/// with and without digests: verify must find every block intact.
#[test]
fn verify_roundtrip_over_every_data_path() {
    for (bs, hd, dd, success) in [
        (4096u32, false, false, true),
        (65536, true, true, false),
        (262144, false, true, true),
    ] {
        let cfg = MiniTargetConfig {
            ns_bytes: 32 << 20,
            c2h_chunk: 16 * 1024,
            c2h_success: success,
            r2t_chunk: 64 * 1024,
            ..Default::default()
        };
        let t = MiniTarget::spawn(
            cfg,
            Backend::Memory(std::sync::Mutex::new(vec![0; 32 << 20])),
        )
        .unwrap();
        let mut o = opts(&t);
        o.hdgst = hd;
        o.ddgst = dd;
        let spec = JobSpec {
            rw: Rw::Randrw,
            rwmixread: 50,
            bs,
            qd: 8,
            jobs: 2,
            runtime_ms: Some(300),
            verify: true,
            ..JobSpec::default()
        };
        let out = run(&o, &spec, None);
        let r = report(&o, &out);
        assert!(
            r.summary.write.count > 0 && r.summary.read.count > 0,
            "bs {bs}"
        );
        assert!(r.verify.blocks_checked > 0);
        assert_eq!(r.verify.error_count, 0, "bs {bs}: {:?}", r.verify.errors);
    }
}

fn file_target(dir: &tempfile::TempDir, bytes: u64) -> (MiniTarget, std::path::PathBuf) {
    let path = dir.path().join("ns0.img");
    let cfg = MiniTargetConfig {
        ns_bytes: bytes,
        ..Default::default()
    };
    let t = MiniTarget::spawn(cfg, file_backend(&path, bytes).unwrap()).unwrap();
    (t, path)
}

fn fill_spec() -> JobSpec {
    JobSpec {
        rw: Rw::Write,
        bs: 4096,
        qd: 16,
        jobs: 2,
        runtime_ms: None,
        total_bytes: None,
        verify: true,
        ..JobSpec::default()
    }
}

/// The proof the issue asks for: bytes flipped in the backing file behind
/// the target's back are reported at their exact LBA.
#[test]
fn verify_catches_bytes_flipped_in_backing_file_at_exact_lba() {
    let dir = tempfile::tempdir().unwrap();
    let (t, path) = file_target(&dir, 8 << 20);
    let o = opts(&t);
    let vs = VerifyState::new(42);
    // Pass 1: write every block once.
    let out = run(&o, &fill_spec(), Some(vs.clone()));
    assert_eq!(report(&o, &out).verify.error_count, 0);

    let bad_lba = 12_345u64;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut b = [0u8; 3];
    f.read_exact_at(&mut b, bad_lba * 512 + 200).unwrap();
    for x in &mut b {
        *x ^= 0x5a;
    }
    f.write_all_at(&b, bad_lba * 512 + 200).unwrap();
    f.sync_all().unwrap();

    // Pass 2: read everything back against the generations of pass 1.
    let read = JobSpec {
        rw: Rw::Read,
        ..fill_spec()
    };
    let r = report(&o, &run(&o, &read, Some(vs)));
    assert_eq!(r.verify.error_count, 1, "{:?}", r.verify.errors);
    let e = &r.verify.errors[0];
    assert_eq!((e.kind, e.lba), (ErrorKind::Corrupt, bad_lba), "{e}");
    assert!(r.table().contains("LBA 12345"), "{}", r.table());
}

/// Lost and misdirected writes, simulated in the backing file.
#[test]
fn verify_names_lost_and_misdirected_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (t, path) = file_target(&dir, 4 << 20);
    let o = opts(&t);
    let vs = VerifyState::new(7);
    run(&o, &fill_spec(), Some(vs.clone()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // Lost: block at LBA 800 reads as never written.
    f.write_all_at(&[0u8; 4096], 800 * 512).unwrap();
    // Misdirected: the data meant for LBA 2000 (one whole 4K block) also
    // landed on LBA 3000.
    let mut blk = [0u8; 4096];
    f.read_exact_at(&mut blk, 2000 * 512).unwrap();
    f.write_all_at(&blk, 3000 * 512).unwrap();
    let read = JobSpec {
        rw: Rw::Read,
        ..fill_spec()
    };
    let r = report(&o, &run(&o, &read, Some(vs)));
    let mut found: Vec<_> = r.verify.errors.iter().map(|e| (e.kind, e.lba)).collect();
    found.sort_by_key(|x| x.1);
    assert_eq!(
        found,
        vec![(ErrorKind::Lost, 800), (ErrorKind::Misdirected, 3000)]
    );
}

/// A write pass with verify reads every block back at the end by itself.
#[test]
fn write_with_verify_reads_back_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (t, _path) = file_target(&dir, 2 << 20);
    let o = opts(&t);
    let spec = JobSpec {
        rw: Rw::Randwrite,
        runtime_ms: Some(200),
        ..fill_spec()
    };
    let r = report(&o, &run(&o, &spec, None));
    assert!(r.verify.blocks_checked > 0);
    assert_eq!(r.verify.error_count, 0);
}

#[test]
fn json_report_validates_against_schema_and_plots_render() {
    let t = MiniTarget::null().unwrap();
    let o = opts(&t);
    let out = run(&o, &short(Rw::Randrw, 4, 1, 300), None);
    let r = report(&o, &out);
    let doc = serde_json::to_value(&r).unwrap();
    common::check_against_schema(&doc).unwrap();
    // A sweep is an array of reports.
    let arr = serde_json::to_value(vec![r.clone(), r.clone()]).unwrap();
    common::check_against_schema(&arr).unwrap();
    // The validator is not a rubber stamp.
    let mut bad = doc.clone();
    bad["summary"]["iops"] = serde_json::json!("fast");
    assert!(common::check_against_schema(&bad).is_err());
    let mut extra = doc;
    extra["job"]["surprise"] = serde_json::json!(1);
    assert!(common::check_against_schema(&extra).is_err());

    let dir = tempfile::tempdir().unwrap();
    let files = strata_bench::plot::run_plots(&r, dir.path()).unwrap();
    assert_eq!(files.len(), 4);
    for f in &files {
        let b = std::fs::read(f).unwrap();
        assert!(b.len() > 1000, "{} is {} bytes", f.display(), b.len());
        if f.extension().unwrap() == "png" {
            assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        } else {
            assert!(String::from_utf8_lossy(&b).contains("<svg"));
        }
    }
    if let Ok(keep) = std::env::var("STRATA_BENCH_KEEP_PLOTS") {
        for f in &files {
            std::fs::copy(f, std::path::Path::new(&keep).join(f.file_name().unwrap())).unwrap();
        }
    }
}

/// `strata bench run` end to end (through `cli_main`), against `--target null`.
#[test]
fn cli_run_writes_json_and_plots() {
    #[derive(Parser)]
    struct Top {
        #[command(flatten)]
        bench: BenchArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let plots = dir.path().join("plots");
    let args = Top::try_parse_from([
        "bench",
        "run",
        "--target",
        "null",
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--qd",
        "1,4",
        "--jobs",
        "1",
        "--runtime",
        "200ms",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plots.to_str().unwrap(),
        "--no-progress",
    ])
    .unwrap();
    cli_main(args.bench).unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    common::check_against_schema(&doc).unwrap();
    assert_eq!(doc.as_array().unwrap().len(), 2);
    for f in ["iops_over_time", "latency_cdf", "iops_vs_qd"] {
        assert!(plots.join(format!("{f}.svg")).exists() && plots.join(format!("{f}.png")).exists());
    }

    // The documented command line parses as given in the issue.
    Top::try_parse_from([
        "bench",
        "run",
        "--target",
        "127.0.0.1:4420",
        "--nqn",
        "nqn.x",
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--qd",
        "32",
        "--jobs",
        "1",
        "--runtime",
        "10s",
        "--json",
        "f.json",
        "--plot",
        "d",
    ])
    .unwrap();
    Top::try_parse_from([
        "bench",
        "tiers",
        "--target",
        "127.0.0.1:4420",
        "--nqn",
        "nqn.x",
    ])
    .unwrap();
    Top::try_parse_from([
        "bench",
        "compare",
        "--a",
        "127.0.0.1:4420,nqn.a",
        "--b",
        "127.0.0.1:4421,nqn.b",
        "job.toml",
    ])
    .unwrap();
}

/// A TOML job file drives a run; flags override it.
#[test]
fn cli_job_file_is_honoured() {
    #[derive(Parser)]
    struct Top {
        #[command(flatten)]
        bench: BenchArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let jf = dir.path().join("job.toml");
    std::fs::write(
        &jf,
        "target = \"null\"\nname = \"fromfile\"\nrw = \"randwrite\"\nbs = \"8k\"\nqd = 2\nruntime = \"150ms\"\n",
    )
    .unwrap();
    let json = dir.path().join("r.json");
    let args = Top::try_parse_from([
        "bench",
        "run",
        "--job",
        jf.to_str().unwrap(),
        "--qd",
        "3",
        "--json",
        json.to_str().unwrap(),
        "--no-progress",
    ])
    .unwrap();
    cli_main(args.bench).unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["job"]["name"], "fromfile");
    assert_eq!(doc["job"]["rw"], "randwrite");
    assert_eq!(doc["job"]["bs"], 8192);
    assert_eq!(doc["job"]["qd"], 3);
}

/// A target that answers ICReq with garbage: the error names the problem
/// instead of panicking or hanging.
#[test]
fn malformed_pdu_from_target_is_a_named_error() {
    for reply in [
        // Unknown PDU type.
        vec![0x55u8; 128],
        // A CapsuleResp before IC exchange: a PDU sequence error.
        {
            let mut v = vec![0u8; 24];
            v[0] = 5;
            v[2] = 24;
            v[4] = 24;
            v
        },
    ] {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 128];
            s.read_exact(&mut req).unwrap();
            s.write_all(&reply).unwrap();
            // Keep the connection open until the initiator gives up on it
            // (EOF), so it sees the reply, never a close.
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let _ = s.read(&mut req);
        });
        let mut o = ConnectOpts::new(addr, "nqn.x");
        o.timeout = Duration::from_secs(2);
        let e = format!("{:#}", Controller::connect(o, 1).err().expect("must fail"));
        assert!(e.contains("malformed PDU"), "{e}");
        h.join().unwrap();
    }
}

/// The target closing the connection mid-run is an error, not a hang.
#[test]
fn target_going_away_is_reported() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        drop(s);
    });
    let mut o = ConnectOpts::new(addr, "nqn.x");
    o.timeout = Duration::from_secs(2);
    let e = format!("{:#}", Controller::connect(o, 1).err().expect("must fail"));
    assert!(e.contains("closed the connection"), "{e}");
    h.join().unwrap();
}

/// Keep Alive is sent while the run lasts longer than KATO/2.
#[test]
fn keep_alive_runs_during_load() {
    let t = MiniTarget::null().unwrap();
    let mut o = opts(&t);
    o.kato_ms = 100;
    let out = run(&o, &short(Rw::Randread, 2, 1, 400), None);
    assert!(out.jobs[0].reads > 0);
}

/// Mismatched settings are refused before any I/O with a clear message.
#[test]
fn bad_job_settings_are_refused() {
    let t = MiniTarget::null().unwrap();
    let o = opts(&t);
    let bad = JobSpec {
        bs: 1000,
        ..short(Rw::Randread, 1, 1, 100)
    };
    let e = load::run(
        &o,
        &bad,
        None,
        Arc::new(Progress::default()),
        &mut |_, _| {},
    )
    .err()
    .unwrap();
    assert!(format!("{e}").contains("multiple of 512"), "{e}");
    let deep = short(Rw::Randread, 2000, 1, 100);
    let e = load::run(
        &o,
        &deep,
        None,
        Arc::new(Progress::default()),
        &mut |_, _| {},
    )
    .err()
    .unwrap();
    assert!(format!("{e}").contains("CAP.MQES"), "{e}");
}

/// A rate limit holds, and latency is charged from the scheduled time.
#[test]
fn rate_limit_is_respected() {
    let t = MiniTarget::null().unwrap();
    let o = opts(&t);
    let spec = JobSpec {
        rate_iops: Some(2000),
        ..short(Rw::Randread, 4, 2, 500)
    };
    let r = report(&o, &run(&o, &spec, None));
    // The limit is an upper bound; how close a loaded machine gets to it
    // is not for a test to assume.
    assert!(
        r.summary.iops > 0.0 && r.summary.iops <= 2000.0 * 1.1,
        "{}",
        r.summary.iops
    );
}

/// Tier search and compare, end to end on the null target.
#[test]
fn tiers_and_compare_on_null_target() {
    let t = MiniTarget::null().unwrap();
    let o = opts(&t);
    let so = strata_bench::tiers::SearchOpts {
        step_ms: 150,
        ramp_ms: 20,
        size: Some(64 << 20),
        target_cores: 2,
        ref_scale: 0.001,
        progress: false,
    };
    let r = strata_bench::tiers::search(&o, "null", &[strata_tier::Tier::Basic], &so).unwrap();
    let b = &r.tiers[0];
    // The machine is shared, so whether a step meets the SLO is not for a
    // test to assume; what the search reports must follow from its steps.
    for (rw, best, qd) in [
        (Rw::Randread, b.measured.read_iops, b.read_qd),
        (Rw::Randwrite, b.measured.write_iops, b.write_qd),
    ] {
        let steps: Vec<_> = b.steps.iter().filter(|s| s.rw == rw).collect();
        assert!(!steps.is_empty());
        let under: Vec<_> = steps.iter().filter(|s| s.p99_us < 1000.0).collect();
        let max = under.iter().map(|s| s.iops).fold(0.0, f64::max);
        assert_eq!(best, max as u64, "{rw:?}: {steps:?}");
        assert_eq!(qd.is_some(), !under.is_empty());
    }
    assert!(b.measured.best_latency_us > 0.0);
    let table = r.table();
    assert!(
        table.contains("Basic") && table.contains("SLO met?"),
        "{table}"
    );
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(r.plot(dir.path()).unwrap().len(), 2);

    let a = vec![report(&o, &run(&o, &short(Rw::Randread, 1, 1, 100), None))];
    let bb = vec![report(&o, &run(&o, &short(Rw::Randread, 1, 1, 100), None))];
    let ratios = strata_bench::compare::ratios(&a, &bb);
    let iops = ratios.iter().find(|r| r.metric == "iops").unwrap();
    // Two runs on a shared machine may differ by any factor; what must hold
    // is that the ratio is B over A of the runs it was given.
    assert!(iops.a_mean > 0.0 && iops.b_mean > 0.0, "{iops:?}");
    assert!(
        (iops.ratio - iops.b_mean / iops.a_mean).abs() < 1e-9,
        "{iops:?}"
    );
}
