//! "An older PUT never overtakes a newer one" must hold at the store: a PUT
//! the device stopped waiting for may still land. The probe store delays
//! one specific PUT past the device's request timeout and lets it land
//! afterwards, whatever the client did with its request.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use common::*;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use strata_objbacker::{FormatOptions, ObjBacker, ObjBackerConfig, format_with_stores};
use strata_target::bdev::IoError;

const OBJ: u64 = 128 * KIB;

async fn setup(cfg: &ObjBackerConfig) -> (Arc<ObjBacker>, Arc<InMemory>, Arc<Probe>) {
    let mem = Arc::new(InMemory::new());
    format_with_stores(cfg, vec![mem.clone()], FormatOptions::default())
        .await
        .unwrap();
    let probe_store = Arc::new(ProbeStore::new(mem.clone()));
    let probe = probe_store.probe.clone();
    let dev = ObjBacker::attach_with_stores(cfg.clone(), vec![probe_store as Arc<dyn ObjectStore>])
        .await
        .unwrap();
    (dev, mem, probe)
}

fn cfg() -> ObjBackerConfig {
    let mut cfg = test_cfg(mem_urls(1), 4 * OBJ, OBJ);
    cfg.request_timeout = Duration::from_millis(200);
    cfg.retry_budget = Duration::from_secs(5);
    cfg
}

/// A direct (whole-object) PUT that the store answers only after the
/// request timeout, then a newer whole-object write and FLUSH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_direct_put_never_overtakes_a_newer_write() {
    let cfg = cfg();
    let (dev, mem, probe) = setup(&cfg).await;
    *probe.delay_put.lock().unwrap() =
        Some(("dev/00000000".into(), 1, Some(Duration::from_secs(1))));
    let mut h = Host::new(&dev);
    h.write(0, &pattern(0, OBJ, 1), false).await.unwrap();
    h.write(0, &pattern(0, OBJ, 2), false).await.unwrap();
    h.flush().await.unwrap();
    eventually("the delayed PUT lands", Duration::from_secs(10), || {
        probe.landed()
    })
    .await;
    eventually("no PUT in flight", Duration::from_secs(10), || {
        probe.puts_in_flight() == 0
    })
    .await;
    assert_same(
        &get(mem.as_ref(), "dev/00000000").await.unwrap(),
        &pattern(0, OBJ, 2),
        "the store holds the newer write",
    );
}

/// The same with a write-back PUT (an object completed by small writes),
/// then newer small writes to it and FLUSH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_write_back_put_never_overtakes_a_newer_write() {
    let cfg = cfg();
    let (dev, mem, probe) = setup(&cfg).await;
    *probe.delay_put.lock().unwrap() =
        Some(("dev/00000001".into(), 1, Some(Duration::from_secs(1))));
    let mut h = Host::new(&dev);
    for off in (OBJ..2 * OBJ).step_by(32768) {
        h.write(off, &pattern(off, 32768, 1), false).await.unwrap();
    }
    // The completed object's write-back PUT is the delayed one.
    eventually(
        "the write-back PUT is sent",
        Duration::from_secs(10),
        || probe.puts_in_flight() == 1,
    )
    .await;
    for off in (OBJ..2 * OBJ).step_by(32768) {
        h.write(off, &pattern(off, 32768, 2), false).await.unwrap();
    }
    h.flush().await.unwrap();
    eventually("the delayed PUT lands", Duration::from_secs(10), || {
        probe.landed()
    })
    .await;
    eventually("no PUT in flight", Duration::from_secs(10), || {
        probe.puts_in_flight() == 0
    })
    .await;
    assert_same(
        &get(mem.as_ref(), "dev/00000001").await.unwrap(),
        &pattern(OBJ, OBJ, 2),
        "the store holds the newer write",
    );
}

/// A late PUT racing a TRIM of the same object: the DELETE wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_put_never_overtakes_a_trim() {
    let cfg = cfg();
    let (dev, mem, probe) = setup(&cfg).await;
    *probe.delay_put.lock().unwrap() =
        Some(("dev/00000002".into(), 1, Some(Duration::from_secs(1))));
    let mut h = Host::new(&dev);
    h.write(2 * OBJ, &pattern(2 * OBJ, OBJ, 1), false)
        .await
        .unwrap();
    h.trim(2 * OBJ, OBJ).await.unwrap();
    eventually("the delayed PUT lands", Duration::from_secs(10), || {
        probe.landed()
    })
    .await;
    eventually("no PUT in flight", Duration::from_secs(10), || {
        probe.puts_in_flight() == 0
    })
    .await;
    assert!(
        get(mem.as_ref(), "dev/00000002").await.is_none(),
        "the late PUT did not land after the DELETE"
    );
    assert_eq!(h.read(2 * OBJ, OBJ).await.unwrap(), vec![0; OBJ as usize]);
}

/// A PUT never answered within the retry budget: the write fails in
/// bounded time, the object stays busy (newer data waits in the buffer,
/// FLUSH fails within its budget instead of hanging), past `orphan_deadline` writes
/// to it fail loudly, and once the store answers everything recovers and
/// the newest write is what the store holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_put_keeps_the_object_busy_then_poisons_it() {
    let mut cfg = cfg();
    cfg.retry_budget = Duration::from_millis(500);
    cfg.orphan_deadline = Duration::from_millis(1500);
    let (dev, mem, probe) = setup(&cfg).await;
    *probe.delay_put.lock().unwrap() = Some(("dev/00000000".into(), 1, None));
    let mut h = Host::new(&dev);
    let t = Instant::now();
    assert_eq!(
        h.write(0, &pattern(0, OBJ, 1), false).await,
        Err(IoError::WriteFault),
        "no answer within the budget is a write fault"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let s = dev.stats();
    assert_eq!(s.unanswered, 1, "{s:?}");
    assert!(s.slow_mutations >= 1, "{s:?}");
    assert_eq!(probe.puts_in_flight(), 1, "the first PUT was not re-sent");
    // A newer write of the same object is buffered behind it, not sent.
    h.write(0, &pattern(0, OBJ, 2), false).await.unwrap();
    let t = Instant::now();
    assert_eq!(h.flush().await, Err(IoError::WriteFault));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "FLUSH waited at most about its retry budget: {:?}",
        t.elapsed()
    );
    assert_eq!(probe.puts_in_flight(), 1, "still nothing sent over it");
    // Other objects are unaffected.
    h.write(OBJ, &pattern(OBJ, OBJ, 3), false).await.unwrap();
    // Past the hard deadline the object is poisoned: writes fail loudly.
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.write(4096, &[7u8; 4096], false).await.is_ok() {
        assert!(Instant::now() < deadline, "object never poisoned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.trim(0, OBJ).await, Err(IoError::WriteFault));
    assert_eq!(probe.puts_in_flight(), 1);
    // The store answers at last: the old PUT lands, then the buffered
    // newer data goes out over it.
    probe.release();
    eventually("the held PUT lands", Duration::from_secs(10), || {
        probe.landed()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.flush().await.is_err() {
        assert!(Instant::now() < deadline, "FLUSH never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut want = pattern(0, OBJ, 2);
    // Writes accepted before the poisoning was noticed are buffered too.
    let got = get(mem.as_ref(), "dev/00000000").await.unwrap();
    if got[4096] == 7 {
        want[4096..8192].fill(7);
    }
    assert_same(&got, &want, "the store holds the newest write");
    assert_same(
        &h.read(0, OBJ).await.unwrap(),
        &want,
        "and the device reads it",
    );
    h.write(0, &pattern(0, OBJ, 4), false).await.unwrap();
    assert_same(
        &get(mem.as_ref(), "dev/00000000").await.unwrap(),
        &pattern(0, OBJ, 4),
        "writes work again",
    );
    assert!(probe.puts_done.load(SeqCst) >= 3);
}
