//! `strata bench s3-proxy`: an HTTP/1.1 proxy that holds every request
//! until a fixed delay after its head arrived, then forwards it to one
//! upstream; responses are copied back unchanged.
//!
//! It puts the same network latency in front of an S3 server for every
//! client (s3fs-fuse, objbacker), so they can be compared under one
//! "20 ms to every request", which objbacker's own `inject_latency_ms`
//! cannot do for another program.
//!
//! Framing is per connection and sequential: a request head (up to
//! CRLFCRLF), then its body framed by Content-Length. S3 clients do not
//! pipeline, and even a pipelined request would only be seen, and timed,
//! after the previous one was forwarded. Chunked request bodies are
//! refused (`501`, then the connection is closed): neither object_store nor
//! s3fs sends them. The parser ([`Framer`]) is pure, bytes in and frames
//! out; the I/O around it is [`serve`].
//!
//! Bounds: at most `max_conns` client connections are served at once (more
//! wait in the listen backlog), and each buffers at most `buf_bytes` of
//! request bytes (beyond that it stops reading, so TCP pushes back). Body
//! bytes stream through after the delay: a 10 MB multipart part is never
//! held whole. Responses are copied by a fixed-size buffer.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head accepted (request line + headers).
pub const MAX_HEAD: usize = 64 * 1024;

/// What the framer found at the start of the unconsumed input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete request head of `len` bytes (CRLFCRLF included), whose
    /// body is `body_len` bytes.
    Head {
        len: usize,
        method: String,
        target: String,
        body_len: u64,
    },
    /// `len` bytes of the current request's body.
    Body { len: usize },
}

/// Why a request cannot be framed; each maps to the status the proxy
/// answers before closing the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed request line {0:?}")]
    BadRequestLine(String),
    #[error("malformed header line {0:?}")]
    BadHeader(String),
    #[error("bad Content-Length {0:?}")]
    BadContentLength(String),
    #[error(
        "chunked request bodies (Transfer-Encoding: {0}) are not supported by this proxy; \
         send a Content-Length"
    )]
    Chunked(String),
}

impl FrameError {
    /// Status line the proxy answers with.
    pub fn status(&self) -> &'static str {
        match self {
            FrameError::HeadTooLarge => "431 Request Header Fields Too Large",
            FrameError::Chunked(_) => "501 Not Implemented",
            _ => "400 Bad Request",
        }
    }
}

/// Sans-IO request framer: call [`Framer::next`] with the unconsumed bytes
/// of a connection, consume what the returned frame says, repeat.
#[derive(Debug, Default)]
pub struct Framer {
    /// Body bytes of the current request not yet framed.
    remaining: u64,
}

impl Framer {
    pub fn new() -> Self {
        Self::default()
    }

    /// True between a head and the end of its body.
    pub fn in_body(&self) -> bool {
        self.remaining > 0
    }

    /// The next frame at the start of `buf`, or None when more bytes are
    /// needed (an incomplete head, or an empty `buf`).
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<Frame>, FrameError> {
        if self.remaining > 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            let len = (buf.len() as u64).min(self.remaining) as usize;
            self.remaining -= len as u64;
            return Ok(Some(Frame::Body { len }));
        }
        let Some(end) = find_crlfcrlf(&buf[..buf.len().min(MAX_HEAD)]) else {
            if buf.len() >= MAX_HEAD {
                return Err(FrameError::HeadTooLarge);
            }
            return Ok(None);
        };
        let len = end + 4;
        let head = parse_head(&buf[..end])?;
        self.remaining = head.2;
        Ok(Some(Frame::Head {
            len,
            method: head.0,
            target: head.1,
            body_len: head.2,
        }))
    }
}

fn find_crlfcrlf(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n")
}

/// (method, target, body length) of a head without its final CRLFCRLF.
fn parse_head(head: &[u8]) -> Result<(String, String, u64), FrameError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let rl = lines.next().unwrap_or_default();
    let mut parts = rl.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(FrameError::BadRequestLine(rl.into()));
    };
    if method.is_empty()
        || target.is_empty()
        || !method.bytes().all(|c| c.is_ascii_uppercase())
        || !version.starts_with("HTTP/1.")
    {
        return Err(FrameError::BadRequestLine(rl.into()));
    }
    let mut body_len: Option<u64> = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(FrameError::BadHeader(line.into()));
        };
        if name.is_empty() || name.ends_with(' ') || name.ends_with('\t') {
            return Err(FrameError::BadHeader(line.into()));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("transfer-encoding") {
            // Any transfer coding means the body is not framed by
            // Content-Length (RFC 9112 §6.1); all of them end in chunked.
            return Err(FrameError::Chunked(value.into()));
        }
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|c| c.is_ascii_digit()) {
                return Err(FrameError::BadContentLength(value.into()));
            }
            let n: u64 = value
                .parse()
                .map_err(|_| FrameError::BadContentLength(value.into()))?;
            if body_len.is_some_and(|m| m != n) {
                return Err(FrameError::BadContentLength(value.into()));
            }
            body_len = Some(n);
        }
    }
    Ok((method.into(), target.into(), body_len.unwrap_or(0)))
}

#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Address to listen on, e.g. 127.0.0.1:9001.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The S3 server, e.g. 127.0.0.1:9000.
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Delay added to every request, from the arrival of its head.
    #[arg(long, default_value_t = 20.0)]
    pub delay_ms: f64,
    /// Client connections served at once; more wait in the backlog.
    #[arg(long, default_value_t = 256)]
    pub max_conns: usize,
    /// Request bytes buffered per connection.
    #[arg(long, default_value_t = 256 * 1024)]
    pub buf_bytes: usize,
    /// Append one line per request: Unix time in ms at the head's arrival,
    /// connection number, method, target, body bytes.
    #[arg(long)]
    pub log: Option<std::path::PathBuf>,
}

/// Counters over the proxy's life, printed on exit.
#[derive(Default)]
pub struct ProxyStats {
    pub conns: AtomicU64,
    pub requests: AtomicU64,
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub other: AtomicU64,
    pub req_body_bytes: AtomicU64,
    pub resp_bytes: AtomicU64,
    pub refused: AtomicU64,
}

impl ProxyStats {
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "s3-proxy: {} connections, {} requests ({} PUT, {} GET, {} other), \
             {} request body bytes, {} response bytes, {} refused",
            g(&self.conns),
            g(&self.requests),
            g(&self.puts),
            g(&self.gets),
            g(&self.other),
            g(&self.req_body_bytes),
            g(&self.resp_bytes),
            g(&self.refused)
        )
    }
}

type Log = Option<Arc<std::sync::Mutex<std::io::BufWriter<std::fs::File>>>>;

/// Entry point for `strata bench s3-proxy`: runs until SIGINT or SIGTERM.
pub fn cmd_s3_proxy(a: ProxyArgs) -> Result<()> {
    anyhow::ensure!(
        a.delay_ms >= 0.0 && a.delay_ms <= 60_000.0,
        "--delay-ms out of [0, 60000]"
    );
    anyhow::ensure!(a.max_conns >= 1, "--max-conns must be at least 1");
    anyhow::ensure!(a.buf_bytes >= 4096, "--buf-bytes must be at least 4096");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("s3-proxy")
        .enable_all()
        .build()?;
    let stats = Arc::new(ProxyStats::default());
    let log: Log = match &a.log {
        Some(p) => Some(Arc::new(std::sync::Mutex::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        )))),
        None => None,
    };
    let res = rt.block_on(async {
        let l = TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        eprintln!(
            "s3-proxy: listening on {} -> {}, {} ms per request",
            l.local_addr()?,
            a.upstream,
            a.delay_ms
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = serve(l, a.clone(), stats.clone(), log.clone()) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        }
    });
    if let Some(l) = &log
        && let Ok(mut w) = l.lock()
    {
        let _ = w.flush();
    }
    eprintln!("{}", stats.summary());
    res
}

/// Accepts connections on `l` and proxies each to `a.upstream`.
pub async fn serve(l: TcpListener, a: ProxyArgs, stats: Arc<ProxyStats>, log: Log) -> Result<()> {
    let sem = Arc::new(tokio::sync::Semaphore::new(a.max_conns));
    let delay = Duration::from_secs_f64(a.delay_ms / 1000.0);
    loop {
        let permit = sem.clone().acquire_owned().await?;
        let (c, _) = l.accept().await?;
        let id = stats.conns.fetch_add(1, Ordering::Relaxed);
        let (stats, log, upstream, buf) = (stats.clone(), log.clone(), a.upstream, a.buf_bytes);
        tokio::spawn(async move {
            if let Err(e) = conn(c, upstream, delay, buf, id, &stats, &log).await {
                eprintln!("s3-proxy: connection {id}: {e:#}");
            }
            drop(permit);
        });
    }
}

async fn conn(
    client: TcpStream,
    upstream: SocketAddr,
    delay: Duration,
    buf_bytes: usize,
    id: u64,
    stats: &ProxyStats,
    log: &Log,
) -> Result<()> {
    client.set_nodelay(true)?;
    let up = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connecting upstream {upstream}"))?;
    up.set_nodelay(true)?;
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    // Responses: copied back unchanged. A response is not framed: the
    // request side is what carries the delay. Ends at the upstream's EOF
    // and hands the client's write half back.
    let back = async {
        let mut b = vec![0u8; 64 * 1024];
        loop {
            let n = ur.read(&mut b).await?;
            if n == 0 {
                break;
            }
            stats.resp_bytes.fetch_add(n as u64, Ordering::Relaxed);
            cw.write_all(&b[..n]).await?;
        }
        anyhow::Ok(cw)
    };
    // Requests: framed, each held until `delay` after its head arrived.
    // Ends at the client's EOF (Ok(None)) or at a request it cannot frame
    // (Ok(Some(e))); either way the upstream then sees EOF, answers what
    // it has, and closes.
    let fwd = async {
        let r = forward(&mut cr, &mut uw, delay, buf_bytes, id, stats, log).await;
        let _ = uw.shutdown().await;
        r
    };
    let (fr, br) = tokio::join!(fwd, back);
    let mut cw = br?;
    match fr? {
        None => {}
        Some(e) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            // After the answers to the requests before it, in order.
            let msg = format!("s3-proxy: {e}\n");
            let resp = format!(
                "HTTP/1.1 {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}",
                e.status(),
                msg.len()
            );
            let _ = cw.write_all(resp.as_bytes()).await;
            let _ = cw.shutdown().await;
            anyhow::bail!("refused a request: {e}");
        }
    }
    cw.shutdown().await?;
    Ok(())
}

async fn forward(
    cr: &mut tokio::net::tcp::OwnedReadHalf,
    uw: &mut tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    buf_bytes: usize,
    id: u64,
    stats: &ProxyStats,
    log: &Log,
) -> Result<Option<FrameError>> {
    let mut f = Framer::new();
    let mut buf: Vec<u8> = Vec::with_capacity(buf_bytes);
    let mut rbuf = vec![0u8; buf_bytes];
    let mut eof = false;
    loop {
        match f.next(&buf) {
            Ok(Some(Frame::Head {
                len,
                method,
                target,
                body_len,
            })) => {
                // The head is complete now and was not before the last
                // read, so this is when it arrived.
                let arrived = Instant::now();
                stats.requests.fetch_add(1, Ordering::Relaxed);
                match method.as_str() {
                    "PUT" => &stats.puts,
                    "GET" => &stats.gets,
                    _ => &stats.other,
                }
                .fetch_add(1, Ordering::Relaxed);
                stats.req_body_bytes.fetch_add(body_len, Ordering::Relaxed);
                if let Some(l) = log
                    && let Ok(mut w) = l.lock()
                {
                    let _ = writeln!(w, "{:.3} {id} {method} {target} {body_len}", unix_ms());
                }
                tokio::time::sleep_until((arrived + delay).into()).await;
                uw.write_all(&buf[..len]).await?;
                buf.drain(..len);
                continue;
            }
            Ok(Some(Frame::Body { len })) => {
                uw.write_all(&buf[..len]).await?;
                buf.drain(..len);
                continue;
            }
            Ok(None) => {}
            Err(e) => return Ok(Some(e)),
        }
        if eof {
            anyhow::ensure!(
                buf.is_empty() && !f.in_body(),
                "client closed mid-request ({} bytes unframed)",
                buf.len()
            );
            return Ok(None);
        }
        // Read more, within the bound. The buffer is only ever full of an
        // incomplete head (a body frame drains whatever is buffered).
        let room = buf_bytes - buf.len();
        if room == 0 {
            return Ok(Some(FrameError::HeadTooLarge));
        }
        let n = cr.read(&mut rbuf[..room]).await?;
        eof = n == 0;
        buf.extend_from_slice(&rbuf[..n]);
    }
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests framed from `input` fed in `chunk`-byte pieces, as a
    /// connection would see them: (method, target, body) per request.
    fn frame_all(input: &[u8], chunk: usize) -> Result<Vec<(String, String, Vec<u8>)>, FrameError> {
        let mut f = Framer::new();
        let mut buf = Vec::new();
        let mut out: Vec<(String, String, Vec<u8>)> = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(fr) = f.next(&buf)? {
                match fr {
                    Frame::Head {
                        len,
                        method,
                        target,
                        ..
                    } => {
                        out.push((method, target, Vec::new()));
                        buf.drain(..len);
                    }
                    Frame::Body { len } => {
                        out.last_mut().expect("head first").2.extend(&buf[..len]);
                        buf.drain(..len);
                    }
                }
            }
        }
        assert!(buf.is_empty() && !f.in_body(), "input ends mid-request");
        Ok(out)
    }

    fn put(key: &str, body: &[u8]) -> Vec<u8> {
        let mut v = format!(
            "PUT /b/{key} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn back_to_back_requests_frame_alike_in_any_chunking() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut input = put("k0", &body);
        input.extend_from_slice(b"GET /b/k0 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n");
        // A body that itself contains CRLFCRLF and looks like a head.
        input.extend(put("k1", b"\r\n\r\nGET /evil HTTP/1.1\r\n\r\n"));
        input.extend_from_slice(b"DELETE /b/k1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        let want = vec![
            ("PUT".to_string(), "/b/k0".to_string(), body.clone()),
            ("GET".into(), "/b/k0".into(), Vec::new()),
            (
                "PUT".into(),
                "/b/k1".into(),
                b"\r\n\r\nGET /evil HTTP/1.1\r\n\r\n".to_vec(),
            ),
            ("DELETE".into(), "/b/k1".into(), Vec::new()),
        ];
        for chunk in [1, 2, 3, 7, 64, 1000, 65536, input.len()] {
            assert_eq!(frame_all(&input, chunk).unwrap(), want, "chunk {chunk}");
        }
    }

    #[test]
    fn head_is_reported_only_when_complete() {
        let mut f = Framer::new();
        assert_eq!(f.next(b"GET / HTTP/1.1\r\nHost: x\r\n\r").unwrap(), None);
        assert_eq!(f.next(b"").unwrap(), None);
        let h = f
            .next(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            h,
            Frame::Head {
                len: 27,
                method: "GET".into(),
                target: "/".into(),
                body_len: 0
            }
        );
        assert!(!f.in_body());
    }

    #[test]
    fn body_frames_stop_at_content_length() {
        let mut f = Framer::new();
        let head = b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        assert!(matches!(
            f.next(head).unwrap(),
            Some(Frame::Head { body_len: 5, .. })
        ));
        assert_eq!(f.next(b"abc").unwrap(), Some(Frame::Body { len: 3 }));
        assert!(f.in_body());
        // The next request's bytes are not the body's.
        assert_eq!(f.next(b"deGET").unwrap(), Some(Frame::Body { len: 2 }));
        assert!(!f.in_body());
        assert_eq!(f.next(b"GET").unwrap(), None);
    }

    #[test]
    fn chunked_bodies_are_refused_with_a_clear_error() {
        let e = frame_all(
            b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            16,
        )
        .unwrap_err();
        assert_eq!(e, FrameError::Chunked("chunked".into()));
        assert!(e.to_string().contains("not supported"));
        assert_eq!(e.status(), "501 Not Implemented");
    }

    #[test]
    fn malformed_heads_are_refused() {
        let cases: &[(&[u8], FrameError)] = &[
            (
                b"PUT /x HTTP/1.1\r\nContent-Length: 12x\r\n\r\n",
                FrameError::BadContentLength("12x".into()),
            ),
            (
                b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                FrameError::BadContentLength("-1".into()),
            ),
            (
                b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                FrameError::BadContentLength("2".into()),
            ),
            (
                b"PUT /x HTTP/1.1\r\nContent-Length : 1\r\n\r\n",
                FrameError::BadHeader("Content-Length : 1".into()),
            ),
            (
                b"PUT /x\r\n\r\n",
                FrameError::BadRequestLine("PUT /x".into()),
            ),
            (
                b"PUT /x SPDY/3\r\n\r\n",
                FrameError::BadRequestLine("PUT /x SPDY/3".into()),
            ),
            (
                b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
                FrameError::BadHeader("no colon here".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Framer::new().next(input).unwrap_err(), *want);
            assert_eq!(want.status(), "400 Bad Request");
        }
    }

    #[test]
    fn oversized_head_is_refused_not_buffered_for_ever() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(
            Framer::new().next(&big).unwrap_err(),
            FrameError::HeadTooLarge
        );
        assert_eq!(
            FrameError::HeadTooLarge.status(),
            "431 Request Header Fields Too Large"
        );
        // Just under the bound it still waits for more.
        assert_eq!(Framer::new().next(&big[..MAX_HEAD - 1]).unwrap(), None);
    }

    #[test]
    fn whitespace_around_values_and_header_case_are_accepted() {
        let head = "POST /b/k?uploads HTTP/1.1\r\ncOnTeNt-LeNgTh:\t 3 \r\n\r\n";
        let mut f = Framer::new();
        let fr = f.next(format!("{head}abc").as_bytes()).unwrap();
        assert_eq!(
            fr,
            Some(Frame::Head {
                len: head.len(),
                method: "POST".into(),
                target: "/b/k?uploads".into(),
                body_len: 3
            })
        );
        assert_eq!(f.next(b"abc").unwrap(), Some(Frame::Body { len: 3 }));
    }
}
