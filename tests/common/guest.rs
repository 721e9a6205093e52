//! Boot a real Linux NVMe/TCP host (Debian 6.1 kernel + busybox + nvme-cli +
//! mke2fs) in QEMU and run a shell script in it. See `tests/guest/README.md`.
//!
//! ```ignore
//! mod common;
//! use common::guest::{self, run_guest, free_port, HOST_FROM_GUEST};
//!
//! #[test]
//! fn connect_from_linux() {
//!     guest::require_guest();                 // panics with build instructions
//!     let port = free_port();
//!     // ... start the strata target on 127.0.0.1:port ...
//!     let run = run_guest(&format!(
//!         "nvme connect -t tcp -a {HOST_FROM_GUEST} -s {port} -n nqn.2024-01.io.strata:t1\n\
//!          nvme list\n"), std::time::Duration::from_secs(120)).unwrap();
//!     run.assert_success();
//! }
//! ```
//!
//! Inside the guest the host's `127.0.0.1:PORT` is `10.0.2.2:PORT`
//! ([`HOST_FROM_GUEST`]). The guest is 10.0.2.15. Runs are independent: each
//! has its own temp dir and its own QEMU with its own user-mode network, so
//! tests may boot guests in parallel (each costs about one host core for
//! 7-10 s).
#![allow(dead_code)]

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Address of the host's loopback as seen from inside the guest.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// Exit code reported when the run hit its timeout (as with `timeout(1)`).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit code reported when the guest ended without printing `GUEST-EXIT=`
/// (kernel panic, QEMU failure).
pub const EXIT_NO_MARKER: i32 = 125;

/// Outcome of one guest boot.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Exit code of the guest script; [`EXIT_TIMEOUT`] on timeout;
    /// [`EXIT_NO_MARKER`] if the guest died before reporting one.
    pub exit_code: i32,
    /// Full serial console (kernel messages, `sh -x` trace, script output).
    pub console: String,
}

impl GuestRun {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// True if the run was stopped by the timeout (no `GUEST-EXIT=` line).
    pub fn timed_out(&self) -> bool {
        self.exit_code == EXIT_TIMEOUT && !self.console.contains("GUEST-EXIT=")
    }

    /// Panics with the whole console unless the script exited 0.
    pub fn assert_success(&self) {
        assert!(
            self.success(),
            "guest script failed with exit code {}{}\n----- guest console -----\n{}\n----- end -----",
            self.exit_code,
            if self.timed_out() { " (timed out)" } else { "" },
            self.console
        );
    }

    /// Lines of the console that the script printed with the given prefix,
    /// prefix stripped (e.g. `run.lines_with("RESULT ")`).
    pub fn lines_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.console
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter_map(move |l| l.strip_prefix(prefix))
    }
}

/// Extra knobs for [`run_guest_with`].
#[derive(Debug, Clone, Default)]
pub struct GuestOptions {
    /// Host files to place in the guest: (host path, absolute guest path).
    pub files: Vec<(PathBuf, String)>,
    /// Host NQN written to the guest's /etc/nvme/hostnqn (default: derived from the host id).
    pub hostnqn: Option<String>,
    /// Host ID (UUID) written to /etc/nvme/hostid (default: random per run).
    pub hostid: Option<String>,
    /// Extra kernel command line words (e.g. `nvme_core.multipath=N`).
    pub append: String,
    /// Guest memory, QEMU syntax (default "1024M").
    pub mem: Option<String>,
}

/// Repository root (the workspace root holding `tests/guest`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Directory holding the built guest image (`$GUEST_CACHE` or `<repo>/.guest-cache`).
pub fn guest_cache() -> PathBuf {
    match std::env::var_os("GUEST_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(".guest-cache"),
    }
}

fn qemu_in_path() -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false)
}

/// True if the guest image is built and QEMU is installed.
pub fn guest_available() -> bool {
    let c = guest_cache();
    ["vmlinux", "initramfs.cpio", "bin/busybox", "READY"]
        .iter()
        .all(|f| c.join(f).exists())
        && qemu_in_path()
}

/// Message telling how to make the guest available.
pub fn guest_missing_message() -> String {
    format!(
        "the QEMU test guest is not available (image dir {}, qemu-system-x86_64 in PATH: {}). \
         Install and build it with `.ci/install-guest.sh` (as root), or, if qemu-system-x86 is \
         already installed, `tests/guest/build.sh`.",
        guest_cache().display(),
        qemu_in_path()
    )
}

/// Panics with build instructions if the guest is not available. Tests that
/// need the guest call this first: they must not silently skip.
pub fn require_guest() {
    if !guest_available() {
        panic!("{}", guest_missing_message());
    }
}

/// A free TCP port on 127.0.0.1, unique within the test process.
#[allow(unused_imports)]
pub use strata_testkit::free_port;

/// Boots the guest with `script` (a POSIX sh script body) and returns when it powers off or `timeout` passes.
pub fn run_guest(script: &str, timeout: Duration) -> io::Result<GuestRun> {
    run_guest_with(script, timeout, &GuestOptions::default())
}

/// [`run_guest`] with extra files, host NQN/ID and kernel arguments.
pub fn run_guest_with(
    script: &str,
    timeout: Duration,
    opts: &GuestOptions,
) -> io::Result<GuestRun> {
    if !guest_available() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            guest_missing_message(),
        ));
    }
    let tmp = TempDir::new()?;
    let script_path = tmp.path().join("test.sh");
    std::fs::write(&script_path, script)?;
    let log = tmp.path().join("console.log");

    let mut append = opts.append.clone();
    if let Some(nqn) = &opts.hostnqn {
        append.push_str(&format!(" guest.hostnqn={nqn}"));
    }
    if let Some(id) = &opts.hostid {
        append.push_str(&format!(" guest.hostid={id}"));
    }
    let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;

    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("tests/guest/run.sh"));
    for (host, guest) in &opts.files {
        cmd.arg("-f").arg(format!("{}:{}", host.display(), guest));
    }
    cmd.arg(&script_path)
        .arg(secs.to_string())
        .env("GUEST_CACHE", guest_cache())
        .env("GUEST_LOG", &log)
        .env("GUEST_APPEND", append.trim())
        .env("TMPDIR", tmp.path())
        .env_remove("GUEST_VERBOSE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("run.stderr"))?);
    if let Some(mem) = &opts.mem {
        cmd.env("GUEST_MEM", mem);
    }
    // run.sh bounds the guest with timeout(1); this bound is only for a
    // wedged run.sh. The guard kills run.sh, QEMU and everything else it
    // started when the test ends, fails or panics.
    let mut run = GuestProcess::spawn(&mut cmd)?;
    let status = run.wait_within(timeout + Duration::from_secs(120));
    drop(run);
    let out = GuestOutput {
        status,
        stderr: std::fs::read(tmp.path().join("run.stderr")).unwrap_or_default(),
    };
    let console = std::fs::read_to_string(&log)
        .map(|s| s.replace('\r', ""))
        .unwrap_or_default();
    let marker = console
        .lines()
        .filter_map(|l| l.strip_prefix("GUEST-EXIT="))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<i32>().ok())
        .next_back();
    let rc = out.status.code().unwrap_or(-1);
    let exit_code = match marker {
        Some(code) => code,
        None if rc == EXIT_TIMEOUT => EXIT_TIMEOUT,
        None if rc == 2 && console.is_empty() => {
            // run.sh refused to start (usage / missing image): surface its message.
            return Err(io::Error::other(format!(
                "tests/guest/run.sh failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        None => EXIT_NO_MARKER,
    };
    let console = if marker.is_none() && console.is_empty() {
        String::from_utf8_lossy(&out.stderr).into_owned()
    } else {
        console
    };
    Ok(GuestRun { exit_code, console })
}

struct GuestOutput {
    status: ExitStatus,
    stderr: Vec<u8>,
}

/// `tests/guest/run.sh` as a child: in its own process group, SIGKILLed by
/// the kernel if the test process dies (PR_SET_PDEATHSIG), and on drop
/// killed with its process group and every descendant (timeout(1) inside
/// run.sh moves QEMU to a process group of its own), then reaped.
struct GuestProcess {
    child: Child,
    /// Set once reaped: from then on the pid is no longer ours.
    status: Option<ExitStatus>,
}

impl GuestProcess {
    fn spawn(cmd: &mut Command) -> io::Result<GuestProcess> {
        strata_testkit::guard_command(cmd)
            .spawn()
            .map(|child| GuestProcess {
                child,
                status: None,
            })
    }

    /// The exit status, or a synthetic [`EXIT_TIMEOUT`] after killing it
    /// when it runs past `limit`.
    fn wait_within(&mut self, limit: Duration) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        let deadline = std::time::Instant::now() + limit;
        while !self.exited() {
            if std::time::Instant::now() >= deadline {
                self.kill_all();
                return ExitStatus::from_raw(EXIT_TIMEOUT << 8);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill_all()
            .unwrap_or_else(|| ExitStatus::from_raw(EXIT_NO_MARKER << 8))
    }

    /// Whether run.sh exited, without reaping it (WNOWAIT): until it is
    /// reaped its pid, which is also its process group's id, stays ours.
    fn exited(&self) -> bool {
        // SAFETY: waitid(2) with WNOWAIT on our own child; siginfo_t is
        // plain data.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            ) == 0
                && info.si_pid() != 0
        }
    }

    /// Kills the descendants and the process group, then reaps run.sh.
    fn kill_all(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let pid = self.child.id() as libc::pid_t;
        // Descendants first (collected while run.sh still holds them),
        // then the group, then run.sh.
        for p in descendants(pid) {
            // SAFETY: kill(2) on processes our own child started.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        // SAFETY: kill(2) on the group our own (unreaped) child leads.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
        self.status
    }
}

impl Drop for GuestProcess {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Every live descendant of `root`, from /proc.
fn descendants(root: libc::pid_t) -> Vec<libc::pid_t> {
    let mut parent_of = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...; comm may contain spaces and ')'.
            let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            parent_of.push((pid, ppid));
        }
    }
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent_of {
            if pp == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// Minimal self-deleting temp dir (std only, unique per process and call).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "strata-guest-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            nanos
        ));
        std::fs::create_dir(&p)?;
        Ok(TempDir(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
