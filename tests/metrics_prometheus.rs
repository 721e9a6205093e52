//! The metrics endpoint as a real Prometheus server sees it: `strata serve`
//! with `[metrics] addr`, Debian's `prometheus` scraping it every second
//! while `strata bench run` reads from a RAM namespace, and the test asking
//! Prometheus's own HTTP API (`/api/v1/query`) for the namespace's rate of
//! reads and the 99th percentile of its read latency histogram.
//!
//! Skipped (with a message) when no `prometheus` binary is installed,
//! unless `STRATA_REQUIRE_PROMETHEUS` is set, as CI sets it (`.ci/run`;
//! `.ci/install.sh` installs the package).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{ChildGuard, Server, free_port, guard_command};

const NQN: &str = "nqn.2026-12.dev.strata:metrics";

fn prometheus_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STRATA_PROMETHEUS_BIN") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("prometheus"))
        .chain(std::iter::once(PathBuf::from("/usr/bin/prometheus")))
        .find(|p| p.is_file())
}

/// A plain HTTP/1.0 GET on 127.0.0.1; returns (status line, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// `%`-encodes a PromQL query for a URL.
fn urlencode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The first sample of an instant query, as a number (`None`: no series,
/// or the API said something else).
fn query_value(prom_port: u16, q: &str) -> Option<f64> {
    let (_, body) = http_get(prom_port, &format!("/api/v1/query?query={}", urlencode(q))).ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    if v["status"] != "success" {
        return None;
    }
    let s = v["data"]["result"].get(0)?["value"].get(1)?.as_str()?;
    s.parse().ok()
}

#[test]
fn prometheus_scrapes_namespace_rate_and_latency_quantile() {
    let Some(prom) = prometheus_bin() else {
        if std::env::var_os("STRATA_REQUIRE_PROMETHEUS").is_some() {
            panic!(
                "STRATA_REQUIRE_PROMETHEUS is set but no prometheus binary was found: apt-get install prometheus (.ci/install.sh does)"
            );
        }
        eprintln!(
            "SKIPPED: no prometheus binary (apt-get install prometheus, or set STRATA_PROMETHEUS_BIN)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let cfg = dir.path().join("strata.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[metrics]
addr = "127.0.0.1:{metrics_port}"

[[listener]]
name = "io"
addr = "127.0.0.1:4420"

[[subsystem]]
nqn = "{NQN}"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
type = "ram"
size = "64MiB"

[[subsystem.namespace]]
nsid = 2
type = "objbacker"
size = "64MiB"
buckets = ["file://{d}/b0", "file://{d}/b1"]
auto_format = true
"#,
            d = dir.path().display()
        ),
    )
    .unwrap();
    let server = Server::start(Some(&cfg), dir.path());

    // Our own scrape first: the endpoint answers before any load.
    let (status, body) = http_get(metrics_port, "/metrics").expect("metrics endpoint");
    assert!(status.contains("200"), "{status}\n{body}");
    assert!(
        body.contains("strata_objbacker_requests_total"),
        "objbacker device missing from\n{body}"
    );

    let prom_port = free_port();
    let prom_yml = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_yml,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: strata\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .unwrap();
    let prom_log = dir.path().join("prometheus.log");
    let _prom = ChildGuard(
        guard_command(
            Command::new(&prom)
                .arg(format!("--config.file={}", prom_yml.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("tsdb").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&prom_log).unwrap()),
        )
        .spawn()
        .expect("spawn prometheus"),
    );
    let prom_text = || std::fs::read_to_string(&prom_log).unwrap_or_default();
    let ready = support::wait_until(Duration::from_secs(30), || {
        http_get(prom_port, "/-/ready").is_ok_and(|(s, _)| s.contains("200"))
    });
    assert!(ready, "prometheus not ready in 30 s:\n{}", prom_text());

    // 4K random reads for up to 40 s; the test stops it when it has seen
    // what it needs.
    let bench_log = dir.path().join("bench.log");
    let _bench = ChildGuard(
        guard_command(
            Command::new(env!("CARGO_BIN_EXE_strata"))
                .args(["bench", "run", "--target"])
                .arg(format!("127.0.0.1:{}", server.port))
                .args([
                    "--nqn", NQN, "--nsid", "1", "--rw", "randread", "--bs", "4k",
                ])
                .args(["--qd", "8", "--size", "64m", "--runtime", "40s"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&bench_log).unwrap()),
        )
        .spawn()
        .expect("spawn strata bench"),
    );

    let sel = format!("subsystem=\"{NQN}\",nsid=\"1\",op=\"read\"");
    let rate_q = format!("rate(strata_ns_commands_total{{{sel}}}[10s])");
    let p99_q =
        format!("histogram_quantile(0.99, rate(strata_ns_latency_seconds_bucket{{{sel}}}[10s]))");
    let deadline = Instant::now() + Duration::from_secs(45);
    let (mut rate, mut p99) = (None, None);
    while Instant::now() < deadline {
        rate = query_value(prom_port, &rate_q);
        p99 = query_value(prom_port, &p99_q);
        if rate.is_some_and(|r| r > 0.0) && p99.is_some_and(f64::is_finite) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let rate = rate.filter(|r| *r > 0.0).unwrap_or_else(|| {
        panic!(
            "no rate of reads from Prometheus ({rate_q} = {rate:?});\nprometheus log:\n{}\nbench log:\n{}\nserve log:\n{}",
            prom_text(),
            std::fs::read_to_string(&bench_log).unwrap_or_default(),
            server.log_text()
        )
    });
    let p99 = p99
        .filter(|p| p.is_finite())
        .unwrap_or_else(|| panic!("no finite p99 from Prometheus ({p99_q} = {p99:?})"));
    eprintln!("prometheus: {rate:.0} reads/s, p99 {:.1} µs", p99 * 1e6);
    // Present, finite and positive is the contract; how fast is bench/'s
    // business.
    assert!(p99 > 0.0, "p99 {p99} s: no positive bucket");

    // The listener's counters reached Prometheus too.
    let conns = query_value(prom_port, "sum(strata_listener_connections_accepted_total)");
    assert!(
        conns.is_some_and(|c| c >= 2.0),
        "accepted connections: {conns:?}"
    );
}
