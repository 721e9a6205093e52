//! The state directory: where `strata serve` keeps its running
//! configuration (`state.toml`) so that management changes survive a
//! restart, and the lock that keeps a second `strata serve` out of it.
//!
//! `state.toml` is a config file like any other (the renderer of
//! [`ServeConfig::to_toml`]); it is replaced atomically — write a temporary
//! file, fsync it, rename it over the old one, fsync the directory — so a
//! kill -9 at any point leaves the old state or the new one, never a mix.
//! How it relates to `--config` is decided in docs/MANAGEMENT.md
//! ("Persistence").

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::config::{ConfigError, ServeConfig, env_path, systemd_dir};

pub const STATE_FILE: &str = "state.toml";
/// The text of the config file the state was last seeded from (or
/// `--config` last applied by SIGHUP): a start whose `--config` differs from
/// it applies the file, as a SIGHUP would.
pub const SEED_FILE: &str = "seed.toml";
const LOCK_FILE: &str = "lock";

/// `$STRATA_STATE_DIR`, else systemd's `$STATE_DIRECTORY`, else
/// `<data dir>/state` (see [`crate::config::data_dir`]).
pub fn default_state_dir() -> PathBuf {
    env_path("STRATA_STATE_DIR")
        .or_else(|| systemd_dir("STATE_DIRECTORY"))
        .unwrap_or_else(|| crate::config::data_dir().join("state"))
}

/// An open, locked state directory. The lock (flock on `lock`) is held
/// for the life of the value and released by the kernel when the process
/// dies, so a kill -9 never leaves it stale.
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates `dir` (mode 0700) if needed and locks it. A second process
    /// on the same directory gets an error naming the holder.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| {
                format!(
                    "state directory {}: cannot create it; fix: pass --state-dir to a writable directory",
                    dir.display()
                )
            })?;
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| {
                format!(
                    "state directory {}: cannot open {}",
                    dir.display(),
                    path.display()
                )
            })?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "state directory {} is in use by another strata serve (pid {}); fix: stop that one, or give this one its own --state-dir",
                dir.display(),
                holder.trim().if_empty("unknown")
            );
        }
        lock.set_len(0)?;
        writeln!(lock, "{}", std::process::id())?;
        Ok(Self { dir, _lock: lock })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved state, or `None` if there is none yet. A state file that
    /// does not parse is an error naming it (never silently replaced).
    pub fn load(&self) -> Result<Option<ServeConfig>, ConfigError> {
        let p = self.path();
        if !p.exists() {
            return Ok(None);
        }
        ServeConfig::load(&p).map(Some)
    }

    /// The config text the state was last seeded from, if recorded.
    pub fn seed(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(SEED_FILE)).ok()
    }

    /// Replaces the saved state with `cfg`, atomically and durably.
    pub fn save(&self, cfg: &ServeConfig) -> Result<()> {
        let text = format!(
            "# strata serve's running configuration, written at every change.\n\
             # It is a config file (docs/CONFIG.md); edit it only while strata serve is stopped.\n{}",
            cfg.to_toml()
        );
        write_atomic(&self.dir, STATE_FILE, text.as_bytes())
            .with_context(|| format!("saving the state to {}", self.path().display()))
    }
}

trait IfEmpty {
    fn if_empty<'a>(&'a self, other: &'a str) -> &'a str;
}

impl IfEmpty for str {
    fn if_empty<'a>(&'a self, other: &'a str) -> &'a str {
        if self.is_empty() { other } else { self }
    }
}

/// Records `text` as the config the state directory `dir` was seeded from.
pub fn save_seed(dir: &Path, text: &str) -> Result<()> {
    write_atomic(dir, SEED_FILE, text.as_bytes())
}

/// write → fsync → rename → fsync(dir): after a crash the file under `name`
/// is the old content or the new, whole.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &dst).with_context(|| format!("renaming over {}", dst.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| anyhow!("fsync of {}: {e}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_with_the_holder_and_save_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let d = StateDir::open(t.path()).unwrap();
        let e = StateDir::open(t.path())
            .err()
            .expect("a second open must fail");
        let msg = format!("{e:#}");
        assert!(msg.contains("in use by another strata serve"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        assert!(d.load().unwrap().is_none());
        let cfg = ServeConfig::embedded_default();
        d.save(&cfg).unwrap();
        let mut back = d.load().unwrap().unwrap();
        back.source = cfg.source.clone();
        assert_eq!(back, cfg);
        drop(d);
        // The lock goes with the holder.
        StateDir::open(t.path()).unwrap();
    }

    #[test]
    fn a_broken_state_file_is_an_error_naming_it() {
        let t = tempfile::tempdir().unwrap();
        let d = StateDir::open(t.path()).unwrap();
        std::fs::write(d.path(), "[[subsystem]]\nnqn = 3\n").unwrap();
        let e = d.load().unwrap_err();
        assert!(e.file.ends_with("state.toml"), "{e}");
    }
}
