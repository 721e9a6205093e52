//! `strata bench objbacker`: throughput of an object-backed namespace
//! through NVMe/TCP, each figure a ratio against a baseline measured in the
//! same run:
//!
//! 1. 1 MiB sequential write (+FLUSH, timed) and read through `strata serve`
//!    against the raw `object_store` client on the same store at the same
//!    concurrency;
//! 2. the same with `inject_latency_ms` on the namespace (and the raw client
//!    wrapped in `FaultyStore`) against 0 ms;
//! 3. 4 KiB random writes against the PUTs the store received for them
//!    (write-back coalescing), counted at the embedded S3 server.
//!
//! Everything runs on 127.0.0.1: an embedded s3s-fs (or a local directory
//! for `--backend file`), `strata serve` children, and this process's load
//! generator. Rounds alternate raw and NVMe/TCP so machine drift hits both.

mod s3;
#[cfg(feature = "s3-server")]
mod s3server;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;
use strata_objbacker::{FaultConfig, FaultyStore, Latency};
use strata_target::spec::{Status, io_opc};

use crate::initiator::{Completions, ConnectOpts, Controller};
use crate::job::{JobSpec, Rw, parse_duration, parse_size};
use crate::load::{self, Progress};
use crate::report::human_bytes;

pub use s3::{ReqCounts, S3Args, S3Store};
#[cfg(feature = "s3-server")]
pub use s3server::S3Server;

const MIB: u64 = 1 << 20;
const OBJECT_SIZE: u64 = MIB;
const NQN: &str = "nqn.2026-11.dev.strata:objbench";
/// Key prefixes (S3) / directories (file) of the two namespaces and the raw
/// client, so the server's counters tell them apart.
const PREFIX_NS0: &str = "ns-0ms";
const PREFIX_NSLAT: &str = "ns-lat";
const PREFIX_RAW: &str = "raw";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// S3: the store at --s3-endpoint, or an embedded S3 server (s3s-fs)
    /// on 127.0.0.1 with requests counted (builds with `s3-server`).
    S3,
    /// Local directories (file:// buckets); PUTs are estimated from files
    /// rewritten, a lower bound.
    File,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ObjBenchArgs {
    #[arg(long, value_enum, default_value = "s3")]
    pub backend: Backend,
    /// Namespace size; also the key space of the raw client (1 MiB keys).
    #[arg(long, default_value = "1GiB")]
    pub size: String,
    /// Buckets the namespace (and the raw client) stripe over.
    #[arg(long, default_value_t = 6)]
    pub buckets: usize,
    /// Commands in flight (NVMe/TCP) = concurrent requests (raw client).
    #[arg(long, default_value_t = 16)]
    pub qd: u32,
    /// Time of each measured phase.
    #[arg(long, default_value = "10s")]
    pub runtime: String,
    /// Injected latency per store request for the latency comparison.
    #[arg(long, default_value_t = 20.0)]
    pub latency_ms: f64,
    /// Rounds of raw / NVMe/TCP alternation (each round: raw, nvme at 0 ms,
    /// raw, nvme at the injected latency).
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Region of the 4 KiB random writes (coalescing phase).
    #[arg(long, default_value = "64MiB")]
    pub rand_size: String,
    /// `strata` binary to run `serve` from (default: $STRATA_BIN, else
    /// this executable).
    #[arg(long)]
    pub strata_bin: Option<PathBuf>,
    /// Working directory for buckets, configs and serve logs (default: a
    /// temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub s3: S3Args,
}

/// Resolved settings.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub backend: Backend,
    pub size_bytes: u64,
    pub buckets: usize,
    pub qd: u32,
    pub runtime_ms: u64,
    pub latency_ms: f64,
    pub rounds: u32,
    pub object_size_bytes: u64,
    pub seq_bs_bytes: u64,
    pub rand_bs_bytes: u64,
    pub rand_region_bytes: u64,
    /// Kept out of the report: it may hold credentials.
    #[serde(skip)]
    pub s3: S3Args,
}

impl Settings {
    pub fn from_args(a: &ObjBenchArgs) -> Result<Self> {
        let s = Self {
            backend: a.backend,
            size_bytes: parse_size(&a.size)?,
            buckets: a.buckets,
            qd: a.qd,
            runtime_ms: parse_duration(&a.runtime)?.as_millis() as u64,
            latency_ms: a.latency_ms,
            rounds: a.rounds,
            object_size_bytes: OBJECT_SIZE,
            seq_bs_bytes: MIB,
            rand_bs_bytes: 4096,
            rand_region_bytes: parse_size(&a.rand_size)?,
            s3: a.s3.clone(),
        };
        ensure!(
            s.size_bytes >= 4 * MIB && s.size_bytes.is_multiple_of(MIB),
            "--size must be a multiple of 1MiB and at least 4MiB"
        );
        ensure!(
            s.rand_region_bytes >= MIB
                && s.rand_region_bytes.is_multiple_of(MIB)
                && s.rand_region_bytes <= s.size_bytes,
            "--rand-size must be a multiple of 1MiB within --size"
        );
        ensure!((1..=64).contains(&s.buckets), "--buckets out of 1..=64");
        ensure!((1..=256).contains(&s.qd), "--qd out of 1..=256");
        ensure!(s.runtime_ms >= 100, "--runtime must be at least 100ms");
        ensure!(
            s.latency_ms > 0.0 && s.latency_ms <= 10_000.0,
            "--latency-ms out of (0, 10000]"
        );
        ensure!(s.rounds >= 1, "--rounds must be at least 1");
        Ok(s)
    }

    fn runtime(&self) -> Duration {
        Duration::from_millis(self.runtime_ms)
    }
}

/// Bytes moved in a window.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Tput {
    pub ios: u64,
    pub bytes: u64,
    /// Measured window; for NVMe/TCP writes it includes the FLUSH.
    pub seconds: f64,
    pub bytes_per_s: f64,
}

impl Tput {
    fn new(ios: u64, bytes: u64, seconds: f64) -> Self {
        Self {
            ios,
            bytes,
            seconds,
            bytes_per_s: if seconds > 0.0 {
                bytes as f64 / seconds
            } else {
                0.0
            },
        }
    }
}

/// A write then a read phase.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct WriteRead {
    pub write: Tput,
    pub read: Tput,
    /// FLUSH after the writes (NVMe/TCP only; 0 for the raw client, whose
    /// PUTs are durable when they complete).
    pub flush_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub raw: WriteRead,
    pub nvme: WriteRead,
    pub raw_lat: WriteRead,
    pub nvme_lat: WriteRead,
}

/// Mean and spread of one figure over the rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub name: String,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl Figure {
    fn of(name: &str, v: &[f64]) -> Self {
        let n = v.len().max(1) as f64;
        Self {
            name: name.into(),
            mean: v.iter().sum::<f64>() / n,
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Coalescing {
    /// 4 KiB writes completed in the window, and their bytes (host side).
    pub writes: u64,
    pub host_bytes: u64,
    pub window_s: f64,
    pub flush_s: f64,
    pub iops: f64,
    /// PUTs the store received for the namespace from the start of the
    /// writes to the end of the FLUSH, and their bytes.
    pub puts: u64,
    pub put_bytes: u64,
    /// GETs in the same span (read-modify-write of partial objects).
    pub gets: u64,
    /// True when counted at the embedded S3 server; false for `file`, where
    /// the figure is the number of object files rewritten (a lower bound),
    /// and for an external S3 store, where nothing is counted (0).
    pub puts_exact: bool,
    /// 4 KiB writes per PUT: what coalescing saves (>= 1).
    pub writes_per_put: f64,
    /// Bytes PUT per byte written by the host (write amplification).
    pub put_bytes_per_host_byte: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ObjBenchReport {
    pub schema_version: u32,
    pub tool: String,
    pub started_unix_ms: u64,
    pub settings: Settings,
    pub rounds: Vec<Round>,
    /// Throughputs in bytes/s over the rounds.
    pub throughput: Vec<Figure>,
    /// Per-round ratios, then mean/min/max.
    pub ratios: Vec<Figure>,
    pub coalescing: Coalescing,
}

impl ObjBenchReport {
    pub fn figure(&self, name: &str) -> Option<&Figure> {
        self.throughput
            .iter()
            .chain(&self.ratios)
            .find(|f| f.name == name)
    }

    pub fn table(&self) -> String {
        use std::fmt::Write;
        let s = &self.settings;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "objbacker bench: backend {:?}, {} namespace, {} buckets, object 1 MiB, QD {}, {} ms per phase, {} round(s), injected latency {} ms",
            s.backend,
            human_bytes(s.size_bytes as f64),
            s.buckets,
            s.qd,
            s.runtime_ms,
            s.rounds,
            s.latency_ms
        );
        let _ = writeln!(
            t,
            "\n{:<34} {:>12} {:>12} {:>12}",
            "throughput (1 MiB sequential)", "mean", "min", "max"
        );
        let gbs = |v: f64| format!("{:.3} GB/s", v / 1e9);
        for f in &self.throughput {
            let _ = writeln!(
                t,
                "{:<34} {:>12} {:>12} {:>12}",
                f.name,
                gbs(f.mean),
                gbs(f.min),
                gbs(f.max)
            );
        }
        let _ = writeln!(
            t,
            "\n{:<34} {:>12} {:>12} {:>12}",
            "ratio (per round)", "mean", "min", "max"
        );
        for f in &self.ratios {
            let _ = writeln!(
                t,
                "{:<34} {:>12.3} {:>12.3} {:>12.3}",
                f.name, f.mean, f.min, f.max
            );
        }
        let c = &self.coalescing;
        let _ = writeln!(
            t,
            "\ncoalescing: {} x 4 KiB random writes over {} in {:.2} s (+{:.3} s FLUSH, {:.0} IOPS)",
            c.writes,
            human_bytes(s.rand_region_bytes as f64),
            c.window_s,
            c.flush_s,
            c.iops
        );
        let _ = writeln!(
            t,
            "  PUTs {}{} ({} PUT), GETs {}: {:.1} writes per PUT; {:.2} bytes PUT per byte written ({} host)",
            c.puts,
            if c.puts_exact {
                ""
            } else if s.backend == Backend::S3 {
                // An external store (--s3-endpoint): nothing here sees its
                // requests, and a 0 must not read as "no PUTs".
                " (not counted: only the embedded S3 server counts requests)"
            } else {
                " (files rewritten, lower bound)"
            },
            human_bytes(c.put_bytes as f64),
            c.gets,
            c.writes_per_put,
            c.put_bytes_per_host_byte,
            human_bytes(c.host_bytes as f64)
        );
        t
    }
}

/// Entry point for `strata bench objbacker`.
pub fn cmd_objbench(a: ObjBenchArgs) -> Result<()> {
    let settings = Settings::from_args(&a)?;
    let bin = match a.strata_bin.clone() {
        Some(b) => b,
        None => match std::env::var_os("STRATA_BIN") {
            Some(b) => PathBuf::from(b),
            None => std::env::current_exe().context("locating the strata binary")?,
        },
    };
    let rep = run(&settings, &bin, a.dir.as_deref(), true)?;
    print!("{}", rep.table());
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rep)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// A `strata serve` child with one objbacker namespace.
struct ServeChild {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

impl ServeChild {
    fn start(
        bin: &Path,
        dir: &Path,
        label: &str,
        buckets: &[String],
        store_options: &[(&str, String)],
        s: &Settings,
        latency_ms: f64,
    ) -> Result<Self> {
        // Both listeners are bound while we pick, so they differ.
        let (port, disc) = {
            let a = TcpListener::bind("127.0.0.1:0")?;
            let b = TcpListener::bind("127.0.0.1:0")?;
            (a.local_addr()?.port(), b.local_addr()?.port())
        };
        let cfg = dir.join(format!("serve-{label}.toml"));
        let opts: Vec<String> = store_options
            .iter()
            .map(|(k, v)| format!("{k} = {}", toml_str(v)))
            .collect();
        let text = format!(
            "[[listener]]\nname = \"bench\"\naddr = \"127.0.0.1:{port}\"\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nallow_any_host = true\n\n\
             [[subsystem.namespace]]\nnsid = 1\ntype = \"objbacker\"\nsize = \"{}\"\n\
             object_size = \"{}\"\nbuckets = [{}]\nauto_format = true\n{}\
             store_options = {{ {} }}\n",
            s.size_bytes,
            OBJECT_SIZE,
            buckets
                .iter()
                .map(|b| toml_str(b))
                .collect::<Vec<_>>()
                .join(", "),
            // 0 ms: no FaultyStore at all, the production path.
            if latency_ms > 0.0 {
                format!("inject_latency_ms = {latency_ms:?}\n")
            } else {
                String::new()
            },
            opts.join(", ")
        );
        std::fs::write(&cfg, text)?;
        let log = dir.join(format!("serve-{label}.log"));
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .arg("--discovery")
            .arg(format!("127.0.0.1:{disc}"))
            .env("STRATA_DATA_DIR", dir.join("data"))
            // Its own state and management socket: the bench runs two
            // targets side by side in one directory.
            .env("STRATA_STATE_DIR", dir.join(format!("state-{label}")))
            .env("STRATA_RUNTIME_DIR", dir.join(format!("run-{label}")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("spawning {} serve", bin.display()))?;
        let mut sc = Self {
            child,
            addr: format!("127.0.0.1:{port}").parse()?,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(sc.addr).is_err() {
            if let Some(st) = sc.child.try_wait()? {
                bail!(
                    "strata serve ({label}) exited with {st}; log:\n{}",
                    sc.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "strata serve ({label}) not listening after 60 s; log:\n{}",
                    sc.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sc)
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn opts(&self) -> ConnectOpts {
        ConnectOpts::new(self.addr, NQN)
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One FLUSH on its own I/O queue; returns how long it took.
pub fn nvme_flush(opts: &ConnectOpts, timeout: Duration) -> Result<Duration> {
    struct One(Option<Status>);
    impl Completions for One {
        fn c2h_data(&mut self, cid: u16, _: u32, _: &[u8]) -> Result<()> {
            bail!("C2HData for FLUSH command {cid}")
        }
        fn write_data(&self, _: u16) -> Option<&[u8]> {
            None
        }
        fn complete(&mut self, _: u16, status: Status) -> Result<()> {
            self.0 = Some(status);
            Ok(())
        }
    }
    let mut ctrl = Controller::connect(opts.clone(), 1)?;
    let mut q = ctrl.connect_io_queue(1, 1, 4096)?;
    let t = Instant::now();
    // FLUSH moves no data; the length only fills the SGL, the target ignores it.
    q.submit(0, io_opc::FLUSH, 0, ctrl.info.lba_size, &[]);
    let mut c = One(None);
    let r = loop {
        if let Some(st) = c.0 {
            break if st.is_success() {
                Ok(t.elapsed())
            } else {
                Err(anyhow::anyhow!("FLUSH failed: {st:?}"))
            };
        }
        if t.elapsed() > timeout {
            break Err(anyhow::anyhow!("FLUSH did not complete in {timeout:?}"));
        }
        if let Err(e) = q.poll(&mut c, Duration::from_millis(50)) {
            break Err(e);
        }
        if let Err(e) = ctrl.keep_alive_if_due() {
            break Err(e);
        }
    };
    q.disconnect();
    let d = ctrl.disconnect();
    let el = r?;
    d?;
    Ok(el)
}

fn load_run(opts: &ConnectOpts, spec: &JobSpec) -> Result<load::RunOutput> {
    load::run(
        opts,
        spec,
        None,
        Arc::new(Progress::default()),
        &mut |_, _| {},
    )
}

/// 1 MiB sequential write for the runtime, FLUSH (timed with the writes),
/// then 1 MiB sequential read of what was written.
fn nvme_seq(opts: &ConnectOpts, s: &Settings) -> Result<WriteRead> {
    let spec = JobSpec {
        name: "objbench-seq-write".into(),
        rw: Rw::Write,
        bs: s.seq_bs_bytes as u32,
        qd: s.qd,
        jobs: 1,
        offset: 0,
        size: Some(s.size_bytes),
        runtime_ms: Some(s.runtime_ms),
        ramp_ms: 0,
        ..JobSpec::default()
    };
    let w = load_run(opts, &spec)?;
    let flush = nvme_flush(opts, Duration::from_secs(300))?;
    let (wios, wbytes, wwin) = sums(&w);
    let write = Tput::new(wios, wbytes, wwin + flush.as_secs_f64());
    // Read back only what was written: unwritten objects read as zeros
    // without a GET, which would flatter the read figure.
    let region = (wios * s.seq_bs_bytes).clamp(s.seq_bs_bytes, s.size_bytes);
    let rspec = JobSpec {
        name: "objbench-seq-read".into(),
        rw: Rw::Read,
        size: Some(region),
        ..spec
    };
    let r = load_run(opts, &rspec)?;
    let (rios, rbytes, rwin) = sums(&r);
    Ok(WriteRead {
        write,
        read: Tput::new(rios, rbytes, rwin),
        flush_s: flush.as_secs_f64(),
    })
}

fn sums(o: &load::RunOutput) -> (u64, u64, f64) {
    let ios = o.jobs.iter().map(|j| j.reads + j.writes).sum();
    let bytes = o.jobs.iter().map(|j| j.read_bytes + j.write_bytes).sum();
    let win = o
        .jobs
        .iter()
        .map(|j| j.window.as_secs_f64())
        .fold(0.0, f64::max);
    (ios, bytes, win)
}

/// The raw client: `qd` tasks PUT 1 MiB objects to distinct keys (cycling
/// over `size / 1 MiB` keys striped over the buckets) for the runtime, then
/// GET the keys written. Only requests completed inside the window count,
/// as with the load generator.
async fn raw_seq(stores: Arc<Vec<Arc<dyn ObjectStore>>>, s: &Settings) -> Result<WriteRead> {
    let nkeys = s.size_bytes / OBJECT_SIZE;
    let payload = {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let v: Vec<u8> = (0..OBJECT_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Bytes::from(v)
    };
    let key = move |i: u64, stores: &[Arc<dyn ObjectStore>]| {
        let k = i % nkeys;
        (
            stores[(k % stores.len() as u64) as usize].clone(),
            ObjPath::from(format!("{PREFIX_RAW}/{k:08}")),
        )
    };
    let phase = |write: bool, limit: u64| {
        let stores = stores.clone();
        let payload = payload.clone();
        let next = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let deadline = t0 + s.runtime();
        let tasks: Vec<_> = (0..s.qd)
            .map(|_| {
                let (stores, payload, next) = (stores.clone(), payload.clone(), next.clone());
                tokio::spawn(async move {
                    let (mut ios, mut bytes) = (0u64, 0u64);
                    while Instant::now() < deadline {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let (store, path) = key(i % limit, &stores);
                        let n = if write {
                            store
                                .put(&path, PutPayload::from_bytes(payload.clone()))
                                .await
                                .with_context(|| format!("raw PUT {path}"))?;
                            payload.len() as u64
                        } else {
                            store
                                .get(&path)
                                .await
                                .with_context(|| format!("raw GET {path}"))?
                                .bytes()
                                .await?
                                .len() as u64
                        };
                        if Instant::now() <= deadline {
                            ios += 1;
                            bytes += n;
                        }
                    }
                    anyhow::Ok((ios, bytes))
                })
            })
            .collect();
        async move {
            let (mut ios, mut bytes) = (0, 0);
            for t in tasks {
                let (i, b) = t.await??;
                ios += i;
                bytes += b;
            }
            let started = next.load(Ordering::Relaxed);
            anyhow::Ok((
                Tput::new(ios, bytes, (deadline - t0).as_secs_f64()),
                started,
            ))
        }
    };
    let (write, started) = phase(true, u64::MAX).await?;
    // Every PUT that started has completed: read those keys back.
    let (read, _) = phase(false, started.clamp(1, nkeys)).await?;
    Ok(WriteRead {
        write,
        read,
        flush_s: 0.0,
    })
}

fn with_latency(stores: &[Arc<dyn ObjectStore>], ms: f64) -> Arc<Vec<Arc<dyn ObjectStore>>> {
    Arc::new(
        stores
            .iter()
            .map(|st| {
                Arc::new(FaultyStore::new(
                    st.clone(),
                    FaultConfig {
                        latency: Latency::Fixed(Duration::from_secs_f64(ms / 1000.0)),
                        ..FaultConfig::default()
                    },
                )) as Arc<dyn ObjectStore>
            })
            .collect(),
    )
}

/// Object files under `dirs` modified at or after `since` (file backend).
fn files_modified_since(dirs: &[PathBuf], since: SystemTime) -> Result<(u64, u64)> {
    let (mut n, mut bytes) = (0, 0);
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let md = e.metadata()?;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.modified()? >= since
                && !e.file_name().to_string_lossy().contains("superblock")
            {
                n += 1;
                bytes += md.len();
            }
        }
    }
    Ok((n, bytes))
}

/// Per-bucket locations (URLs, directories) of a key prefix.
type PerPrefix<T> = Box<dyn Fn(&str) -> Vec<T>>;
/// Namespace bucket URLs, raw clients, store_options, directories (file).
type BackendSetup = (
    PerPrefix<String>,
    Vec<Arc<dyn ObjectStore>>,
    Vec<(&'static str, String)>,
    PerPrefix<PathBuf>,
);

fn log(progress: bool, msg: &str) {
    if progress {
        eprintln!("objbench: {msg}");
    }
}

/// Runs the whole benchmark. `bin` is the `strata` binary (`serve`); `dir`
/// the working directory (a temporary one when None).
pub fn run(s: &Settings, bin: &Path, dir: Option<&Path>, progress: bool) -> Result<ObjBenchReport> {
    strata_objbacker::install_crypto_provider();
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let tmp;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.to_path_buf()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("strata-objbench")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    // The S3 server and the raw client run on separate runtimes, as the
    // server and serve's object-store runtime (2 workers) are separate.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("objbench-s3")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("objbench-raw")
        .enable_all()
        .build()?;

    let nb = s.buckets;
    let server;
    let (ns_urls, raw_stores, store_options, file_dirs): BackendSetup = match s.backend {
        Backend::S3 => {
            let st = S3Store::open(&s.s3, &dir.join("s3"), nb, &server_rt)?;
            let stores = (0..nb).map(|k| st.client(k)).collect::<Result<Vec<_>>>()?;
            let opts = st.store_options();
            let buckets: Vec<String> = (0..nb).map(|k| st.bucket(k)).collect();
            server = Some(st);
            (
                Box::new(move |p| buckets.iter().map(|b| format!("s3://{b}/{p}")).collect()),
                stores,
                opts,
                Box::new(|_| Vec::new()),
            )
        }
        Backend::File => {
            let root = dir.join("file");
            let mut stores: Vec<Arc<dyn ObjectStore>> = Vec::new();
            for k in 0..nb {
                let d = root.join(PREFIX_RAW).join(format!("bucket-{k}"));
                std::fs::create_dir_all(&d)?;
                stores.push(Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(&d)?,
                ));
            }
            server = None;
            let r1 = root.clone();
            (
                Box::new(move |p| {
                    (0..nb)
                        .map(|k| format!("file://{}/{p}/bucket-{k}", r1.display()))
                        .collect()
                }),
                stores,
                Vec::new(),
                Box::new(move |p| {
                    (0..nb)
                        .map(|k| root.join(p).join(format!("bucket-{k}")))
                        .collect()
                }),
            )
        }
    };
    let raw_stores = Arc::new(raw_stores);
    let raw_lat_stores = with_latency(&raw_stores, s.latency_ms);

    log(
        progress,
        &format!("starting strata serve ({})", bin.display()),
    );
    let ns0 = ServeChild::start(
        bin,
        &dir,
        "0ms",
        &ns_urls(PREFIX_NS0),
        &store_options,
        s,
        0.0,
    )?;
    let nslat = ServeChild::start(
        bin,
        &dir,
        "lat",
        &ns_urls(PREFIX_NSLAT),
        &store_options,
        s,
        s.latency_ms,
    )?;
    let with_log =
        |sc: &ServeChild, e: anyhow::Error| e.context(format!("serve log:\n{}", sc.log_tail()));

    let mut rounds = Vec::new();
    for r in 1..=s.rounds {
        let tag = format!("round {r}/{}", s.rounds);
        log(progress, &format!("{tag}: raw client, 0 ms"));
        let raw = client_rt.block_on(raw_seq(raw_stores.clone(), s))?;
        log(progress, &format!("{tag}: NVMe/TCP, 0 ms"));
        let nvme = nvme_seq(&ns0.opts(), s).map_err(|e| with_log(&ns0, e))?;
        log(progress, &format!("{tag}: raw client, {} ms", s.latency_ms));
        let raw_lat = client_rt.block_on(raw_seq(raw_lat_stores.clone(), s))?;
        log(progress, &format!("{tag}: NVMe/TCP, {} ms", s.latency_ms));
        let nvme_lat = nvme_seq(&nslat.opts(), s).map_err(|e| with_log(&nslat, e))?;
        rounds.push(Round {
            raw,
            nvme,
            raw_lat,
            nvme_lat,
        });
    }

    log(progress, "coalescing: 4 KiB random writes, 0 ms namespace");
    let counts = |p: &str| server.as_ref().and_then(|srv| srv.counts(p));
    let before = counts(PREFIX_NS0);
    let since = SystemTime::now();
    let spec = JobSpec {
        name: "objbench-coalesce".into(),
        rw: Rw::Randwrite,
        bs: s.rand_bs_bytes as u32,
        qd: s.qd,
        jobs: 1,
        offset: 0,
        size: Some(s.rand_region_bytes),
        runtime_ms: Some(s.runtime_ms),
        ramp_ms: 0,
        ..JobSpec::default()
    };
    let o = ns0.opts();
    let out = load_run(&o, &spec).map_err(|e| with_log(&ns0, e))?;
    let flush = nvme_flush(&o, Duration::from_secs(300)).map_err(|e| with_log(&ns0, e))?;
    let (writes, host_bytes, window_s) = sums(&out);
    let (puts, put_bytes, gets, puts_exact) = match (before, counts(PREFIX_NS0)) {
        (Some(b), Some(a)) => {
            let d = a.since(&b);
            (d.puts, d.put_bytes, d.gets, true)
        }
        _ => {
            let (n, b) = files_modified_since(&file_dirs(PREFIX_NS0), since)?;
            (n, b, 0, false)
        }
    };
    let coalescing = Coalescing {
        writes,
        host_bytes,
        window_s,
        flush_s: flush.as_secs_f64(),
        iops: if window_s > 0.0 {
            writes as f64 / window_s
        } else {
            0.0
        },
        puts,
        put_bytes,
        gets,
        puts_exact,
        writes_per_put: if puts > 0 {
            writes as f64 / puts as f64
        } else {
            0.0
        },
        put_bytes_per_host_byte: if host_bytes > 0 {
            put_bytes as f64 / host_bytes as f64
        } else {
            0.0
        },
    };
    drop(nslat);
    drop(ns0);
    drop(server);
    server_rt.shutdown_timeout(Duration::from_secs(1));
    client_rt.shutdown_timeout(Duration::from_secs(1));

    let col = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let throughput = vec![
        Figure::of("raw_write", &col(&|r| r.raw.write.bytes_per_s)),
        Figure::of("raw_read", &col(&|r| r.raw.read.bytes_per_s)),
        Figure::of("nvme_write", &col(&|r| r.nvme.write.bytes_per_s)),
        Figure::of("nvme_read", &col(&|r| r.nvme.read.bytes_per_s)),
        Figure::of("raw_lat_write", &col(&|r| r.raw_lat.write.bytes_per_s)),
        Figure::of("raw_lat_read", &col(&|r| r.raw_lat.read.bytes_per_s)),
        Figure::of("nvme_lat_write", &col(&|r| r.nvme_lat.write.bytes_per_s)),
        Figure::of("nvme_lat_read", &col(&|r| r.nvme_lat.read.bytes_per_s)),
    ];
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let ratios = vec![
        Figure::of(
            "nvme_write/raw_write",
            &col(&|r| ratio(r.nvme.write.bytes_per_s, r.raw.write.bytes_per_s)),
        ),
        Figure::of(
            "nvme_read/raw_read",
            &col(&|r| ratio(r.nvme.read.bytes_per_s, r.raw.read.bytes_per_s)),
        ),
        Figure::of(
            "nvme_lat_write/nvme_write",
            &col(&|r| ratio(r.nvme_lat.write.bytes_per_s, r.nvme.write.bytes_per_s)),
        ),
        Figure::of(
            "nvme_lat_read/nvme_read",
            &col(&|r| ratio(r.nvme_lat.read.bytes_per_s, r.nvme.read.bytes_per_s)),
        ),
        Figure::of(
            "raw_lat_write/raw_write",
            &col(&|r| ratio(r.raw_lat.write.bytes_per_s, r.raw.write.bytes_per_s)),
        ),
        Figure::of(
            "raw_lat_read/raw_read",
            &col(&|r| ratio(r.raw_lat.read.bytes_per_s, r.raw.read.bytes_per_s)),
        ),
        Figure::of(
            "nvme_lat_write/raw_lat_write",
            &col(&|r| ratio(r.nvme_lat.write.bytes_per_s, r.raw_lat.write.bytes_per_s)),
        ),
        Figure::of(
            "nvme_lat_read/raw_lat_read",
            &col(&|r| ratio(r.nvme_lat.read.bytes_per_s, r.raw_lat.read.bytes_per_s)),
        ),
    ];
    Ok(ObjBenchReport {
        schema_version: 1,
        tool: format!("strata-bench {}", env!("CARGO_PKG_VERSION")),
        started_unix_ms,
        settings: s.clone(),
        rounds,
        throughput,
        ratios,
        coalescing,
    })
}
