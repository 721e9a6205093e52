//! SIGHUP reloads with object-backed namespaces, against a real `strata
//! serve` over TCP: adding, removing (which drains and flushes) and a
//! refused in-place change, all under a verified write load; a reload that
//! fails validation creates nothing; a reload that fails while applying
//! rolls back; and the log output (no ANSI codes off a terminal, JSON lines).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_target::spec::{self, NvmeCmd, NvmeCpl, SglDescriptor, Status};
use support::{Client, Server, free_port, pattern, rw};

const NQN: &str = "nqn.2026-11.dev.strata:reload";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
/// 4 KiB writes of 512-byte blocks.
const NLB: u32 = 8;
const WRITE: usize = 4096;
/// Write `i` goes to slot `i % SLOTS` (LBA `slot * NLB`) with pattern seed
/// `i`, so the load can run as long as the test needs it to.
const SLOTS: u64 = 16_000;

fn lba(i: u64) -> u64 {
    (i % SLOTS) * u64::from(NLB)
}

/// The last acknowledged write to each slot, given `acked` writes.
fn last_writes(acked: u64) -> impl Iterator<Item = u64> {
    (0..acked.min(SLOTS)).map(move |slot| slot + (acked - 1 - slot) / SLOTS * SLOTS)
}

fn wait_for(what: &str, srv: &Server, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            srv.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn applied(srv: &Server) -> usize {
    srv.log_text().matches("configuration applied").count()
}

fn refused(srv: &Server) -> usize {
    srv.log_text().matches("reload refused").count()
}

fn assert_alive(srv: &mut Server) {
    if let Some(st) = srv.child.try_wait().unwrap() {
        panic!(
            "strata serve exited ({st}) during a reload; log:\n{}",
            srv.log_text()
        );
    }
    assert!(!srv.log_text().contains("panicked"), "{}", srv.log_text());
}

/// Sends SIGHUP and waits until the reload is answered (applied or refused).
fn reload(srv: &mut Server, cfg: &Path, body: &str) -> bool {
    std::fs::write(cfg, body).unwrap();
    let (a, r) = (applied(srv), refused(srv));
    srv.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if applied(srv) > a {
            assert_alive(srv);
            return true;
        }
        if refused(srv) > r {
            assert_alive(srv);
            return false;
        }
        assert_alive(srv);
        assert!(
            Instant::now() < deadline,
            "reload never answered; log:\n{}",
            srv.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn base(extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "a"
addr = "127.0.0.1:1"
[[subsystem]]
nqn = "{NQN}"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "16MiB"
{extra}"#
    )
}

fn objbacker_ns(dir: &Path, extra: &str) -> String {
    format!(
        r#"
[[subsystem.namespace]]
nsid = 2
type = "objbacker"
size = "64MiB"
object_size = "128KiB"
buckets = ["file://{0}/b0", "file://{0}/b1"]
auto_format = true
{extra}
"#,
        dir.display()
    )
}

fn write_ns(c: &mut Client, nsid: u32, slba: u64, data: &[u8]) -> NvmeCpl {
    let mut cmd = rw(
        spec::io_opc::WRITE,
        slba,
        (data.len() / 512) as u32,
        data.len() as u32,
    );
    cmd.set_nsid(nsid);
    cmd.set_sgl(SglDescriptor {
        addr: 0,
        len: data.len() as u32,
        id: spec::SGL_ID_DATA_BLOCK_OFFSET,
    });
    c.exec(cmd, data).0
}

fn read_ns(c: &mut Client, nsid: u32, slba: u64, nlb: u32) -> (NvmeCpl, Vec<u8>) {
    let mut cmd = rw(spec::io_opc::READ, slba, nlb, nlb * 512);
    cmd.set_nsid(nsid);
    c.exec(cmd, &[])
}

fn flush_ns(c: &mut Client, nsid: u32) -> NvmeCpl {
    let mut cmd = NvmeCmd::default();
    cmd.set_opcode(spec::io_opc::FLUSH);
    cmd.set_nsid(nsid);
    c.exec(cmd, &[]).0
}

fn is(s: Status, want: Status) -> bool {
    s.sct == want.sct && s.sc == want.sc
}

#[derive(Default)]
struct Load {
    /// Writes acknowledged, in order (see [`SLOTS`]).
    acked: u64,
    /// Writes covered by a successful FLUSH.
    flushed: u64,
    /// A failure other than the namespace going away.
    error: Option<String>,
}

/// Steers the write load.
#[derive(Default)]
struct Ctl {
    /// Stop flushing: what follows is acknowledged but only in the
    /// write-back buffer, until the removal flushes it.
    no_flush: AtomicBool,
    progress: AtomicU64,
}

/// Writes patterned blocks to NSID 2, FLUSHes every 16 writes and reads
/// the last flushed block back, until the namespace goes away.
fn write_load(port: u16, cntlid: u16, ctl: Arc<Ctl>, st: Arc<Mutex<Load>>) {
    let mut io = Client::io(port, NQN, HOST, cntlid, 1);
    let gone = |s: Status| is(s, Status::INVALID_NAMESPACE);
    let mut i = 0u64;
    loop {
        let c = write_ns(&mut io, 2, lba(i), &pattern(WRITE, i));
        if gone(c.status) {
            return;
        }
        if !c.status.is_success() {
            st.lock().unwrap().error = Some(format!("write {i}: {c:?}"));
            return;
        }
        i += 1;
        st.lock().unwrap().acked = i;
        ctl.progress.store(i, Ordering::Relaxed);
        if i.is_multiple_of(16) && !ctl.no_flush.load(Ordering::Relaxed) {
            let c = flush_ns(&mut io, 2);
            if gone(c.status) {
                return;
            }
            if !c.status.is_success() {
                st.lock().unwrap().error = Some(format!("flush after {i}: {c:?}"));
                return;
            }
            st.lock().unwrap().flushed = i;
            let j = i - 1;
            let (c, back) = read_ns(&mut io, 2, lba(j), NLB);
            if gone(c.status) {
                return;
            }
            if !c.status.is_success() || back != pattern(WRITE, j) {
                st.lock().unwrap().error = Some(format!("read-back of write {j}: {c:?}"));
                return;
            }
        }
    }
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
fn sighup_adds_refuses_in_place_change_and_removes_objbacker_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let buckets = dir.path().join("obj");
    let cfg = dir.path().join("strata.toml");
    std::fs::write(&cfg, base("")).unwrap();
    let mut srv = Server::start(Some(&cfg), dir.path());
    let (mut a, cntlid) = Client::admin(srv.port, NQN, HOST);
    assert_eq!(identify_active_ns(&mut a), vec![1]);

    // Add an objbacker namespace.
    let with_ob = base(&objbacker_ns(&buckets, ""));
    assert!(reload(&mut srv, &cfg, &with_ob), "{}", srv.log_text());
    assert_eq!(identify_active_ns(&mut a), vec![1, 2]);

    // Verified write load on it.
    let ctl = Arc::new(Ctl::default());
    let st = Arc::new(Mutex::new(Load::default()));
    let writer = {
        let (ctl, st, port) = (ctl.clone(), st.clone(), srv.port);
        std::thread::spawn(move || write_load(port, cntlid, ctl, st))
    };
    let progress = &ctl.progress;
    wait_for(
        "the write load to start",
        &srv,
        Duration::from_secs(30),
        || progress.load(Ordering::Relaxed) >= 64,
    );

    // An in-place change of the objbacker parameters is refused, names the
    // file, the field and the fix, and changes nothing: the load carries on.
    let changed = base(&objbacker_ns(&buckets, "writeback = \"32MiB\""));
    assert!(
        !reload(&mut srv, &cfg, &changed),
        "in-place change must be refused"
    );
    let log = srv.log_text();
    assert!(
        log.contains(&cfg.display().to_string())
            && log.contains("subsystem[0].namespace[1].writeback")
            && log.contains("remove the namespace in one reload"),
        "refusal must name file, field and fix:\n{log}"
    );
    assert_eq!(
        log.matches("formatted new objbacker device").count(),
        1,
        "no second engine attached:\n{log}"
    );
    let before = progress.load(Ordering::Relaxed);
    wait_for(
        "the load to carry on after the refusal",
        &srv,
        Duration::from_secs(30),
        || progress.load(Ordering::Relaxed) >= before + 64,
    );
    assert!(
        st.lock().unwrap().error.is_none(),
        "{:?}",
        st.lock().unwrap().error
    );

    // Stop flushing, so the removal has acknowledged writes to flush.
    ctl.no_flush.store(true, Ordering::Relaxed);
    let before = progress.load(Ordering::Relaxed);
    wait_for("unflushed writes", &srv, Duration::from_secs(30), || {
        progress.load(Ordering::Relaxed) >= before + 48
    });

    // Remove it while the load runs: drained, flushed, closed.
    assert!(reload(&mut srv, &cfg, &base("")), "{}", srv.log_text());
    assert!(
        srv.log_text()
            .contains("removed objbacker namespace flushed and closed"),
        "{}",
        srv.log_text()
    );
    // The writer ends when its next command finds the namespace gone.
    writer.join().unwrap();
    let (acked, flushed) = {
        let l = st.lock().unwrap();
        assert!(l.error.is_none(), "write load failed: {:?}", l.error);
        (l.acked, l.flushed)
    };
    eprintln!("write load: {acked} writes acknowledged, {flushed} flushed before the removal");
    assert!(
        flushed >= 128 && acked >= flushed + 48,
        "acked {acked}, flushed {flushed}"
    );
    assert_eq!(identify_active_ns(&mut a), vec![1]);
    // The data is in the directory: objects exist in both buckets.
    for b in ["b0", "b1"] {
        let n = std::fs::read_dir(buckets.join(b)).unwrap().count();
        assert!(n > 1, "bucket {b} holds {n} entries");
    }

    // Re-add it: every acknowledged write (flushed or not: removal
    // flushes) reads back.
    assert!(reload(&mut srv, &cfg, &with_ob), "{}", srv.log_text());
    let mut io = Client::io(srv.port, NQN, HOST, cntlid, 2);
    for i in last_writes(acked) {
        let (c, back) = read_ns(&mut io, 2, lba(i), NLB);
        assert!(c.status.is_success(), "read of write {i}: {c:?}");
        assert!(
            back == pattern(WRITE, i),
            "write {i} of {acked} acknowledged ({flushed} flushed) lost across removal"
        );
    }
    assert_alive(&mut srv);
}

#[test]
fn reload_failing_validation_on_the_last_namespace_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("strata.toml");
    std::fs::write(&cfg, base("")).unwrap();
    let mut srv = Server::start(Some(&cfg), dir.path());
    let (mut a, _) = Client::admin(srv.port, NQN, HOST);

    let img = dir.path().join("new.img");
    let bucket = dir.path().join("newbucket");
    let not_a_dir = dir.path().join("plain-file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let new_ones = |last: &str| {
        base(&format!(
            r#"
[[subsystem.namespace]]
nsid = 2
type = "file"
path = "{}"
size = "16MiB"
[[subsystem.namespace]]
nsid = 3
type = "objbacker"
size = "16MiB"
object_size = "128KiB"
buckets = ["file://{}"]
auto_format = true
{last}"#,
            img.display(),
            bucket.display()
        ))
    };
    let bad_last = new_ones(&format!(
        "[[subsystem.namespace]]\nnsid = 4\ntype = \"file\"\npath = \"{}/x.img\"\nsize = \"16MiB\"\n",
        not_a_dir.display()
    ));
    assert!(!reload(&mut srv, &cfg, &bad_last), "must be refused");
    let log = srv.log_text();
    assert!(log.contains("subsystem[0].namespace[3].path"), "{log}");
    assert!(!img.exists(), "a refused reload created {}", img.display());
    assert!(
        !bucket.exists(),
        "a refused reload created {}",
        bucket.display()
    );
    assert!(!log.contains("formatted new objbacker device"), "{log}");
    assert_eq!(identify_active_ns(&mut a), vec![1]);

    // A failure only the store can report (an empty bucket directory and
    // no auto_format: attach finds no superblock) happens after the file
    // was created: the reload rolls it back.
    let empty = dir.path().join("empty-bucket");
    std::fs::create_dir(&empty).unwrap();
    let fails_late = new_ones(&format!(
        "[[subsystem.namespace]]\nnsid = 4\ntype = \"objbacker\"\nsize = \"16MiB\"\nobject_size = \"128KiB\"\nbuckets = [\"file://{}\"]\n",
        empty.display()
    ));
    assert!(!reload(&mut srv, &cfg, &fails_late), "must be refused");
    let log = srv.log_text();
    assert!(log.contains("rolled back everything"), "{log}");
    assert!(!img.exists(), "rollback left {}", img.display());
    assert!(!bucket.exists(), "rollback left {}", bucket.display());
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    assert_eq!(identify_active_ns(&mut a), vec![1]);

    // And the same namespaces without the bad one apply.
    assert!(reload(&mut srv, &cfg, &new_ones("")), "{}", srv.log_text());
    assert_eq!(identify_active_ns(&mut a), vec![1, 2, 3]);
    assert!(img.exists() && bucket.exists());
    assert_alive(&mut srv);
}

/// `strata [GLOBAL] serve` with stderr to a file, on free ports.
fn start_with_args(dir: &Path, cfg: &Path, global: &[&str]) -> Server {
    let port = free_port();
    let discovery_port = free_port();
    let log: PathBuf = dir.join(format!("serve-{port}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(global)
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--discovery")
        .arg(format!("127.0.0.1:{discovery_port}"))
        .arg("--config")
        .arg(cfg)
        .env("STRATA_LOG", "info,strata_target=debug")
        .env("STRATA_DATA_DIR", dir.join("data"))
        .env("STRATA_RUNTIME_DIR", dir.join("run"))
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn strata serve");
    let srv = Server {
        child,
        port,
        discovery_port,
        log,
    };
    wait_for("the listener", &srv, Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    srv
}

#[test]
fn logs_to_a_file_have_no_ansi_codes_and_json_lines_parse() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("strata.toml");
    std::fs::write(&cfg, base("")).unwrap();

    let mut srv = start_with_args(dir.path(), &cfg, &[]);
    let _c = Client::admin(srv.port, NQN, HOST);
    assert!(reload(&mut srv, &cfg, &base("")));
    let text = srv.log_text();
    assert!(text.contains("strata serve started"), "{text}");
    assert!(
        !text.contains("\x1b["),
        "ANSI codes in a log file:\n{text:?}"
    );
    drop(srv);

    let mut srv = start_with_args(dir.path(), &cfg, &["--log-format", "json"]);
    let _c = Client::admin(srv.port, NQN, HOST);
    assert!(reload(&mut srv, &cfg, &base("")));
    let text = srv.log_text();
    assert!(!text.contains("\x1b["), "{text:?}");
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        lines += 1;
    }
    assert!(lines >= 3, "{text}");
    assert!(text.contains("\"configuration applied\""), "{text}");
}
