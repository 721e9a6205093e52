//! `strata bench soak`: a long mixed, verified load against a running
//! `strata serve`, with misbehaving hosts among the healthy ones, while the
//! target's resident memory is sampled.
//!
//! * Healthy connections run the load generator ([`crate::load`]) in verify
//!   mode: one group per block size (4 KiB and 8 KiB go in-capsule, 128 KiB
//!   and 512 KiB through R2T + H2CData), each group its own controller and
//!   its own slice of the region, random read/write mix. Every region is
//!   written once before the clock starts (so first-touch pages of a RAM
//!   namespace do not count as growth), and every written block is read back
//!   and checked when the run ends.
//! * Misbehaving connections share one controller of their own and cycle
//!   through [`Behaviour`]s; each episode lasts until the target cuts the
//!   connection (EOF, reset, C2HTermReq), then the host reconnects after a
//!   pause. Being cut is the expected outcome, never an error of the soak.
//! * The target's VmRSS (`/proc/<pid>/status`) is sampled every interval.
//!
//! The wire format is the target's codec (`strata_target::pdu`) through the
//! bench initiator ([`IoQueue`], [`Conn`]); nothing here encodes a PDU by
//! hand.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::Serialize;
use strata_target::host;
use strata_target::pdu::{H2CData, PduHeader};
use strata_target::spec::{ConnectData, io_opc};

use crate::conn::Conn;
use crate::initiator::{ConnectOpts, Controller, ControllerInfo, IoQueue};
use crate::job::{JobSpec, Rw, parse_duration, parse_size};
use crate::load::{self, Progress, VerifyState};
use crate::verify::VerifyError;

/// The embedded default subsystem of `strata serve`.
pub const DEFAULT_NQN: &str = "nqn.2026-11.dev.strata:default";
const MISBEHAVING_HOSTNQN: &str = "nqn.2024-01.io.strata:soak-misbehaving";
/// Large writes of the withholding host: 4 H2CData PDUs at MAXH2CDATA 128 KiB.
const WITHHELD_WRITE: u32 = 512 << 10;
/// Writes the withholding host keeps outstanding: 24 MiB, past the target's
/// default R2T budget (16 MiB per queue).
const WITHHELD_WRITES: u16 = 48;
/// Reads of the flooding host.
const FLOOD_READ: u32 = 128 << 10;
/// Region kept apart for the misbehaving hosts' commands.
const MISBEHAVING_REGION: u64 = 1 << 20;
/// Most verify errors kept with full detail (all are counted).
const MAX_ERRORS: usize = 64;

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// Target address, host:port.
    #[arg(long, default_value = "127.0.0.1:4420")]
    pub addr: String,
    /// Subsystem NQN.
    #[arg(long, default_value = DEFAULT_NQN)]
    pub nqn: String,
    #[arg(long, default_value_t = 1)]
    pub nsid: u32,
    /// Target process whose VmRSS is sampled (default: the process
    /// listening on --addr, if it can be found in /proc).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Healthy connections (I/O queues running verified load).
    #[arg(long, default_value_t = 64)]
    pub connections: u32,
    /// Misbehaving connections among them.
    #[arg(long, default_value_t = 4)]
    pub misbehaving: u32,
    /// How long the load runs, e.g. 10m.
    #[arg(long, default_value = "10m")]
    pub duration: String,
    /// Block sizes; healthy connections are dealt round-robin, one group
    /// (controller, region slice) per size.
    #[arg(long, default_value = "4k,8k,128k,512k")]
    pub bs: String,
    /// Queue depth of each healthy connection.
    #[arg(long, default_value_t = 4)]
    pub qd: u32,
    /// Percent reads.
    #[arg(long, default_value_t = 50)]
    pub rwmixread: u8,
    /// Start of the exercised region.
    #[arg(long, default_value = "0")]
    pub offset: String,
    /// Length of the exercised region (bounded by the namespace).
    #[arg(long, default_value = "256m")]
    pub size: String,
    /// Memory sampling interval.
    #[arg(long, default_value = "10s")]
    pub sample_interval: String,
    /// Growth is measured from the first sample at or after this.
    #[arg(long, default_value = "30s")]
    pub warmup: String,
    /// A misbehaving connection the target has not cut after this long is
    /// closed by the host (and counted as not cut).
    #[arg(long, default_value = "120s")]
    pub episode_limit: String,
    /// Fail when RSS grows by more than this after warm-up, e.g. 256m.
    #[arg(long)]
    pub max_rss_growth: Option<String>,
    #[arg(long, default_value_t = 0x50a4_5eed)]
    pub seed: u64,
    /// Keep Alive Timeout of every controller, ms.
    #[arg(long, default_value_t = 5000)]
    pub kato_ms: u32,
    /// Write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No per-sample progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl SoakArgs {
    /// The command-line defaults, as `strata bench soak` with no flags.
    pub fn defaults() -> Self {
        <Self as clap::FromArgMatches>::from_arg_matches(
            &<Self as clap::Args>::augment_args(clap::Command::new("soak"))
                .get_matches_from(["soak"]),
        )
        .expect("defaults parse")
    }
}

/// What a misbehaving host does in one episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Floods read commands and never receives.
    ReadFlood,
    /// Answers every R2T of its large writes except for the last H2CData PDU.
    WithholdH2C,
    /// Opens TCP and sends nothing (no ICReq).
    NoIcReq,
    /// Sends ICReq, never Connect.
    NoConnect,
}

pub const BEHAVIOURS: [Behaviour; 4] = [
    Behaviour::ReadFlood,
    Behaviour::WithholdH2C,
    Behaviour::NoIcReq,
    Behaviour::NoConnect,
];

#[derive(Clone, Debug, Default, Serialize)]
pub struct BehaviourStats {
    pub behaviour: String,
    pub episodes: u64,
    /// Connections the target ended (EOF, reset, C2HTermReq).
    pub cut: u64,
    /// Closed by us after `episode_limit` without the target acting.
    pub not_cut: u64,
    /// Still open when the soak ended.
    pub open_at_end: u64,
    /// Connection attempts that failed before misbehaving (refused, Connect
    /// rejected, …); retried with backoff.
    pub connect_failures: u64,
    /// Time from TCP connect to the cut.
    pub cut_after_ms_min: Option<u64>,
    pub cut_after_ms_mean: Option<u64>,
    pub cut_after_ms_max: Option<u64>,
    #[serde(skip)]
    cut_sum_ms: u64,
    pub last_cut_reason: Option<String>,
    pub last_connect_error: Option<String>,
}

impl BehaviourStats {
    fn record_cut(&mut self, after: Duration, reason: String) {
        let ms = after.as_millis() as u64;
        self.cut += 1;
        self.cut_sum_ms += ms;
        self.cut_after_ms_min = Some(self.cut_after_ms_min.map_or(ms, |m| m.min(ms)));
        self.cut_after_ms_max = Some(self.cut_after_ms_max.map_or(ms, |m| m.max(ms)));
        self.cut_after_ms_mean = Some(self.cut_sum_ms / self.cut);
        self.last_cut_reason = Some(reason);
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct MemSample {
    pub t_s: f64,
    pub rss_bytes: u64,
    /// Healthy I/Os completed so far.
    pub ios: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryReport {
    pub pid: Option<u32>,
    pub interval_s: f64,
    pub warmup_s: f64,
    pub samples: Vec<MemSample>,
    pub min_rss_bytes: Option<u64>,
    pub max_rss_bytes: Option<u64>,
    pub first_after_warmup_bytes: Option<u64>,
    pub last_bytes: Option<u64>,
    /// last − first sample after warm-up (negative: shrank).
    pub growth_bytes: Option<i64>,
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupReport {
    pub bs: u32,
    pub connections: u32,
    pub offset: u64,
    pub size: u64,
    pub reads: u64,
    pub writes: u64,
    /// Block reads checked against the last acknowledged write (load and
    /// the final read-back).
    pub verified_blocks: u64,
    pub verify_errors: u64,
    /// The error that ended the group's run, if one did.
    pub io_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HealthyReport {
    pub connections: u32,
    pub qd: u32,
    pub rwmixread: u8,
    pub groups: Vec<GroupReport>,
    pub reads: u64,
    pub writes: u64,
    pub verified_blocks: u64,
    pub verify_errors: u64,
    /// Groups whose run ended with an I/O or transport error.
    pub io_errors: u64,
    pub errors: Vec<VerifyError>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MisbehavingReport {
    pub connections: u32,
    /// Times the misbehaving hosts' own admin queue had to be reconnected.
    pub admin_reconnects: u64,
    pub behaviours: Vec<BehaviourStats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub schema_version: u32,
    pub tool: String,
    pub started_unix_ms: u64,
    pub addr: String,
    pub subnqn: String,
    pub nsid: u32,
    pub lba_size: u32,
    pub ns_bytes: u64,
    pub duration_s: f64,
    pub memory: MemoryReport,
    pub healthy: HealthyReport,
    pub misbehaving: MisbehavingReport,
    pub passed: bool,
    pub failures: Vec<String>,
}

/// Resolved settings.
struct Plan {
    opts: ConnectOpts,
    duration: Duration,
    interval: Duration,
    warmup: Duration,
    episode_limit: Duration,
    max_growth: Option<u64>,
    pid: Option<u32>,
    note: Option<String>,
}

/// Runs the soak; the report says whether it passed ([`SoakReport::passed`]).
pub fn run(a: &SoakArgs) -> Result<SoakReport> {
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let addr = crate::conn::resolve(&a.addr)?;
    let mut opts = ConnectOpts::new(addr, a.nqn.clone());
    opts.nsid = a.nsid;
    opts.kato_ms = a.kato_ms;
    let (pid, note) = match a.pid {
        Some(p) => (Some(p), None),
        None => match find_listener_pid(addr) {
            Some(p) => (Some(p), None),
            None => (
                None,
                Some(format!(
                    "no --pid and no process of ours listens on {addr}: memory not sampled"
                )),
            ),
        },
    };
    let plan = Plan {
        opts,
        duration: parse_duration(&a.duration)?,
        interval: parse_duration(&a.sample_interval)?.max(Duration::from_millis(100)),
        warmup: parse_duration(&a.warmup)?,
        episode_limit: parse_duration(&a.episode_limit)?,
        max_growth: a.max_rss_growth.as_deref().map(parse_size).transpose()?,
        pid,
        note,
    };
    ensure!(!plan.duration.is_zero(), "--duration of 0");
    ensure!(a.connections >= 1, "--connections must be at least 1");
    let sizes: Vec<u32> =
        a.bs.split(',')
            .map(|s| {
                let v = parse_size(s)?;
                u32::try_from(v).context("block size too large")
            })
            .collect::<Result<_>>()?;
    ensure!(!sizes.is_empty(), "--bs is empty");

    // What the namespace is.
    let info = {
        let c = Controller::connect(plan.opts.clone(), 1).context("identifying the target")?;
        let info = c.info.clone();
        c.disconnect()?;
        info
    };
    let ns_bytes = info.ns_blocks * u64::from(info.lba_size);
    let offset = parse_size(&a.offset)?;
    ensure!(
        offset < ns_bytes && offset.is_multiple_of(u64::from(info.lba_size)),
        "--offset {offset} not an LBA-aligned offset inside the {ns_bytes} byte namespace"
    );
    let size = parse_size(&a.size)?.min(ns_bytes - offset);
    let max_bs = u64::from(*sizes.iter().max().expect("non-empty"));
    ensure!(
        size > MISBEHAVING_REGION + max_bs,
        "region of {size} bytes too small"
    );
    let mis_lba = (offset + size - MISBEHAVING_REGION) / u64::from(info.lba_size);

    // Healthy groups: one per block size, connections dealt round-robin.
    let ngroups = sizes.len().min(a.connections as usize);
    let per_group = ((size - MISBEHAVING_REGION) / ngroups as u64) / max_bs * max_bs;
    ensure!(per_group >= max_bs, "region too small for {ngroups} groups");
    let mut groups = Vec::new();
    for (g, &bs) in sizes.iter().take(ngroups).enumerate() {
        let jobs =
            a.connections / ngroups as u32 + u32::from((g as u32) < a.connections % ngroups as u32);
        let spec = JobSpec {
            name: format!("soak-{}k", bs / 1024),
            rw: Rw::Randrw,
            rwmixread: a.rwmixread,
            bs,
            qd: a.qd,
            jobs,
            offset: offset + g as u64 * per_group,
            size: Some(per_group),
            runtime_ms: Some(plan.duration.as_millis() as u64),
            total_bytes: None,
            ramp_ms: 0,
            rate_iops: None,
            verify: true,
            seed: a.seed ^ (g as u64) << 8,
            interval_ms: 1000,
        };
        spec.validate()?;
        groups.push(spec);
    }

    // Fill every region once, verified, before the clock starts.
    let mut states = Vec::new();
    for spec in &groups {
        let vs = VerifyState::new(spec.seed as u32 ^ (spec.seed >> 32) as u32);
        let mut fill = spec.clone();
        fill.name = format!("{}-fill", spec.name);
        fill.rw = Rw::Write;
        fill.runtime_ms = None;
        let out = load::run(
            &plan.opts,
            &fill,
            Some(vs.clone()),
            Arc::new(Progress::default()),
            &mut |_, _| {},
        )
        .with_context(|| format!("filling the {} byte block region", spec.bs))?;
        let errs: u64 = out.jobs.iter().map(|j| j.verify_error_count).sum();
        ensure!(
            errs == 0,
            "the fill of the {} byte block region read back {errs} bad blocks",
            spec.bs
        );
        states.push(vs);
    }

    // The misbehaving hosts' own controller, connected once the fill (which
    // could outlast its keep-alive timeout) is done.
    let mis_opts = {
        let mut o = plan.opts.clone();
        o.hostnqn = MISBEHAVING_HOSTNQN.into();
        o.hostid = *b"strata-soak-mis\x01";
        o
    };
    let mis = Arc::new(MisCtl::connect(mis_opts)?);

    let t0 = Instant::now();
    let deadline = t0 + plan.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Arc<Mutex<Vec<BehaviourStats>>> = Arc::new(Mutex::new(
        BEHAVIOURS
            .iter()
            .map(|b| BehaviourStats {
                behaviour: format!("{b:?}"),
                ..Default::default()
            })
            .collect(),
    ));
    let progresses: Vec<Arc<Progress>> = groups
        .iter()
        .map(|_| Arc::new(Progress::default()))
        .collect();

    let mut memory = MemoryReport {
        pid: plan.pid,
        interval_s: plan.interval.as_secs_f64(),
        warmup_s: plan.warmup.as_secs_f64(),
        note: plan.note.clone(),
        ..Default::default()
    };
    let (group_results, ka_thread) = std::thread::scope(|s| {
        let ka = {
            let (mis, stop) = (mis.clone(), stop.clone());
            s.spawn(move || mis.keep_alive_loop(&stop))
        };
        let handles: Vec<_> = groups
            .iter()
            .zip(&states)
            .zip(&progresses)
            .map(|((spec, vs), p)| {
                let (opts, vs, p) = (&plan.opts, vs.clone(), p.clone());
                s.spawn(move || load::run(opts, spec, Some(vs), p, &mut |_, _| {}))
            })
            .collect();
        for i in 0..a.misbehaving {
            let (mis, stats, stop) = (mis.clone(), stats.clone(), stop.clone());
            let limit = plan.episode_limit;
            s.spawn(move || misbehave(i, &mis, &stats, &stop, deadline, limit, mis_lba));
        }
        // Sample while the load runs.
        let ios = || {
            progresses
                .iter()
                .map(|p| p.ios.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let mut next = t0;
        loop {
            let now = Instant::now();
            if now >= next || now >= deadline {
                if let Some(pid) = plan.pid {
                    match vm_rss(pid) {
                        Ok(rss) => memory.samples.push(MemSample {
                            t_s: (now - t0).as_secs_f64(),
                            rss_bytes: rss,
                            ios: ios(),
                        }),
                        Err(e) if memory.note.is_none() => {
                            memory.note = Some(format!("sampling stopped: {e:#}"))
                        }
                        Err(_) => {}
                    }
                }
                if !a.quiet {
                    let st = stats.lock().expect("stats");
                    let cuts: Vec<String> = st
                        .iter()
                        .map(|b| format!("{}={}", b.behaviour, b.cut))
                        .collect();
                    eprintln!(
                        "soak t={:>5.0}s rss={} ios={} cut: {}",
                        (now - t0).as_secs_f64(),
                        memory
                            .samples
                            .last()
                            .map_or("-".into(), |m| mib(m.rss_bytes)),
                        ios(),
                        cuts.join(" ")
                    );
                }
                if now >= deadline {
                    break;
                }
                while next <= now {
                    next += plan.interval;
                }
            }
            std::thread::sleep((next.min(deadline)).saturating_duration_since(Instant::now()));
        }
        stop.store(true, Ordering::Relaxed);
        let r: Vec<Result<load::RunOutput>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("group panicked"))))
            .collect();
        (r, ka.join().unwrap_or(0))
    });
    mis.disconnect();

    // Memory summary.
    if !memory.samples.is_empty() {
        memory.min_rss_bytes = memory.samples.iter().map(|m| m.rss_bytes).min();
        memory.max_rss_bytes = memory.samples.iter().map(|m| m.rss_bytes).max();
        let w = plan.warmup.as_secs_f64();
        let first = memory
            .samples
            .iter()
            .find(|m| m.t_s + 0.5 >= w)
            .or(memory.samples.last())
            .map(|m| m.rss_bytes);
        let last = memory.samples.last().map(|m| m.rss_bytes);
        memory.first_after_warmup_bytes = first;
        memory.last_bytes = last;
        memory.growth_bytes = first.zip(last).map(|(f, l)| l as i64 - f as i64);
    }

    let mut healthy = HealthyReport {
        connections: a.connections,
        qd: a.qd,
        rwmixread: a.rwmixread,
        groups: Vec::new(),
        reads: 0,
        writes: 0,
        verified_blocks: 0,
        verify_errors: 0,
        io_errors: 0,
        errors: Vec::new(),
    };
    for (spec, r) in groups.iter().zip(group_results) {
        let mut g = GroupReport {
            bs: spec.bs,
            connections: spec.jobs,
            offset: spec.offset,
            size: spec.size.unwrap_or(0),
            reads: 0,
            writes: 0,
            verified_blocks: 0,
            verify_errors: 0,
            io_error: None,
        };
        match r {
            Ok(out) => {
                for j in &out.jobs {
                    g.reads += j.reads;
                    g.writes += j.writes;
                    g.verified_blocks += j.verified_blocks;
                    g.verify_errors += j.verify_error_count;
                    for e in &j.verify_errors {
                        if healthy.errors.len() < MAX_ERRORS {
                            healthy.errors.push(e.clone());
                        }
                    }
                }
            }
            Err(e) => {
                g.io_error = Some(format!("{e:#}"));
                healthy.io_errors += 1;
            }
        }
        healthy.reads += g.reads;
        healthy.writes += g.writes;
        healthy.verified_blocks += g.verified_blocks;
        healthy.verify_errors += g.verify_errors;
        healthy.groups.push(g);
    }

    let mut failures = Vec::new();
    if healthy.verify_errors > 0 {
        failures.push(format!(
            "{} verified blocks were wrong; first: {}",
            healthy.verify_errors,
            healthy
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_default()
        ));
    }
    for g in &healthy.groups {
        if let Some(e) = &g.io_error {
            failures.push(format!("healthy {} byte I/O failed: {e}", g.bs));
        }
    }
    if healthy.verified_blocks == 0 && healthy.io_errors == 0 {
        failures.push("no block was verified".into());
    }
    if let (Some(max), Some(g)) = (plan.max_growth, memory.growth_bytes)
        && g > max as i64
    {
        failures.push(format!(
            "target RSS grew by {} after warm-up (limit {})",
            mib(g.max(0) as u64),
            mib(max)
        ));
    }
    let behaviours = stats.lock().expect("stats").clone();
    Ok(SoakReport {
        schema_version: 1,
        tool: format!("strata-bench {}", env!("CARGO_PKG_VERSION")),
        started_unix_ms,
        addr: a.addr.clone(),
        subnqn: a.nqn.clone(),
        nsid: a.nsid,
        lba_size: info.lba_size,
        ns_bytes,
        duration_s: plan.duration.as_secs_f64(),
        memory,
        healthy,
        misbehaving: MisbehavingReport {
            connections: a.misbehaving,
            admin_reconnects: ka_thread,
            behaviours,
        },
        passed: failures.is_empty(),
        failures,
    })
}

/// `strata bench soak`.
pub fn cmd_soak(a: SoakArgs) -> Result<()> {
    let r = run(&a)?;
    print!("{}", r.table());
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if !r.passed {
        bail!("soak failed: {}", r.failures.join("; "));
    }
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

impl SoakReport {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "soak {} {} nsid {} for {:.0} s: {}",
            self.addr,
            self.subnqn,
            self.nsid,
            self.duration_s,
            if self.passed { "PASSED" } else { "FAILED" }
        );
        let m = &self.memory;
        let _ = writeln!(
            s,
            "\ntarget memory (pid {}, every {:.0} s, warm-up {:.0} s)",
            m.pid.map_or("-".into(), |p| p.to_string()),
            m.interval_s,
            m.warmup_s
        );
        let _ = writeln!(
            s,
            "  {:>8}  {:>12}  {:>12}",
            "t (s)", "VmRSS", "healthy I/Os"
        );
        for x in &m.samples {
            let _ = writeln!(
                s,
                "  {:>8.1}  {:>12}  {:>12}",
                x.t_s,
                mib(x.rss_bytes),
                x.ios
            );
        }
        if let (Some(lo), Some(hi), Some(g)) = (m.min_rss_bytes, m.max_rss_bytes, m.growth_bytes) {
            let _ = writeln!(
                s,
                "  min {}  max {}  growth after warm-up {}{}",
                mib(lo),
                mib(hi),
                if g < 0 { "-" } else { "+" },
                mib(g.unsigned_abs())
            );
        }
        if let Some(n) = &m.note {
            let _ = writeln!(s, "  note: {n}");
        }
        let h = &self.healthy;
        let _ = writeln!(
            s,
            "\nhealthy: {} connections, QD {}, {}% reads",
            h.connections, h.qd, h.rwmixread
        );
        let _ = writeln!(
            s,
            "  {:>8} {:>5} {:>12} {:>12} {:>12} {:>8}  error",
            "bs", "conns", "reads", "writes", "verified", "bad"
        );
        for g in &h.groups {
            let _ = writeln!(
                s,
                "  {:>8} {:>5} {:>12} {:>12} {:>12} {:>8}  {}",
                g.bs,
                g.connections,
                g.reads,
                g.writes,
                g.verified_blocks,
                g.verify_errors,
                g.io_error.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(
            s,
            "  {:>8} {:>5} {:>12} {:>12} {:>12} {:>8}  I/O errors: {}",
            "total",
            h.connections,
            h.reads,
            h.writes,
            h.verified_blocks,
            h.verify_errors,
            h.io_errors
        );
        for e in h.errors.iter().take(8) {
            let _ = writeln!(s, "  verify: {e}");
        }
        let mb = &self.misbehaving;
        let _ = writeln!(
            s,
            "\nmisbehaving: {} connections, admin reconnects {}",
            mb.connections, mb.admin_reconnects
        );
        let _ = writeln!(
            s,
            "  {:<12} {:>8} {:>5} {:>7} {:>7} {:>9} {:>23}  last cut",
            "behaviour",
            "episodes",
            "cut",
            "not cut",
            "open",
            "conn fail",
            "cut after ms min/mean/max"
        );
        let o = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
        for b in &mb.behaviours {
            let _ = writeln!(
                s,
                "  {:<12} {:>8} {:>5} {:>7} {:>7} {:>9} {:>23}  {}",
                b.behaviour,
                b.episodes,
                b.cut,
                b.not_cut,
                b.open_at_end,
                b.connect_failures,
                format!(
                    "{}/{}/{}",
                    o(b.cut_after_ms_min),
                    o(b.cut_after_ms_mean),
                    o(b.cut_after_ms_max)
                ),
                b.last_cut_reason.as_deref().unwrap_or("-")
            );
        }
        for f in &self.failures {
            let _ = writeln!(s, "\nFAILURE: {f}");
        }
        s
    }
}

/// VmRSS of `pid`, bytes.
pub fn vm_rss(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad VmRSS line {line:?}"))?
        .parse()
        .with_context(|| format!("bad VmRSS line {line:?}"))?;
    Ok(kib * 1024)
}

/// The process (visible to us) with a socket listening on `addr`: the
/// listening socket's inode from /proc/net/tcp{,6}, then the process whose
/// fd table holds it.
pub fn find_listener_pid(addr: SocketAddr) -> Option<u32> {
    let port = format!("{:04X}", addr.port());
    let mut inodes = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for l in text.lines().skip(1) {
            let c: Vec<&str> = l.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if c.len() > 9 && c[3] == "0A" && c[1].rsplit(':').next() == Some(port.as_str()) {
                inodes.push(format!("socket:[{}]", c[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(l) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| l.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// The misbehaving hosts' controller: an admin queue kept alive by one
/// thread, and the QIDs its misbehaving I/O queues take in turn.
struct MisCtl {
    opts: ConnectOpts,
    st: Mutex<MisState>,
}

struct MisState {
    ctrl: Option<Controller>,
    info: ControllerInfo,
    in_use: Vec<bool>,
    next: usize,
}

impl MisCtl {
    fn connect(opts: ConnectOpts) -> Result<Self> {
        let ctrl =
            Controller::connect(opts.clone(), 127).context("misbehaving hosts' controller")?;
        let info = ctrl.info.clone();
        Ok(Self {
            opts,
            st: Mutex::new(MisState {
                in_use: vec![false; usize::from(info.io_queues)],
                info,
                ctrl: Some(ctrl),
                next: 0,
            }),
        })
    }

    /// Sends Keep Alive as due; reconnects the admin queue (with backoff)
    /// if it failed. Returns the number of reconnects.
    fn keep_alive_loop(&self, stop: &AtomicBool) -> u64 {
        let mut reconnects = 0;
        let mut backoff = Duration::from_millis(100);
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            let mut st = self.st.lock().expect("mis");
            let ok = match st.ctrl.as_mut() {
                Some(c) => c.keep_alive_if_due().is_ok(),
                None => false,
            };
            if ok {
                continue;
            }
            st.ctrl = None;
            drop(st);
            std::thread::sleep(backoff);
            if let Ok(c) = Controller::connect(self.opts.clone(), 127) {
                let mut st = self.st.lock().expect("mis");
                st.info = c.info.clone();
                st.in_use = vec![false; usize::from(c.info.io_queues)];
                st.ctrl = Some(c);
                reconnects += 1;
                backoff = Duration::from_millis(100);
            } else {
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        reconnects
    }

    /// A QID not held by another of our episodes (round-robin, so a QID
    /// the target is still releasing is not asked for again at once), with
    /// the controller it belongs to.
    fn take_qid(&self) -> Option<(u16, ControllerInfo)> {
        let mut st = self.st.lock().expect("mis");
        st.ctrl.as_ref()?;
        let n = st.in_use.len();
        for _ in 0..n {
            let i = st.next % n;
            st.next = st.next.wrapping_add(1);
            if !st.in_use[i] {
                st.in_use[i] = true;
                return Some((i as u16 + 1, st.info.clone()));
            }
        }
        None
    }

    fn release_qid(&self, qid: u16, cntlid: u16) {
        let mut st = self.st.lock().expect("mis");
        if st.info.cntlid == cntlid
            && let Some(u) = st.in_use.get_mut(usize::from(qid) - 1)
        {
            *u = false;
        }
    }

    fn disconnect(&self) {
        if let Some(c) = self.st.lock().expect("mis").ctrl.take() {
            let _ = c.disconnect();
        }
    }
}

/// How one episode ended.
enum Outcome {
    /// The target ended the connection.
    Cut(Duration, String),
    /// We gave up waiting (episode limit).
    NotCut,
    /// The soak ended first.
    OpenAtEnd,
    /// Could not get to misbehaving (connect, ICReq or Connect failed).
    ConnectFailed(String),
}

/// One misbehaving host: behaviours in turn, each until the target cuts it.
fn misbehave(
    idx: u32,
    mis: &MisCtl,
    stats: &Mutex<Vec<BehaviourStats>>,
    stop: &AtomicBool,
    deadline: Instant,
    limit: Duration,
    lba: u64,
) {
    let mut k = idx as usize;
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let b = BEHAVIOURS[k % BEHAVIOURS.len()];
        let end = deadline.min(Instant::now() + limit);
        let out = episode(b, mis, stop, end, deadline, lba, idx);
        let mut st = stats.lock().expect("stats");
        let s = &mut st[k % BEHAVIOURS.len()];
        let pause = match out {
            Outcome::Cut(after, why) => {
                s.episodes += 1;
                s.record_cut(after, why);
                k += 1;
                backoff = Duration::from_millis(100);
                backoff
            }
            Outcome::NotCut => {
                s.episodes += 1;
                s.not_cut += 1;
                k += 1;
                Duration::from_millis(100)
            }
            Outcome::OpenAtEnd => {
                s.episodes += 1;
                s.open_at_end += 1;
                break;
            }
            Outcome::ConnectFailed(e) => {
                s.connect_failures += 1;
                s.last_connect_error = Some(e);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            }
        };
        drop(st);
        let until = (Instant::now() + pause).min(deadline);
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
    }
}

fn episode(
    b: Behaviour,
    mis: &MisCtl,
    stop: &AtomicBool,
    end: Instant,
    deadline: Instant,
    lba: u64,
    idx: u32,
) -> Outcome {
    let t0 = Instant::now();
    let over = || {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            Some(Outcome::OpenAtEnd)
        } else if Instant::now() >= end {
            Some(Outcome::NotCut)
        } else {
            None
        }
    };
    let cut = |e: anyhow::Error| Outcome::Cut(t0.elapsed(), format!("{e:#}"));
    match b {
        Behaviour::NoIcReq => {
            let mut s = match TcpStream::connect_timeout(&mis.opts.addr, mis.opts.timeout) {
                Ok(s) => s,
                Err(e) => return Outcome::ConnectFailed(format!("TCP connect: {e}")),
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Outcome::Cut(t0.elapsed(), "EOF".into()),
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Outcome::Cut(t0.elapsed(), e.to_string()),
                }
                if let Some(o) = over() {
                    return o;
                }
            }
        }
        Behaviour::NoConnect => {
            let o = &mis.opts;
            let mut c = match Conn::connect(o.addr, o.hdgst, o.ddgst, 64 << 10, o.timeout) {
                Ok(c) => c,
                Err(e) => return Outcome::ConnectFailed(format!("{e:#}")),
            };
            loop {
                if let Err(e) = c
                    .fill(Duration::from_millis(100))
                    .and_then(|_| c.next_pdu())
                {
                    return cut(e);
                }
                if let Some(o) = over() {
                    return o;
                }
            }
        }
        Behaviour::ReadFlood => {
            let Some((qid, info)) = mis.take_qid() else {
                return Outcome::ConnectFailed("no free QID / admin queue down".into());
            };
            let out = (|| {
                let qd = (info.max_queue_entries - 1).min(1000);
                let mut q = match IoQueue::connect(&mis.opts, &info, qid, qd, FLOOD_READ) {
                    Ok(q) => q,
                    Err(e) => return Outcome::ConnectFailed(format!("{e:#}")),
                };
                let nlb = u64::from(FLOOD_READ >> q.lba_shift);
                let mut n: u64 = 0;
                loop {
                    // Queue more only when the last batch left, so our own
                    // buffer stays bounded while the target stops reading.
                    if !q.tx_pending() {
                        for _ in 0..64 {
                            let cid = (n % u64::from(qd)) as u16;
                            let slba = lba + (n % 8) * nlb;
                            q.submit(cid, io_opc::READ, slba, FLOOD_READ, &[]);
                            n += 1;
                        }
                    }
                    if let Err(e) = q.flush() {
                        return cut(e);
                    }
                    if let Some(o) = over() {
                        return o;
                    }
                    if q.tx_pending() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })();
            mis.release_qid(qid, info.cntlid);
            out
        }
        Behaviour::WithholdH2C => {
            let Some((qid, info)) = mis.take_qid() else {
                return Outcome::ConnectFailed("no free QID / admin queue down".into());
            };
            let out = (|| {
                let mut c = match io_conn(&mis.opts, &info, qid, WITHHELD_WRITES + 1) {
                    Ok(c) => c,
                    Err(e) => return Outcome::ConnectFailed(format!("{e:#}")),
                };
                let (hd, dd) = (c.cfg.hdgst, c.cfg.ddgst);
                let shift = info.lba_size.trailing_zeros();
                let data = vec![0xa5u8 ^ idx as u8; WITHHELD_WRITE as usize];
                for cid in 0..WITHHELD_WRITES {
                    let nlb = WITHHELD_WRITE >> shift;
                    let slba = lba + (u64::from(cid) % 2) * u64::from(nlb);
                    let mut cmd = host::rw_cmd(
                        io_opc::WRITE,
                        mis.opts.nsid,
                        slba,
                        nlb,
                        WITHHELD_WRITE,
                        false,
                    );
                    cmd.set_cid(cid);
                    host::encode_capsule(&cmd, &[], hd, dd, &mut c.tx);
                }
                loop {
                    let r = (|| -> Result<()> {
                        c.fill(Duration::from_millis(100))?;
                        while let Some(p) = c.next_pdu()? {
                            if let PduHeader::R2T(r) = p.header {
                                // Every PDU of the transfer but the last.
                                let max = c.maxh2cdata.max(4096);
                                let end = (r.r2to + r.r2tl).min(WITHHELD_WRITE);
                                let mut pos = r.r2to;
                                while pos + max < end {
                                    let h = H2CData {
                                        cccid: r.cccid,
                                        ttag: r.ttag,
                                        datao: pos,
                                        datal: max,
                                        last: false,
                                    };
                                    let chunk = &data[pos as usize..(pos + max) as usize];
                                    host::encode_h2c(&h, chunk, hd, dd, &mut c.tx);
                                    pos += max;
                                }
                            }
                        }
                        Ok(())
                    })();
                    if let Err(e) = r {
                        return cut(e);
                    }
                    if let Some(o) = over() {
                        return o;
                    }
                }
            })();
            mis.release_qid(qid, info.cntlid);
            out
        }
    }
}

/// ICReq and Fabrics Connect of I/O queue `qid` on a bare [`Conn`], for a
/// host that then drives the data phase itself.
fn io_conn(opts: &ConnectOpts, info: &ControllerInfo, qid: u16, entries: u16) -> Result<Conn> {
    let mut c = Conn::connect(opts.addr, opts.hdgst, opts.ddgst, 64 << 10, opts.timeout)?;
    let cd = ConnectData {
        hostid: opts.hostid,
        cntlid: info.cntlid,
        subnqn: opts.subnqn.clone(),
        hostnqn: opts.hostnqn.clone(),
    };
    let (mut cmd, cd) = host::connect(qid, entries - 1, 0, &cd);
    cmd.set_cid(0);
    let (hd, dd) = (c.cfg.hdgst, c.cfg.ddgst);
    host::encode_capsule(&cmd, &cd, hd, dd, &mut c.tx);
    c.flush_blocking(opts.timeout)?;
    let p = c.next_pdu_blocking(Instant::now() + opts.timeout)?;
    match p.header {
        PduHeader::CapsuleResp(cpl) if cpl.status.is_success() => Ok(c),
        PduHeader::CapsuleResp(cpl) => bail!("Connect (I/O queue {qid}) failed: {:?}", cpl.status),
        other => bail!("target answered Connect with {:?}", other.pdu_type()),
    }
}
