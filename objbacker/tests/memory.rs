//! Semantics against InMemory stores, through the Bdev API.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use strata_objbacker::{
    FaultConfig, FaultyStore, FormatOptions, FsckProblem, Latency, ObjBacker, ObjBackerConfig,
    ObjError, format_with_stores, fsck_with_stores, info_with_stores,
};
use strata_target::bdev::{Bdev, IoBuf, IoError, IoOp};

const OBJ: u64 = 128 * KIB;

fn stores(n: usize) -> (Vec<Arc<InMemory>>, Vec<Arc<dyn ObjectStore>>) {
    let mem: Vec<Arc<InMemory>> = (0..n).map(|_| Arc::new(InMemory::new())).collect();
    let dynv = mem
        .iter()
        .map(|m| m.clone() as Arc<dyn ObjectStore>)
        .collect();
    (mem, dynv)
}

async fn fresh(cfg: &ObjBackerConfig, n: usize) -> (Arc<ObjBacker>, Vec<Arc<InMemory>>) {
    let (mem, dynv) = stores(n);
    format_with_stores(cfg, dynv.clone(), FormatOptions::default())
        .await
        .unwrap();
    let dev = ObjBacker::attach_with_stores(cfg.clone(), dynv)
        .await
        .unwrap();
    (dev, mem)
}

fn dyn_of(mem: &[Arc<InMemory>]) -> Vec<Arc<dyn ObjectStore>> {
    mem.iter()
        .map(|m| m.clone() as Arc<dyn ObjectStore>)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_objects_are_striped_single_puts() {
    let cfg = test_cfg(mem_urls(3), 8 * OBJ, OBJ);
    let (dev, mem) = fresh(&cfg, 3).await;
    let mut h = Host::new(&dev);
    let data = pattern(0, 8 * OBJ, 1);
    h.write(0, &data, false).await.unwrap();
    // Objects 1..8 continue a sequential writer: write-behind, durable at
    // FLUSH.
    h.flush().await.unwrap();
    let s = dev.stats();
    assert_eq!(s.puts, 8, "one PUT per whole object");
    assert_eq!(s.rmw_gets, 0);
    assert_eq!(dev.dirty_bytes(), 0, "nothing left in memory after FLUSH");
    // Striped.
    for (k, m) in mem.iter().enumerate() {
        let keys: Vec<String> = list(m.as_ref(), Some("dev"))
            .await
            .into_iter()
            .map(|x| x.0)
            .collect();
        let want: Vec<String> = (0..8u64)
            .filter(|i| i % 3 == k as u64)
            .map(|i| format!("dev/{i:08}"))
            .chain(["dev/superblock.json".to_string()])
            .collect();
        let mut want = want;
        want.sort();
        assert_eq!(keys, want, "bucket {k}");
    }
    assert_same(&h.read(0, 8 * OBJ).await.unwrap(), &data, "read back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_sequential_writes_coalesce_into_one_put() {
    let cfg = test_cfg(mem_urls(1), 4 * OBJ, OBJ);
    let (dev, mem) = fresh(&cfg, 1).await;
    let mut h = Host::new(&dev);
    for off in (OBJ..2 * OBJ).step_by(4096) {
        h.write(off, &pattern(off, 4096, 2), false).await.unwrap();
    }
    h.flush().await.unwrap();
    let s = dev.stats();
    assert_eq!(s.puts, 1, "32 x 4 KiB writes became one PUT: {s:?}");
    assert_eq!(s.rmw_gets, 0, "a fully covered object needs no GET");
    let stored = get(mem[0].as_ref(), "dev/00000001").await.unwrap();
    assert_same(&stored, &pattern(OBJ, OBJ, 2), "stored object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_write_is_buffered_visible_and_read_modify_written() {
    let cfg = test_cfg(mem_urls(2), 4 * OBJ, OBJ);
    let (dev, mem) = fresh(&cfg, 2).await;
    let mut h = Host::new(&dev);
    let a = pattern(0, OBJ, 3);
    h.write(0, &a, false).await.unwrap();
    let puts = dev.stats().puts;
    let b = pattern(8192, 8192, 4);
    h.write(8192, &b, false).await.unwrap();
    assert_eq!(dev.stats().puts, puts, "partial write is buffered, not PUT");
    assert_eq!(dev.dirty_bytes(), OBJ);
    let mut want = a.clone();
    want[8192..16384].copy_from_slice(&b);
    assert_same(
        &h.read(0, OBJ).await.unwrap(),
        &want,
        "read sees buffer over store",
    );
    assert_same(
        &h.read(4096, 8192).await.unwrap(),
        &want[4096..12288],
        "straddling read",
    );
    // The store still has the old object until FLUSH.
    assert_same(
        &get(mem[0].as_ref(), "dev/00000000").await.unwrap(),
        &a,
        "store before flush",
    );
    h.flush().await.unwrap();
    assert_eq!(dev.stats().rmw_gets, 1);
    assert_eq!(dev.dirty_bytes(), 0, "buffer freed once durable");
    assert_same(
        &get(mem[0].as_ref(), "dev/00000000").await.unwrap(),
        &want,
        "store after flush",
    );
    // A never-written object reads as zeros, also partially.
    assert_eq!(h.read(3 * OBJ + 4096, 8192).await.unwrap(), vec![0; 8192]);
    assert_eq!(h.read(2 * OBJ, OBJ).await.unwrap(), vec![0; OBJ as usize]);
    // A partial write to a never-written object: RMW finds nothing, rest is zero.
    h.write(3 * OBJ + 4096, &[7u8; 4096], false).await.unwrap();
    h.flush().await.unwrap();
    let obj3 = get(mem[1].as_ref(), "dev/00000003").await.unwrap();
    assert_eq!(obj3.len() as u64, OBJ);
    assert!(obj3[..4096].iter().all(|&x| x == 0) && obj3[4096..8192].iter().all(|&x| x == 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_write_is_durable_at_completion() {
    let cfg = test_cfg(mem_urls(1), 4 * OBJ, OBJ);
    let (dev, mem) = fresh(&cfg, 1).await;
    let mut h = Host::new(&dev);
    h.write(OBJ + 4096, &[9u8; 4096], true).await.unwrap();
    let stored = get(mem[0].as_ref(), "dev/00000001")
        .await
        .expect("FUA data in the store");
    assert!(stored[4096..8192].iter().all(|&x| x == 9));
    assert_eq!(dev.dirty_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_keeps_everything_before_the_last_flush() {
    let mut cfg = test_cfg(mem_urls(3), 16 * OBJ, OBJ);
    // Big enough that buffer pressure does not write anything back.
    cfg.writeback_bytes = 64 * OBJ;
    let (dev, mem) = fresh(&cfg, 3).await;
    let mut h = Host::new(&dev);
    // Partial writes scattered over every object, then FLUSH.
    let spots: Vec<u64> = (0..16).map(|i| i * OBJ + (i % 5) * 8192).collect();
    for &off in &spots {
        h.write(off, &pattern(off, 8192, 1), false).await.unwrap();
    }
    h.flush().await.unwrap();
    // More acknowledged writes, but no FLUSH, then "kill -9".
    for &off in &spots {
        h.write(off + 4096, &pattern(off + 4096, 4096, 2), false)
            .await
            .unwrap();
    }
    assert!(
        dev.dirty_bytes() > 0,
        "the unflushed writes are only in memory"
    );
    dev.simulate_crash();
    drop(h);
    drop(dev);
    let dev = ObjBacker::attach_with_stores(cfg.clone(), dyn_of(&mem))
        .await
        .unwrap();
    let mut h = Host::new(&dev);
    for &off in &spots {
        let got = h.read(off, 8192).await.unwrap();
        assert_same(&got[..4096], &pattern(off, 4096, 1), "flushed block");
        // The second block was acknowledged after the flush: old or new,
        // never anything else. Here it was never written back, so old.
        assert_same(
            &got[4096..],
            &pattern(off + 4096, 4096, 1),
            "unflushed block",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_edge_cases() {
    // 3.5 objects: the last object is half size.
    let size = 3 * OBJ + OBJ / 2;
    let cfg = test_cfg(mem_urls(2), size, OBJ);
    let (dev, mem) = fresh(&cfg, 2).await;
    let mut h = Host::new(&dev);
    let data = pattern(0, size, 5);
    h.write(0, &data, false).await.unwrap();
    h.flush().await.unwrap();
    let stored: Vec<_> = list(mem[1].as_ref(), Some("dev"))
        .await
        .into_iter()
        .filter(|(k, _)| !k.ends_with(".json"))
        .collect();
    assert_eq!(
        stored,
        vec![
            ("dev/00000001".to_string(), OBJ),
            ("dev/00000003".to_string(), OBJ / 2)
        ],
        "last object stored at its short length"
    );
    // Empty range: completes, changes nothing.
    h.trim(OBJ, 0).await.unwrap();
    assert_same(&h.read(0, size).await.unwrap(), &data, "after empty trim");
    // Out of range.
    assert_eq!(h.trim(size, 4096).await, Err(IoError::OutOfRange));
    assert_eq!(
        h.one(IoOp::Read, size - 4096, 8192, Some(IoBuf::new(8192)))
            .await
            .result,
        Err(IoError::OutOfRange)
    );
    // Partial range inside object 1: zeroed through the buffer, no DELETE.
    let deletes = dev.stats().deletes;
    h.trim(OBJ + 4096, 8192).await.unwrap();
    assert_eq!(dev.stats().deletes, deletes);
    let mut want = data.clone();
    want[(OBJ + 4096) as usize..(OBJ + 12288) as usize].fill(0);
    assert_same(
        &h.read(0, size).await.unwrap(),
        &want,
        "partial trim reads zero",
    );
    // The whole last (short) object: DELETE.
    h.trim(3 * OBJ, OBJ / 2).await.unwrap();
    assert!(
        get(mem[1].as_ref(), "dev/00000003").await.is_none(),
        "last object deleted"
    );
    want[(3 * OBJ) as usize..].fill(0);
    assert_same(
        &h.read(0, size).await.unwrap(),
        &want,
        "after last-object trim",
    );
    // A range covering object 2 wholly and parts of 1 and 3.
    h.trim(OBJ + OBJ / 2, 2 * OBJ).await.unwrap();
    assert!(
        get(mem[0].as_ref(), "dev/00000002").await.is_none(),
        "object 2 deleted"
    );
    want[(OBJ + OBJ / 2) as usize..(3 * OBJ + OBJ / 2) as usize].fill(0);
    assert_same(
        &h.read(0, size).await.unwrap(),
        &want,
        "after straddling trim",
    );
    // Whole device: every data object is gone and everything reads zero.
    h.trim(0, size).await.unwrap();
    h.flush().await.unwrap();
    for (k, m) in mem.iter().enumerate() {
        assert_eq!(
            list(m.as_ref(), Some("dev")).await.len(),
            1,
            "bucket {k} holds only the superblock"
        );
    }
    assert_eq!(h.read(0, size).await.unwrap(), vec![0; size as usize]);
    // Writing after a trim works (Zero layer becomes a buffer).
    h.write(4096, &[1u8; 4096], false).await.unwrap();
    let got = h.read(0, 12288).await.unwrap();
    assert!(
        got[..4096].iter().all(|&x| x == 0)
            && got[4096..8192].iter().all(|&x| x == 1)
            && got[8192..].iter().all(|&x| x == 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_device_write_and_read_with_short_last_object() {
    let size = 5 * OBJ + 3 * 4096;
    let cfg = test_cfg(mem_urls(3), size, OBJ);
    let (dev, _mem) = fresh(&cfg, 3).await;
    assert_eq!(dev.info().num_blocks, size / 4096);
    assert!(dev.info().volatile_write_cache);
    let mut h = Host::new(&dev);
    let data = pattern(0, size, 6);
    h.write(0, &data, false).await.unwrap();
    h.flush().await.unwrap();
    assert_same(&h.read(0, size).await.unwrap(), &data, "whole device");
    // Zero-length read and write complete successfully.
    assert!(
        h.one(IoOp::Read, 0, 0, Some(IoBuf::new(4096)))
            .await
            .result
            .is_ok()
    );
    assert!(
        h.one(IoOp::Write { fua: false }, 4096, 0, Some(IoBuf::new(4096)))
            .await
            .result
            .is_ok()
    );
}

/// Slow requests so that ordering bugs would show, observed by a probe.
fn slow(mem: &Arc<InMemory>, lat: Latency) -> (Arc<dyn ObjectStore>, Arc<Probe>) {
    let probed = ProbeStore::new(Arc::new(FaultyStore::new(
        mem.clone(),
        FaultConfig {
            latency: lat,
            ..Default::default()
        },
    )));
    let probe = probed.probe.clone();
    (Arc::new(probed), probe)
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_write_is_never_overtaken_by_older_put() {
    let cfg = test_cfg(mem_urls(1), 4 * OBJ, OBJ);
    let mem = Arc::new(InMemory::new());
    format_with_stores(&cfg, vec![mem.clone()], FormatOptions::default())
        .await
        .unwrap();
    let (store, probe) = slow(
        &mem,
        Latency::Uniform(Duration::from_millis(5), Duration::from_millis(150)),
    );
    let dev = ObjBacker::attach_with_stores(cfg.clone(), vec![store])
        .await
        .unwrap();
    let mut h = Host::new(&dev);
    for round in 0..6u8 {
        // Completing the object with small writes starts a write-back PUT;
        // the next round's writes land while it is in flight.
        for off in (0..OBJ).step_by(32768) {
            h.write(off, &pattern(off, 32768, round), false)
                .await
                .unwrap();
        }
        // A direct whole-object PUT to object 1 racing a buffered one.
        h.write(OBJ, &pattern(OBJ, OBJ, round), false)
            .await
            .unwrap();
    }
    h.flush().await.unwrap();
    // Anything still on its way to the store lands before we look.
    eventually("no PUT in flight", WAIT, || probe.puts_in_flight() == 0).await;
    assert_same(
        &get(mem.as_ref(), "dev/00000000").await.unwrap(),
        &pattern(0, OBJ, 5),
        "object 0 holds the last round",
    );
    assert_same(
        &get(mem.as_ref(), "dev/00000001").await.unwrap(),
        &pattern(OBJ, OBJ, 5),
        "object 1 holds the last round",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_is_ordered_after_an_in_flight_put() {
    let cfg = test_cfg(mem_urls(1), 4 * OBJ, OBJ);
    let mem = Arc::new(InMemory::new());
    format_with_stores(&cfg, vec![mem.clone()], FormatOptions::default())
        .await
        .unwrap();
    let (store, probe) = slow(&mem, Latency::Fixed(Duration::from_millis(200)));
    let dev = ObjBacker::attach_with_stores(cfg.clone(), vec![store])
        .await
        .unwrap();
    let mut h = Host::new(&dev);
    // Complete object from small writes: a write-back PUT starts at once.
    for off in (0..OBJ).step_by(65536) {
        h.write(off, &pattern(off, 65536, 1), false).await.unwrap();
    }
    eventually("the write-back PUT is in flight", WAIT, || {
        probe.puts_in_flight() == 1
    })
    .await;
    h.trim(0, OBJ).await.unwrap();
    assert_eq!(h.read(0, OBJ).await.unwrap(), vec![0; OBJ as usize]);
    // The PUT has finished (the DELETE waited for it) and nothing else is
    // on its way to the store.
    assert_eq!(probe.puts_done.load(SeqCst), 1);
    assert!(probe.deletes_done.load(SeqCst) >= 1);
    eventually("no PUT in flight", WAIT, || probe.puts_in_flight() == 0).await;
    assert!(
        get(mem.as_ref(), "dev/00000000").await.is_none(),
        "the older PUT did not land after the DELETE"
    );
    assert_eq!(h.read(0, OBJ).await.unwrap(), vec![0; OBJ as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_applies_back_pressure() {
    let mut cfg = test_cfg(mem_urls(2), 16 * OBJ, OBJ);
    cfg.writeback_bytes = 2 * OBJ;
    let (mem, _) = stores(2);
    let slowed: Vec<Arc<dyn ObjectStore>> = mem
        .iter()
        .map(|m| slow(m, Latency::Fixed(Duration::from_millis(30))).0)
        .collect();
    format_with_stores(&cfg, slowed.clone(), FormatOptions::default())
        .await
        .unwrap();
    let dev = ObjBacker::attach_with_stores(cfg.clone(), slowed)
        .await
        .unwrap();
    let mut h = Host::new(&dev);
    // 16 partial writes to 16 objects at once: only 2 fit in the buffer.
    let ios = (0..16u64)
        .map(|i| {
            let off = i * OBJ + 4096;
            (
                IoOp::Write { fua: false },
                off,
                4096,
                Some(IoBuf::from_slice(&pattern(off, 4096, 8))),
            )
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (dev, done) = (dev.clone(), done.clone());
        tokio::spawn(async move {
            let mut peak = 0;
            // Samples for as long as the writes run, however long that is.
            while !done.load(SeqCst) {
                peak = peak.max(dev.dirty_bytes());
                tokio::task::yield_now().await;
            }
            peak
        })
    };
    for c in h.batch(ios).await {
        assert_eq!(c.result, Ok(()));
    }
    done.store(true, SeqCst);
    let peak = watcher.await.unwrap();
    assert!(peak <= 2 * OBJ, "buffer bounded: peak {peak}");
    // 16 objects through a 2-object buffer: all but two writers completed
    // only after write-back of an earlier object had landed.
    let puts = dev.stats().puts;
    assert!(puts >= 14, "writers waited for write-back: {puts} PUTs");
    h.flush().await.unwrap();
    for i in 0..16u64 {
        let off = i * OBJ + 4096;
        assert_same(
            &h.read(off, 4096).await.unwrap(),
            &pattern(off, 4096, 8),
            "after back-pressure",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_trigger_read_ahead_and_writes_invalidate_it() {
    let mut cfg = test_cfg(mem_urls(2), 12 * OBJ, OBJ);
    let (dev, mem) = fresh(&cfg, 2).await;
    let data = pattern(0, 12 * OBJ, 9);
    Host::new(&dev).write(0, &data, false).await.unwrap();
    drop(dev);
    cfg.readahead_bytes = 3 * OBJ;
    let dev = ObjBacker::attach_with_stores(cfg.clone(), dyn_of(&mem))
        .await
        .unwrap();
    let mut h = Host::new(&dev);
    let mut got = Vec::new();
    for off in (0..6 * OBJ).step_by(32768) {
        got.extend(h.read(off, 32768).await.unwrap());
    }
    assert_same(&got, &data[..(6 * OBJ) as usize], "sequential read");
    let s = dev.stats();
    assert!(s.readahead_gets >= 3, "read-ahead fetched objects: {s:?}");
    assert!(s.cache_hits > 0, "reads were served from read-ahead: {s:?}");
    // Objects 6..9 are being prefetched; once they are in the cache,
    // overwrite part of 7 and read it.
    eventually("read-ahead finished", WAIT, || {
        dev.prefetches_in_flight() == 0
    })
    .await;
    h.write(7 * OBJ + 4096, &[0xEE; 4096], false).await.unwrap();
    h.flush().await.unwrap();
    let r = h.read(7 * OBJ, 12288).await.unwrap();
    assert_same(
        &r[..4096],
        &data[(7 * OBJ) as usize..(7 * OBJ + 4096) as usize],
        "unchanged part",
    );
    assert!(
        r[4096..8192].iter().all(|&x| x == 0xEE),
        "cache was invalidated by the write"
    );
    // Whole-object trim also invalidates.
    h.trim(8 * OBJ, OBJ).await.unwrap();
    assert_eq!(h.read(8 * OBJ, 4096).await.unwrap(), vec![0; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superblock_mismatch_is_refused_with_a_clear_message() {
    let cfg = test_cfg(mem_urls(2), 8 * OBJ, OBJ);
    let (mem, dynv) = stores(2);
    // Not formatted.
    let e = ObjBacker::attach_with_stores(cfg.clone(), dynv.clone())
        .await
        .err()
        .unwrap();
    assert!(matches!(e, ObjError::NotFormatted { .. }), "{e}");
    assert!(e.to_string().contains("format"), "{e}");
    let sb = format_with_stores(&cfg, dynv.clone(), FormatOptions::default())
        .await
        .unwrap();
    assert_eq!(sb.num_objects, 8);
    assert_eq!(sb.uuid.len(), 36);
    // Formatting again is refused, force works.
    let e = format_with_stores(&cfg, dynv.clone(), FormatOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, ObjError::AlreadyFormatted { .. }), "{e}");
    // Wrong size.
    let mut bad = cfg.clone();
    bad.size_bytes = 16 * OBJ;
    let e = ObjBacker::attach_with_stores(bad, dynv.clone())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("size_bytes")
            && e.contains(&(8 * OBJ).to_string())
            && e.contains(&(16 * OBJ).to_string()),
        "{e}"
    );
    // Wrong object size.
    let mut bad = cfg.clone();
    bad.object_size = 2 * OBJ;
    bad.writeback_bytes = 32 * OBJ;
    let e = ObjBacker::attach_with_stores(bad, dynv.clone())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("object_size"), "{e}");
    // Buckets swapped (same URLs, stores in the other order).
    let swapped = vec![dynv[1].clone(), dynv[0].clone()];
    let e = ObjBacker::attach_with_stores(cfg.clone(), swapped)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("stripe"), "{e}");
    // A different bucket list.
    let mut bad = cfg.clone();
    bad.buckets = vec!["memory://b0/dev".into(), "memory://other/dev".into()];
    let e = ObjBacker::attach_with_stores(bad, dynv.clone())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("buckets"), "{e}");
    // Foreign data without a superblock blocks format.
    let fresh_store = Arc::new(InMemory::new());
    fresh_store
        .put(&Path::from("dev/foo"), PutPayload::from_static(b"x"))
        .await
        .unwrap();
    let cfg1 = test_cfg(vec!["memory://b0/dev".into()], 8 * OBJ, OBJ);
    let e = format_with_stores(&cfg1, vec![fresh_store.clone()], FormatOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, ObjError::NotEmpty { .. }), "{e}");
    format_with_stores(
        &cfg1,
        vec![fresh_store.clone()],
        FormatOptions { force: true },
    )
    .await
    .unwrap();
    assert_eq!(list(fresh_store.as_ref(), None).await.len(), 1);
    // The matching config attaches, and info reports the superblock.
    ObjBacker::attach_with_stores(cfg.clone(), dynv.clone())
        .await
        .unwrap();
    let info = info_with_stores(&cfg, dyn_of(&mem)).await.unwrap();
    assert_eq!(info.superblock.uuid, sb.uuid);
    assert_eq!(info.buckets.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_flags_stray_keys_and_objects_beyond_the_device() {
    let cfg = test_cfg(mem_urls(2), 4 * OBJ + OBJ / 2, OBJ);
    let (dev, mem) = fresh(&cfg, 2).await;
    Host::new(&dev)
        .write(0, &pattern(0, 4 * OBJ + OBJ / 2, 1), false)
        .await
        .unwrap();
    let clean = fsck_with_stores(&cfg, dyn_of(&mem)).await.unwrap();
    assert!(clean.is_clean(), "{:?}", clean.problems);
    assert_eq!(clean.data_objects, 5);
    let put = |m: &Arc<InMemory>, k: &str, n: usize| {
        let m = m.clone();
        let k = k.to_string();
        async move {
            m.put(&Path::from(k), PutPayload::from(Bytes::from(vec![1u8; n])))
                .await
                .unwrap()
        }
    };
    put(&mem[0], "dev/notes.txt", 3).await;
    put(&mem[1], "dev/00000007", OBJ as usize).await; // beyond the 5 objects
    put(&mem[1], "dev/00000002", OBJ as usize).await; // even index in bucket 1
    put(&mem[0], "dev/00000000", 100).await; // torn/foreign size
    put(&mem[0], "dev/sub/00000000", 1).await;
    let r = fsck_with_stores(&cfg, dyn_of(&mem)).await.unwrap();
    assert!(!r.is_clean());
    let has = |f: &dyn Fn(&FsckProblem) -> bool| r.problems.iter().any(f);
    assert!(
        has(&|p| matches!(p, FsckProblem::StrayKey { key, .. } if key == "dev/notes.txt")),
        "{:?}",
        r.problems
    );
    assert!(
        has(&|p| matches!(p, FsckProblem::StrayKey { key, .. } if key == "dev/sub/00000000")),
        "{:?}",
        r.problems
    );
    assert!(
        has(&|p| matches!(p, FsckProblem::BeyondDevice { index: 7, .. })),
        "{:?}",
        r.problems
    );
    assert!(
        has(&|p| matches!(p, FsckProblem::WrongBucket { index: 2, .. })),
        "{:?}",
        r.problems
    );
    assert!(
        has(&|p| matches!(p, FsckProblem::WrongSize { size: 100, .. })),
        "{:?}",
        r.problems
    );
    assert_eq!(r.problems.len(), 5, "{:?}", r.problems);
    // A missing superblock copy is found too.
    mem[1]
        .delete(&Path::from("dev/superblock.json"))
        .await
        .unwrap();
    let r = fsck_with_stores(&cfg, dyn_of(&mem)).await.unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, FsckProblem::SuperblockMissing { .. }))
    );
}

/// Small writes into an object that a read-modify-write already made whole
/// wait for the write-back delay: a hot object is PUT once per delay (or per
/// FLUSH), not once per PUT round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_put_wait_for_the_delay_instead_of_re_putting_at_once() {
    let cfg = test_cfg(mem_urls(1), 4 * OBJ, OBJ);
    let mem = Arc::new(InMemory::new());
    format_with_stores(&cfg, vec![mem.clone()], FormatOptions::default())
        .await
        .unwrap();
    let (store, probe) = slow(&mem, Latency::Fixed(Duration::from_millis(100)));
    let dev = ObjBacker::attach_with_stores(cfg.clone(), vec![store])
        .await
        .unwrap();
    dev.write_at(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    let d2 = dev.clone();
    let flush = tokio::spawn(async move { d2.flush().await });
    // Once the flush's GET is done and its PUT in flight: write more.
    eventually("the flush's PUT is in flight", WAIT, || {
        probe.puts_in_flight() == 1
    })
    .await;
    dev.write_at(8192, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    dev.write_at(16384, Bytes::from(vec![3u8; 4096]), false)
        .await
        .unwrap();
    flush.await.unwrap().unwrap();
    let after_flush = dev.stats().puts;
    // Let the flusher make a whole pass: it must not pick the object.
    let (passes, picks) = dev.flusher_counters();
    dev.kick_flusher();
    eventually("a flusher pass", WAIT, || dev.flusher_counters().0 > passes).await;
    assert_eq!(
        dev.flusher_counters().1,
        picks,
        "re-dirtied object must wait for its delay"
    );
    assert_eq!(dev.stats().puts, after_flush);
    dev.flush().await.unwrap();
    assert_eq!(
        dev.stats().puts,
        after_flush + 1,
        "FLUSH writes it back once"
    );
    let got = get(mem.as_ref(), "dev/00000000").await.unwrap();
    assert!(got[..4096].iter().all(|&b| b == 1));
    assert!(got[8192..12288].iter().all(|&b| b == 2));
    assert!(got[16384..20480].iter().all(|&b| b == 3));
}

/// A host splits a whole-device TRIM into commands of at most 256 MiB; at
/// 1 MiB objects that is 256 whole-object DELETEs per command (here 256
/// objects of 128 KiB). They run concurrently, bounded by trim_parallelism.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_object_trim_deletes_concurrently_and_reads_zero() {
    let n = 256u64;
    let mut cfg = test_cfg(mem_urls(1), n * OBJ, OBJ);
    cfg.max_in_flight = 64;
    cfg.trim_parallelism = 32;
    let (mem, _) = stores(1);
    format_with_stores(&cfg, dyn_of(&mem), FormatOptions::default())
        .await
        .unwrap();
    let probed: Vec<Arc<ProbeStore>> = mem
        .iter()
        .map(|m| Arc::new(ProbeStore::new(m.clone())))
        .collect();
    let dev = ObjBacker::attach_with_stores(
        cfg.clone(),
        probed
            .iter()
            .map(|p| p.clone() as Arc<dyn ObjectStore>)
            .collect(),
    )
    .await
    .unwrap();
    let mut h = Host::new(&dev);
    for chunk in 0..n / 64 {
        let off = chunk * 64 * OBJ;
        h.write(off, &pattern(off, 64 * OBJ, 1), false)
            .await
            .unwrap();
    }
    for p in &probed {
        *p.probe.delete_latency.lock().unwrap() = Duration::from_millis(20);
    }
    h.trim(0, n * OBJ).await.unwrap();
    let deletes: u64 = probed
        .iter()
        .map(|p| p.probe.deletes_done.load(SeqCst))
        .sum();
    assert_eq!(deletes, n, "one DELETE per written object");
    assert_eq!(dev.stats().deletes, n);
    let peak = probed[0].probe.max_deletes_in_flight.load(SeqCst);
    assert!(
        peak >= 8,
        "DELETEs ran concurrently: at most {peak} at once"
    );
    assert!(peak <= 32, "bounded by trim_parallelism: {peak} at once");
    assert_eq!(
        list(mem[0].as_ref(), Some("dev")).await.len(),
        1,
        "the bucket holds only the superblock"
    );
    assert_eq!(
        h.read(0, n * OBJ).await.unwrap(),
        vec![0; (n * OBJ) as usize]
    );
}

/// A Deallocate of a range far beyond the written data (64 GiB device, one
/// written object) completes, DELETEs only what is in the store, and holds
/// per-object state for a bounded number of objects, not for the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_far_beyond_written_data_is_bounded() {
    let size = 64 << 30;
    let cfg = test_cfg(mem_urls(2), size, MIB);
    let (dev, mem) = fresh(&cfg, 2).await;
    eventually("attach-time LIST done", WAIT, || dev.store_scan_done()).await;
    let mut h = Host::new(&dev);
    h.write(5 * MIB, &pattern(5 * MIB, MIB, 1), false)
        .await
        .unwrap();
    // A partial write too: buffered, never stored, zeroed by the TRIM.
    h.write(9 * MIB + 4096, &[3u8; 4096], false).await.unwrap();
    let before = dev.peak_tracked_objects();
    dev.zero_at(0, size).await.unwrap();
    let s = dev.stats();
    assert_eq!(s.deletes, 1, "only the stored object is DELETEd: {s:?}");
    assert_eq!(s.deletes_skipped, (size / MIB) - 1, "{s:?}");
    let peak = dev.peak_tracked_objects();
    assert!(
        peak <= before.max(2) + 32,
        "per-object state bounded by trim_parallelism: peak {peak}"
    );
    assert!(get(mem[1].as_ref(), "dev/00000005").await.is_none());
    assert_eq!(h.read(5 * MIB, MIB).await.unwrap(), vec![0; MIB as usize]);
    assert_eq!(h.read(9 * MIB, MIB).await.unwrap(), vec![0; MIB as usize]);
    assert_eq!(dev.dirty_bytes(), 0);
    // Without the LIST (an object written by someone else) the DELETE is
    // not skipped: the second device attaches to the same store, once the
    // first has let go of it (an attach waits for that).
    drop(h);
    drop(dev);
    mem[0]
        .put(
            &Path::from("dev/00000010"),
            PutPayload::from(vec![1u8; MIB as usize]),
        )
        .await
        .unwrap();
    let dev2 = ObjBacker::attach_with_stores(cfg.clone(), dyn_of(&mem))
        .await
        .unwrap();
    eventually("attach-time LIST done", WAIT, || dev2.store_scan_done()).await;
    dev2.zero_at(0, size).await.unwrap();
    assert_eq!(dev2.stats().deletes, 1);
    assert!(get(mem[0].as_ref(), "dev/00000010").await.is_none());
}
