//! `strata ctl` against a test's `strata serve` (whose management socket is
//! `DIR/run/mgmt.sock`, see [`super::Server`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use super::output_within;

pub fn socket(dir: &Path) -> PathBuf {
    dir.join("run").join("mgmt.sock")
}

pub fn ctl_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.arg("ctl").arg("--socket").arg(socket(dir)).args(args);
    c
}

pub fn ctl(dir: &Path, args: &[&str]) -> Output {
    output_within(&mut ctl_cmd(dir, args), Duration::from_secs(60))
}

/// Runs `strata ctl ARGS`, which must succeed; its stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let o = ctl(dir, args);
    assert!(
        o.status.success(),
        "strata ctl {args:?} failed ({:?}): {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

pub fn json(dir: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(dir, &a)).unwrap()
}

/// Runs `strata ctl ARGS`, which must fail with exit `code`; its stderr.
pub fn refused(dir: &Path, args: &[&str], code: i32) -> String {
    let o = ctl(dir, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(code),
        "strata ctl {args:?}: expected exit {code}; stdout {} stderr {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    err
}
