//! `strata bench …`: the command-line front end (mounted by the `strata`
//! binary through [`BenchArgs`] and [`cli_main`]).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::initiator::ConnectOpts;
use crate::job::{JobFile, JobSpec, Rw, parse_duration, parse_size};
use crate::load::{self, Progress, VerifyState};
use crate::minitarget::MiniTarget;
use crate::report::Report;

#[derive(clap::Args, Debug)]
#[command(about = "NVMe/TCP initiator and load generator")]
pub struct BenchArgs {
    #[command(subcommand)]
    pub cmd: BenchCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCmd {
    /// Run one job (or a queue-depth sweep) against a target.
    Run(RunArgs),
    /// Search each tier's best IOPS with p99 < 1 ms and its best latency.
    Tiers(TiersArgs),
    /// Alternate two targets (A B A B …) and report B/A ratios.
    Compare(CompareArgs),
    /// The target's codec + queue pair + controller path in process, no sockets.
    Inproc(crate::inproc::InprocArgs),
    /// Object-backed namespace throughput through NVMe/TCP against the raw
    /// object_store client, injected latency, and write coalescing.
    Objbacker(crate::objbench::ObjBenchArgs),
    /// Long verified mixed load with misbehaving hosts among the healthy
    /// ones, sampling the target's resident memory.
    Soak(crate::soak::SoakArgs),
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct TargetArgs {
    /// Target address, host:port. `null` starts the in-process null target
    /// (the baseline for the initiator's own overhead).
    #[arg(long)]
    pub target: Option<String>,
    /// Subsystem NQN.
    #[arg(long)]
    pub nqn: Option<String>,
    #[arg(long)]
    pub nsid: Option<u32>,
    /// Ask for header digests.
    #[arg(long)]
    pub hdgst: bool,
    /// Ask for data digests.
    #[arg(long)]
    pub ddgst: bool,
    /// Keep Alive Timeout in milliseconds (0 disables keep-alive).
    #[arg(long, default_value_t = 5000)]
    pub kato_ms: u32,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct JobArgs {
    /// TOML job file; command-line options override its settings.
    #[arg(long = "job", value_name = "FILE")]
    pub job_file: Option<PathBuf>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, value_enum)]
    pub rw: Option<Rw>,
    /// Percent reads for randrw / rw.
    #[arg(long)]
    pub rwmixread: Option<u8>,
    /// Block size, e.g. 4k.
    #[arg(long)]
    pub bs: Option<String>,
    /// Queue depth per job; a comma list (1,2,4,…) runs a sweep.
    #[arg(long)]
    pub qd: Option<String>,
    #[arg(long)]
    pub jobs: Option<u32>,
    /// Start of the exercised region, e.g. 1g.
    #[arg(long)]
    pub offset: Option<String>,
    /// Length of the exercised region (default: rest of the namespace).
    #[arg(long)]
    pub size: Option<String>,
    /// Measured run time, e.g. 10s.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Stop after this many bytes instead of a runtime.
    #[arg(long)]
    pub total: Option<String>,
    /// Warm-up before measuring, e.g. 1s.
    #[arg(long)]
    pub ramp: Option<String>,
    /// Total IOPS cap over all jobs.
    #[arg(long)]
    pub rate_iops: Option<u64>,
    /// Stamp every written sector and check every read.
    #[arg(long)]
    pub verify: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Resolution of the over-time series, e.g. 100ms.
    #[arg(long)]
    pub interval: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub job: JobArgs,
    /// Write the result document (schema: bench/schema/result.schema.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write SVG and PNG plots into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bar even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(clap::Args, Debug)]
pub struct TiersArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Tiers to measure (default: all).
    #[arg(long, value_delimiter = ',')]
    pub tier: Vec<strata_tier::Tier>,
    /// Length of each measured step of the search.
    #[arg(long, default_value = "2s")]
    pub step_time: String,
    #[arg(long, default_value = "300ms")]
    pub ramp: String,
    /// Cores the target runs on, for the per-core column (default: this
    /// machine's, as the target is usually local in these runs).
    #[arg(long)]
    pub target_cores: Option<u32>,
    /// Multiply the reference IOPS by this before judging the SLO.
    #[arg(long, default_value_t = 1.0)]
    pub ref_scale: f64,
    /// Region exercised, e.g. 256m (default: whole namespace).
    #[arg(long)]
    pub size: Option<String>,
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Target A as ADDR,NQN.
    #[arg(long)]
    pub a: String,
    /// Target B as ADDR,NQN.
    #[arg(long)]
    pub b: String,
    /// Alternating rounds (each runs A then B).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Job file (same format as `run --job`).
    pub job: Option<PathBuf>,
    #[command(flatten)]
    pub job_args: JobArgs,
    #[arg(long)]
    pub hdgst: bool,
    #[arg(long)]
    pub ddgst: bool,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Entry point for `strata bench`.
pub fn cli_main(args: BenchArgs) -> Result<()> {
    match args.cmd {
        BenchCmd::Run(a) => cmd_run(a),
        BenchCmd::Tiers(a) => crate::tiers::cmd_tiers(a),
        BenchCmd::Compare(a) => crate::compare::cmd_compare(a),
        BenchCmd::Inproc(a) => crate::inproc::cmd_inproc(a),
        BenchCmd::Objbacker(a) => crate::objbench::cmd_objbench(a),
        BenchCmd::Soak(a) => crate::soak::cmd_soak(a),
    }
}

/// A connected target: either an address or the in-process null target,
/// which lives as long as this value.
pub struct Endpoint {
    pub opts: ConnectOpts,
    pub label: String,
    _null: Option<MiniTarget>,
}

impl Endpoint {
    pub fn resolve(t: &TargetArgs, file: Option<&JobFile>) -> Result<Self> {
        let addr = t
            .target
            .clone()
            .or_else(|| file.and_then(|f| f.target.clone()))
            .ok_or_else(|| anyhow!("--target ADDR is required (or `target` in the job file)"))?;
        let nqn = t.nqn.clone().or_else(|| file.and_then(|f| f.nqn.clone()));
        let (sa, null, nqn) = if addr == "null" {
            let m = MiniTarget::null()?;
            let n = nqn.unwrap_or_else(|| m.subnqn().to_string());
            (m.addr, Some(m), n)
        } else {
            let nqn =
                nqn.ok_or_else(|| anyhow!("--nqn NQN is required (or `nqn` in the job file)"))?;
            (crate::conn::resolve(&addr)?, None, nqn)
        };
        let mut opts = ConnectOpts::new(sa, nqn);
        opts.nsid = t.nsid.or_else(|| file.and_then(|f| f.nsid)).unwrap_or(1);
        opts.hdgst = t.hdgst || file.and_then(|f| f.hdgst).unwrap_or(false);
        opts.ddgst = t.ddgst || file.and_then(|f| f.ddgst).unwrap_or(false);
        opts.kato_ms = t.kato_ms;
        Ok(Self {
            opts,
            label: addr,
            _null: null,
        })
    }
}

/// Resolves job settings: defaults, then the job file, then flags. Returns
/// one spec per queue depth of a `--qd` list.
pub fn resolve_jobs(a: &JobArgs, file: Option<&JobFile>) -> Result<Vec<JobSpec>> {
    let mut spec = JobSpec::default();
    if let Some(f) = file {
        f.apply(&mut spec)?;
    }
    if let Some(v) = &a.name {
        spec.name = v.clone();
    }
    if let Some(v) = a.rw {
        spec.rw = v;
    }
    if let Some(v) = a.rwmixread {
        spec.rwmixread = v;
    }
    if let Some(v) = &a.bs {
        spec.bs = u32::try_from(parse_size(v)?).context("--bs too large")?;
    }
    if let Some(v) = a.jobs {
        spec.jobs = v;
    }
    if let Some(v) = &a.offset {
        spec.offset = parse_size(v)?;
    }
    if let Some(v) = &a.size {
        spec.size = Some(parse_size(v)?);
    }
    if let Some(v) = &a.total {
        spec.total_bytes = Some(parse_size(v)?);
        if a.runtime.is_none() {
            spec.runtime_ms = None;
        }
    }
    if let Some(v) = &a.runtime {
        spec.runtime_ms = Some(parse_duration(v)?.as_millis() as u64);
    }
    if let Some(v) = &a.ramp {
        spec.ramp_ms = parse_duration(v)?.as_millis() as u64;
    }
    if let Some(v) = a.rate_iops {
        spec.rate_iops = Some(v);
    }
    if a.verify {
        spec.verify = true;
    }
    if let Some(v) = a.seed {
        spec.seed = v;
    }
    if let Some(v) = &a.interval {
        spec.interval_ms = parse_duration(v)?.as_millis() as u64;
    }
    let qds: Vec<u32> = match &a.qd {
        Some(s) => s
            .split(',')
            .map(|q| {
                q.trim()
                    .parse::<u32>()
                    .with_context(|| format!("bad --qd {q:?}"))
            })
            .collect::<Result<_>>()?,
        None => vec![spec.qd],
    };
    if qds.is_empty() {
        bail!("--qd is empty");
    }
    let specs: Vec<JobSpec> = qds
        .into_iter()
        .map(|qd| {
            let mut s = spec.clone();
            s.qd = qd;
            s
        })
        .collect();
    for s in &specs {
        s.validate()?;
    }
    Ok(specs)
}

/// Runs one spec with a progress bar on stderr (hidden when not a TTY).
pub fn run_with_progress(
    opts: &ConnectOpts,
    spec: &JobSpec,
    verify: Option<Arc<VerifyState>>,
    show: bool,
) -> Result<load::RunOutput> {
    let show = show && std::io::stderr().is_terminal();
    let ramp = Duration::from_millis(spec.ramp_ms);
    let pb = if show {
        let len = spec.runtime_ms.map_or(0, |r| r + spec.ramp_ms);
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed}/{duration} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        pb.set_prefix(format!("{} qd={}", spec.name, spec.qd));
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut last = (Duration::ZERO, 0u64);
    let progress = Arc::new(Progress::default());
    let mut tick = |p: &Progress, t: Duration| {
        let ios = p.ios.load(std::sync::atomic::Ordering::Relaxed);
        let dt = (t - last.0).as_secs_f64();
        if dt >= 0.5 {
            let iops = (ios - last.1) as f64 / dt;
            pb.set_message(format!(
                "{:.0} IOPS{}",
                iops,
                if t < ramp { " (ramp)" } else { "" }
            ));
            last = (t, ios);
        }
        pb.set_position(t.as_millis() as u64);
    };
    let r = load::run(opts, spec, verify, progress, &mut tick);
    pb.finish_and_clear();
    r
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let file = a.job.job_file.as_deref().map(JobFile::load).transpose()?;
    let ep = Endpoint::resolve(&a.target, file.as_ref())?;
    let specs = resolve_jobs(&a.job, file.as_ref())?;
    let mut reports = Vec::new();
    for spec in &specs {
        let vs = spec
            .verify
            .then(|| VerifyState::new(spec.seed as u32 ^ (spec.seed >> 32) as u32));
        let seed = vs.as_ref().map_or(0, |v| v.seed);
        let out = run_with_progress(&ep.opts, spec, vs, !a.no_progress)?;
        let rep = Report::build(
            &out,
            &ep.label,
            &ep.opts.subnqn,
            ep.opts.hdgst,
            ep.opts.ddgst,
            seed,
        );
        print!("{}", rep.table());
        reports.push(rep);
    }
    if let Some(path) = &a.json {
        write_json(path, &reports)?;
    }
    if let Some(dir) = &a.plot {
        let mut files = crate::plot::run_plots(reports.last().expect("one run"), dir)?;
        if reports.len() > 1 {
            let pts = reports
                .iter()
                .map(|r| (f64::from(r.job.qd), r.summary.iops))
                .collect();
            files.extend(crate::plot::qd_chart(
                "IOPS against queue depth",
                vec![crate::plot::Series {
                    label: format!(
                        "{:?} bs={} jobs={}",
                        specs[0].rw, specs[0].bs, specs[0].jobs
                    ),
                    points: pts,
                }],
                dir,
                "iops_vs_qd",
            )?);
        }
        for f in files {
            eprintln!("plot: {}", f.display());
        }
    }
    let errs: u64 = reports.iter().map(|r| r.verify.error_count).sum();
    if errs > 0 {
        let first = reports
            .iter()
            .flat_map(|r| r.verify.errors.first())
            .next()
            .map(|e| e.to_string())
            .unwrap_or_default();
        bail!("verify found {errs} bad blocks; first: {first}");
    }
    Ok(())
}

/// One report is written as an object, a sweep as an array of them.
pub fn write_json(path: &std::path::Path, reports: &[Report]) -> Result<()> {
    let text = if reports.len() == 1 {
        serde_json::to_string_pretty(&reports[0])?
    } else {
        serde_json::to_string_pretty(reports)?
    };
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
