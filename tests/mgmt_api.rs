//! The management API through `strata ctl` against a running `strata serve`:
//! the lifecycle (and that it survives a restart), refusals that change
//! nothing, kill -9 in the middle of a burst of updates, and the socket's
//! permissions against another Unix user.
//!
//! The Linux kernel host's view of the same lifecycle (a namespace added
//! live shows up in `nvme list`) is in `tests/mgmt_linux.rs`.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::ctl::{ctl, json, ok, refused, socket};
use support::{Client, Server, free_port, output_within, pattern};

const NQN: &str = "nqn.2026-12.dev.strata:mgmt";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const OTHER: &str = "nqn.2014-08.org.nvmexpress:uuid:99999999-2222-3333-4444-555555555555";

fn write_config(dir: &Path) -> PathBuf {
    let p = dir.join("strata.toml");
    std::fs::write(
        &p,
        r#"
[[listener]]
name = "default"
addr = "127.0.0.1:4420"

[[subsystem]]
nqn = "nqn.2026-12.dev.strata:seed"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "4MiB"
"#,
    )
    .unwrap();
    p
}

fn nsids(dir: &Path, nqn: &str) -> Vec<u64> {
    json(dir, &["ns", "ls", nqn])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["nsid"].as_u64().unwrap())
        .collect()
}

#[test]
fn lifecycle_through_ctl_survives_a_restart() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let cfg = write_config(dir);
    let port = free_port();
    let disc = free_port();
    let mut srv = Server::start_on(Some(&cfg), dir, port, disc);

    let st = json(dir, &["status"]);
    assert_eq!(st["subsystems"], 1);
    assert!(st["state_file"].as_str().unwrap().ends_with("state.toml"));

    let p2 = free_port();
    let l2 = format!("127.0.0.1:{p2}");
    ok(dir, &["listener", "add", "l2", &l2]);
    ok(
        dir,
        &["subsystem", "add", NQN, "--host", HOST, "--listener", "l2"],
    );
    let img = dir.join("ns2.img");
    ok(dir, &["ns", "add", NQN, "--ram", "8MiB"]);
    ok(
        dir,
        &[
            "ns",
            "add",
            NQN,
            "--nsid",
            "2",
            "--file",
            img.to_str().unwrap(),
            "--size",
            "4MiB",
        ],
    );
    assert_eq!(nsids(dir, NQN), [1, 2]);
    let ls = json(dir, &["listener", "ls"]);
    let l = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "l2")
        .unwrap();
    assert_eq!(l["bound_addr"], l2.as_str());
    assert_eq!(l["subsystems"][0], NQN);

    // A host on the allow-list connects on the new listener and does I/O;
    // another host is refused.
    let (mut admin, cntlid) = Client::admin(p2, NQN, HOST);
    admin.enable();
    let mut io = Client::io(p2, NQN, HOST, cntlid, 1);
    let data = pattern(4096, 7);
    assert!(io.write(0, &data, 512).status.is_success());
    let (c, back) = io.read(0, 8, 512);
    assert!(c.status.is_success());
    assert_eq!(back, data);
    let mut other = Client::connect_tcp(p2);
    other.icreq(false, false);
    assert!(!other.connect(0, 0xffff, NQN, OTHER).status.is_success());

    let st = json(dir, &["status"]);
    let c = st["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["nqn"] == NQN && c["nsid"] == 1)
        .cloned()
        .unwrap_or_else(|| panic!("no counters for {NQN}/1: {st}"));
    assert!(
        c["reads"].as_u64().unwrap() >= 1 && c["writes"].as_u64().unwrap() >= 1,
        "{c}"
    );
    assert!(c["write_bytes"].as_u64().unwrap() >= 4096, "{c}");

    let ctrls = json(dir, &["ctrl", "ls", NQN]);
    let c0 = &ctrls.as_array().unwrap()[0];
    assert_eq!(c0["host_nqn"], HOST);
    assert_eq!(c0["cntlid"], u64::from(cntlid));
    assert_eq!(c0["listener"], "l2");
    assert_eq!(c0["io_queues"], 1);
    assert!(c0["host_addr"].as_str().unwrap().starts_with("127.0.0.1:"));

    // Removing what a host uses needs --force.
    let e = refused(dir, &["ns", "rm", NQN, "1"], 7);
    assert!(e.contains("connected") && e.contains("--force"), "{e}");
    assert_eq!(nsids(dir, NQN), [1, 2]);

    // Resize grows the file namespace; RAM is refused.
    let r = json(dir, &["ns", "resize", NQN, "2", "8MiB"]);
    assert_eq!(r[0]["size"], 8 << 20);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 << 20);
    refused(dir, &["ns", "resize", NQN, "1", "16MiB"], 7);

    // Disconnect drops the host's connections.
    ok(dir, &["ctrl", "disconnect", NQN, &cntlid.to_string()]);
    assert!(support::wait_until(Duration::from_secs(10), || json(
        dir,
        &["ctrl", "ls", NQN]
    )
    .as_array()
    .unwrap()
    .is_empty()));
    drop((admin, io, other));

    ok(dir, &["host", "allow", NQN, OTHER]);
    ok(dir, &["ana", "set", "l2", "1", "non-optimized"]);
    let before = ok(dir, &["save-config"]);
    let subs_before = json(dir, &["subsystem", "ls"]);

    // Restart: everything is still there, and the file namespace's data.
    srv.kill9();
    let _srv = Server::start_on(Some(&cfg), dir, port, disc);
    assert_eq!(json(dir, &["subsystem", "ls"]), subs_before);
    assert_eq!(ok(dir, &["save-config"]), before);
    let ls = json(dir, &["listener", "ls"]);
    let l = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "l2")
        .unwrap();
    assert_eq!(l["ana"]["1"], "non-optimized");
    // The host allowed after the restart's state connects.
    let (mut admin, _) = Client::admin(p2, NQN, OTHER);
    admin.enable();
    drop(admin);

    // The saved config is a config file that starts a target.
    let saved = dir.join("saved.toml");
    ok(dir, &["save-config", "-o", saved.to_str().unwrap()]);
    let reparsed = std::fs::read_to_string(&saved).unwrap();
    assert_eq!(reparsed, before);
}

#[test]
fn refusals_name_the_field_and_change_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let cfg = write_config(dir);
    let _srv = Server::start(Some(&cfg), dir);
    ok(dir, &["subsystem", "add", NQN, "--allow-any-host"]);
    ok(dir, &["ns", "add", NQN, "--ram", "1MiB"]);
    let before = ok(dir, &["save-config"]);

    let e = refused(dir, &["subsystem", "add", "iqn.not-nvme"], 4);
    assert!(e.contains("nqn:") && e.contains("fix:"), "{e}");
    let e = refused(dir, &["subsystem", "add", NQN], 6);
    assert!(e.contains("exists"), "{e}");
    let e = refused(dir, &["ns", "add", NQN, "--nsid", "1", "--ram", "1MiB"], 6);
    assert!(e.contains("nsid:") && e.contains("NSID 1"), "{e}");
    let e = refused(dir, &["ns", "add", NQN, "--ram", "1000"], 4);
    assert!(e.contains("ram.size:") && e.contains("block_size"), "{e}");
    let e = refused(
        dir,
        &[
            "ns",
            "add",
            NQN,
            "--objbacker",
            "--bucket",
            "ftp://nope",
            "--size",
            "1GiB",
        ],
        4,
    );
    assert!(e.contains("objbacker.buckets[0]"), "{e}");
    refused(dir, &["listener", "attach", NQN, "nope"], 5);
    refused(dir, &["listener", "add", "dup", "127.0.0.1:notaport"], 4);
    refused(dir, &["ns", "rm", NQN, "9"], 5);
    refused(dir, &["host", "deny", NQN, HOST], 5);
    refused(dir, &["ana", "set", "default", "1", "sleepy"], 4);
    refused(dir, &["ana", "set", "default", "0", "optimized"], 4);
    refused(dir, &["ctrl", "disconnect", NQN, "7"], 5);
    // A listener on a port someone holds: refused at apply, rolled back.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = refused(
        dir,
        &[
            "listener",
            "add",
            "busy",
            &held.local_addr().unwrap().to_string(),
        ],
        7,
    );
    assert!(e.contains("cannot listen"), "{e}");
    // A file namespace whose directory cannot be created.
    refused(
        dir,
        &[
            "ns",
            "add",
            NQN,
            "--file",
            "/proc/strata/x.img",
            "--size",
            "1MiB",
        ],
        7,
    );

    // A malformed request on the socket (bytes that are not HTTP/2): that
    // connection is dropped and the target keeps answering.
    {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(socket(dir)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\xfe garbage")
            .unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    }
    assert_eq!(
        ok(dir, &["save-config"]),
        before,
        "a refusal changed the state"
    );

    // A second strata serve on the same state directory.
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--discovery")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--mgmt-socket")
            .arg(dir.join("other.sock"))
            .arg("--config")
            .arg(&cfg)
            .env("STRATA_DATA_DIR", dir.join("data")),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another strata serve"), "{err}");
    // And one on the same socket with its own state directory.
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--discovery")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--state-dir")
            .arg(dir.join("state2"))
            .arg("--config")
            .arg(&cfg)
            .env("STRATA_RUNTIME_DIR", dir.join("run")),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("answered by another strata serve"), "{err}");
    assert_eq!(ok(dir, &["save-config"]), before);

    // Not running: a clear message and exit 3.
    let e = String::from_utf8_lossy(
        &output_within(
            Command::new(env!("CARGO_BIN_EXE_strata"))
                .args(["ctl", "--socket"])
                .arg(dir.join("nobody.sock"))
                .arg("status"),
            Duration::from_secs(30),
        )
        .stderr,
    )
    .into_owned();
    assert!(e.contains("not running"), "{e}");
}

/// kill -9 of `strata serve` in the middle of 100 updates, 20 trials: the
/// state after restart holds every acknowledged update and at most the
/// one in flight, and it loads.
#[test]
fn kill9_mid_update_burst_keeps_every_acknowledged_change() {
    let t = tempfile::tempdir().unwrap();
    let mut rng_state = 0x5eed_u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let mut in_flight_seen = 0;
    for trial in 0..20 {
        let dir = t.path().join(format!("trial{trial}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = write_config(&dir);
        let mut srv = Server::start(Some(&cfg), &dir);
        ok(&dir, &["subsystem", "add", NQN, "--allow-any-host"]);
        let kill_after = Duration::from_millis(next() % 1500);
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
        let a2 = acked.clone();
        let d2 = dir.clone();
        let updater = std::thread::spawn(move || {
            for nsid in 1..=100u32 {
                let o = ctl(
                    &d2,
                    &[
                        "ns",
                        "add",
                        NQN,
                        "--nsid",
                        &nsid.to_string(),
                        "--ram",
                        "1MiB",
                    ],
                );
                if !o.status.success() {
                    return nsid;
                }
                a2.lock().unwrap().push(nsid);
            }
            101
        });
        std::thread::sleep(kill_after);
        srv.kill9();
        let failed_at = updater.join().unwrap();
        let acked = acked.lock().unwrap().clone();
        let _srv = Server::start(Some(&cfg), &dir);
        let got = nsids(&dir, NQN);
        let want: Vec<u64> = acked.iter().map(|&n| u64::from(n)).collect();
        let extra: Vec<u64> = got.iter().copied().filter(|n| !want.contains(n)).collect();
        assert!(
            want.iter().all(|n| got.contains(n)),
            "trial {trial}: acknowledged {want:?} but the restarted state has {got:?}"
        );
        assert!(
            extra.is_empty() || (extra.len() == 1 && extra[0] == u64::from(failed_at)),
            "trial {trial}: unacknowledged namespaces {extra:?} (the one in flight was {failed_at})"
        );
        in_flight_seen += extra.len();
    }
    // Reported, not asserted: whether a kill landed between persist and
    // answer depends on timing.
    eprintln!("in-flight updates found applied after restart: {in_flight_seen} of 20 trials");
}

/// Another Unix user cannot reconfigure the target: the socket is 0600,
/// and even a socket made world-writable refuses a peer of another uid.
#[test]
fn another_user_cannot_use_the_socket() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    // Let the other user reach the socket file itself (tempdirs are 0700):
    // what must stop it is the socket's own mode and the peer check.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = write_config(dir);
    let _srv = Server::start(Some(&cfg), dir);
    let sock = socket(dir);
    std::fs::set_permissions(
        sock.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The binary, where the other user can execute it.
    let bin = dir.join("strata");
    std::fs::copy(env!("CARGO_BIN_EXE_strata"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        output_within(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&bin)
                .args(["ctl", "--socket"])
                .arg(&sock)
                .args(args),
            Duration::from_secs(30),
        )
    };
    let o = as_nobody(&["subsystem", "add", "nqn.2026-12.dev.strata:intruder"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("ermission denied"));
    // World-writable socket: the connection is made, the peer check drops it.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = as_nobody(&["subsystem", "add", "nqn.2026-12.dev.strata:intruder"]);
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let subs = json(dir, &["subsystem", "ls"]);
    assert_eq!(subs.as_array().unwrap().len(), 1, "{subs}");
    assert!(
        _srv.log_text()
            .contains("connection from another user refused")
    );
}

/// TCP is opt-in and only with a token: none, a wrong one, and a token
/// file others can read are all refused; the right one works.
#[test]
fn tcp_management_needs_the_token() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let cfg = write_config(dir);
    let tok = dir.join("token");
    std::fs::write(&tok, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bad = dir.join("bad-token");
    std::fs::write(&bad, "ffffffffffffffffffffffffffffffff\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mgmt = format!("127.0.0.1:{}", free_port());
    let port = free_port();
    let log = dir.join("serve.log");
    let mut child = support::guard_command(
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--discovery")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--config")
            .arg(&cfg)
            .args(["--mgmt-addr", &mgmt])
            .arg("--mgmt-token-file")
            .arg(&tok)
            .env("STRATA_DATA_DIR", dir.join("data"))
            .env("STRATA_RUNTIME_DIR", dir.join("run"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    )
    .spawn()
    .unwrap();
    assert!(
        support::wait_until(Duration::from_secs(30), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("strata serve started")),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let tcp = |token: &Path| {
        output_within(
            Command::new(env!("CARGO_BIN_EXE_strata"))
                .args(["ctl", "--addr", &mgmt, "--token-file"])
                .arg(token)
                .args(["subsystem", "add", NQN, "--allow-any-host"]),
            Duration::from_secs(30),
        )
    };
    let o = tcp(&bad);
    assert_eq!(
        o.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = tcp(&tok);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(dir, &["subsystem", "ls"]).as_array().unwrap().len(), 2);
    // Without --token-file clap refuses the command line.
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_strata")).args(["ctl", "--addr", &mgmt, "status"]),
        Duration::from_secs(30),
    );
    assert_eq!(o.status.code(), Some(2));
    support::kill_and_reap(&mut child);

    // A token file others can read: serve refuses to start.
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .args(["--mgmt-addr", &mgmt])
            .arg("--mgmt-token-file")
            .arg(&tok)
            .env("STRATA_DATA_DIR", dir.join("data"))
            .env("STRATA_RUNTIME_DIR", dir.join("run")),
        Duration::from_secs(30),
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("chmod 600"));
}

/// Restarting with the same config file keeps the management changes; a
/// config file edited since then is applied instead (the last explicit
/// intent wins), and the log says so.
#[test]
fn an_edited_config_file_wins_at_restart_an_unchanged_one_does_not() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let cfg = write_config(dir);
    let (port, disc) = (free_port(), free_port());
    let mut srv = Server::start_on(Some(&cfg), dir, port, disc);
    ok(dir, &["subsystem", "add", NQN, "--allow-any-host"]);
    srv.kill9();
    let mut srv = Server::start_on(Some(&cfg), dir, port, disc);
    assert_eq!(json(dir, &["subsystem", "ls"]).as_array().unwrap().len(), 2);
    assert!(srv.log_text().contains("starting from the saved state"));
    srv.kill9();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("\n[[subsystem.namespace]]\nnsid = 2\ntype = \"ram\"\nsize = \"1MiB\"\n");
    std::fs::write(&cfg, text).unwrap();
    let srv = Server::start_on(Some(&cfg), dir, port, disc);
    let subs = json(dir, &["subsystem", "ls"]);
    assert_eq!(subs.as_array().unwrap().len(), 1, "{subs}");
    assert_eq!(nsids(dir, "nqn.2026-12.dev.strata:seed"), [1, 2]);
    assert!(srv.log_text().contains("the config file changed"));
}
