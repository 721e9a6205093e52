//! The management API's lifecycle as the real Linux NVMe/TCP host sees it
//! (issue #9): `strata ctl` against a running `strata serve`, and Debian
//! 12's 6.1 kernel with nvme-cli 2.3 in a QEMU guest (see
//! `tests/linux_host.rs` for the guest set-up).
//!
//! Through `strata ctl`: a listener, a subsystem allowing only the guest's
//! host NQN, a RAM and a file namespace. The guest connects once and, while
//! it stays connected, sees a namespace added and one removed (Namespace
//! Attribute Changed AEN, Changed Namespace List, rescan); `ctl ctrl
//! disconnect` drops its controller and the kernel reconnects by itself.
//! Then `strata serve` is killed and started again with the unchanged config
//! file: the state directory brings everything back, and the guest finds
//! the same namespaces and the data it wrote to the file namespace.
//!
//! The guest asks the test to run each `strata ctl` step with
//! `wget http://10.0.2.2:PORT/<action>`; the answer is `ok...` once the step
//! is done and checked, or `FAIL: ...`.

mod common;
mod support;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::guest::{self, GuestOptions, HOST_FROM_GUEST, run_guest_with};
use support::ctl::{json, ok, refused};
use support::{Server, free_port, trigger_server, wait_until};

const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
const NQN: &str = "nqn.2026-12.dev.strata:mgmt-linux";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:7e57a5e0-0009-4000-8000-00000000f00d";

fn nsids(dir: &Path) -> Vec<u64> {
    json(dir, &["ns", "ls", NQN])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["nsid"].as_u64().unwrap())
        .collect()
}

/// The controllers of [`NQN`] as (cntlid, host NQN).
fn ctrls(dir: &Path) -> Vec<(u64, String)> {
    json(dir, &["ctrl", "ls", NQN])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["cntlid"].as_u64().unwrap(),
                c["host_nqn"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Guest shell helpers (no udev in the guest): the NSIDs of the block
/// devices the kernel shows, the device of an NSID, and bounded waits.
const GUEST_LIB: &str = r#"
nsids() { for d in /sys/block/nvme*; do b=${d##*/}; case $b in nvme*c*n*) continue;; esac; [ -r $d/nsid ] && cat $d/nsid; done | sort -n | tr '\n' ' '; }
dev_of() { for d in /sys/block/nvme*; do b=${d##*/}; case $b in nvme*c*n*) continue;; esac; [ "$(cat $d/nsid 2>/dev/null)" = "$1" ] && { echo /dev/$b; return 0; }; done; echo "no device for nsid $1" >&2; return 1; }
# wait_nsids "WANT" TENTHS: until the kernel shows exactly these namespaces.
wait_nsids() { i=0; while [ "$(nsids)" != "$1" ]; do i=$((i+1)); [ $i -gt $2 ] && { echo "namespaces [$(nsids)], want [$1]"; return 1; }; sleep 0.1; done; echo "namespaces [$1] after $((i*100)) ms"; }
wait_dev() { i=0; while [ ! -b "$1" ]; do i=$((i+1)); [ $i -gt 100 ] && { echo "no $1"; return 1; }; sleep 0.1; done; }
same() { [ "$(sha256sum < $1)" = "$(sha256sum < $2)" ] || { echo "$1 and $2 differ"; return 1; }; }
"#;

#[test]
fn ctl_lifecycle_seen_by_the_linux_host_and_kept_across_a_restart() {
    guest::require_guest();
    let start = Instant::now();
    // On disk, not tmpfs: the file namespace is opened with O_DIRECT.
    let t = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let dir = t.path().to_path_buf();
    let cfg = dir.join("strata.toml");
    // One listener (its address is --listen's); everything else comes
    // through `strata ctl`, and after the restart from the state directory.
    std::fs::write(&cfg, "[[listener]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n").unwrap();
    let cfg_before = std::fs::read(&cfg).unwrap();
    let (p, d, p2) = (free_port(), free_port(), free_port());
    let srv = Arc::new(Mutex::new(Some(Server::start_on(Some(&cfg), &dir, p, d))));

    // A second listener, through ctl, is the one the guest uses.
    let l2 = format!("127.0.0.1:{p2}");
    ok(&dir, &["listener", "add", "l2", &l2]);
    ok(
        &dir,
        &["subsystem", "add", NQN, "--host", HOST, "--listener", "l2"],
    );
    ok(&dir, &["ns", "add", NQN, "--nsid", "1", "--ram", "8MiB"]);
    let img = dir.join("ns2.img");
    ok(
        &dir,
        &[
            "ns",
            "add",
            NQN,
            "--nsid",
            "2",
            "--file",
            img.to_str().unwrap(),
            "--size",
            "16MiB",
        ],
    );
    assert_eq!(nsids(&dir), [1, 2]);

    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let (s2, dir2, cfg2, f2) = (srv.clone(), dir.clone(), cfg.clone(), failures.clone());
    let trig = trigger_server(move |action| {
        let dir = dir2.as_path();
        let r = catch_unwind(AssertUnwindSafe(|| -> String {
            match action {
                "add" => {
                    ok(dir, &["ns", "add", NQN, "--nsid", "3", "--ram", "4MiB"]);
                    assert_eq!(nsids(dir), [1, 2, 3]);
                    "ok".into()
                }
                "rm" => {
                    // The guest is connected: refused without --force,
                    // and nothing changes.
                    let e = refused(dir, &["ns", "rm", NQN, "1"], 7);
                    assert!(e.contains("--force"), "{e}");
                    assert_eq!(nsids(dir), [1, 2, 3]);
                    ok(dir, &["ns", "rm", NQN, "1", "--force"]);
                    assert_eq!(nsids(dir), [2, 3]);
                    "ok".into()
                }
                "disconnect" => {
                    let c = ctrls(dir);
                    assert_eq!(c.len(), 1, "one controller, the guest's: {c:?}");
                    assert_eq!(c[0].1, HOST);
                    let cntlid = c[0].0.to_string();
                    ok(dir, &["ctrl", "disconnect", NQN, &cntlid]);
                    format!("ok {cntlid}")
                }
                "ctrls" => {
                    let c = ctrls(dir);
                    assert!(c.iter().all(|(_, h)| h == HOST), "{c:?}");
                    format!("ok {}", c.len())
                }
                "restart" => {
                    let subs_before = json(dir, &["subsystem", "ls"]);
                    let saved_before = ok(dir, &["save-config"]);
                    let mut g = s2.lock().unwrap();
                    if let Some(mut old) = g.take() {
                        old.kill9();
                        old.report_refusals("before restart");
                    }
                    *g = Some(Server::start_on(Some(&cfg2), dir, p, d));
                    assert_eq!(nsids(dir), [2, 3], "namespaces after the restart");
                    assert_eq!(json(dir, &["subsystem", "ls"]), subs_before);
                    assert_eq!(ok(dir, &["save-config"]), saved_before);
                    let ls = json(dir, &["listener", "ls"]);
                    let l = ls
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|l| l["name"] == "l2")
                        .unwrap_or_else(|| panic!("listener l2 after the restart: {ls}"));
                    assert_eq!(l["bound_addr"], l2.as_str());
                    assert_eq!(l["subsystems"][0], NQN, "{ls}");
                    assert!(ctrls(dir).is_empty());
                    "ok".into()
                }
                other => panic!("unknown action {other:?}"),
            }
        }));
        match r {
            Ok(s) => s,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let msg = format!("FAIL: {action}: {msg}");
                f2.lock().unwrap().push(msg.clone());
                msg
            }
        }
    });

    let h = HOST_FROM_GUEST;
    let script = format!(
        r#"set -e
{GUEST_LIB}
trig() {{ r=$(wget -q -O - http://{h}:{trig}/$1) || {{ echo "trigger $1: no answer"; return 1; }}; echo "trigger $1: $r"; case "$r" in ok*) return 0;; esac; return 1; }}
nvme connect -t tcp -a {h} -s {p2} -n {NQN} --hostnqn={HOST} --reconnect-delay=1 --ctrl-loss-tmo=30
C=
for c in /sys/class/nvme/nvme*; do [ "$(cat $c/subsysnqn)" = "{NQN}" ] && C=$c; done
[ -n "$C" ]; grep -qx live $C/state
wait_nsids "1 2 " 100
nvme list | tee /tmp/list
[ "$(grep -c Strata /tmp/list)" = 2 ]
R=$(dev_of 1); F=$(dev_of 2); wait_dev $R; wait_dev $F
dd if=/dev/urandom of=/tmp/pat bs=64k count=32 2>/dev/null
dd if=/tmp/pat of=$F bs=64k seek=3 oflag=direct conv=fsync 2>/dev/null
dd if=$F of=/tmp/b bs=64k skip=3 count=32 iflag=direct 2>/dev/null
same /tmp/pat /tmp/b
dd if=/tmp/pat of=$R bs=64k oflag=direct 2>/dev/null
dd if=$R of=/tmp/b bs=64k count=32 iflag=direct 2>/dev/null
same /tmp/pat /tmp/b
echo RESULT io-ok
# A namespace added while connected: AEN, Changed NS List, rescan.
trig add
wait_nsids "1 2 3 " 200
N=$(dev_of 3); wait_dev $N
dd if=/tmp/pat of=$N bs=64k oflag=direct 2>/dev/null
dd if=$N of=/tmp/b bs=64k count=32 iflag=direct 2>/dev/null
same /tmp/pat /tmp/b
echo RESULT added-live
# A namespace removed (--force) while connected.
trig rm
wait_nsids "2 3 " 200
F=$(dev_of 2)
dd if=$F of=/tmp/b bs=64k skip=3 count=32 iflag=direct 2>/dev/null
same /tmp/pat /tmp/b
# Both changes reached the same association (no reconnect): two rescans.
grep -qx live $C/state
[ "$(dmesg | grep -c 'nvme0: rescanning namespaces')" = 2 ]
[ "$(dmesg | grep -c 'nvme0: Reconnecting')" = 0 ]
echo RESULT removed-live
# The target drops the controller; the kernel reconnects by itself.
trig disconnect
i=0; while grep -qx live $C/state; do i=$((i+1)); [ $i -gt 100 ] && {{ echo "controller never left live"; exit 1; }}; sleep 0.1; done
echo "state after disconnect: $(cat $C/state)"
i=0; until grep -qx live $C/state; do i=$((i+1)); [ $i -gt 300 ] && {{ echo "no reconnect: $(cat $C/state)"; exit 1; }}; sleep 0.1; done
echo "live again after $((i*100)) ms"
wait_nsids "2 3 " 100
F=$(dev_of 2)
dd if=$F of=/tmp/b bs=64k skip=3 count=32 iflag=direct 2>/dev/null
same /tmp/pat /tmp/b
[ "$(wget -q -O - http://{h}:{trig}/ctrls)" = "ok 1" ]
echo RESULT reconnected
nvme disconnect -n {NQN} | tee /tmp/dis
grep -q "disconnected 1" /tmp/dis
wait_nsids "" 100
# The target is killed and started again; its state directory brings
# everything back.
trig restart
nvme connect -t tcp -a {h} -s {p2} -n {NQN} --hostnqn={HOST}
wait_nsids "2 3 " 100
nvme list | tee /tmp/list
[ "$(grep -c Strata /tmp/list)" = 2 ]
F=$(dev_of 2); wait_dev $F
dd if=$F of=/tmp/b bs=64k skip=3 count=32 iflag=direct 2>/dev/null
same /tmp/pat /tmp/b
echo RESULT restart-ok
nvme disconnect -n {NQN}
dmesg | grep -i nvme | tail -n 30
"#
    );
    let opts = GuestOptions {
        hostnqn: Some(HOST.into()),
        ..Default::default()
    };
    let run = run_guest_with(&script, GUEST_TIMEOUT, &opts).unwrap();
    // `trig` stays alive to the end: the restarted `strata serve` was
    // spawned by its thread, and guard_command's PR_SET_PDEATHSIG kills it
    // when that thread ends.
    if let Some(s) = srv.lock().unwrap().as_ref() {
        s.report_refusals("after restart");
    }
    // For the record: what the guest saw and how long each step took.
    for l in run.console.lines().filter(|l| {
        [
            "trigger ",
            "namespaces [",
            "state after",
            "live again",
            "RESULT ",
        ]
        .iter()
        .any(|p| l.starts_with(p))
            || l.contains("nvme nvme")
    }) {
        eprintln!("[guest] {l}");
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "host-side steps failed: {failures:#?}\n----- guest console -----\n{}",
        run.console
    );
    run.assert_success();
    let results: Vec<&str> = run.lines_with("RESULT ").collect();
    assert_eq!(
        results,
        [
            "io-ok",
            "added-live",
            "removed-live",
            "reconnected",
            "restart-ok"
        ]
    );
    // The restart used the config file as it was: the state came from the
    // state directory.
    assert_eq!(std::fs::read(&cfg).unwrap(), cfg_before);
    assert_eq!(
        json(&dir, &["subsystem", "ls"]).as_array().unwrap().len(),
        1
    );
    // The guest's disconnect released its controller.
    let srv = srv.lock().unwrap();
    let srv = srv.as_ref().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || ctrls(&dir).is_empty()),
        "controllers left after the guest disconnected; log:\n{}",
        srv.log_text()
    );
    eprintln!(
        "mgmt_linux: whole run {:.1} s",
        start.elapsed().as_secs_f64()
    );
}
