//! Smoke test of tests/common/guest.rs, runnable without building the workspace:
//!
//!   CARGO_MANIFEST_DIR=$PWD rustc --edition 2024 --test tests/guest/rust_smoke.rs -o /tmp/guest-smoke
//!   /tmp/guest-smoke --test-threads 2
//!
//! (Cargo does not pick this file up: it is not directly under tests/.)
#[path = "../common/guest.rs"]
mod guest;

use guest::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[test]
fn free_port_is_bindable() {
    let p = free_port();
    assert!(p > 0);
    std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
}

#[test]
fn exit_code_and_console() {
    require_guest();
    let run = run_guest("echo MARK hello\nexit 7\n", Duration::from_secs(90)).unwrap();
    assert_eq!(run.exit_code, 7, "{}", run.console);
    assert_eq!(run.lines_with("MARK ").collect::<Vec<_>>(), vec!["hello"]);
    assert!(!run.timed_out());
}

#[test]
fn timeout_is_reported() {
    require_guest();
    let t = Instant::now();
    let run = run_guest("sleep 600\n", Duration::from_secs(8)).unwrap();
    assert_eq!(run.exit_code, EXIT_TIMEOUT, "{}", run.console);
    assert!(run.timed_out());
    assert!(t.elapsed() < Duration::from_secs(20));
}

#[test]
fn guest_reaches_host_loopback_and_gets_files() {
    require_guest();
    // A host listener on 127.0.0.1 that the guest reaches as 10.0.2.2.
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    });
    let tmp = std::env::temp_dir().join(format!("guest-smoke-{}", std::process::id()));
    std::fs::write(&tmp, "payload-42\n").unwrap();
    let opts = GuestOptions {
        files: vec![(tmp.clone(), "/data/p.txt".into())],
        hostnqn: Some("nqn.2014-08.io.strata:host-smoke".into()),
        ..Default::default()
    };
    let script = format!(
        "set -e\n[ \"$(cat /etc/nvme/hostnqn)\" = nqn.2014-08.io.strata:host-smoke ]\n\
         cat /data/p.txt | nc {HOST_FROM_GUEST} {port}\n"
    );
    let run = run_guest_with(&script, Duration::from_secs(90), &opts).unwrap();
    let _ = std::fs::remove_file(&tmp);
    run.assert_success();
    assert_eq!(srv.join().unwrap(), "payload-42\n");
    let _ = std::io::stdout().flush();
}
