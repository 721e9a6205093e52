//! Injected 5xx errors, timeouts and outages, through the Bdev API.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use strata_objbacker::{
    FaultConfig, FaultyStore, FormatOptions, Latency, ObjBacker, format_with_stores,
};
use strata_target::bdev::IoError;

const OBJ: u64 = 128 * KIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_5xx_and_timeouts_are_retried_to_success() {
    let mut cfg = test_cfg(mem_urls(2), 16 * OBJ, OBJ);
    cfg.request_timeout = Duration::from_millis(100);
    cfg.retry_budget = Duration::from_secs(30);
    let mem: Vec<Arc<InMemory>> = (0..2).map(|_| Arc::new(InMemory::new())).collect();
    let plain: Vec<Arc<dyn ObjectStore>> = mem
        .iter()
        .map(|m| m.clone() as Arc<dyn ObjectStore>)
        .collect();
    format_with_stores(&cfg, plain.clone(), FormatOptions::default())
        .await
        .unwrap();
    let faulty: Vec<Arc<FaultyStore>> = mem
        .iter()
        .map(|m| {
            Arc::new(FaultyStore::new(
                m.clone(),
                FaultConfig {
                    latency: Latency::Exponential(Duration::from_millis(2)),
                    error_rate: 0.3,
                    timeout_rate: 0.15,
                    // Longer than request_timeout. A hung GET is dropped
                    // and retried at request_timeout; a hung PUT/DELETE is
                    // waited for (it might still land) until the client
                    // gives up on it, as a real HTTP client does after its
                    // own timeout.
                    hang: Duration::from_secs(5),
                    client_timeout: Some(cfg.request_timeout),
                },
            ))
        })
        .collect();
    let dev = ObjBacker::attach_with_stores(
        cfg.clone(),
        faulty
            .iter()
            .map(|f| f.clone() as Arc<dyn ObjectStore>)
            .collect(),
    )
    .await
    .unwrap();
    let mut h = Host::new(&dev);
    let data = pattern(0, 16 * OBJ, 3);
    // Whole objects (direct PUTs), partial ones (RMW GET + PUT), FLUSH.
    h.write(0, &data[..(8 * OBJ) as usize], false)
        .await
        .unwrap();
    for off in (8 * OBJ..16 * OBJ).step_by(OBJ as usize) {
        h.write(
            off + 4096,
            &data[(off + 4096) as usize..(off + OBJ) as usize],
            false,
        )
        .await
        .unwrap();
        h.write(off, &data[off as usize..(off + 4096) as usize], true)
            .await
            .unwrap();
    }
    h.flush().await.unwrap();
    assert_same(
        &h.read(0, 16 * OBJ).await.unwrap(),
        &data,
        "read back through faults",
    );
    let stats = dev.stats();
    // And the store really holds it (fresh device, no cache).
    drop(h);
    drop(dev);
    let dev = ObjBacker::attach_with_stores(cfg, plain).await.unwrap();
    assert_same(
        &Host::new(&dev).read(0, 16 * OBJ).await.unwrap(),
        &data,
        "durable",
    );
    let s = stats;
    let injected: u64 = faulty
        .iter()
        .map(|f| f.control().injected_errors.load(Relaxed))
        .sum();
    let timeouts: u64 = faulty
        .iter()
        .map(|f| f.control().injected_timeouts.load(Relaxed))
        .sum();
    assert!(
        injected > 0 && timeouts > 0,
        "faults were injected: {injected} errors, {timeouts} timeouts"
    );
    assert!(
        s.retries >= injected + timeouts,
        "every fault was retried: {injected} errors, {timeouts} timeouts, {s:?}"
    );
    assert_eq!(s.failures, 0);
}

/// A store that goes down for good: errors within the budget, no hang, and
/// what the last good FLUSH covered is intact.
async fn outage(black_hole: bool) {
    let mut cfg = test_cfg(mem_urls(1), 8 * OBJ, OBJ);
    cfg.request_timeout = Duration::from_millis(200);
    cfg.retry_budget = Duration::from_secs(1);
    cfg.writeback_bytes = 2 * OBJ;
    let mem = Arc::new(InMemory::new());
    format_with_stores(&cfg, vec![mem.clone()], FormatOptions::default())
        .await
        .unwrap();
    let faulty = Arc::new(FaultyStore::new(
        mem.clone(),
        FaultConfig {
            hang: Duration::from_secs(3600),
            ..Default::default()
        },
    ));
    let ctl = faulty.control();
    let dev = ObjBacker::attach_with_stores(cfg.clone(), vec![faulty.clone()])
        .await
        .unwrap();
    let mut h = Host::new(&dev);
    let a = pattern(0, 8 * OBJ, 1);
    for off in (0..8 * OBJ).step_by(OBJ as usize) {
        h.write(
            off + 4096,
            &a[(off + 4096) as usize..(off + 8192) as usize],
            false,
        )
        .await
        .unwrap();
    }
    h.flush().await.unwrap();

    if black_hole {
        ctl.black_hole.store(true, Relaxed);
    } else {
        ctl.down.store(true, Relaxed);
    }
    // Bound: budget + one request timeout + slack for a loaded machine.
    let bound = Duration::from_secs(6);
    let t = Instant::now();
    h.write(4096, &[0xBB; 4096], false).await.unwrap(); // buffered: fine
    assert_eq!(
        h.flush().await,
        Err(IoError::WriteFault),
        "FLUSH reports the lost durability"
    );
    assert!(t.elapsed() < bound, "flush error after {:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(
        h.write(OBJ, &[0xCC; OBJ as usize], false).await,
        Err(IoError::WriteFault),
        "direct PUT fails"
    );
    assert_eq!(
        h.write(2 * OBJ, &[0xCC; 4096], true).await,
        Err(IoError::WriteFault),
        "FUA fails"
    );
    assert!(
        t.elapsed() < 2 * bound,
        "write errors after {:?}",
        t.elapsed()
    );
    // Buffer full of undurable data: new partial writes fail, bounded.
    let t = Instant::now();
    let mut failed = false;
    for i in 3..8u64 {
        if h.write(i * OBJ, &[0xDD; 4096], false).await.is_err() {
            failed = true;
            break;
        }
    }
    assert!(
        failed,
        "a full buffer on a dead store turns into write errors"
    );
    assert!(
        t.elapsed() < 2 * bound,
        "back-pressure error after {:?}",
        t.elapsed()
    );
    // A read of an object not in the buffer needs the store.
    let t = Instant::now();
    assert_eq!(h.read(7 * OBJ + 65536, 4096).await, Err(IoError::ReadError));
    assert!(t.elapsed() < bound, "read error after {:?}", t.elapsed());
    // Buffered data is still served.
    assert_eq!(h.read(4096, 4096).await.unwrap(), vec![0xBB; 4096]);

    // The store holds the last good FLUSH.
    let fresh = ObjBacker::attach_with_stores(cfg.clone(), vec![mem.clone()])
        .await
        .unwrap();
    let mut h2 = Host::new(&fresh);
    for off in (0..8 * OBJ).step_by(OBJ as usize) {
        let got = h2.read(off + 4096, 4096).await.unwrap();
        assert_same(
            &got,
            &a[(off + 4096) as usize..(off + 8192) as usize],
            "flushed data survives the outage",
        );
    }
    drop(h2);
    drop(fresh);

    // The store comes back: nothing acknowledged was dropped, FLUSH works.
    ctl.down.store(false, Relaxed);
    ctl.black_hole.store(false, Relaxed);
    h.flush().await.unwrap();
    let fresh = ObjBacker::attach_with_stores(cfg, vec![mem.clone()])
        .await
        .unwrap();
    assert_eq!(
        Host::new(&fresh).read(4096, 4096).await.unwrap(),
        vec![0xBB; 4096],
        "write acknowledged during the outage is durable after recovery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_gives_errors_not_hangs() {
    outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_store_gives_errors_not_hangs() {
    outage(true).await;
}
