//! End to end: the Linux NVMe/TCP host (Debian 6.1 kernel, nvme-cli 2.3 in
//! the QEMU guest) on object-backed namespaces served by `strata serve`,
//! with real protocol servers on 127.0.0.1 behind them:
//!
//! | NSID | backend | server |
//! |---|---|---|
//! | 1 | S3 | s3s-fs embedded in this test process, SigV4 checked, 3 buckets |
//! | 2 | Azure Blob | Azurite 3 spawned by the test, 3 containers |
//! | 3 | GCS | object_store's GCS client against s3s-fs (see below), 3 buckets |
//! | 4 | local directory | `file:///…`, 3 bucket directories |
//!
//! GCS: what NSID 3 proves is the `gs://` code path (GCS builder from
//! `store_options`, the GCS client's XML-API PUT / ranged GET / DELETE /
//! LIST) working end to end under the kernel host, against s3s-fs with the
//! empty Bearer header dropped. It does not prove GCS authentication or any
//! behaviour where real GCS differs from S3; see
//! `support::objstores::GCS_NO_OAUTH` and docs/objbacker.md.
//!
//! The guest asks the host to act mid-script with busybox wget
//! (`http://10.0.2.2:PORT/<action>`); the host answers `ok` or the reason a
//! check failed, and the guest stops on anything but `ok`.

mod common;
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::guest::{self, GuestOptions, HOST_FROM_GUEST, run_guest_with};
use object_store::ObjectStore;
use support::objstores::{self, Azurite, S3s};
use support::{Server, free_port, trigger_server};

const NQN: &str = "nqn.2026-11.dev.strata:objbacker-e2e";
const BUCKETS: u64 = 3;
const MIB: u64 = 1 << 20;
/// Written per namespace: 64 MiB in 1 MiB objects.
const WRITTEN_OBJECTS: u64 = 64;

/// One namespace's backend as the test sees it: a direct client per bucket
/// and the key prefix inside the bucket.
struct Backend {
    label: &'static str,
    stores: Vec<Arc<dyn ObjectStore>>,
    prefix: &'static str,
}

impl Backend {
    /// Exactly objects 0..n, named `{prefix}/{i:08}`, 1 MiB each, object i
    /// in bucket i % 3; nothing else but the superblock copy.
    async fn check(&self, n: u64) -> Result<(), String> {
        for (k, store) in self.stores.iter().enumerate() {
            let got = objstores::data_objects(store.as_ref(), self.prefix).await;
            let want: Vec<(String, u64)> = (0..n)
                .filter(|i| i % BUCKETS == k as u64)
                .map(|i| (objstores::data_key(self.prefix, i), MIB))
                .collect();
            if got != want {
                return Err(format!(
                    "{} bucket {k}: {} data objects {:?}…, want {} {:?}…",
                    self.label,
                    got.len(),
                    &got[..got.len().min(4)],
                    want.len(),
                    &want[..want.len().min(4)]
                ));
            }
            let sb = objstores::list(store.as_ref(), None).await;
            if !sb
                .iter()
                .any(|(key, _)| key.ends_with(strata_objbacker::SUPERBLOCK_NAME))
            {
                return Err(format!("{} bucket {k}: no superblock copy", self.label));
            }
        }
        Ok(())
    }
}

fn check_log(srv: &Server, what: &str) {
    let log = srv.log_text();
    assert!(!log.contains("panicked"), "{what}: target panicked:\n{log}");
}

#[test]
fn linux_host_on_s3_azure_gcs_and_local_objbacker_namespaces() {
    guest::require_guest();
    let t0 = Instant::now();
    let rt = objstores::runtime();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    // S3 on s3s-fs (SigV4), 3 buckets.
    let s3_root = root.join("s3");
    for k in 0..BUCKETS {
        std::fs::create_dir_all(s3_root.join(format!("strata-{k}"))).unwrap();
    }
    let s3 = S3s::start(&s3_root, true);
    // GCS client on s3s-fs (Authorization dropped), 3 buckets.
    let gcs_root = root.join("gcs");
    for k in 0..BUCKETS {
        std::fs::create_dir_all(gcs_root.join(format!("gcs-{k}"))).unwrap();
    }
    let gcs = S3s::start(&gcs_root, false);
    // Azurite, 3 containers.
    let az_dir = root.join("azurite");
    std::fs::create_dir_all(&az_dir).unwrap();
    let az = Azurite::start(&az_dir);
    rt.block_on(async {
        for k in 0..BUCKETS {
            az.create_container(&format!("strata-{k}")).await;
        }
    });
    let local = root.join("local");

    let bucket_list = |urls: Vec<String>| {
        format!(
            "[{}]",
            urls.iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let ns = |nsid: u32, buckets: String, options: String| {
        format!(
            "[[subsystem.namespace]]\nnsid = {nsid}\ntype = \"objbacker\"\nsize = \"128MiB\"\nblock_size = 4096\nobject_size = \"1MiB\"\nauto_format = true\nbuckets = {buckets}\nstore_options = {options}\n"
        )
    };
    let (port, dport) = (free_port(), free_port());
    let config = format!(
        "[target]\nreactors = 1\n[[listener]]\nname = \"a\"\naddr = \"127.0.0.1:{port}\"\n[[subsystem]]\nnqn = \"{NQN}\"\n{}{}{}{}",
        ns(
            1,
            bucket_list(
                (0..BUCKETS)
                    .map(|k| format!("s3://strata-{k}/vol1"))
                    .collect()
            ),
            objstores::s3_options_toml(&s3.endpoint())
        ),
        ns(
            2,
            bucket_list(
                (0..BUCKETS)
                    .map(|k| format!("az://strata-{k}/vol1"))
                    .collect()
            ),
            az.options_toml()
        ),
        ns(
            3,
            bucket_list((0..BUCKETS).map(|k| format!("gs://gcs-{k}/vol1")).collect()),
            objstores::gcs_options_toml(&gcs.endpoint())
        ),
        ns(
            4,
            bucket_list(
                (0..BUCKETS)
                    .map(|k| format!("file://{}/bucket-{k}", local.display()))
                    .collect()
            ),
            "{}".into()
        ),
    );
    let cfg_path = root.join("strata.toml");
    std::fs::write(&cfg_path, &config).unwrap();

    let backends = Arc::new(vec![
        Backend {
            label: "S3 (s3s-fs)",
            stores: (0..BUCKETS)
                .map(|k| objstores::s3_store(&s3.endpoint(), &format!("strata-{k}")))
                .collect(),
            prefix: "vol1",
        },
        Backend {
            label: "Azure (Azurite)",
            stores: (0..BUCKETS)
                .map(|k| az.store(&format!("strata-{k}")))
                .collect(),
            prefix: "vol1",
        },
        Backend {
            label: "GCS client (XML API on s3s-fs)",
            stores: (0..BUCKETS)
                .map(|k| objstores::gcs_store(&gcs.endpoint(), &format!("gcs-{k}")))
                .collect(),
            prefix: "vol1",
        },
        Backend {
            label: "local directory",
            stores: (0..BUCKETS)
                .map(|k| objstores::local_store(&local.join(format!("bucket-{k}"))))
                .collect(),
            prefix: "",
        },
    ]);

    let srv = Arc::new(Mutex::new(Some(Server::start_on(
        Some(&cfg_path),
        root,
        port,
        dport,
    ))));
    eprintln!("servers up and strata serve attached in {:?}", t0.elapsed());

    let checks = Arc::new(Mutex::new(Vec::<String>::new()));
    let trig = {
        let (srv, checks, backends) = (srv.clone(), checks.clone(), backends.clone());
        let handle = rt.handle().clone();
        let (cfg_path, root) = (cfg_path.clone(), root.to_path_buf());
        trigger_server(move |action| {
            let parts: Vec<&str> = action.split('/').collect();
            let result = match parts.as_slice() {
                ["list", n] | ["trimmed", n] => {
                    let b = &backends[n.parse::<usize>().unwrap() - 1];
                    let want = if parts[0] == "list" {
                        WRITTEN_OBJECTS
                    } else {
                        0
                    };
                    handle
                        .block_on(b.check(want))
                        .map(|()| format!("{}: {want} data objects", b.label))
                }
                ["restart"] => {
                    let mut g = srv.lock().unwrap();
                    if let Some(mut old) = g.take() {
                        check_log(&old, "before restart");
                        old.kill9();
                    }
                    *g = Some(Server::start_on(Some(&cfg_path), &root, port, dport));
                    Ok("strata serve killed (SIGKILL) and restarted".into())
                }
                _ => Err(format!("unknown action {action}")),
            };
            match result {
                Ok(s) => {
                    checks.lock().unwrap().push(format!("ok {action}: {s}"));
                    "ok".to_string()
                }
                Err(e) => {
                    checks.lock().unwrap().push(format!("FAIL {action}: {e}"));
                    format!("FAIL {e}")
                }
            }
        })
    };

    let h = HOST_FROM_GUEST;
    let nlb = WRITTEN_OBJECTS * MIB / 4096;
    let script = format!(
        r#"set -e
wait_dev() {{ i=0; while [ ! -b "$1" ]; do i=$((i+1)); [ $i -gt 100 ] && {{ echo "no $1"; return 1; }}; sleep 0.1; done; }}
host() {{ r=$(wget -q -O - http://{h}:{trig}/$1); [ "$r" = ok ] || {{ echo "HOST CHECK FAILED: $r"; exit 1; }}; }}
nvme connect -t tcp -a {h} -s {port} -n {NQN} --reconnect-delay=1 --ctrl-loss-tmo=120
for n in 1 2 3 4; do wait_dev /dev/nvme0n$n; done
nvme list
dd if=/dev/urandom of=/tmp/r bs=1M count={WRITTEN_OBJECTS} 2>/dev/null
want=$(sha256sum < /tmp/r)
zeros=$(dd if=/dev/zero bs=1M count={WRITTEN_OBJECTS} 2>/dev/null | sha256sum)
for n in 1 2 3 4; do
  dev=/dev/nvme0n$n
  dd if=/tmp/r of=$dev bs=1M oflag=direct conv=fsync 2>/dev/null
  got=$(dd if=$dev bs=1M count={WRITTEN_OBJECTS} iflag=direct 2>/dev/null | sha256sum)
  [ "$got" = "$want" ]
  echo RESULT ns$n-readback-ok
  host list/$n
  nvme dsm $dev -n $n -d -s 0 -b {nlb}
  host trimmed/$n
  got=$(dd if=$dev bs=1M count={WRITTEN_OBJECTS} iflag=direct 2>/dev/null | sha256sum)
  [ "$got" = "$zeros" ]
  echo RESULT ns$n-trim-ok
done
# ext4 on the S3 and the local-directory namespaces, across a kill -9 of
# strata serve (after umount, whose FLUSH made everything durable).
dd if=/dev/urandom of=/tmp/f1 bs=1M count=5 2>/dev/null
dd if=/dev/urandom of=/tmp/f2 bs=4k count=37 2>/dev/null
for n in 1 4; do
  mkfs.ext4 -q -F /dev/nvme0n$n
  mkdir -p /mnt/$n && mount -t ext4 /dev/nvme0n$n /mnt/$n
  cp /tmp/f1 /mnt/$n/a; mkdir /mnt/$n/d; cp /tmp/f2 /mnt/$n/d/b
  for i in $(seq 1 40); do echo "file $i on $n" > /mnt/$n/d/s$i; done
  (cd /mnt/$n && sha256sum a d/b d/s*) > /tmp/sums$n
  umount /mnt/$n
done
echo RESULT fs-written
host restart
for n in 1 4; do
  mount -t ext4 /dev/nvme0n$n /mnt/$n
  (cd /mnt/$n && sha256sum -c /tmp/sums$n) > /tmp/check$n
  [ "$(grep -c ': OK$' /tmp/check$n)" = 42 ]
  umount /mnt/$n
  e2fsck -n -f /dev/nvme0n$n
done
grep -q live /sys/class/nvme/nvme0/state
echo RESULT fs-after-restart-ok
nvme disconnect -n {NQN}
"#
    );
    let t = Instant::now();
    let run = run_guest_with(
        &script,
        Duration::from_secs(900),
        &GuestOptions {
            append: "clocksource=hpet".into(),
            ..GuestOptions::default()
        },
    )
    .unwrap();
    let guest_t = t.elapsed();
    for c in checks.lock().unwrap().iter() {
        eprintln!("[host check] {c}");
    }
    // Take the server out of the trigger's shared slot so it is killed here
    // (the trigger's drop, at the end of the test, also drops its clone).
    if let Some(s) = srv.lock().unwrap().take() {
        check_log(&s, "after the guest run");
    }
    run.assert_success();
    let results: Vec<&str> = run.lines_with("RESULT ").collect();
    assert_eq!(
        results,
        [
            "ns1-readback-ok",
            "ns1-trim-ok",
            "ns2-readback-ok",
            "ns2-trim-ok",
            "ns3-readback-ok",
            "ns3-trim-ok",
            "ns4-readback-ok",
            "ns4-trim-ok",
            "fs-written",
            "fs-after-restart-ok"
        ]
    );
    let checks = checks.lock().unwrap();
    assert_eq!(checks.len(), 9, "{checks:?}");
    assert!(checks.iter().all(|c| c.starts_with("ok ")), "{checks:?}");
    eprintln!("guest run {guest_t:?}, whole test {:?}", t0.elapsed());
}
