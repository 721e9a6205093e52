//! Children that cannot outlive the test that spawned them, and waiting
//! for events without fixed sleeps.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Makes `cmd` safe to spawn from a test: the child leads its own process
/// group (so [`kill_and_reap`] reaches anything it spawns in turn), and on
/// Linux it gets SIGKILL when the spawning thread's process dies abruptly
/// (PR_SET_PDEATHSIG), so a crashed or killed test run leaves no server.
///
/// PR_SET_PDEATHSIG fires when the *thread* that spawned the child exits:
/// spawn from a thread that outlives the child (the test's own thread, or a
/// helper thread that is joined only after the child is dropped).
pub fn guard_command(cmd: &mut Command) -> &mut Command {
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died between fork and prctl: nobody will kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    cmd
}

/// Whether `child` exited, without reaping it (waitid WNOWAIT): until it is
/// reaped, its pid — also its process group's id — cannot be reused, so
/// [`kill_and_reap`] can still kill the group safely. Use this (or
/// [`Server::wait_exit`]) instead of `child.try_wait()`, which reaps.
pub fn has_exited(child: &Child) -> bool {
    peek(child) != Peek::Running
}

#[derive(PartialEq)]
enum Peek {
    Running,
    Exited,
    /// Already reaped (by std): the pid is no longer ours.
    Reaped,
}

fn peek(child: &Child) -> Peek {
    // SAFETY: waitid(2) with WNOWAIT on our own child; siginfo_t is plain
    // data.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            child.id() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        match (r, info.si_pid()) {
            (0, 0) => Peek::Running,
            (0, _) => Peek::Exited,
            _ => Peek::Reaped,
        }
    }
}

/// SIGKILLs the process group `child` leads (see [`guard_command`]) and
/// reaps the child; returns its exit status. Idempotent (once the child is
/// reaped its group is not signalled again: the pid is no longer ours).
pub fn kill_and_reap(child: &mut Child) -> Option<std::process::ExitStatus> {
    if peek(child) != Peek::Reaped {
        // SAFETY: kill(2) on the group our own, unreaped child leads.
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = child.kill();
    }
    child.wait().ok()
}

/// A spawned child that is killed with its process group and reaped on
/// drop, also when the test panics.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `cmd` with [`guard_command`] applied.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<ChildGuard> {
        guard_command(cmd).spawn().map(ChildGuard)
    }

    /// Waits up to `limit` for the child to exit; kills it (and fails the
    /// test) if it does not.
    pub fn wait_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let done = wait_until(limit, || has_exited(&self.0));
        let status = kill_and_reap(&mut self.0).expect("wait for child");
        assert!(done, "child {} did not exit within {limit:?}", self.0.id());
        status
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        kill_and_reap(&mut self.0);
    }
}

/// Polls `cond` every 10 ms until it holds (true) or `limit` passes (false,
/// after one last check). Tests wait for events with this instead of
/// sleeping a fixed time.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `cmd`'s stdout and stderr once it exits; the child is killed (and the
/// test fails) if it runs longer than `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = ChildGuard::spawn(cmd).expect("spawn");
    let status = child.wait_within(limit);
    std::process::Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}
