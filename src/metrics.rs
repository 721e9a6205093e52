//! The Prometheus endpoint (`strata serve --metrics-addr`, `[metrics] addr`).
//!
//! Off unless an address is given: then no thread, no listener, and the
//! counters are only what the queues keep anyway (see "Metrics" in
//! docs/ARCHITECTURE.md). On, one thread (`metrics`) of its own, off the
//! reactors and the control plane, serves `GET /metrics`: each request
//! sums the counters ([`strata_target::stats::Registry::snapshot`],
//! [`strata_objbacker::live_devices`]), sets them into a
//! `metrics-exporter-prometheus` recorder (counters and gauges) and renders
//! it, then appends the latency histograms, which this module writes in the
//! text format itself: their buckets are counted on the reactors already,
//! and the `metrics` API only takes single samples.
//!
//! Invariants:
//! * Nothing here runs on a reactor, and nothing a reactor does waits for a
//!   scrape: the registry lock a scrape holds is taken on the I/O path only
//!   when a queue opens or drops a namespace channel.
//! * Every counter is monotonic for the life of the process.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use strata_target::stats::{self, HistogramSnapshot, IoKind, Snapshot};

/// The running endpoint; dropping it stops the thread.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics` on a thread of its own.
    pub fn start(addr: SocketAddr) -> Result<Self> {
        let l = TcpListener::bind(addr)
            .with_context(|| format!("metrics endpoint: cannot bind {addr}"))?;
        let addr = l.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let recorder = PrometheusBuilder::new().build_recorder();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(l, recorder, stop2))?;
        tracing::info!(%addr, "metrics endpoint: GET /metrics");
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(l: TcpListener, recorder: PrometheusRecorder, stop: Arc<AtomicBool>) {
    describe(&recorder);
    for conn in l.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut s) = conn else { continue };
        if let Err(e) = answer(&mut s, &recorder) {
            tracing::debug!(error = %e, "metrics request failed");
        }
    }
}

/// One request, one response, then close (Prometheus opens a connection
/// per scrape or keeps one alive; either works with `Connection: close`).
fn answer(s: &mut TcpStream, recorder: &PrometheusRecorder) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(recorder),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "strata: the metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "strata: only GET /metrics\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

fn describe(recorder: &PrometheusRecorder) {
    metrics::with_local_recorder(recorder, || {
        describe_counter!(
            "strata_ns_commands_total",
            "I/O commands a namespace's device completed, by op"
        );
        describe_counter!(
            "strata_ns_bytes_total",
            "Bytes moved by successful commands, by op"
        );
        describe_counter!(
            "strata_ns_errors_total",
            "Commands the device failed, by op"
        );
        describe_counter!(
            "strata_listener_connections_accepted_total",
            "TCP connections accepted"
        );
        describe_counter!(
            "strata_listener_connections_refused_total",
            "Connections closed at accept: a connection limit was reached"
        );
        describe_counter!(
            "strata_listener_connections_ended_total",
            "Connections that ended, by reason"
        );
        describe_gauge!(
            "strata_listener_queues",
            "Connected queues (after Fabrics Connect), by kind"
        );
        describe_counter!(
            "strata_subsystem_controllers_created_total",
            "Controllers created by Fabrics Connect on the admin queue"
        );
        describe_counter!(
            "strata_subsystem_keepalive_expiries_total",
            "Controllers destroyed because their keep-alive expired"
        );
        describe_counter!(
            "strata_objbacker_requests_total",
            "Object-store requests, by op (retries of one request count once)"
        );
        describe_counter!(
            "strata_objbacker_retries_total",
            "Store request attempts repeated after a failure or timeout"
        );
        describe_counter!(
            "strata_objbacker_failures_total",
            "Store requests that failed after the retry budget"
        );
        describe_counter!(
            "strata_objbacker_bytes_put_total",
            "Bytes sent to the store by PUTs"
        );
        describe_counter!(
            "strata_objbacker_bytes_written_total",
            "Bytes the host wrote to the device"
        );
        describe_gauge!(
            "strata_objbacker_put_bytes_per_byte_written",
            "bytes_put / bytes_written since attach: the write amplification"
        );
        describe_gauge!(
            "strata_objbacker_writeback_bytes",
            "Bytes held in the write-back buffer"
        );
        describe_gauge!(
            "strata_objbacker_writeback_capacity_bytes",
            "The write-back buffer's bound"
        );
    });
}

/// The whole exposition: the recorder's counters and gauges, then the
/// histograms.
pub fn render(recorder: &PrometheusRecorder) -> String {
    let snap = stats::registry().snapshot();
    let devices = strata_objbacker::live_devices();
    metrics::with_local_recorder(recorder, || {
        record(&snap, &devices);
    });
    let mut out = recorder.handle().render();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    write_histograms(&mut out, &snap, &devices);
    out
}

fn record(snap: &Snapshot, devices: &[strata_objbacker::DeviceMetrics]) {
    for ((nqn, nsid), ns) in &snap.namespaces {
        for k in IoKind::ALL {
            let o = ns.op(k);
            let labels = [
                ("subsystem", nqn.clone()),
                ("nsid", nsid.to_string()),
                ("op", k.name().to_string()),
            ];
            counter!("strata_ns_commands_total", &labels).absolute(o.commands);
            counter!("strata_ns_bytes_total", &labels).absolute(o.bytes);
            counter!("strata_ns_errors_total", &labels).absolute(o.errors);
        }
    }
    for l in &snap.listeners {
        let at = [("listener", l.addr.clone())];
        counter!("strata_listener_connections_accepted_total", &at).absolute(l.accepted);
        counter!("strata_listener_connections_refused_total", &at).absolute(l.refused);
        for (kind, v) in [("admin", l.admin_queues), ("io", l.io_queues)] {
            let lab = [("listener", l.addr.clone()), ("kind", kind.to_string())];
            gauge!("strata_listener_queues", &lab).set(v as f64);
        }
        for &(r, v) in &l.ended {
            let lab = [
                ("listener", l.addr.clone()),
                ("reason", r.name().to_string()),
            ];
            counter!("strata_listener_connections_ended_total", &lab).absolute(v);
        }
    }
    for s in &snap.subsystems {
        let lab = [("subsystem", s.nqn.clone())];
        counter!("strata_subsystem_controllers_created_total", &lab)
            .absolute(s.controllers_created);
        counter!("strata_subsystem_keepalive_expiries_total", &lab).absolute(s.keepalive_expiries);
    }
    for d in devices {
        let dev = [("device", d.name.clone())];
        let st = &d.stats;
        for (op, v) in [("get", st.gets), ("put", st.puts), ("delete", st.deletes)] {
            let lab = [("device", d.name.clone()), ("op", op.to_string())];
            counter!("strata_objbacker_requests_total", &lab).absolute(v);
        }
        counter!("strata_objbacker_retries_total", &dev).absolute(st.retries);
        counter!("strata_objbacker_failures_total", &dev).absolute(st.failures);
        counter!("strata_objbacker_bytes_put_total", &dev).absolute(st.bytes_put);
        counter!("strata_objbacker_bytes_got_total", &dev).absolute(st.bytes_got);
        counter!("strata_objbacker_bytes_written_total", &dev).absolute(st.bytes_written);
        counter!("strata_objbacker_readahead_gets_total", &dev).absolute(st.readahead_gets);
        counter!("strata_objbacker_rmw_gets_total", &dev).absolute(st.rmw_gets);
        if st.bytes_written > 0 {
            gauge!("strata_objbacker_put_bytes_per_byte_written", &dev)
                .set(st.bytes_put as f64 / st.bytes_written as f64);
        }
        gauge!("strata_objbacker_writeback_bytes", &dev).set(d.dirty_bytes as f64);
        gauge!("strata_objbacker_writeback_capacity_bytes", &dev).set(d.writeback_capacity as f64);
    }
}

/// A label value as the text format wants it.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Seconds, as Prometheus's `le` and `_sum` take them.
fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// One histogram series in the text format: cumulative `_bucket`s over the
/// fixed bounds of [`stats::bucket_upper_ns`], then `_sum` and `_count`.
fn write_series(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    let mut cum = 0u64;
    for (i, &c) in h.buckets.iter().enumerate() {
        cum += c;
        match stats::bucket_upper_ns(i) {
            Some(up) => {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {cum}", secs(up));
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cum}");
            }
        }
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", secs(h.sum_ns));
    let _ = writeln!(out, "{name}_count{{{labels}}} {cum}");
}

fn write_histograms(
    out: &mut String,
    snap: &Snapshot,
    devices: &[strata_objbacker::DeviceMetrics],
) {
    const NS: &str = "strata_ns_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {NS} Time from a command's arrival to its completion by the device, by op\n# TYPE {NS} histogram"
    );
    for ((nqn, nsid), ns) in &snap.namespaces {
        for k in IoKind::ALL {
            let o = ns.op(k);
            if o.commands == 0 {
                // A series appears with its first command.
                continue;
            }
            let h = HistogramSnapshot {
                count: o.commands,
                sum_ns: o.latency_sum_ns,
                buckets: o.buckets,
            };
            let labels = format!(
                "subsystem=\"{}\",nsid=\"{nsid}\",op=\"{}\"",
                esc(nqn),
                k.name()
            );
            write_series(out, NS, &labels, &h);
        }
    }
    const OB: &str = "strata_objbacker_request_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {OB} Object-store request latency, retries included, by op\n# TYPE {OB} histogram"
    );
    for d in devices {
        for (op, h) in [
            ("get", &d.get_latency),
            ("put", &d.put_latency),
            ("delete", &d.delete_latency),
        ] {
            if h.count == 0 {
                continue;
            }
            let labels = format!("device=\"{}\",op=\"{op}\"", esc(&d.name));
            write_series(out, OB, &labels, h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition of a namespace that served commands: counters through
    /// the recorder, the histogram cumulative and ending in +Inf = _count.
    #[test]
    fn renders_counters_and_cumulative_histograms() {
        let reg = stats::registry();
        let h = reg.ns_block("nqn.2026-12.test:render", 3);
        h.block().record(IoKind::Read, 4096, true, 3_000);
        h.block().record(IoKind::Read, 4096, true, 30_000);
        h.block().record(IoKind::Read, 4096, false, 300_000);
        let rec = PrometheusBuilder::new().build_recorder();
        let text = render(&rec);
        let sel = "subsystem=\"nqn.2026-12.test:render\",nsid=\"3\",op=\"read\"";
        let line = |prefix: &str| -> String {
            text.lines()
                .find(|l| l.starts_with(prefix) && l.contains(sel))
                .unwrap_or_else(|| panic!("no {prefix} for {sel} in\n{text}"))
                .to_string()
        };
        assert!(line("strata_ns_commands_total").ends_with(" 3"));
        assert!(line("strata_ns_bytes_total").ends_with(" 8192"));
        assert!(line("strata_ns_errors_total").ends_with(" 1"));
        assert!(line("strata_ns_latency_seconds_count").ends_with(" 3"));
        assert!(text.contains(&format!(
            "strata_ns_latency_seconds_bucket{{{sel},le=\"+Inf\"}} 3"
        )));
        // Cumulative: never falls, and reaches 1 at 4.096 µs (3 µs sample).
        let mut last = 0u64;
        let mut at_4us = None;
        for l in text
            .lines()
            .filter(|l| l.starts_with("strata_ns_latency_seconds_bucket") && l.contains(sel))
        {
            let v: u64 = l.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v >= last, "{l}");
            last = v;
            if l.contains("le=\"0.000004096\"") {
                at_4us = Some(v);
            }
        }
        assert_eq!(at_4us, Some(1), "{text}");
        let sum = line("strata_ns_latency_seconds_sum");
        let sum: f64 = sum.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((sum - 333e-6).abs() < 1e-9, "{sum}");
        assert!(text.contains("# TYPE strata_ns_latency_seconds histogram"));
    }

    #[test]
    fn endpoint_answers_get_metrics_and_stops_on_drop() {
        let m = MetricsServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut s = TcpStream::connect(m.local_addr()).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.contains("# TYPE strata_ns_latency_seconds histogram"));
        let mut s = TcpStream::connect(m.local_addr()).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
        drop(m);
    }
}
