//! The same round trip against real protocol servers on 127.0.0.1:
//! S3 (s3s-fs, embedded), Azure Blob (Azurite, spawned), GCS client against
//! an S3-protocol server (see gcs_client_* for exactly what that proves),
//! and a local directory.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use object_store::ObjectStore;
use strata_objbacker::{FormatOptions, ObjBacker, ObjBackerConfig, format, fsck, info};
use strata_target::bdev::{IoBuf, IoOp};
use strata_testkit::objstores::{self, Azurite, S3s};

const BUCKETS: usize = 3;

/// format → attach → 8 x 1 MiB writes through the Bdev API → FLUSH → list
/// each bucket with object_store directly → read back → partial write (RMW)
/// → fsck → TRIM everything → list again. `inspect[k]` sees bucket k with
/// data keys under `key_prefix`.
async fn round_trip(
    label: &str,
    cfg: ObjBackerConfig,
    inspect: Vec<Arc<dyn ObjectStore>>,
    key_prefix: &str,
) {
    let t0 = Instant::now();
    format(&cfg, FormatOptions::default())
        .await
        .expect("format");
    let dev = ObjBacker::attach(cfg.clone()).await.expect("attach");
    let mut h = Host::new(&dev);
    let size = 8 * MIB;
    let data = pattern(0, size, 42);

    let t = Instant::now();
    let ios = (0..8u64)
        .map(|i| {
            let off = i * MIB;
            (
                IoOp::Write { fua: false },
                off,
                MIB,
                Some(IoBuf::from_slice(&data[off as usize..(off + MIB) as usize])),
            )
        })
        .collect();
    for c in h.batch(ios).await {
        assert_eq!(c.result, Ok(()), "{label}: write");
    }
    h.flush().await.expect("flush");
    let write_t = t.elapsed();
    assert_eq!(dev.stats().puts, 8, "{label}: one PUT per 1 MiB object");

    let key = |i: u64| {
        if key_prefix.is_empty() {
            format!("{i:08}")
        } else {
            format!("{key_prefix}/{i:08}")
        }
    };
    for (k, store) in inspect.iter().enumerate() {
        let listed = list(
            store.as_ref(),
            (!key_prefix.is_empty()).then_some(key_prefix),
        )
        .await;
        let data_keys: Vec<(String, u64)> = listed
            .into_iter()
            .filter(|(n, _)| !n.ends_with("superblock.json"))
            .collect();
        let want: Vec<(String, u64)> = (0..8u64)
            .filter(|i| i % BUCKETS as u64 == k as u64)
            .map(|i| (key(i), MIB))
            .collect();
        assert_eq!(data_keys, want, "{label}: bucket {k} objects");
    }

    let t = Instant::now();
    assert_same(
        &h.read(0, size).await.unwrap(),
        &data,
        &format!("{label}: read back"),
    );
    let read_t = t.elapsed();
    // Ranged GET path.
    assert_same(
        &h.read(3 * MIB + 4096, 8192).await.unwrap(),
        &data[(3 * MIB + 4096) as usize..(3 * MIB + 12288) as usize],
        label,
    );

    // A partial write: read-modify-write against the server.
    h.write(5 * MIB + 8192, &[0x5A; 4096], false).await.unwrap();
    h.flush().await.unwrap();
    let obj5 = get(inspect[5 % BUCKETS].as_ref(), &key(5))
        .await
        .expect("object 5");
    assert_eq!(obj5.len() as u64, MIB);
    assert!(
        obj5[8192..12288].iter().all(|&x| x == 0x5A),
        "{label}: RMW applied"
    );
    assert_same(
        &obj5[..8192],
        &data[(5 * MIB) as usize..(5 * MIB + 8192) as usize],
        &format!("{label}: RMW kept old bytes"),
    );

    let report = fsck(&cfg).await.expect("fsck");
    assert!(report.is_clean(), "{label}: fsck {:?}", report.problems);
    assert_eq!(report.data_objects, 8);
    let inf = info(&cfg).await.expect("info");
    assert_eq!(inf.buckets.iter().map(|b| b.data_objects).sum::<u64>(), 8);

    h.trim(0, size).await.unwrap();
    for (k, store) in inspect.iter().enumerate() {
        let left: Vec<String> = list(
            store.as_ref(),
            (!key_prefix.is_empty()).then_some(key_prefix),
        )
        .await
        .into_iter()
        .map(|x| x.0)
        .collect();
        assert!(
            left.iter().all(|n| n.ends_with("superblock.json")),
            "{label}: bucket {k} after TRIM: {left:?}"
        );
    }
    assert_eq!(h.read(0, MIB).await.unwrap(), vec![0; MIB as usize]);
    eprintln!(
        "{label}: 8 MiB write+flush {write_t:?} ({:.0} MB/s), read {read_t:?} ({:.0} MB/s), whole test {:?}, stats {:?}",
        8.0 / write_t.as_secs_f64(),
        8.0 / read_t.as_secs_f64(),
        t0.elapsed(),
        dev.stats()
    );
}

fn base_cfg(buckets: Vec<String>, options: Vec<(&str, String)>) -> ObjBackerConfig {
    let mut cfg = test_cfg(buckets, 8 * MIB, MIB);
    cfg.store_options = options
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    cfg.writeback_bytes = 16 * MIB;
    cfg.readahead_bytes = 2 * MIB;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_s3s_fs_three_buckets() {
    strata_objbacker::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    for k in 0..BUCKETS {
        std::fs::create_dir(root.path().join(format!("strata-{k}"))).unwrap();
    }
    let s3 = S3s::start(root.path(), true);
    let endpoint = s3.endpoint();
    let cfg = base_cfg(
        (0..BUCKETS)
            .map(|k| format!("s3://strata-{k}/vol1"))
            .collect(),
        objstores::s3_options(&endpoint),
    );
    let inspect = (0..BUCKETS)
        .map(|k| objstores::s3_store(&endpoint, &format!("strata-{k}")))
        .collect();
    round_trip("s3 (s3s-fs)", cfg, inspect, "vol1").await;
}

/// What this proves: object_store's GCS client (`gs://` URLs, the GCS
/// builder, its XML-API request shapes: path-style PUT/GET with Range,
/// DELETE, `list-type=2` LIST) drives the device end to end against a server
/// that speaks that XML dialect. The server is s3s-fs, an S3 server: GCS's
/// XML API is S3-compatible for these calls, and no GCS emulator that
/// speaks the XML API exists in the registries we reach. What it does NOT
/// prove: GCS authentication (OAuth/service accounts; OAuth is disabled
/// here, see [`objstores::GCS_NO_OAUTH`]), or any behaviour where real GCS
/// differs from S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_client_against_s3_compatible_xml_api() {
    strata_objbacker::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    for k in 0..BUCKETS {
        std::fs::create_dir(root.path().join(format!("gcs-{k}"))).unwrap();
    }
    let gcs = S3s::start(root.path(), false);
    let base = gcs.endpoint();
    let cfg = base_cfg(
        (0..BUCKETS).map(|k| format!("gs://gcs-{k}/vol1")).collect(),
        objstores::gcs_options(&base),
    );
    let inspect = (0..BUCKETS)
        .map(|k| objstores::gcs_store(&base, &format!("gcs-{k}")))
        .collect();
    round_trip("gcs client (XML API on s3s-fs)", cfg, inspect, "vol1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_directory_three_buckets() {
    let root = tempfile::tempdir().unwrap();
    let urls: Vec<String> = (0..BUCKETS)
        .map(|k| format!("file://{}/bucket-{k}", root.path().display()))
        .collect();
    let cfg = base_cfg(urls, vec![]);
    let inspect = (0..BUCKETS)
        .map(|k| objstores::local_store(&root.path().join(format!("bucket-{k}"))))
        .collect();
    round_trip("local directory", cfg, inspect, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_azurite_three_containers() {
    strata_objbacker::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let az = Azurite::start(dir.path());
    for k in 0..BUCKETS {
        az.create_container(&format!("strata-{k}")).await;
    }
    let cfg = base_cfg(
        (0..BUCKETS)
            .map(|k| format!("az://strata-{k}/vol1"))
            .collect(),
        az.options(),
    );
    let inspect = (0..BUCKETS)
        .map(|k| az.store(&format!("strata-{k}")))
        .collect();
    round_trip("azure (azurite)", cfg, inspect, "vol1").await;
}
