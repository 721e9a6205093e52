//! The same round trip against real protocol servers on 127.0.0.1:
//! S3 (s3s-fs, embedded), Azure Blob (Azurite, spawned), GCS client against
//! an S3-protocol server (see gcs_client_* for exactly what that proves),
//! and a local directory.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use object_store::ObjectStore;
use strata_objbacker::{FormatOptions, ObjBacker, ObjBackerConfig, format, fsck, info};
use strata_target::bdev::{IoBuf, IoOp};

const AK: &str = "strata-test-ak";
const SK: &str = "strata-test-secret-key";
const BUCKETS: usize = 3;

/// Serves s3s-fs over `root` on 127.0.0.1:0 until the test runtime ends.
async fn start_s3s(root: &std::path::Path, auth: bool) -> SocketAddr {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;
    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs root");
    let mut b = s3s::service::S3ServiceBuilder::new(fs);
    if auth {
        b.set_auth(s3s::auth::SimpleAuth::from_single(AK, SK));
    }
    let service = b.build();
    // GCS mode: the GCS client sends `Authorization: Bearer ` (empty, OAuth
    // disabled), which s3s rejects as a malformed S3 signature. Dropping it
    // is the whole of the compatibility shim.
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let s = service.clone();
            async move {
                if !auth {
                    req.headers_mut().remove(hyper::header::AUTHORIZATION);
                }
                hyper::service::Service::call(&s, req).await
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let conn = http
                .serve_connection(TokioIo::new(sock), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    addr
}

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
    cfg.readahead_objects = 2;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_s3s_fs_three_buckets() {
    use object_store::aws::AmazonS3Builder;
    strata_objbacker::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    for k in 0..BUCKETS {
        std::fs::create_dir(root.path().join(format!("strata-{k}"))).unwrap();
    }
    let addr = start_s3s(root.path(), true).await;
    let endpoint = format!("http://{addr}");
    let opts = vec![
        ("aws_endpoint", endpoint.clone()),
        ("aws_allow_http", "true".into()),
        ("aws_virtual_hosted_style_request", "false".into()),
        ("aws_region", "us-east-1".into()),
        ("aws_access_key_id", AK.into()),
        ("aws_secret_access_key", SK.into()),
    ];
    let cfg = base_cfg(
        (0..BUCKETS)
            .map(|k| format!("s3://strata-{k}/vol1"))
            .collect(),
        opts,
    );
    let inspect = (0..BUCKETS)
        .map(|k| {
            Arc::new(
                AmazonS3Builder::new()
                    .with_endpoint(&endpoint)
                    .with_allow_http(true)
                    .with_virtual_hosted_style_request(false)
                    .with_region("us-east-1")
                    .with_bucket_name(format!("strata-{k}"))
                    .with_access_key_id(AK)
                    .with_secret_access_key(SK)
                    .build()
                    .unwrap(),
            ) as Arc<dyn ObjectStore>
        })
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
/// here), or any behaviour where real GCS differs from S3.
/// A service-account key with OAuth disabled: without it the GCS client
/// asks the cloud metadata service for a token, which must never be
/// contacted from a test.
const GCS_NO_OAUTH: &str =
    r#"{"disable_oauth":true,"client_email":"","private_key":"","private_key_id":""}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_client_against_s3_compatible_xml_api() {
    use object_store::gcp::GoogleCloudStorageBuilder;
    strata_objbacker::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    for k in 0..BUCKETS {
        std::fs::create_dir(root.path().join(format!("gcs-{k}"))).unwrap();
    }
    let addr = start_s3s(root.path(), false).await;
    let base = format!("http://{addr}");
    let opts = vec![
        ("google_base_url", base.clone()),
        ("google_service_account_key", GCS_NO_OAUTH.into()),
        ("allow_http", "true".into()),
    ];
    let cfg = base_cfg(
        (0..BUCKETS).map(|k| format!("gs://gcs-{k}/vol1")).collect(),
        opts,
    );
    let inspect = (0..BUCKETS)
        .map(|k| {
            Arc::new(
                GoogleCloudStorageBuilder::new()
                    .with_base_url(&base)
                    .with_bucket_name(format!("gcs-{k}"))
                    .with_service_account_key(GCS_NO_OAUTH)
                    .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
                    .build()
                    .unwrap(),
            ) as Arc<dyn ObjectStore>
        })
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
        .map(|k| {
            let dir = root.path().join(format!("bucket-{k}"));
            std::fs::create_dir_all(&dir).unwrap();
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap())
                as Arc<dyn ObjectStore>
        })
        .collect();
    round_trip("local directory", cfg, inspect, "").await;
}

// ------------------------------------------------------------------ Azurite

const AZ_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known development key (public, in Microsoft's docs).
const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Creates a container with a SharedKey-signed `PUT ?restype=container`:
/// object_store has no call for it.
async fn az_create_container(port: u16, container: &str) {
    use base64::Engine;
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let version = "2021-08-06";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZ_ACCOUNT}/{AZ_ACCOUNT}/{container}\nrestype:container"
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(AZ_KEY)
        .unwrap();
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        to_sign.as_bytes(),
    );
    let sig = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    let resp = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{port}/{AZ_ACCOUNT}/{container}?restype=container"
        ))
        .header("x-ms-date", date)
        .header("x-ms-version", version)
        .header("Authorization", format!("SharedKey {AZ_ACCOUNT}:{sig}"))
        .header("Content-Length", "0")
        .send()
        .await
        .expect("create container request");
    assert!(
        resp.status().is_success(),
        "create container {container}: {} {:?}",
        resp.status(),
        resp.text().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_azurite_three_containers() {
    use object_store::azure::MicrosoftAzureBuilder;
    strata_objbacker::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new("azurite-blob")
        .args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "-l",
        ])
        .arg(dir.path())
        .arg("--skipApiVersionCheck")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let _server = match child {
        Ok(c) => KillOnDrop(c),
        Err(e) => panic!(
            "cannot start azurite-blob ({e}). Install it with `bash .ci/install-objstores.sh` (npm install --global azurite@3)"
        ),
    };
    let t = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "azurite-blob did not listen on {port} within 30s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for k in 0..BUCKETS {
        az_create_container(port, &format!("strata-{k}")).await;
    }
    let endpoint = format!("http://127.0.0.1:{port}/{AZ_ACCOUNT}");
    let opts = vec![
        ("azure_storage_account_name", AZ_ACCOUNT.to_string()),
        ("azure_storage_account_key", AZ_KEY.to_string()),
        ("azure_storage_endpoint", endpoint.clone()),
        ("allow_http", "true".into()),
    ];
    let cfg = base_cfg(
        (0..BUCKETS)
            .map(|k| format!("az://strata-{k}/vol1"))
            .collect(),
        opts,
    );
    let inspect = (0..BUCKETS)
        .map(|k| {
            Arc::new(
                MicrosoftAzureBuilder::new()
                    .with_account(AZ_ACCOUNT)
                    .with_access_key(AZ_KEY)
                    .with_endpoint(endpoint.clone())
                    .with_allow_http(true)
                    .with_container_name(format!("strata-{k}"))
                    .build()
                    .unwrap(),
            ) as Arc<dyn ObjectStore>
        })
        .collect();
    round_trip("azure (azurite)", cfg, inspect, "vol1").await;
}
