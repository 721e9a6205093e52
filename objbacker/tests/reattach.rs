//! A device attached to buckets an earlier device of the same process has
//! just let go of. The earlier one's write-behind PUTs run on after it is
//! dropped; the new one must not LIST (or DELETE) before they land.

mod common;

use std::time::Duration;

use common::*;
use strata_objbacker::{FaultConfig, FormatOptions, Latency, ObjBacker, ObjError};

const OBJ: u64 = MIB;

/// A device of 4 objects on two fresh `file://` buckets under `root`.
async fn formatted(root: &std::path::Path) -> strata_objbacker::ObjBackerConfig {
    let urls = (0..2)
        .map(|k| format!("file://{}/bucket-{k}", root.display()))
        .collect();
    let cfg = test_cfg(urls, 4 * OBJ, OBJ);
    for u in &cfg.buckets {
        std::fs::create_dir_all(u.strip_prefix("file://").unwrap()).unwrap();
    }
    strata_objbacker::format(&cfg, FormatOptions::default())
        .await
        .unwrap();
    cfg
}

/// Before the attach waited, the second device's LIST ran while the first
/// device's slow PUT of object 1 was still on its way: the stored-object
/// bitmap said "not stored", the TRIM skipped its DELETE, and the read
/// returned the old data once the PUT landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_after_reattach_deletes_what_the_dropped_device_was_still_putting() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = formatted(root.path()).await;

    let mut slow = cfg.clone();
    slow.fault = Some(FaultConfig {
        latency: Latency::Fixed(Duration::from_millis(400)),
        ..Default::default()
    });
    let first = ObjBacker::attach(slow).await.unwrap();
    let data = pattern(OBJ, OBJ, 3);
    // Whole objects 0 and 1, sequential: write-behind, so the command
    // completes before the PUT of object 1 lands.
    let mut h = Host::new(&first);
    h.write(0, &pattern(0, OBJ, 3), false).await.unwrap();
    h.write(OBJ, &data, false).await.unwrap();
    drop(h);
    drop(first);

    cfg.fault = None;
    let second = ObjBacker::attach(cfg.clone()).await.unwrap();
    let mut h = Host::new(&second);
    h.trim(OBJ, OBJ).await.unwrap();
    h.flush().await.unwrap();
    // Long after every PUT of the first device could have landed.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        h.read(OBJ, OBJ).await.unwrap(),
        vec![0; OBJ as usize],
        "a trimmed object must read as zeros (stats {:?})",
        second.stats()
    );
    assert_same(
        &h.read(0, OBJ).await.unwrap(),
        &pattern(0, OBJ, 3),
        "the untrimmed object",
    );
}

/// An earlier device that never lets go (here: alive in the test) makes
/// the attach fail after its bound, naming the bucket, instead of racing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_is_refused_while_an_earlier_device_holds_the_buckets() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = formatted(root.path()).await;
    let _first = ObjBacker::attach(cfg.clone()).await.unwrap();
    cfg.request_timeout = Duration::from_millis(100);
    cfg.retry_budget = Duration::from_millis(100);
    cfg.orphan_deadline = Duration::from_millis(100);
    let e = ObjBacker::attach(cfg.clone()).await.err().unwrap();
    assert!(matches!(e, ObjError::StillInUse { .. }), "{e}");
    assert!(e.to_string().contains("bucket-0"), "{e}");
    // A different directory is not held.
    let other = tempfile::tempdir().unwrap();
    let mut cfg2 = formatted(other.path()).await;
    cfg2.name = "other".into();
    ObjBacker::attach(cfg2).await.unwrap();
}
