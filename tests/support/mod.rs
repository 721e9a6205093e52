//! Shared by the integration tests: a `strata serve` process on free ports,
//! and, from strata-testkit, a raw NVMe/TCP client built on the target's
//! own codec for sending exactly the bytes a test wants (well-formed or
//! not).
#![allow(dead_code)]

use std::io::{BufRead, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// Each test binary uses its own subset.
#[allow(unused_imports)]
pub use strata_testkit::host::{Client, Rsp, rw};
#[allow(unused_imports)]
pub use strata_testkit::process::output_within;
#[allow(unused_imports)]
pub use strata_testkit::{
    ChildGuard, free_port, guard_command, has_exited, kill_and_reap, wait_until,
};

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
            .env("STRATA_RUNTIME_DIR", dir.join("run"))
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

    /// Ready means the port accepts and the start is logged as complete
    /// (listeners accept only once their configuration is applied).
    fn wait_ready(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok()
                && self.log_text().contains("strata serve started")
            {
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

    /// Prints what a host asked for that the target refused, for the
    /// record; fails on a target panic.
    pub fn report_refusals(&self, test: &str) {
        let log = self.log_text();
        for l in log.lines().filter(|l| l.contains("admin command refused")) {
            eprintln!("[{test}] {l}");
        }
        assert!(!log.contains("panicked"), "target panicked:\n{log}");
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
pub mod ctl;
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
            .env("STRATA_RUNTIME_DIR", dir.join("run"))
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
