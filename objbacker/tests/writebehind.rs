//! Whole-object writes of a sequential writer are acknowledged before
//! their PUT (write-behind); FLUSH and FUA wait for it; isolated
//! whole-object writes stay write-through.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use strata_objbacker::{FormatOptions, ObjBacker, format_with_stores};

const OBJ: u64 = 128 * KIB;
const WAIT: Duration = Duration::from_secs(20);

async fn setup() -> (Arc<ObjBacker>, Arc<InMemory>, Arc<Probe>) {
    let cfg = test_cfg(mem_urls(1), 16 * OBJ, OBJ);
    let mem = Arc::new(InMemory::new());
    format_with_stores(&cfg, vec![mem.clone()], FormatOptions::default())
        .await
        .unwrap();
    let probe_store = Arc::new(ProbeStore::new(mem.clone()));
    let probe = probe_store.probe.clone();
    let dev = ObjBacker::attach_with_stores(cfg, vec![probe_store as Arc<dyn ObjectStore>])
        .await
        .unwrap();
    (dev, mem, probe)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_whole_object_writes_do_not_wait_for_their_put_but_flush_does() {
    let (dev, mem, probe) = setup().await;
    // Object 3's PUT is held until released.
    *probe.delay_put.lock().unwrap() = Some(("dev/00000003".into(), 1, None));
    let mut h = Host::new(&dev);
    for i in 0..8u64 {
        h.write(i * OBJ, &pattern(i * OBJ, OBJ, 1), false)
            .await
            .unwrap();
    }
    // Every write completed although object 3's PUT cannot have.
    assert!(!probe.landed(), "held PUT landed before release");
    assert!(
        dev.dirty_bytes() >= OBJ,
        "object 3 is held in the write cache"
    );
    // Reads see the acknowledged data meanwhile.
    assert_same(
        &h.read(3 * OBJ, OBJ).await.unwrap(),
        &pattern(3 * OBJ, OBJ, 1),
        "read of a write-behind object",
    );
    let d = dev.clone();
    let flush = tokio::spawn(async move { d.flush().await });
    eventually("FLUSH is waiting", WAIT, || probe.puts_in_flight() == 1).await;
    assert!(!flush.is_finished(), "FLUSH finished before the held PUT");
    probe.release();
    flush.await.unwrap().unwrap();
    assert!(probe.landed(), "FLUSH returned after the held PUT landed");
    assert_eq!(dev.dirty_bytes(), 0);
    for i in 0..8u64 {
        assert_same(
            &get(mem.as_ref(), &format!("dev/{i:08}")).await.unwrap(),
            &pattern(i * OBJ, OBJ, 1),
            "durable after FLUSH",
        );
    }
    assert_eq!(dev.stats().puts, 8, "one PUT per object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_and_isolated_whole_object_writes_wait_for_their_put() {
    let (dev, mem, probe) = setup().await;
    let mut h = Host::new(&dev);
    // A sequential writer, then a FUA write continuing it: still exact.
    h.write(0, &pattern(0, OBJ, 2), false).await.unwrap();
    *probe.delay_put.lock().unwrap() = Some(("dev/00000001".into(), 1, None));
    let d = dev.clone();
    let fua = tokio::spawn(async move { d.write_at(OBJ, pattern(OBJ, OBJ, 2).into(), true).await });
    eventually("the FUA PUT is in flight", WAIT, || {
        probe.puts_in_flight() == 1
    })
    .await;
    assert!(!fua.is_finished(), "FUA write completed before its PUT");
    probe.release();
    fua.await.unwrap().unwrap();
    assert_same(
        &get(mem.as_ref(), "dev/00000001").await.unwrap(),
        &pattern(OBJ, OBJ, 2),
        "FUA data durable at completion",
    );
    // An isolated whole-object write (no predecessor) is write-through.
    *probe.delay_put.lock().unwrap() = Some(("dev/00000009".into(), 1, None));
    let d = dev.clone();
    let lone = tokio::spawn(async move {
        d.write_at(9 * OBJ, pattern(9 * OBJ, OBJ, 3).into(), false)
            .await
    });
    eventually("the PUT is in flight", WAIT, || probe.puts_in_flight() == 1).await;
    assert!(
        !lone.is_finished(),
        "isolated write completed before its PUT"
    );
    probe.release();
    lone.await.unwrap().unwrap();
    assert_same(
        &get(mem.as_ref(), "dev/00000009").await.unwrap(),
        &pattern(9 * OBJ, OBJ, 3),
        "isolated write durable at completion",
    );
}
