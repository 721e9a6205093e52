//! The TCP driver: reactors, listeners and the per-connection loop.
//!
//! SPDK's model: one reactor thread per core, each a single-threaded event
//! loop that owns its connections outright and runs each one to completion
//! (read everything available, execute, reap completions, write everything
//! with one vectored write) before it polls the next. A connection never
//! moves between reactors, so nothing on the I/O path is shared or locked.
//! An acceptor thread owns the listening sockets and deals accepted
//! connections to the reactors round-robin.
//!
//! This file is deliberately thin: every protocol decision lives in
//! [`crate::queue::QueuePair`].

use std::collections::HashMap;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::queue::{CloseReason, QueueLimits, QueuePair};
use crate::subsystem::Target;

/// Bytes read per `read` call. Large enough that a burst of 4 KiB
/// in-capsule writes arrives in one syscall.
const RX_BUF: usize = 256 * 1024;
/// Vectored-write fan-in: many PDUs per `writev`.
const MAX_IOV: usize = 64;
/// Loop iterations before a busy connection yields to its reactor's other
/// connections.
const BUDGET: usize = 32;
const TICK: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Reactor threads; default one per core.
    pub reactors: usize,
    /// Pin reactor i to CPU i (SPDK does; harmless when it fails).
    pub pin_cores: bool,
    pub limits: QueueLimits,
    /// After its last activity a connection keeps polling its socket this
    /// long before it parks in epoll. SPDK polls forever; a short window
    /// catches the host's next command without a sleep and wakeup per batch,
    /// and an idle target still uses no CPU.
    pub poll_us: u64,
    /// Open connections over all listeners; past it a new connection is
    /// closed as soon as it is accepted.
    pub max_connections: usize,
    /// Open connections per listener (port).
    pub max_connections_per_listener: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            reactors: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_cores: true,
            limits: QueueLimits::default(),
            poll_us: 50,
            max_connections: 4096,
            max_connections_per_listener: 2048,
        }
    }
}

/// Keeps the open-connection counts right however a connection task ends,
/// a panic included.
struct ConnCount {
    total: Arc<AtomicUsize>,
    port: Arc<AtomicUsize>,
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        self.port.fetch_sub(1, Ordering::Relaxed);
    }
}

struct NewConn {
    stream: std::net::TcpStream,
    port_id: u16,
    /// Counted at accept; released when the connection task ends.
    count: ConnCount,
}

enum AcceptorCmd {
    Add {
        listener: std::net::TcpListener,
        port_id: u16,
    },
    Remove {
        port_id: u16,
    },
}

/// A running transport. Dropping it without [`Transport::shutdown`] leaves
/// the threads running until the process exits.
pub struct Transport {
    acceptor_tx: mpsc::UnboundedSender<AcceptorCmd>,
    shutdown_tx: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    listeners: HashMap<u16, SocketAddr>,
    /// Connections currently open, over all reactors.
    pub open_connections: Arc<AtomicUsize>,
}

impl Transport {
    pub fn start(target: Arc<Target>, cfg: TransportConfig) -> io::Result<Self> {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        let epoch = Instant::now();
        let mut threads = Vec::new();
        let mut reactor_txs = Vec::new();
        for i in 0..cfg.reactors.max(1) {
            let (tx, rx) = mpsc::unbounded_channel::<NewConn>();
            reactor_txs.push(tx);
            let target = target.clone();
            let shutdown = shutdown_rx.clone();
            let limits = cfg.limits;
            let pin = cfg.pin_cores;
            let poll = Duration::from_micros(cfg.poll_us);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("reactor-{i}"))
                    .spawn(move || {
                        if pin {
                            pin_to_cpu(i);
                        }
                        reactor_main(rx, target, limits, poll, shutdown, epoch)
                    })?,
            );
        }
        let (acceptor_tx, acceptor_rx) = mpsc::unbounded_channel();
        let shutdown = shutdown_rx.clone();
        let acc = Acceptor {
            reactors: reactor_txs,
            open: open.clone(),
            max_total: cfg.max_connections.max(1),
            max_per_port: cfg.max_connections_per_listener.max(1),
            target,
            epoch,
        };
        threads.push(
            std::thread::Builder::new()
                .name("acceptor".into())
                .spawn(move || acceptor_main(acceptor_rx, acc, shutdown))?,
        );
        Ok(Self {
            acceptor_tx,
            shutdown_tx,
            threads,
            listeners: HashMap::new(),
            open_connections: open,
        })
    }

    /// Binds `addr` and serves it as port `port_id`. Returns the bound
    /// address (port 0 picks a free port).
    pub fn add_listener(&mut self, addr: SocketAddr, port_id: u16) -> io::Result<SocketAddr> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        let local = l.local_addr()?;
        self.acceptor_tx
            .send(AcceptorCmd::Add {
                listener: l,
                port_id,
            })
            .map_err(|_| io::Error::other("acceptor thread is gone"))?;
        self.listeners.insert(port_id, local);
        tracing::info!(%local, port_id, "listening");
        Ok(local)
    }

    /// Stops accepting on a port. Connections already made stay up; the
    /// host is steered away by ANA or by the subsystem losing the port.
    pub fn remove_listener(&mut self, port_id: u16) {
        if self.listeners.remove(&port_id).is_some() {
            let _ = self.acceptor_tx.send(AcceptorCmd::Remove { port_id });
            tracing::info!(port_id, "listener removed");
        }
    }

    pub fn listeners(&self) -> &HashMap<u16, SocketAddr> {
        &self.listeners
    }

    /// Closes every listener and connection and joins the threads.
    pub fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(cpu, "could not pin reactor");
        }
    }
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio current-thread runtime")
}

struct Acceptor {
    reactors: Vec<mpsc::UnboundedSender<NewConn>>,
    open: Arc<AtomicUsize>,
    max_total: usize,
    max_per_port: usize,
    target: Arc<Target>,
    epoch: Instant,
}

/// How often the acceptor sweeps the registry for controllers whose
/// keep-alive expired without their connection noticing.
const SWEEP: Duration = Duration::from_secs(1);

fn acceptor_main(
    mut cmds: mpsc::UnboundedReceiver<AcceptorCmd>,
    acc: Acceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    let rt = current_thread_runtime();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let acc = Arc::new(acc);
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks: HashMap<u16, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut sweep = tokio::time::interval(SWEEP);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = sweep.tick() => {
                    let now = acc.epoch.elapsed().as_millis() as u64;
                    acc.target.reap_expired_controllers(now);
                }
                cmd = cmds.recv() => match cmd {
                    None => break,
                    Some(AcceptorCmd::Add { listener, port_id }) => {
                        let Ok(l) = tokio::net::TcpListener::from_std(listener) else { continue };
                        let acc = acc.clone();
                        let next = next.clone();
                        let port_open = Arc::new(AtomicUsize::new(0));
                        let h = tokio::task::spawn_local(async move {
                            // Logged once per episode of being at a limit.
                            let mut at_limit = false;
                            loop {
                                match l.accept().await {
                                    Ok((s, peer)) => {
                                        let total = acc.open.load(Ordering::Relaxed);
                                        let here = port_open.load(Ordering::Relaxed);
                                        if total >= acc.max_total || here >= acc.max_per_port {
                                            if !at_limit {
                                                tracing::warn!(
                                                    %peer, port_id, open = total, on_port = here,
                                                    max = acc.max_total, max_per_listener = acc.max_per_port,
                                                    "connection limit reached: refusing new connections until some close"
                                                );
                                                at_limit = true;
                                            }
                                            drop(s);
                                            continue;
                                        }
                                        at_limit = false;
                                        tracing::debug!(%peer, port_id, "accepted");
                                        let Ok(s) = s.into_std() else { continue };
                                        acc.open.fetch_add(1, Ordering::Relaxed);
                                        port_open.fetch_add(1, Ordering::Relaxed);
                                        let count = ConnCount { total: acc.open.clone(), port: port_open.clone() };
                                        let i = next.fetch_add(1, Ordering::Relaxed) % acc.reactors.len();
                                        let _ = acc.reactors[i].send(NewConn { stream: s, port_id, count });
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "accept failed");
                                        tokio::time::sleep(Duration::from_millis(50)).await;
                                    }
                                }
                            }
                        });
                        if let Some(old) = tasks.insert(port_id, h) {
                            old.abort();
                        }
                    }
                    Some(AcceptorCmd::Remove { port_id }) => {
                        if let Some(h) = tasks.remove(&port_id) {
                            h.abort();
                        }
                    }
                },
            }
        }
        for (_, h) in tasks {
            h.abort();
        }
    });
}

fn reactor_main(
    mut conns: mpsc::UnboundedReceiver<NewConn>,
    target: Arc<Target>,
    limits: QueueLimits,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
    epoch: Instant,
) {
    let rt = current_thread_runtime();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut live = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                c = conns.recv() => {
                    let Some(c) = c else { break };
                    let target = target.clone();
                    let sd = shutdown.clone();
                    live.retain(|h: &tokio::task::JoinHandle<()>| !h.is_finished());
                    live.push(tokio::task::spawn_local(async move {
                        let peer = c.stream.peer_addr().ok();
                        match serve_connection(c, target, limits, poll, sd, epoch).await {
                            Ok(reason) => tracing::debug!(?peer, ?reason, "connection closed"),
                            Err(e) => tracing::debug!(?peer, error = %e, "connection ended"),
                        }
                    }));
                }
            }
        }
        // Let every connection observe the shutdown and drain its bdev I/O.
        for h in live {
            let _ = h.await;
        }
    });
}

/// Drives one connection until it closes.
async fn serve_connection(
    c: NewConn,
    target: Arc<Target>,
    limits: QueueLimits,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
    epoch: Instant,
) -> io::Result<Option<CloseReason>> {
    let _count = c.count;
    c.stream.set_nodelay(true)?;
    c.stream.set_nonblocking(true)?;
    let peer = c.stream.peer_addr().ok();
    let stream = TcpStream::from_std(c.stream)?;
    // Dropping the queue (a panic included) releases its controller.
    let mut qp = QueuePair::new(target, c.port_id, limits);
    if let Some(p) = peer {
        qp.set_peer(p);
    }
    let mut conn = Conn {
        rx: vec![0u8; RX_BUF],
        rx_len: 0,
        tick: tokio::time::interval(TICK),
        waker_set: false,
        epoch,
        poll,
        last_active: Instant::now(),
    };
    let result = poll_fn(|cx| {
        if shutdown.has_changed().unwrap_or(true) {
            return Poll::Ready(Ok(Some(CloseReason::Disconnected("target shutting down"))));
        }
        let r = conn.drive(cx, &stream, &mut qp);
        if r.is_pending() {
            // Registers for the shutdown signal without consuming it.
            let fut = shutdown.changed();
            tokio::pin!(fut);
            if fut.poll(cx).is_ready() {
                return Poll::Ready(Ok(Some(CloseReason::Disconnected("target shutting down"))));
            }
        }
        r
    })
    .await;
    qp.on_disconnect();
    // The devices may still write into buffers this queue owns: wait for
    // them (bounded) before the queue is dropped.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while qp.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        poll_fn(|cx| {
            qp.poll_completions(cx);
            Poll::Ready(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = stream
        .into_std()
        .map(|s| s.shutdown(std::net::Shutdown::Both));
    result
}

use std::future::Future;

struct Conn {
    rx: Vec<u8>,
    rx_len: usize,
    tick: tokio::time::Interval,
    waker_set: bool,
    epoch: Instant,
    poll: Duration,
    last_active: Instant,
}

impl Conn {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// One run-to-completion pass: read, execute, reap, write, repeat until
    /// nothing moves, then register for readiness.
    fn drive(
        &mut self,
        cx: &mut Context<'_>,
        stream: &TcpStream,
        qp: &mut QueuePair,
    ) -> Poll<io::Result<Option<CloseReason>>> {
        for _ in 0..BUDGET {
            let mut progress = false;
            if qp.must_close_now() {
                return Poll::Ready(Ok(qp.close_reason().cloned()));
            }
            if qp.wants_input() && self.rx_len > 0 {
                // Bytes left when input paused (or a partial header): the
                // queue may take them now without another read.
                let used = qp.handle_input(&self.rx[..self.rx_len], self.now_ms());
                if used > 0 {
                    self.rx.copy_within(used..self.rx_len, 0);
                    self.rx_len -= used;
                    progress = true;
                }
            }
            if !qp.wants_input() {
                // Back-pressure: nothing more is read until the host has
                // taken its output (or the device has finished its reads).
            } else if self.rx_len == 0
                && let Some(dst) = qp.direct_rx()
            {
                // Large write data goes from the socket into the command's
                // buffer with no intermediate copy.
                match stream.try_read(dst) {
                    Ok(0) => return Poll::Ready(Ok(None)),
                    Ok(n) => {
                        qp.direct_rx_done(n);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            } else if self.rx_len < self.rx.len() {
                match stream.try_read(&mut self.rx[self.rx_len..]) {
                    Ok(0) => return Poll::Ready(Ok(None)),
                    Ok(n) => {
                        self.rx_len += n;
                        let used = qp.handle_input(&self.rx[..self.rx_len], self.now_ms());
                        self.rx.copy_within(used..self.rx_len, 0);
                        self.rx_len -= used;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if !self.waker_set
                && let Some(c) = qp.ctrlr().filter(|_| qp.is_admin())
            {
                c.set_event_waker(cx.waker().clone());
                self.waker_set = true;
            }
            if qp.poll_completions(cx) {
                progress = true;
            }
            qp.flush_submissions();
            while qp.has_tx() {
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let n = qp.tx_slices(&mut iov);
                match stream.try_write_vectored(&iov[..n]) {
                    Ok(w) => {
                        qp.tx_advance(w);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if let Some(r) = qp.close_reason()
                && !qp.has_tx()
            {
                return Poll::Ready(Ok(Some(r.clone())));
            }
            if self.tick.poll_tick(cx).is_ready() {
                qp.on_tick(self.now_ms());
                progress = true;
            }
            if progress {
                self.last_active = Instant::now();
            } else {
                let readable = qp.wants_input()
                    && self.rx_len < self.rx.len()
                    && stream.poll_read_ready(cx).is_ready();
                let writable = qp.has_tx() && stream.poll_write_ready(cx).is_ready();
                if !readable && !writable {
                    if self.last_active.elapsed() < self.poll {
                        // Stay runnable: the reactor comes back to us after
                        // its other connections, without an epoll sleep.
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
