//! The Raft transport: a tonic service on `--cluster-addr` that hands
//! incoming batches to the driver, and one sender task per peer that drains
//! a bounded queue into unary `Send` calls.
//!
//! Every queue here is bounded and drops rather than blocks: Raft
//! retransmits whatever is lost (appends are re-sent on the next heartbeat
//! round, votes on the next election), so a slow or dead peer costs
//! counted drops, never memory or a stalled driver.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_cluster::state::NodeId;
use strata_proto::cluster::v1 as pb;
use strata_proto::cluster::v1::raft_client::RaftClient;
use tokio::sync::{Notify, mpsc};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// Messages waiting for one peer; beyond this the oldest is dropped.
pub const PEER_QUEUE_CAP: usize = 1024;
/// One `Send` call carries at most this many bytes of messages (a single
/// larger message, a snapshot, goes alone).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// One `Send` call carries at most this many messages.
pub const MAX_BATCH_MESSAGES: usize = 256;
/// Largest request the cluster port decodes: one message of the node's
/// maximum plus the envelope.
pub const MAX_REQUEST_BYTES: usize = strata_cluster::node::MAX_MESSAGE_BYTES + (1 << 20);
/// Connection retries back off from the first to the last.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// An idle peer gets an empty batch this often, so `reachable` in status
/// is current for every member, not only those Raft happens to talk to
/// (followers never send to each other).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A call that takes longer than this counts as a failed delivery.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Transport counters, shown by `strata ctl cluster status`.
#[derive(Default)]
pub struct Counters {
    /// Calls to the cluster port without the right token.
    pub refused_calls: AtomicU64,
    /// Outbound messages dropped from a full peer queue.
    pub dropped_out: AtomicU64,
    /// Incoming batches dropped because the driver's inbox was full.
    pub dropped_in: AtomicU64,
}

/// What a sender task tells the driver.
#[derive(Debug)]
pub enum Report {
    Unreachable(NodeId),
    Snapshot { to: NodeId, delivered: bool },
}

/// Bearer-token check on every call to the cluster port.
#[derive(Clone)]
pub struct TokenCheck {
    pub want: Arc<str>,
    pub counters: Arc<Counters>,
}

impl Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if crate::mgmt::listen::bearer_matches(&req, &self.want) {
            Ok(req)
        } else {
            self.counters.refused_calls.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("cluster port: call without the right token refused");
            Err(Status::unauthenticated(
                "cluster token: missing or wrong; fix: give every member the same --cluster-token-file",
            ))
        }
    }
}

/// Adds the bearer token to a request.
pub fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// A client of a peer's cluster port (lazy: the connection is made, and
/// re-made after a failure, by the first call).
pub fn client(addr: &str, timeout: Duration) -> Result<RaftClient<Channel>, String> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("cluster address {addr:?}: {e}; fix: give ip:port"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout);
    Ok(RaftClient::new(ep.connect_lazy())
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES))
}

struct Queue {
    msgs: VecDeque<(Vec<u8>, bool)>,
}

/// The outbound side of one peer: a bounded queue and the task that
/// drains it.
pub struct Peer {
    pub addr: String,
    queue: Arc<Mutex<Queue>>,
    notify: Arc<Notify>,
    reachable: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Who we are, on every outgoing batch.
#[derive(Clone)]
pub struct Sender {
    pub id: NodeId,
    pub addr: String,
    pub token: Arc<str>,
    pub counters: Arc<Counters>,
    pub reports: mpsc::Sender<Report>,
}

impl Peer {
    pub fn start(to: NodeId, addr: String, me: Sender) -> Peer {
        let queue = Arc::new(Mutex::new(Queue {
            msgs: VecDeque::new(),
        }));
        let notify = Arc::new(Notify::new());
        let reachable = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run_peer(
            to,
            addr.clone(),
            me,
            queue.clone(),
            notify.clone(),
            reachable.clone(),
        ));
        Peer {
            addr,
            queue,
            notify,
            reachable,
            task,
        }
    }

    /// Queues a message; a full queue drops its oldest (counted).
    pub fn push(&self, bytes: Vec<u8>, snapshot: bool, counters: &Counters) {
        {
            let mut q = lock(&self.queue);
            if q.msgs.len() >= PEER_QUEUE_CAP {
                q.msgs.pop_front();
                counters.dropped_out.fetch_add(1, Ordering::Relaxed);
            }
            q.msgs.push_back((bytes, snapshot));
        }
        self.notify.notify_one();
    }

    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    // The queue holds plain bytes; a panic elsewhere leaves it usable.
    q.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run_peer(
    to: NodeId,
    addr: String,
    me: Sender,
    queue: Arc<Mutex<Queue>>,
    notify: Arc<Notify>,
    reachable: Arc<AtomicBool>,
) {
    let mut client = match client(&addr, CALL_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(peer = to, "{e}");
            return;
        }
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let batch: Vec<(Vec<u8>, bool)> = {
            let mut q = lock(&queue);
            let mut bytes = 0;
            let mut out = Vec::new();
            while let Some((m, _)) = q.msgs.front() {
                if !out.is_empty()
                    && (bytes + m.len() > MAX_BATCH_BYTES || out.len() >= MAX_BATCH_MESSAGES)
                {
                    break;
                }
                bytes += m.len();
                out.extend(q.msgs.pop_front());
            }
            out
        };
        if batch.is_empty()
            && tokio::time::timeout(PROBE_INTERVAL, notify.notified())
                .await
                .is_ok()
        {
            continue;
        }
        let snapshots: usize = batch.iter().filter(|(_, s)| *s).count();
        let req = pb::SendRequest {
            from_id: me.id,
            from_addr: me.addr.clone(),
            to_id: to,
            messages: batch.into_iter().map(|(m, _)| m).collect(),
        };
        let ok = match client.send(authed(req, &me.token)).await {
            Ok(_) => true,
            Err(s) => {
                // Debug level: a dead peer fails every heartbeat.
                tracing::debug!(peer = to, %addr, "cluster send failed: {}", s.message());
                false
            }
        };
        let was = reachable.swap(ok, Ordering::Relaxed);
        if was != ok {
            tracing::info!(peer = to, %addr, reachable = ok, "cluster peer");
        }
        for _ in 0..snapshots {
            let _ = me.reports.try_send(Report::Snapshot { to, delivered: ok });
        }
        if ok {
            backoff = BACKOFF_MIN;
        } else {
            let _ = me.reports.try_send(Report::Unreachable(to));
            // What queued meanwhile is stale by the time the peer is back;
            // Raft sends afresh what it still needs.
            let stale = std::mem::take(&mut lock(&queue).msgs).len();
            me.counters
                .dropped_out
                .fetch_add(stale as u64, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_call_without_the_token_is_refused_and_counted() {
        let counters = Arc::new(Counters::default());
        let mut check = TokenCheck {
            want: "0123456789abcdef".into(),
            counters: counters.clone(),
        };
        assert!(check.call(authed((), "0123456789abcdef")).is_ok());
        let e = check.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("--cluster-token-file"), "{e}");
        let e = check.call(authed((), "0123456789abcdeX")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(counters.refused_calls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_failed_call_reports_the_peer_unreachable_and_its_snapshot_undelivered() {
        rt().block_on(async {
            let counters = Arc::new(Counters::default());
            let (reports, mut rx) = mpsc::channel(REPORT_QUEUE_TEST);
            let me = Sender {
                id: 1,
                addr: "127.0.0.1:1".into(),
                token: "0123456789abcdef".into(),
                counters: counters.clone(),
                reports,
            };
            // Port 1 on loopback: nothing listens, every call fails.
            let p = Peer::start(2, "127.0.0.1:1".into(), me);
            p.push(vec![1], true, &counters);
            let mut got = Vec::new();
            while got.len() < 2 {
                let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("reports within 10 s");
                got.push(r.unwrap());
            }
            assert!(
                matches!(
                    got[0],
                    Report::Snapshot {
                        to: 2,
                        delivered: false
                    }
                ),
                "{got:?}"
            );
            assert!(matches!(got[1], Report::Unreachable(2)), "{got:?}");
            assert!(!p.reachable());
        });
    }

    const REPORT_QUEUE_TEST: usize = 16;

    #[test]
    fn push_is_bounded() {
        rt().block_on(async {
            let counters = Arc::new(Counters::default());
            let (reports, _rx) = mpsc::channel(1);
            let me = Sender {
                id: 1,
                addr: "127.0.0.1:1".into(),
                token: "0123456789abcdef".into(),
                counters: counters.clone(),
                reports,
            };
            let p = Peer::start(2, "127.0.0.1:1".into(), me);
            // On a current-thread runtime the sender task does not run
            // until this one yields, so every push lands in the queue.
            for i in 0..(PEER_QUEUE_CAP + 7) {
                p.push(vec![(i % 251) as u8], false, &counters);
            }
            let q = lock(&p.queue);
            assert_eq!(q.msgs.len(), PEER_QUEUE_CAP);
            assert_eq!(counters.dropped_out.load(Ordering::Relaxed), 7);
            // The oldest went: the first left is the 8th pushed.
            assert_eq!(q.msgs.front().unwrap().0, vec![7u8]);
        });
    }

    #[test]
    fn a_bad_address_is_an_error_naming_the_fix() {
        let e = client("not an address", CALL_TIMEOUT).unwrap_err();
        assert!(e.contains("ip:port"), "{e}");
    }
}
