//! Where a bench command points and what it runs: the target and job
//! options that `run`, `tiers` and `compare` share, and how they resolve
//! against a job file. Kept out of [`crate::cli`] so the commands depend
//! on these options and the front end on the commands, never back.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};

use crate::initiator::ConnectOpts;
use crate::job::{JobFile, JobSpec, Rw, parse_duration, parse_size};
use crate::minitarget::MiniTarget;

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
