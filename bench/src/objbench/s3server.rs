//! An embedded S3 server (s3s-fs over a local directory) on 127.0.0.1:0
//! that counts the requests it receives, per key prefix, so the benchmark
//! can say how many PUTs a workload caused at the store. Only in builds
//! with the `s3-server` feature.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use super::s3::ReqCounts;

/// SigV4 credentials of the embedded server.
pub const ACCESS_KEY: &str = "strata-bench-ak";
pub const SECRET_KEY: &str = "strata-bench-secret-key";

#[derive(Default)]
pub struct Counter {
    by_prefix: Mutex<HashMap<String, ReqCounts>>,
}

impl Counter {
    fn record(&self, method: &hyper::Method, path: &str, len: u64) {
        let mut seg = path.trim_start_matches('/').split('/');
        let _bucket = seg.next();
        let prefix = match (seg.next(), seg.next()) {
            (Some(p), Some(_)) => p,
            _ => "",
        };
        let mut m = self.by_prefix.lock().expect("counter poisoned");
        let c = m.entry(prefix.to_string()).or_default();
        match *method {
            hyper::Method::PUT => {
                c.puts += 1;
                c.put_bytes += len;
            }
            hyper::Method::GET => c.gets += 1,
            hyper::Method::DELETE => c.deletes += 1,
            _ => c.other += 1,
        }
    }

    /// Counts so far for keys under `prefix`.
    pub fn get(&self, prefix: &str) -> ReqCounts {
        self.by_prefix
            .lock()
            .expect("counter poisoned")
            .get(prefix)
            .copied()
            .unwrap_or_default()
    }
}

pub struct S3Server {
    pub addr: SocketAddr,
    pub counter: Arc<Counter>,
    task: tokio::task::JoinHandle<()>,
}

impl S3Server {
    /// Serves s3s-fs over `root` (each subdirectory is a bucket) on the
    /// current tokio runtime.
    pub async fn start(root: &Path) -> Result<Self> {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use hyper_util::server::conn::auto::Builder as ConnBuilder;
        let fs = s3s_fs::FileSystem::new(root)
            .map_err(|e| anyhow::anyhow!("s3s-fs over {}: {e:?}", root.display()))?;
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let counter = Arc::new(Counter::default());
        let c = counter.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let s = service.clone();
                let len = req
                    .headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                c.record(req.method(), req.uri().path(), len);
                async move { hyper::service::Service::call(&s, req).await }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the embedded S3 server")?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let conn = http
                    .serve_connection(TokioIo::new(sock), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(Self {
            addr,
            counter,
            task,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
