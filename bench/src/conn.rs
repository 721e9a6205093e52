//! One NVMe/TCP connection seen from the host: socket, receive buffer,
//! transmit buffer and the negotiated codec settings.
//!
//! The hot path is built so that the initiator's own cost stays small and
//! visible: buffers are allocated once per connection, many PDUs are parsed
//! out of one `recv`, and everything queued in `tx` leaves in one `send`.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use strata_target::host;
use strata_target::pdu::{self, DIGEST_LEN, DecodeConfig, Parsed, PduHeader, Role, crc32c};

/// How long a blocking receive waits before handing control back to the
/// caller's loop, so deadlines and keep-alives are noticed even when the
/// target has nothing to say.
const RECV_SLICE: Duration = Duration::from_millis(20);

pub struct Conn {
    sock: TcpStream,
    rbuf: Vec<u8>,
    /// Unconsumed bytes are `rbuf[rpos..rlen]`.
    rpos: usize,
    rlen: usize,
    pub tx: Vec<u8>,
    txpos: usize,
    pub cfg: DecodeConfig,
    pub maxh2cdata: u32,
    pub peer: SocketAddr,
}

/// A PDU whose header was decoded and whose bytes are all in the buffer.
/// `data` is the range of the payload within [`Conn::rx_bytes`].
pub struct RxPdu {
    pub header: PduHeader,
    pub data: std::ops::Range<usize>,
}

pub fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

impl Conn {
    /// TCP connect and ICReq/ICResp exchange. `max_data` bounds the largest
    /// data PDU accepted from the target and sizes the receive buffer.
    pub fn connect(
        addr: SocketAddr,
        hdgst: bool,
        ddgst: bool,
        max_data: u32,
        timeout: Duration,
    ) -> Result<Self> {
        let sock = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        // Latency is the product; Nagle would add up to 40 ms to small PDUs.
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(RECV_SLICE))?;
        // Room for two full data PDUs, so a PDU straddling the end of one
        // recv never needs the buffer to grow.
        let rcap = 2 * (max_data as usize + 4096).max(64 * 1024);
        let mut c = Self {
            sock,
            rbuf: vec![0; rcap],
            rpos: 0,
            rlen: 0,
            tx: Vec::with_capacity(64 * 1024),
            txpos: 0,
            cfg: DecodeConfig::initial(Role::Host),
            maxh2cdata: 0,
            peer: addr,
        };
        let req = host::icreq(hdgst, ddgst);
        pdu::encode_icreq(&req, &mut c.tx);
        c.flush_blocking(timeout)?;
        let deadline = Instant::now() + timeout;
        let p = c.next_pdu_blocking(deadline)?;
        let PduHeader::ICResp(resp) = p.header else {
            bail!("target answered ICReq with {:?}", p.header.pdu_type());
        };
        pdu::validate_icresp(&req, &resp).map_err(|e| anyhow!("target's {e}"))?;
        c.cfg = DecodeConfig {
            role: Role::Host,
            hdgst,
            ddgst,
            max_data,
            connected: true,
        };
        c.maxh2cdata = resp.maxh2cdata;
        Ok(c)
    }

    pub fn rx_bytes(&self) -> &[u8] {
        &self.rbuf
    }

    pub fn tx_pending(&self) -> bool {
        self.txpos < self.tx.len()
    }

    /// Sends what the socket takes without blocking.
    pub fn flush_nonblocking(&mut self) -> Result<()> {
        while self.tx_pending() {
            let buf = &self.tx[self.txpos..];
            // SAFETY: buf is a valid initialized slice for the call.
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock => return Ok(()),
                    ErrorKind::Interrupted => continue,
                    _ => return Err(e).context("sending to target"),
                }
            }
            self.txpos += n as usize;
        }
        self.tx.clear();
        self.txpos = 0;
        Ok(())
    }

    pub fn flush_blocking(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.flush_nonblocking()?;
            if !self.tx_pending() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("timed out sending to target {}", self.peer);
            }
            self.wait(libc::POLLOUT, RECV_SLICE)?;
        }
    }

    fn wait(&self, events: libc::c_short, timeout: Duration) -> Result<libc::c_short> {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e).context("poll");
        }
        Ok(pfd.revents)
    }

    /// Moves bytes from the socket into the receive buffer, sending pending
    /// tx on the way. Waits at most about `timeout`; returns whether bytes
    /// arrived. Offsets of PDUs returned earlier become invalid.
    pub fn fill(&mut self, timeout: Duration) -> Result<bool> {
        if self.rpos == self.rlen {
            self.rpos = 0;
            self.rlen = 0;
        } else if self.rbuf.len() - self.rlen < self.rbuf.len() / 2 {
            self.rbuf.copy_within(self.rpos..self.rlen, 0);
            self.rlen -= self.rpos;
            self.rpos = 0;
        }
        if self.rlen == self.rbuf.len() {
            bail!(
                "target sent a PDU larger than the {} byte receive buffer",
                self.rbuf.len()
            );
        }
        self.flush_nonblocking()?;
        let flags = if self.tx_pending() || timeout < RECV_SLICE {
            // Either we must also watch for POLLOUT (a blocking recv could
            // deadlock against a target that stopped reading until we do),
            // or the caller wants a shorter wait than the socket timeout.
            let mut ev = libc::POLLIN;
            if self.tx_pending() {
                ev |= libc::POLLOUT;
            }
            let rev = self.wait(ev, timeout)?;
            if rev & libc::POLLOUT != 0 {
                self.flush_nonblocking()?;
            }
            if rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
                return Ok(false);
            }
            libc::MSG_DONTWAIT
        } else {
            // The common case costs one syscall: a recv that blocks until
            // the next completion (or RECV_SLICE passes).
            0
        };
        let buf = &mut self.rbuf[self.rlen..];
        let fd = self.sock.as_raw_fd();
        // Optional busy-poll before a blocking recv, as spdk_nvme_perf
        // polls: removes the initiator's own wakeup from QD1 latency. It
        // polls with a zero-timeout `poll`, not an empty `recv`: an empty
        // recv takes the socket lock the target's transmit path needs to
        // deliver into this socket (the target's driver made the same
        // change, see docs/ARCHITECTURE.md "The QD1 round trip").
        let spin = poll_window();
        let mut n = -1;
        if flags == 0 && !spin.is_zero() {
            let t0 = std::time::Instant::now();
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            while t0.elapsed() < spin {
                // SAFETY: one valid pollfd; a zero timeout never blocks.
                if unsafe { libc::poll(&mut pfd, 1, 0) } != 0 {
                    // SAFETY: buf is valid writable memory of the given length.
                    n = unsafe {
                        libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
                    };
                    if n >= 0 || std::io::Error::last_os_error().kind() != ErrorKind::WouldBlock {
                        break;
                    }
                }
            }
        }
        if n < 0 {
            // SAFETY: buf is valid writable memory of the given length.
            n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted => Ok(false),
                ErrorKind::ConnectionReset => Err(anyhow!(
                    "target {} closed the connection (reset)",
                    self.peer
                )),
                _ => Err(e).with_context(|| format!("receiving from target {}", self.peer)),
            };
        }
        if n == 0 {
            bail!("target {} closed the connection", self.peer);
        }
        self.rlen += n as usize;
        Ok(true)
    }

    /// Next complete PDU already in the buffer, if any. Checks the data
    /// digest; the codec checks the header digest.
    pub fn next_pdu(&mut self) -> Result<Option<RxPdu>> {
        let avail = &self.rbuf[self.rpos..self.rlen];
        let parsed: Parsed = match pdu::parse_header(avail, &self.cfg) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(e) => bail!(
                "malformed PDU from target {} (type byte {:#04x}): {e}",
                self.peer,
                avail.first().copied().unwrap_or(0)
            ),
        };
        if avail.len() < parsed.plen {
            return Ok(None);
        }
        let start = self.rpos + parsed.data_offset;
        let data = start..start + parsed.data_len;
        if data.end > self.rpos + parsed.plen
            || (parsed.has_ddgst && data.end + DIGEST_LEN > self.rpos + parsed.plen)
        {
            bail!(
                "malformed PDU from target: data ({} bytes at {}) overruns PLEN {}",
                parsed.data_len,
                parsed.data_offset,
                parsed.plen
            );
        }
        if parsed.has_ddgst {
            let got = u32::from_le_bytes(
                self.rbuf[data.end..data.end + DIGEST_LEN]
                    .try_into()
                    .expect("4 bytes"),
            );
            let want = crc32c(&self.rbuf[data.clone()]);
            if got != want {
                bail!(
                    "data digest error in {:?} from target: got {got:#010x}, computed {want:#010x}",
                    parsed.header.pdu_type()
                );
            }
        }
        if let PduHeader::C2HTermReq(t) = &parsed.header {
            bail!(
                "target terminated the connection: C2HTermReq {:?} (FEI {:#x})",
                t.fes,
                t.fei
            );
        }
        self.rpos += parsed.plen;
        Ok(Some(RxPdu {
            header: parsed.header,
            data,
        }))
    }

    pub fn next_pdu_blocking(&mut self, deadline: Instant) -> Result<RxPdu> {
        loop {
            if let Some(p) = self.next_pdu()? {
                return Ok(p);
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("timed out waiting for a PDU from target {}", self.peer);
            }
            self.fill((deadline - now).min(RECV_SLICE))?;
        }
    }

    /// Half-close: the target sees EOF after everything queued was sent.
    pub fn shutdown(&mut self) {
        let _ = self.flush_blocking(Duration::from_secs(1));
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// `STRATA_BENCH_POLL_US`: how long a queue busy-polls its socket before it
/// blocks (default 0: block at once).
fn poll_window() -> std::time::Duration {
    static W: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *W.get_or_init(|| {
        std::env::var("STRATA_BENCH_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_micros)
            .unwrap_or_default()
    })
}
