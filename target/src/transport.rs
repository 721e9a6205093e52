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

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use crate::ctrlr::Target;
use crate::queue::{CloseReason, QueueLimits, QueuePair};
use crate::stats::{self, EndReason};

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
    counters: Vec<Arc<ReactorCounters>>,
}

impl Transport {
    pub fn start(target: Arc<Target>, cfg: TransportConfig) -> io::Result<Self> {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        let epoch = Instant::now();
        // Fixes the metrics clock's epoch before any pass reads it.
        stats::now_ns();
        let mut threads = Vec::new();
        let mut reactor_txs = Vec::new();
        let mut counters = Vec::new();
        for i in 0..cfg.reactors.max(1) {
            let c = Arc::new(ReactorCounters::default());
            counters.push(c.clone());
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
                        reactor_main(rx, target, limits, poll, shutdown, epoch, c)
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
            counters,
        })
    }

    /// Binds `addr` and serves it as port `port_id`. Returns the bound
    /// address (port 0 picks a free port).
    pub fn add_listener(&mut self, addr: SocketAddr, port_id: u16) -> io::Result<SocketAddr> {
        let b = BoundListener::bind(addr)?;
        self.start_listener(b, port_id)
    }

    /// Starts accepting on a socket bound by [`BoundListener::bind`].
    /// Hosts that connected since the bind waited in the kernel's backlog,
    /// so a control plane can bind, apply the configuration the port
    /// serves, and only then accept: no host meets a half-applied target.
    pub fn start_listener(&mut self, b: BoundListener, port_id: u16) -> io::Result<SocketAddr> {
        let local = b.local;
        self.acceptor_tx
            .send(AcceptorCmd::Add {
                listener: b.listener,
                port_id,
            })
            .map_err(|_| io::Error::other("acceptor thread is gone"))?;
        self.listeners.insert(port_id, local);
        stats::registry().listener(port_id, &local.to_string());
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

    /// Socket syscalls, polls and sleeps of every reactor so far.
    pub fn counters(&self) -> TransportCounters {
        sum_counters(&self.counters)
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

/// A listening socket not yet served: connections queue in the kernel's
/// backlog until [`Transport::start_listener`]. Dropping it closes the
/// socket (how a refused reload gives an address back).
pub struct BoundListener {
    listener: std::net::TcpListener,
    local: SocketAddr,
}

impl BoundListener {
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        Ok(Self { listener, local })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
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
                        let lstats = stats::registry().listener(port_id, "");
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
                                            lstats.refused.fetch_add(1, Ordering::Relaxed);
                                            drop(s);
                                            continue;
                                        }
                                        at_limit = false;
                                        tracing::debug!(%peer, port_id, "accepted");
                                        let Ok(s) = s.into_std() else { continue };
                                        acc.open.fetch_add(1, Ordering::Relaxed);
                                        lstats.accepted.fetch_add(1, Ordering::Relaxed);
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

/// Syscall and sleep counters of one reactor. Only the reactor's own
/// thread writes them (a load and a store, no locked read-modify-write, on
/// a line no other reactor writes); anyone may read them.
#[derive(Debug, Default)]
#[repr(align(128))]
struct ReactorCounters {
    recv_data: AtomicU64,
    recv_empty: AtomicU64,
    send: AtomicU64,
    parks: AtomicU64,
    spins: AtomicU64,
    probe_empty: AtomicU64,
    probe_ready: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// What the reactors have done so far, summed over reactors: the figures a
/// syscall budget is checked against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportCounters {
    /// `read`s on a connection socket that returned bytes (or EOF).
    pub recv_data: u64,
    /// `read`s that found nothing (EAGAIN): the cost of polling.
    pub recv_empty: u64,
    /// `writev`s on a connection socket.
    pub send: u64,
    /// Times a reactor thread went to sleep in epoll.
    pub parks: u64,
    /// Passes a connection stayed runnable to poll instead of parking.
    pub spins: u64,
    /// Zero-timeout `poll`s on a socket that found nothing.
    pub probe_empty: u64,
    /// Zero-timeout `poll`s that found bytes, so a `read` followed.
    pub probe_ready: u64,
}

impl TransportCounters {
    /// Every syscall the connections issued on their sockets.
    pub fn socket_syscalls(&self) -> u64 {
        self.recv_data + self.recv_empty + self.send + self.probe_empty + self.probe_ready
    }
}

fn sum_counters(rs: &[Arc<ReactorCounters>]) -> TransportCounters {
    let mut t = TransportCounters::default();
    for r in rs {
        t.recv_data += r.recv_data.load(Ordering::Relaxed);
        t.recv_empty += r.recv_empty.load(Ordering::Relaxed);
        t.send += r.send.load(Ordering::Relaxed);
        t.parks += r.parks.load(Ordering::Relaxed);
        t.spins += r.spins.load(Ordering::Relaxed);
        t.probe_empty += r.probe_empty.load(Ordering::Relaxed);
        t.probe_ready += r.probe_ready.load(Ordering::Relaxed);
    }
    t
}

/// How a connection is told the target is stopping: a flag on its own
/// reactor, and the waker it left when it parked. Per-reactor and
/// unshared, so the hot path reads a `Cell`, not a lock (a `watch`
/// receiver polled per pass locks the channel's waiter list).
#[derive(Default)]
struct StopSignal {
    stop: Cell<bool>,
    waker: RefCell<Option<std::task::Waker>>,
}

fn reactor_main(
    mut conns: mpsc::UnboundedReceiver<NewConn>,
    target: Arc<Target>,
    limits: QueueLimits,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
    epoch: Instant,
    counters: Arc<ReactorCounters>,
) {
    let parks = counters.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(move || bump(&parks.parks))
        .build()
        .expect("tokio current-thread runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut live: Vec<(tokio::task::JoinHandle<()>, Rc<StopSignal>)> = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                c = conns.recv() => {
                    let Some(c) = c else { break };
                    let target = target.clone();
                    let sig = Rc::new(StopSignal::default());
                    let s2 = sig.clone();
                    let counters = counters.clone();
                    live.retain(|(h, _)| !h.is_finished());
                    live.push((tokio::task::spawn_local(async move {
                        let peer = c.stream.peer_addr().ok();
                        let lstats = stats::registry().listener(c.port_id, "");
                        match serve_connection(c, target, limits, poll, s2, epoch, counters).await {
                            Ok(reason) => {
                                lstats.ended(end_reason(reason.as_ref()));
                                tracing::debug!(?peer, ?reason, "connection closed")
                            }
                            Err(e) => {
                                lstats.ended(EndReason::SocketError);
                                tracing::debug!(?peer, error = %e, "connection ended")
                            }
                        }
                    }), sig));
                }
            }
        }
        for (_, sig) in &live {
            sig.stop.set(true);
            if let Some(w) = sig.waker.borrow_mut().take() {
                w.wake();
            }
        }
        // Let every connection observe the shutdown and drain its bdev I/O.
        for (h, _) in live {
            let _ = h.await;
        }
    });
}

/// The `reason` label of a connection that ended without a socket error
/// (`None`: the host closed it).
fn end_reason(r: Option<&CloseReason>) -> EndReason {
    match r {
        None => EndReason::HostClosed,
        Some(CloseReason::Fatal(_)) => EndReason::Malformed,
        Some(CloseReason::HostTerminated) => EndReason::HostTerminated,
        Some(CloseReason::Cut(_)) => EndReason::Cut,
        Some(CloseReason::Disconnected(why)) => match *why {
            "Disconnect command" => EndReason::Disconnect,
            "keep-alive timeout" => EndReason::KeepAlive,
            "target shutting down" => EndReason::Shutdown,
            _ => EndReason::ControllerDestroyed,
        },
    }
}

/// Drives one connection until it closes.
async fn serve_connection(
    c: NewConn,
    target: Arc<Target>,
    limits: QueueLimits,
    poll: Duration,
    sig: Rc<StopSignal>,
    epoch: Instant,
    counters: Arc<ReactorCounters>,
) -> io::Result<Option<CloseReason>> {
    let _count = c.count;
    c.stream.set_nodelay(true)?;
    c.stream.set_nonblocking(true)?;
    let peer = c.stream.peer_addr().ok();
    // SAFETY: the TcpStream owns its fd, and the AsyncFd owns the stream
    // until `into_inner` at the end of this function; nothing else closes or
    // replaces the fd while it is registered.
    let sock = unsafe {
        AsyncFd::register_with_interest(c.stream, Interest::READABLE | Interest::WRITABLE)?
    };
    // Dropping the queue (a panic included) releases its controller.
    let mut qp = QueuePair::new(target, c.port_id, limits);
    if let Some(p) = peer {
        qp.set_peer(p);
    }
    qp.set_clock(stats::now_ns);
    let now = Instant::now();
    let mut conn = Conn {
        rx: vec![0u8; RX_BUF],
        rx_len: 0,
        tick: tokio::time::interval(TICK),
        next_tick: now + TICK,
        waker_set: false,
        epoch,
        spin: SpinWindow::new(poll),
        last_active: now,
        spinning: false,
        rx_hint: RxHint::default(),
        counters,
    };
    conn.tick
        .set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = poll_fn(|cx| {
        if sig.stop.get() {
            return Poll::Ready(Ok(Some(CloseReason::Disconnected("target shutting down"))));
        }
        let r = conn.drive(cx, &sock, &mut qp);
        if r.is_pending() && !conn.spinning {
            let mut w = sig.waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
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
    let _ = sock.into_inner().shutdown(std::net::Shutdown::Both);
    result
}

/// Whether a connection polls its socket after its last activity, and for
/// how long. Polling wins the wakeup (several µs of a QD1 round trip, and
/// more under load, where an epoll sleep and its wakeup sit between every
/// batch) when the host's next bytes come soon; it is wasted when they do
/// not. So the connection tracks the host's recent gaps (an EWMA of the
/// time from our last activity to its next bytes, capped so one long pause
/// is forgotten after a few quick commands) and polls for twice that gap,
/// at least the configured window and at most [`SPIN_MAX_WINDOWS`] of it.
/// A host whose gaps exceed that cap is not polled at all: a QD1 host and a
/// pipelining host that returns every 80–100 µs (4K writes at QD32, when the
/// initiator's core is the bottleneck) are polled; a keep-alive-only or slow
/// host parks at once, so idle queues cost no CPU.
struct SpinWindow {
    window: Duration,
    gap_ewma_ns: u64,
}

/// The longest a connection polls, in configured windows: with the default
/// 50 µs window, 200 µs. Measured: parking after a fixed 50 µs cost 4K
/// randwrite QD32 a quarter of its IOPS (the host's batches came 80–100 µs
/// apart, so every batch paid an epoll wakeup); 200 µs recovers it.
const SPIN_MAX_WINDOWS: u64 = 4;

/// Longest gap the EWMA takes in: a pause longer than this says the same as
/// this ("slow host"), and the window comes back within about 20 quick
/// commands.
const GAP_CAP_NS: u64 = 1_000_000;

impl SpinWindow {
    fn new(window: Duration) -> Self {
        Self {
            window,
            gap_ewma_ns: 0,
        }
    }

    fn on_input(&mut self, gap: Duration) {
        let g = (gap.as_nanos() as u64).min(GAP_CAP_NS);
        self.gap_ewma_ns = (self.gap_ewma_ns * 7 + g) / 8;
    }

    fn spin(&self, idle: Duration) -> bool {
        let window = self.window.as_nanos() as u64;
        let cap = SPIN_MAX_WINDOWS * window;
        let limit = (2 * self.gap_ewma_ns).clamp(window, cap.max(window));
        self.gap_ewma_ns <= cap && (idle.as_nanos() as u64) < limit
    }
}

struct Conn {
    rx: Vec<u8>,
    rx_len: usize,
    /// Wakes a parked connection for its timers; the hot path reads the
    /// clock instead of polling it.
    tick: tokio::time::Interval,
    next_tick: Instant,
    waker_set: bool,
    epoch: Instant,
    spin: SpinWindow,
    last_active: Instant,
    /// The last pass left the task runnable (polling) rather than parked.
    spinning: bool,
    rx_hint: RxHint,
    counters: Arc<ReactorCounters>,
}

/// Whether to ask `poll` before `read`. `poll` does not take the socket
/// lock; an empty `read` does, and contends with the host's packets
/// arriving on the other core (measured: 11% of the reactor in the lock's
/// slow path when a QD1 connection polled with `read`). But a `poll` that
/// finds bytes is a syscall wasted: a pipelining host (QD32) has its next
/// commands waiting by the time we have written the last completions.
///
/// So the hint learns which kind of host this is, from the first look at
/// the socket after each read that brought data: if that look finds bytes
/// at once, the next first look is a plain `read` (pipelining); if it finds
/// nothing, the next first looks are `poll`s (a host waiting for us). After
/// the first look finds nothing, every look is a `poll` until bytes come.
/// A wrong guess costs one syscall and flips the hint.
#[derive(Debug, Default)]
struct RxHint {
    /// The socket is known (or guessed) empty: probe before reading.
    idle: bool,
    /// No look at the socket yet since the last read with data.
    fresh: bool,
    /// The host's next bytes were waiting at the last first look.
    eager: bool,
}

impl RxHint {
    fn probe(&self) -> bool {
        if self.fresh { !self.eager } else { self.idle }
    }

    /// Outcome of a `poll`; returns it.
    fn probed(&mut self, ready: bool) -> bool {
        if self.fresh {
            self.eager = ready;
            self.fresh = false;
        }
        self.idle = !ready;
        ready
    }

    /// Outcome of a `read` of up to `want` bytes that returned `n` (0:
    /// nothing there).
    fn read(&mut self, n: usize, want: usize) {
        if n == 0 {
            if self.fresh {
                self.eager = false;
            }
            self.fresh = false;
            self.idle = true;
        } else {
            // A full buffer says more is waiting: read again at once.
            self.idle = n < want;
            self.fresh = n < want;
        }
    }
}

/// One `read` on the socket, counted. `None`: nothing there.
fn sock_read(
    counters: &ReactorCounters,
    sock: &std::net::TcpStream,
    dst: &mut [u8],
) -> io::Result<Option<usize>> {
    match (&*sock).read(dst) {
        Ok(n) => {
            bump(&counters.recv_data);
            Ok(Some(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            bump(&counters.recv_empty);
            Ok(None)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the socket has bytes (or EOF/error) to read, without reading.
fn sock_probe(counters: &ReactorCounters, sock: &std::net::TcpStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    if r == 0 {
        bump(&counters.probe_empty);
        false
    } else {
        bump(&counters.probe_ready);
        true
    }
}

/// A pass's outcome when the socket had nothing to give.
enum Park {
    /// Registered with epoll; the task sleeps until something is ready.
    Sleep,
    /// Tokio's readiness was stale (the hot path reads the socket directly,
    /// so tokio never saw it drained): cleared; try another pass.
    Retry,
}

impl Conn {
    /// Milliseconds since the transport started, from a clock read the
    /// pass already made.
    fn ms_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// One pass of run to completion: read, execute, reap, write, repeat
    /// until nothing moves; then either stay runnable (the spin window) or
    /// register for readiness.
    ///
    /// The socket is read and written with plain non-blocking syscalls, not
    /// through tokio's readiness cache: a poll must really look at the
    /// socket (tokio's `try_read` returns WouldBlock without a syscall
    /// until its epoll driver runs), and a busy connection costs one `read`
    /// and one `writev` per batch.
    fn drive(
        &mut self,
        cx: &mut Context<'_>,
        sock: &AsyncFd<std::net::TcpStream>,
        qp: &mut QueuePair,
    ) -> Poll<io::Result<Option<CloseReason>>> {
        let s = sock.get_ref();
        self.spinning = false;
        for _ in 0..BUDGET {
            let mut progress = false;
            let now = Instant::now();
            qp.set_now_ns(stats::ns_at(now));
            if qp.must_close_now() {
                return Poll::Ready(Ok(qp.close_reason().cloned()));
            }
            if qp.wants_input() && self.rx_len > 0 {
                // Bytes left when input paused (or a partial header): the
                // queue may take them now without another read.
                let used = qp.handle_input(&self.rx[..self.rx_len], self.ms_at(now));
                if used > 0 {
                    self.rx.copy_within(used..self.rx_len, 0);
                    self.rx_len -= used;
                    progress = true;
                }
            }
            if !qp.wants_input() {
                // Back-pressure: nothing more is read until the host has
                // taken its output (or the device has finished its reads).
            } else if self.rx_hint.probe() && !self.rx_hint.probed(sock_probe(&self.counters, s)) {
                // Nothing waiting: no read, so no fight with the sender's
                // softirq for the socket lock.
            } else if self.rx_len == 0
                && let Some(dst) = qp.direct_rx()
            {
                // Large write data goes from the socket into the command's
                // buffer with no intermediate copy.
                let want = dst.len();
                match sock_read(&self.counters, s, dst)? {
                    Some(0) => return Poll::Ready(Ok(None)),
                    Some(n) => {
                        self.rx_hint.read(n, want);
                        qp.direct_rx_done(n);
                        progress = true;
                    }
                    None => self.rx_hint.read(0, want),
                }
            } else if self.rx_len < self.rx.len() {
                let want = self.rx.len() - self.rx_len;
                match sock_read(&self.counters, s, &mut self.rx[self.rx_len..])? {
                    Some(0) => return Poll::Ready(Ok(None)),
                    Some(n) => {
                        self.rx_hint.read(n, want);
                        self.spin
                            .on_input(now.saturating_duration_since(self.last_active));
                        self.rx_len += n;
                        let used = qp.handle_input(&self.rx[..self.rx_len], self.ms_at(now));
                        self.rx.copy_within(used..self.rx_len, 0);
                        self.rx_len -= used;
                        progress = true;
                    }
                    None => self.rx_hint.read(0, want),
                }
            }
            if !self.waker_set
                && let Some(c) = qp.ctrlr().filter(|_| qp.is_admin())
            {
                c.set_event_waker(cx.waker().clone());
                self.waker_set = true;
            }
            qp.flush_submissions();
            if qp.poll_completions(cx) {
                progress = true;
            }
            qp.flush_submissions();
            while qp.has_tx() {
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let n = qp.tx_slices(&mut iov);
                bump(&self.counters.send);
                match (&*s).write_vectored(&iov[..n]) {
                    Ok(w) => {
                        qp.tx_advance(w);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if let Some(r) = qp.close_reason()
                && !qp.has_tx()
            {
                return Poll::Ready(Ok(Some(r.clone())));
            }
            if now >= self.next_tick {
                self.next_tick = now + TICK;
                qp.on_tick(self.ms_at(now));
                progress = true;
            }
            if progress {
                self.last_active = now;
                continue;
            }
            if self
                .spin
                .spin(now.saturating_duration_since(self.last_active))
            {
                // Stay runnable: the reactor comes back to us after its
                // other connections, without an epoll sleep.
                bump(&self.counters.spins);
                self.spinning = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match self.park(cx, sock, qp) {
                Ok(Park::Sleep) => return Poll::Pending,
                Ok(Park::Retry) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        cx.waker().wake_by_ref();
        self.spinning = true;
        Poll::Pending
    }

    /// Registers for whatever the connection waits on: input (unless input
    /// is paused), output room (if output is pending), and its tick.
    fn park(
        &mut self,
        cx: &mut Context<'_>,
        sock: &AsyncFd<std::net::TcpStream>,
        qp: &QueuePair,
    ) -> io::Result<Park> {
        let mut retry = false;
        if qp.wants_input()
            && self.rx_len < self.rx.len()
            && let Poll::Ready(g) = sock.poll_read_ready(cx)
        {
            // Epoll's word may be stale (the hot path read the bytes before
            // tokio saw the event), so the hint stays idle: a stale wakeup
            // costs a `poll`, not an empty `read`.
            g?.clear_ready();
            retry = true;
        }
        if qp.has_tx()
            && let Poll::Ready(g) = sock.poll_write_ready(cx)
        {
            g?.clear_ready();
            retry = true;
        }
        if retry {
            return Ok(Park::Retry);
        }
        // The interval fires at the same period the hot path uses; it only
        // matters while parked.
        while self.tick.poll_tick(cx).is_ready() {}
        Ok(Park::Sleep)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{RxHint, SpinWindow};

    fn host(window_us: u64, gap_us: u64) -> SpinWindow {
        let mut w = SpinWindow::new(Duration::from_micros(window_us));
        for _ in 0..64 {
            w.on_input(Duration::from_micros(gap_us));
        }
        w
    }

    #[test]
    fn spin_window_follows_the_host() {
        let us = Duration::from_micros;
        // QD1: the configured window.
        assert!(host(50, 5).spin(us(45)));
        assert!(!host(50, 5).spin(us(55)));
        // Pipelining with batches 90 µs apart: twice the gap.
        assert!(host(50, 90).spin(us(150)));
        assert!(!host(50, 90).spin(us(190)));
        // Never more than four windows, and a slow host not at all.
        assert!(!host(50, 150).spin(us(210)));
        assert!(!host(50, 1000).spin(us(1)));
        // 0 turns polling off.
        assert!(!host(0, 0).spin(us(0)));
    }

    /// A QD1 host: the first look after each command finds nothing, so
    /// from the second command on every look is a `poll`.
    #[test]
    fn rx_hint_probes_a_waiting_host() {
        let mut h = RxHint::default();
        let mut empty_reads = 0;
        for _ in 0..100 {
            // Looks until the next command arrives (the third look).
            for look in 0..3 {
                let there = look == 2;
                if h.probe() {
                    if h.probed(there) {
                        h.read(72, 4096);
                    }
                } else if there {
                    h.read(72, 4096);
                } else {
                    empty_reads += 1;
                    h.read(0, 4096);
                }
                if there {
                    break;
                }
            }
        }
        assert_eq!(
            empty_reads, 1,
            "only the very first command pays an empty read"
        );
    }

    /// A pipelining host: bytes are always waiting, so no `poll` is spent
    /// after the first.
    #[test]
    fn rx_hint_reads_a_pipelining_host_directly() {
        let mut h = RxHint::default();
        let mut polls = 0;
        for _ in 0..100 {
            if h.probe() {
                polls += 1;
                assert!(h.probed(true));
            }
            h.read(72 * 8, 4096);
        }
        assert!(
            polls <= 1,
            "{polls} polls for a host whose bytes were always there"
        );
    }

    /// A full buffer means more is waiting: the next look is a read.
    #[test]
    fn rx_hint_full_read_reads_again() {
        let mut h = RxHint::default();
        h.read(10, 4096);
        h.probed(false);
        assert!(h.probe());
        h.read(4096, 4096);
        assert!(!h.probe());
    }
}
