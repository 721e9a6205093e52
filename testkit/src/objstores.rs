//! Real object-store protocol servers on 127.0.0.1, and object_store
//! clients to look inside them.
//!
//! * S3: s3s-fs embedded in the test process, on its own tokio runtime so a
//!   test can take it down ([`S3s::stop`]: every connection dies at once)
//!   and bring it back on the same port and directory ([`S3s::restart`]).
//! * Azure Blob: Azurite 3 (npm), spawned and killed by the test (its whole
//!   process group, on drop; the kernel kills it if the test process dies).
//!   A missing binary fails the test with the install command; it never
//!   skips.
//! * GCS: object_store's GCS client against s3s-fs with the empty
//!   `Authorization: Bearer` header dropped (see [`GCS_NO_OAUTH`]).
//! * Local directory: `file:///…`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};

pub const AK: &str = "strata-test-ak";
pub const SK: &str = "strata-test-secret-key";

/// rustls' ring provider as the process default, which object_store's
/// HTTP client needs before its first request (the same one
/// strata-objbacker installs; installing twice is harmless).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A multi-thread runtime for the test's own async work (listing buckets,
/// creating containers).
pub fn runtime() -> tokio::runtime::Runtime {
    install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------- s3s-fs

/// s3s-fs serving `root` (one sub-directory per bucket) on 127.0.0.1.
pub struct S3s {
    pub addr: SocketAddr,
    root: PathBuf,
    auth: bool,
    rt: Option<tokio::runtime::Runtime>,
}

impl S3s {
    /// SigV4-checked S3 server (`auth`), or the GCS-mode server that drops
    /// the `Authorization` header (`!auth`).
    pub fn start(root: &Path, auth: bool) -> S3s {
        Self::start_on(root, auth, 0)
    }

    pub fn start_on(root: &Path, auth: bool, port: u16) -> S3s {
        // The port may still be held for a moment by the previous
        // instance's sockets being torn down: retry the bind briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("s3s-fs cannot bind 127.0.0.1:{port}: {e}"),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("s3s-fs")
            .enable_all()
            .build()
            .unwrap();
        let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs root");
        rt.spawn(serve_s3s(listener, fs, auth));
        S3s {
            addr,
            root: root.to_path_buf(),
            auth,
            rt: Some(rt),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Takes the server down: the listener and every open connection close
    /// at once (the runtime that owns them is dropped).
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }

    /// Brings it back on the same port over the same directory.
    pub fn restart(&mut self) {
        self.stop();
        *self = Self::start_on(&self.root.clone(), self.auth, self.addr.port());
    }
}

impl Drop for S3s {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve_s3s(listener: std::net::TcpListener, fs: s3s_fs::FileSystem, auth: bool) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;
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
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
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
}

/// `store_options` for `s3://` buckets on the s3s-fs at `endpoint`.
pub fn s3_options(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("aws_endpoint", endpoint.to_string()),
        ("aws_allow_http", "true".into()),
        ("aws_virtual_hosted_style_request", "false".into()),
        ("aws_region", "us-east-1".into()),
        ("aws_access_key_id", AK.into()),
        ("aws_secret_access_key", SK.into()),
    ]
}

/// [`s3_options`] as a TOML inline table.
pub fn s3_options_toml(endpoint: &str) -> String {
    toml_inline(&s3_options(endpoint))
}

/// `{ k = "v", … }` with the values as TOML basic strings.
pub fn toml_inline(options: &[(&str, String)]) -> String {
    let kv: Vec<String> = options
        .iter()
        .map(|(k, v)| format!("{k} = \"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{ {} }}", kv.join(", "))
}

pub fn s3_store(endpoint: &str, bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region("us-east-1")
            .with_bucket_name(bucket)
            .with_access_key_id(AK)
            .with_secret_access_key(SK)
            .build()
            .unwrap(),
    )
}

// ------------------------------------------------------------------- GCS

/// What the GCS backend's end-to-end test proves: object_store's GCS client
/// (`gs://` URLs, the GCS builder from `store_options`, its XML-API request
/// shapes: path-style PUT, GET with Range, DELETE, `list-type=2` LIST),
/// driven by `strata serve`, against a server that speaks that XML dialect.
/// The server is s3s-fs, an S3 server: GCS's XML API is S3-compatible for
/// these calls, and no GCS emulator that speaks the XML API is in the
/// registries we reach. It does NOT prove GCS authentication (OAuth is
/// disabled through this dummy service-account key, which also keeps the
/// client from asking a cloud metadata service for a token) or any
/// behaviour in which real GCS differs from S3.
pub const GCS_NO_OAUTH: &str =
    r#"{"disable_oauth":true,"client_email":"","private_key":"","private_key_id":""}"#;

/// `store_options` for `gs://` buckets on the s3s-fs (GCS mode) at `base`.
pub fn gcs_options(base: &str) -> Vec<(&'static str, String)> {
    vec![
        ("google_base_url", base.to_string()),
        ("google_service_account_key", GCS_NO_OAUTH.into()),
        ("allow_http", "true".into()),
    ]
}

/// [`gcs_options`] as a TOML inline table.
pub fn gcs_options_toml(base: &str) -> String {
    toml_inline(&gcs_options(base))
}

pub fn gcs_store(base: &str, bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        object_store::gcp::GoogleCloudStorageBuilder::new()
            .with_base_url(base)
            .with_bucket_name(bucket)
            .with_service_account_key(GCS_NO_OAUTH)
            .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
            .build()
            .unwrap(),
    )
}

// ---------------------------------------------------------------- Azurite

pub const AZ_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known development key (public, in Microsoft's docs).
pub const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A spawned `azurite-blob` (see [`crate::guard_command`]), killed with its
/// process group and reaped on drop.
pub struct Azurite {
    child: Child,
    pub port: u16,
}

impl Azurite {
    /// Spawns Azurite's blob service over `dir` and waits until it listens.
    /// Panics (the test fails, it does not skip) when it is not installed.
    pub fn start(dir: &Path) -> Azurite {
        let port = crate::free_port();
        let child = crate::guard_command(&mut Command::new("azurite-blob"))
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "-l",
            ])
            .arg(dir)
            .arg("--skipApiVersionCheck")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start azurite-blob ({e}). Install it with `bash .ci/install-objstores.sh` (npm install --global azurite@3)"
                )
            });
        let mut az = Azurite { child, port };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = az.child.try_wait() {
                panic!("azurite-blob exited ({st}) before listening on {port}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "azurite-blob did not listen on {port} within 30s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        az
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZ_ACCOUNT}", self.port)
    }

    /// Creates a container with a SharedKey-signed `PUT ?restype=container`:
    /// object_store has no call for it.
    pub async fn create_container(&self, container: &str) {
        use base64::Engine;
        let port = self.port;
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

    /// `store_options` for `az://` containers on this Azurite.
    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("azure_storage_account_name", AZ_ACCOUNT.into()),
            ("azure_storage_account_key", AZ_KEY.into()),
            ("azure_storage_endpoint", self.endpoint()),
            ("allow_http", "true".into()),
        ]
    }

    /// [`Azurite::options`] as a TOML inline table.
    pub fn options_toml(&self) -> String {
        toml_inline(&self.options())
    }

    pub fn store(&self, container: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            object_store::azure::MicrosoftAzureBuilder::new()
                .with_account(AZ_ACCOUNT)
                .with_access_key(AZ_KEY)
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .with_container_name(container)
                .build()
                .unwrap(),
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        crate::kill_and_reap(&mut self.child);
    }
}

// --------------------------------------------------------- local directory

pub fn local_store(dir: &Path) -> Arc<dyn ObjectStore> {
    std::fs::create_dir_all(dir).unwrap();
    Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap())
}

// ------------------------------------------------------------- inspection

/// Every key under `prefix` (None: the whole bucket) with its size, sorted.
pub async fn list(store: &dyn ObjectStore, prefix: Option<&str>) -> Vec<(String, u64)> {
    let p = prefix.map(object_store::path::Path::from);
    let mut v: Vec<(String, u64)> = store
        .list(p.as_ref())
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .expect("list bucket");
    v.sort();
    v
}

/// The object at `key`, None when there is none.
pub async fn get(store: &dyn ObjectStore, key: &str) -> Option<Vec<u8>> {
    match store.get(&object_store::path::Path::from(key)).await {
        Ok(r) => Some(r.bytes().await.expect("body").to_vec()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("get {key}: {e}"),
    }
}
