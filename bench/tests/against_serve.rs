//! The initiator against the real target, `strata serve`, run as a child
//! process.
//!
//! The binary is the one `common::strata_bin` has cargo build from the
//! current sources, with this test's profile; the child is killed with its
//! process group on drop and by the kernel if the test process dies.

mod common;

fn strata_bin() -> std::path::PathBuf {
    common::strata_bin(&["serve", "--help"])
}

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_bench::initiator::ConnectOpts;
use strata_bench::job::{JobSpec, Rw};
use strata_bench::load::{self, Progress, RunOutput, VerifyState};
use strata_bench::minitarget::MiniTarget;
use strata_bench::report::Report;
use strata_bench::verify::ErrorKind;
use strata_testkit::free_port;

const DEFAULT_NQN: &str = "nqn.2026-11.dev.strata:default";

struct Serve {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Serve {
    fn start(config: Option<&Path>, dir: &Path) -> Self {
        let port = free_port();
        let log = dir.join(format!("serve-{port}.log"));
        let mut cmd = Command::new(strata_bin());
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--discovery")
            .arg(format!("127.0.0.1:{}", free_port()))
            .env("STRATA_DATA_DIR", dir.join("data"))
            // Its own management socket, whatever else runs.
            .env("STRATA_RUNTIME_DIR", dir.join("run"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let child = common::guard_command(&mut cmd)
            .spawn()
            .expect("spawn strata serve");
        let s = Self {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(s.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "serve not listening; log:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        common::kill_and_reap(&mut self.child);
    }
}

fn run(o: &ConnectOpts, spec: &JobSpec, vs: Option<Arc<VerifyState>>) -> RunOutput {
    load::run(o, spec, vs, Arc::new(Progress::default()), &mut |_, _| {})
        .expect("run against serve")
}

fn report(o: &ConnectOpts, out: &RunOutput) -> Report {
    Report::build(out, &o.addr.to_string(), &o.subnqn, o.hdgst, o.ddgst, 0)
}

fn timed(rw: Rw, qd: u32, jobs: u32, ms: u64) -> JobSpec {
    JobSpec {
        rw,
        qd,
        jobs,
        runtime_ms: Some(ms),
        ramp_ms: 100,
        size: Some(256 << 20),
        ..JobSpec::default()
    }
}

#[test]
fn serve_default_ram_namespace_read_and_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(None, dir.path());
    for (hd, dd) in [(false, false), (true, true)] {
        let mut o = ConnectOpts::new(s.addr, DEFAULT_NQN);
        o.hdgst = hd;
        o.ddgst = dd;
        for (rw, bs) in [
            (Rw::Randread, 4096),
            (Rw::Randwrite, 4096),
            (Rw::Randwrite, 65536),
        ] {
            let spec = JobSpec {
                bs,
                ..timed(rw, 8, 2, 400)
            };
            let r = report(&o, &run(&o, &spec, None));
            assert!(r.summary.iops > 0.0, "{}\n{}", r.table(), s.log_text());
            common::check_against_schema(&serde_json::to_value(&r).unwrap()).unwrap();
            eprint!("{}", r.table());
        }
    }
}

#[test]
fn serve_verify_catches_bytes_flipped_in_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ns1.img");
    let size: u64 = 16 << 20;
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\nname = \"default\"\naddr = \"127.0.0.1:4420\"\n\n[[subsystem]]\nnqn = \"nqn.2026-11.dev.strata:verify\"\nallow_any_host = true\n\n[[subsystem.namespace]]\nnsid = 1\ntype = \"file\"\npath = \"{}\"\nsize = \"16MiB\"\n",
            img.display()
        ),
    )
    .unwrap();
    let s = Serve::start(Some(&cfg), dir.path());
    let o = ConnectOpts::new(s.addr, "nqn.2026-11.dev.strata:verify");
    let vs = VerifyState::new(99);
    let fill = JobSpec {
        rw: Rw::Write,
        bs: 4096,
        qd: 16,
        jobs: 1,
        runtime_ms: None,
        verify: true,
        ..JobSpec::default()
    };
    let r = report(&o, &run(&o, &fill, Some(vs.clone())));
    assert_eq!(
        r.verify.error_count,
        0,
        "{:?}\n{}",
        r.verify.errors,
        s.log_text()
    );
    let lba_size = u64::from(r.target.lba_size);

    // Flip bytes in the middle of one block, behind the target's back.
    let bad_lba = 3000u64;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let off = bad_lba * lba_size + 100;
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).unwrap();
    for x in &mut b {
        *x = !*x;
    }
    f.write_all_at(&b, off).unwrap();
    f.sync_all().unwrap();

    let read = JobSpec {
        rw: Rw::Read,
        ..fill
    };
    let r = report(&o, &run(&o, &read, Some(vs)));
    assert_eq!(r.verify.error_count, 1, "{:?}", r.verify.errors);
    let e = &r.verify.errors[0];
    assert_eq!((e.kind, e.lba), (ErrorKind::Corrupt, bad_lba), "{e}");
}

/// The same job against `strata serve` and against the in-process null
/// target both complete every I/O without error. No time or speed is
/// asserted; the initiator's CPU per I/O on each is a benchmark
/// (`strata bench run --target null` / `--target ADDR`, `cpu.us_per_io`).
#[test]
fn serve_and_null_path_complete_the_same_job() {
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(None, dir.path());
    let null = MiniTarget::null().unwrap();
    for qd in [1, 32] {
        let spec = JobSpec {
            rw: Rw::Randread,
            qd,
            jobs: 1,
            runtime_ms: None,
            ramp_ms: 0,
            size: Some(8 << 20),
            ..JobSpec::default()
        };
        let want = (8u64 << 20) / u64::from(spec.bs);
        let os = ConnectOpts::new(s.addr, DEFAULT_NQN);
        let on = ConnectOpts::new(null.addr, null.subnqn());
        for (what, o) in [("serve", &os), ("null", &on)] {
            let r = report(o, &run(o, &spec, None));
            let ios: u64 = r.jobs.iter().map(|j| j.ios).sum();
            assert_eq!(ios, want, "{what} qd{qd}\n{}\n{}", r.table(), s.log_text());
            assert_eq!(r.verify.error_count, 0, "{what} qd{qd}");
            assert!(r.cpu.us_per_io > 0.0, "{what} qd{qd}: no CPU figure");
        }
    }
}

#[test]
fn serve_tier_search_basic() {
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(None, dir.path());
    let o = ConnectOpts::new(s.addr, DEFAULT_NQN);
    let so = strata_bench::tiers::SearchOpts {
        step_ms: 300,
        ramp_ms: 50,
        size: Some(256 << 20),
        target_cores: 2,
        ref_scale: 1.0,
        progress: false,
    };
    let r = strata_bench::tiers::search(&o, "serve", &[strata_tier::Tier::Basic], &so).unwrap();
    eprint!("{}", r.table());
    assert!(r.qd1_read.mean_us > 0.0);
    let plots = r.plot(dir.path()).unwrap();
    assert!(plots.iter().all(|p| p.exists()));
}
