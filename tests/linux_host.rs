//! Interoperability with the real Linux NVMe/TCP host: Debian 12's 6.1
//! kernel and nvme-cli 2.3 in a QEMU guest, reaching `strata serve` on the
//! host's 127.0.0.1 as 10.0.2.2. Nothing here is mocked.
//!
//! A guest that needs the host to act mid-script (flip an ANA state, restart
//! the target) fetches `http://10.0.2.2:PORT/<action>` with busybox wget; the
//! test performs the action and only then answers.

mod common;
mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::guest::{self, HOST_FROM_GUEST, run_guest};
use support::{Server, free_port, trigger_server, wait_until};

const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

fn config(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("strata.toml");
    std::fs::write(&p, body).unwrap();
    p
}

const NQN: &str = "nqn.2026-11.dev.strata:interop";

/// Waits in the guest until a block device shows up (no udev there).
const WAIT_DEV: &str = r#"
wait_dev() { i=0; while [ ! -b "$1" ]; do i=$((i+1)); [ $i -gt 100 ] && { echo "no $1"; return 1; }; sleep 0.1; done; }
"#;

#[test]
fn discover_connect_io_filesystem_digests_disconnect() {
    guest::require_guest();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "[[listener]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n[[subsystem]]\nnqn = \"{NQN}\"\n[[subsystem.namespace]]\nnsid = 1\ntype = \"ram\"\nsize = \"256MiB\"\n"
        ),
    );
    let srv = Server::start(Some(&cfg), dir.path());
    let (p, d) = (srv.port, srv.discovery_port);
    let h = HOST_FROM_GUEST;
    let script = format!(
        r#"set -e
{WAIT_DEV}
nvme discover -t tcp -a {h} -s {d} | tee /tmp/disc
grep -q "subnqn:.*{NQN}" /tmp/disc
grep -q "trsvcid: {p}" /tmp/disc
nvme discover -t tcp -a {h} -s {p} | grep -q "{NQN}"
nvme connect -t tcp -a {h} -s {p} -n {NQN}
wait_dev /dev/nvme0n1
nvme list | tee /tmp/list
grep -q Strata /tmp/list
nvme id-ctrl /dev/nvme0 | grep -E "^(subnqn|mdts|cntlid|sgls|ioccsz|kas) " 
nvme id-ns /dev/nvme0n1 | grep -E "^(nsze|nmic|anagrpid) "
# 4 KiB and 1 MiB random data, O_DIRECT both ways.
dd if=/dev/urandom of=/tmp/r4k bs=4k count=512 2>/dev/null
dd if=/tmp/r4k of=/dev/nvme0n1 bs=4k oflag=direct seek=100 2>/dev/null
dd if=/dev/nvme0n1 of=/tmp/b4k bs=4k count=512 iflag=direct skip=100 2>/dev/null
[ "$(sha256sum < /tmp/r4k)" = "$(sha256sum < /tmp/b4k)" ]
dd if=/dev/urandom of=/tmp/r1m bs=1M count=24 2>/dev/null
dd if=/tmp/r1m of=/dev/nvme0n1 bs=1M oflag=direct seek=64 2>/dev/null
dd if=/dev/nvme0n1 of=/tmp/b1m bs=1M count=24 iflag=direct skip=64 2>/dev/null
[ "$(sha256sum < /tmp/r1m)" = "$(sha256sum < /tmp/b1m)" ]
echo RESULT dd-ok
# ext4: write, unmount, remount, compare.
mkfs.ext4 -q -F /dev/nvme0n1
mkdir -p /mnt/s && mount -t ext4 /dev/nvme0n1 /mnt/s
cp /tmp/r1m /mnt/s/a; cp /tmp/r4k /mnt/s/b; mkdir /mnt/s/d; cp /tmp/r4k /mnt/s/d/c
(cd /mnt/s && sha256sum a b d/c) > /tmp/sums
umount /mnt/s
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/nvme0n1 /mnt/s
(cd /mnt/s && sha256sum -c /tmp/sums)
umount /mnt/s
echo RESULT fs-ok
nvme disconnect -n {NQN} | tee /tmp/dis
grep -q "disconnected 1" /tmp/dis
# Header and data digests.
nvme connect -t tcp -a {h} -s {p} -n {NQN} -g -G
wait_dev /dev/nvme0n1
dd if=/tmp/r1m of=/dev/nvme0n1 bs=1M oflag=direct seek=128 2>/dev/null
dd if=/dev/nvme0n1 of=/tmp/g1m bs=1M count=24 iflag=direct skip=128 2>/dev/null
[ "$(sha256sum < /tmp/r1m)" = "$(sha256sum < /tmp/g1m)" ]
dd if=/tmp/r4k of=/dev/nvme0n1 bs=4k oflag=direct seek=7 2>/dev/null
dd if=/dev/nvme0n1 of=/tmp/g4k bs=4k count=512 iflag=direct skip=7 2>/dev/null
[ "$(sha256sum < /tmp/r4k)" = "$(sha256sum < /tmp/g4k)" ]
echo RESULT digests-ok
nvme disconnect -n {NQN}
"#
    );
    let run = run_guest(&script, GUEST_TIMEOUT).unwrap();
    srv.report_refusals("basic");
    run.assert_success();
    let results: Vec<&str> = run.lines_with("RESULT ").collect();
    assert_eq!(results, ["dd-ok", "fs-ok", "digests-ok"]);
    // Both associations released their controllers on disconnect.
    let released = || srv.log_text().matches("controller released").count();
    assert!(
        wait_until(Duration::from_secs(10), || released() >= 2),
        "disconnect must release the controller; log:\n{}",
        srv.log_text()
    );
}

#[test]
fn multipath_two_listeners_and_ana_failover() {
    guest::require_guest();
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let body = |ana_a: &str| {
        format!(
            "[[listener]]\nname = \"a\"\naddr = \"127.0.0.1:{pa}\"\nana = {{ \"1\" = \"{ana_a}\" }}\n\
             [[listener]]\nname = \"b\"\naddr = \"127.0.0.1:{pb}\"\n\
             [[subsystem]]\nnqn = \"{NQN}\"\n[[subsystem.namespace]]\nnsid = 1\ntype = \"ram\"\nsize = \"128MiB\"\n"
        )
    };
    let cfg = config(dir.path(), &body("optimized"));
    let srv = Arc::new(Mutex::new(Server::start_on(
        Some(&cfg),
        dir.path(),
        pa,
        free_port(),
    )));
    let s2 = srv.clone();
    let cfg2 = cfg.clone();
    let next = body("inaccessible");
    let trig = trigger_server(move |action| {
        if action == "flip" {
            let srv = s2.lock().unwrap();
            let applied = || srv.log_text().matches("configuration applied").count();
            let before = applied();
            std::fs::write(&cfg2, &next).unwrap();
            srv.signal(libc::SIGHUP);
            // Answer the guest only once the new ANA state is in force.
            if !wait_until(Duration::from_secs(30), || applied() > before) {
                return format!("FAIL: reload not applied; log:\n{}", srv.log_text());
            }
        }
        "ok".into()
    });
    let h = HOST_FROM_GUEST;
    let script = format!(
        r#"set -e
{WAIT_DEV}
cat /sys/module/nvme_core/parameters/multipath
nvme connect -t tcp -a {h} -s {pa} -n {NQN}
nvme connect -t tcp -a {h} -s {pb} -n {NQN}
wait_dev /dev/nvme0n1
nvme list-subsys | tee /tmp/ls
[ "$(grep -c 'tcp traddr' /tmp/ls)" = 2 ]
echo RESULT two-paths
for f in /sys/block/nvme0c*n1/ana_state; do echo "$f $(cat $f)"; done
dd if=/dev/urandom of=/tmp/r bs=1M count=8 2>/dev/null
dd if=/tmp/r of=/dev/nvme0n1 bs=1M oflag=direct 2>/dev/null
# The host turns listener a inaccessible (SIGHUP) and answers when done.
r=$(wget -q -O - http://{h}:{trig}/flip); echo "flip: $r"; [ "$r" = ok ]
# I/O keeps working through b while a is inaccessible.
for i in 1 2 3 4 5 6; do
  dd if=/tmp/r of=/dev/nvme0n1 bs=1M oflag=direct seek=$((i*8)) 2>/dev/null
  dd if=/dev/nvme0n1 of=/tmp/b bs=1M count=8 iflag=direct skip=$((i*8)) 2>/dev/null
  [ "$(sha256sum < /tmp/r)" = "$(sha256sum < /tmp/b)" ]
done
dd if=/dev/nvme0n1 of=/tmp/b bs=1M count=8 iflag=direct 2>/dev/null
[ "$(sha256sum < /tmp/r)" = "$(sha256sum < /tmp/b)" ]
states=$(cat /sys/block/nvme0c*n1/ana_state | sort | tr '\n' ' ')
echo "ana states: $states"
[ "$states" = "inaccessible optimized " ]
echo RESULT failover-io-ok
nvme disconnect -n {NQN}
"#
    );
    let run = run_guest(&script, GUEST_TIMEOUT).unwrap();
    srv.lock().unwrap().report_refusals("multipath");
    run.assert_success();
    let results: Vec<&str> = run.lines_with("RESULT ").collect();
    assert_eq!(results, ["two-paths", "failover-io-ok"]);
}

#[test]
fn target_restart_while_connected_host_reconnects_data_intact() {
    guest::require_guest();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let img = dir.path().join("ns.img");
    let (p, d) = (free_port(), free_port());
    let cfg = config(
        dir.path(),
        &format!(
            "[[listener]]\nname = \"a\"\naddr = \"127.0.0.1:{p}\"\n[[subsystem]]\nnqn = \"{NQN}\"\n[[subsystem.namespace]]\nnsid = 1\ntype = \"file\"\npath = \"{}\"\nsize = \"128MiB\"\n",
            img.display()
        ),
    );
    let srv = Arc::new(Mutex::new(Some(Server::start_on(
        Some(&cfg),
        dir.path(),
        p,
        d,
    ))));
    let s2 = srv.clone();
    let cfg2 = cfg.clone();
    let path = dir.path().to_path_buf();
    let trig = trigger_server(move |action| {
        if action == "restart" {
            let mut g = s2.lock().unwrap();
            if let Some(mut old) = g.take() {
                old.kill9();
                old.report_refusals("restart-1");
            }
            *g = Some(Server::start_on(Some(&cfg2), &path, p, d));
        }
        "ok".into()
    });
    let h = HOST_FROM_GUEST;
    let script = format!(
        r#"set -e
{WAIT_DEV}
nvme connect -t tcp -a {h} -s {p} -n {NQN} --reconnect-delay=1 --ctrl-loss-tmo=120
wait_dev /dev/nvme0n1
dd if=/dev/urandom of=/tmp/r bs=1M count=16 2>/dev/null
dd if=/tmp/r of=/dev/nvme0n1 bs=1M oflag=direct conv=fsync 2>/dev/null
echo RESULT written
wget -q -O - http://{h}:{trig}/restart
# I/O issued now waits for the reconnect.
dd if=/dev/nvme0n1 of=/tmp/b bs=1M count=16 iflag=direct 2>/dev/null
[ "$(sha256sum < /tmp/r)" = "$(sha256sum < /tmp/b)" ]
dd if=/tmp/r of=/dev/nvme0n1 bs=1M oflag=direct seek=32 2>/dev/null
dd if=/dev/nvme0n1 of=/tmp/b bs=1M count=16 iflag=direct skip=32 2>/dev/null
[ "$(sha256sum < /tmp/r)" = "$(sha256sum < /tmp/b)" ]
grep -q live /sys/class/nvme/nvme0/state
echo RESULT reconnected-data-intact
nvme disconnect -n {NQN}
"#
    );
    let run = run_guest(&script, GUEST_TIMEOUT).unwrap();
    if let Some(s) = srv.lock().unwrap().as_ref() {
        s.report_refusals("restart-2");
    }
    run.assert_success();
    let results: Vec<&str> = run.lines_with("RESULT ").collect();
    assert_eq!(results, ["written", "reconnected-data-intact"]);
}
