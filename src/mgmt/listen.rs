//! Where the management API listens.
//!
//! - **Unix socket (default)**: `<runtime dir>/mgmt.sock`, the directory
//!   mode 0700 and the socket 0600, and every accepted connection's peer
//!   credentials checked (the same user as `strata serve`, or root): nobody
//!   else on the machine can reconfigure the target.
//! - **TCP (opt-in)**: `--mgmt-addr IP:PORT` together with
//!   `--mgmt-token-file FILE` (mode 0600, or refused). Every call carries
//!   `authorization: Bearer <token>`; a missing or wrong token is
//!   UNAUTHENTICATED. The token is not encrypted in transit: bind it to
//!   127.0.0.1 or a management network (TLS comes with the security issue).

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use strata_proto::mgmt::v1::management_server::ManagementServer;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::StreamExt as _;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::server::Service;
use crate::config::{env_path, systemd_dir};

pub const SOCKET_NAME: &str = "mgmt.sock";

/// `$STRATA_RUNTIME_DIR`, else systemd's `$RUNTIME_DIRECTORY`, else
/// `$XDG_RUNTIME_DIR/strata`, else `/run/strata` for root and
/// `/tmp/strata-<uid>` for anyone else.
pub fn default_runtime_dir() -> PathBuf {
    env_path("STRATA_RUNTIME_DIR")
        .or_else(|| systemd_dir("RUNTIME_DIRECTORY"))
        .or_else(|| env_path("XDG_RUNTIME_DIR").map(|d| d.join("strata")))
        .unwrap_or_else(|| {
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            if uid == 0 {
                PathBuf::from("/run/strata")
            } else {
                PathBuf::from(format!("/tmp/strata-{uid}"))
            }
        })
}

pub fn default_socket() -> PathBuf {
    default_runtime_dir().join(SOCKET_NAME)
}

/// Binds the management socket at `path`, refusing if another live
/// `strata serve` answers there, and replacing a stale one (a socket file
/// left by a process that was killed).
pub fn bind_unix(path: &Path) -> Result<UnixListener> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| {
                format!(
                    "management socket {}: cannot create {}; fix: pass --mgmt-socket in a writable directory",
                    path.display(),
                    dir.display()
                )
            })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "management socket {} is answered by another strata serve; fix: stop it, or give this one --mgmt-socket PATH (or STRATA_RUNTIME_DIR)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("management socket {}: cannot bind", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("management socket {}: chmod 0600", path.display()))?;
    Ok(l)
}

/// Only our own user (or root) may talk to us, whatever the file mode.
fn peer_allowed(s: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match s.peer_cred() {
        Ok(c) => c.uid() == me || c.uid() == 0,
        Err(_) => false,
    }
}

pub async fn serve_unix(
    listener: UnixListener,
    svc: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).filter(|s| match s {
        Ok(s) if !peer_allowed(s) => {
            tracing::warn!(
                peer = ?s.peer_cred().map(|c| c.uid()).ok(),
                "management socket: connection from another user refused"
            );
            false
        }
        _ => true,
    });
    tonic::transport::Server::builder()
        .add_service(ManagementServer::new(svc))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("management API (unix socket)")
}

/// Reads a bearer token from a file that only its owner can read.
pub fn read_token(path: &Path) -> Result<String> {
    let md = std::fs::metadata(path)
        .with_context(|| format!("token file {}: cannot read it", path.display()))?;
    if md.mode() & 0o077 != 0 {
        bail!(
            "token file {} has mode {:o}; fix: chmod 600 {}",
            path.display(),
            md.mode() & 0o777,
            path.display()
        );
    }
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("token file {}: cannot read it", path.display()))?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        bail!(
            "token file {}: the token is shorter than 16 characters; fix: write a long random one (e.g. `openssl rand -hex 32`)",
            path.display()
        );
    }
    Ok(t)
}

#[derive(Clone)]
struct TokenCheck {
    want: std::sync::Arc<str>,
}

impl Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if bearer_matches(&req, &self.want) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong token; fix: pass --token-file with the file strata serve was given",
            ))
        }
    }
}

/// Whether the call carries `authorization: Bearer <want>`, compared in
/// constant time (the management and cluster ports share the check).
pub(crate) fn bearer_matches(req: &Request<()>, want: &str) -> bool {
    let got = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(got.as_bytes(), want.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn serve_tcp(
    addr: SocketAddr,
    token: String,
    svc: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let check = TokenCheck { want: token.into() };
    tonic::transport::Server::builder()
        .add_service(ManagementServer::with_interceptor(svc, check))
        .serve_with_shutdown(addr, shutdown)
        .await
        .with_context(|| format!("management API on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("tok");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&p).unwrap(), "0123456789abcdef0123");
    }

    #[test]
    fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("run/mgmt.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = bind_unix(&p).unwrap();
            let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let dmode = std::fs::metadata(p.parent().unwrap()).unwrap().mode() & 0o777;
            assert_eq!(dmode, 0o700);
            let e = bind_unix(&p).unwrap_err().to_string();
            assert!(e.contains("another strata serve"), "{e}");
            drop(l);
            // The file stays behind, as after a kill -9.
            assert!(p.exists());
            bind_unix(&p).unwrap();
        });
    }
}
