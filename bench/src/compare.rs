//! `strata bench compare`: A and B alternate (A B A B …) so drift of the
//! machine (thermal, other tenants, page cache) hits both alike; each
//! figure is reported as the B/A ratio with its spread across rounds.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, ensure};
use serde::Serialize;

use crate::job::{JobFile, JobSpec};
use crate::opts::{Endpoint, JobArgs, TargetArgs, resolve_jobs};
use crate::progress::run_with_progress;
use crate::report::Report;

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

#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub metric: String,
    pub a_mean: f64,
    pub b_mean: f64,
    /// Mean of the per-round B/A ratios.
    pub ratio: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// Sample standard deviation of the per-round ratios.
    pub ratio_stddev: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub schema_version: u32,
    pub a: String,
    pub b: String,
    pub rounds: u32,
    pub job: JobSpec,
    pub ratios: Vec<Ratio>,
    pub a_runs: Vec<Report>,
    pub b_runs: Vec<Report>,
}

type Metric = (&'static str, fn(&Report) -> f64);

const METRICS: [Metric; 7] = [
    ("iops", |r| r.summary.iops),
    ("bw_bytes_per_s", |r| r.summary.bw_bytes_per_s),
    ("mean_us", |r| r.summary.all.mean_us),
    ("p50_us", |r| r.summary.all.p50_us),
    ("p99_us", |r| r.summary.all.p99_us),
    ("p999_us", |r| r.summary.all.p999_us),
    ("cpu_us_per_io", |r| r.cpu.us_per_io),
];

/// Per-metric ratios from paired runs (a[i], b[i]).
pub fn ratios(a: &[Report], b: &[Report]) -> Vec<Ratio> {
    METRICS
        .iter()
        .map(|(name, f)| {
            let rs: Vec<f64> = a
                .iter()
                .zip(b)
                .map(|(x, y)| if f(x) > 0.0 { f(y) / f(x) } else { f64::NAN })
                .collect();
            let n = rs.len() as f64;
            let mean = rs.iter().sum::<f64>() / n;
            let var = if rs.len() > 1 {
                rs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)
            } else {
                0.0
            };
            Ratio {
                metric: name.to_string(),
                a_mean: a.iter().map(f).sum::<f64>() / a.len() as f64,
                b_mean: b.iter().map(f).sum::<f64>() / b.len() as f64,
                ratio: mean,
                ratio_min: rs.iter().copied().fold(f64::INFINITY, f64::min),
                ratio_max: rs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ratio_stddev: var.sqrt(),
            }
        })
        .collect()
}

fn endpoint(s: &str) -> Result<Endpoint> {
    let (addr, nqn) = s
        .split_once(',')
        .ok_or_else(|| anyhow!("expected ADDR,NQN, got {s:?}"))?;
    Endpoint::resolve(
        &TargetArgs {
            target: Some(addr.to_string()),
            nqn: Some(nqn.to_string()),
            kato_ms: 5000,
            ..Default::default()
        },
        None,
    )
}

pub fn cmd_compare(a: CompareArgs) -> Result<()> {
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    let mut job_args = a.job_args.clone();
    if job_args.job_file.is_none() {
        job_args.job_file = a.job.clone();
    }
    let file = job_args
        .job_file
        .as_deref()
        .map(JobFile::load)
        .transpose()?;
    let specs = resolve_jobs(&job_args, file.as_ref())?;
    ensure!(specs.len() == 1, "compare runs one job; give a single --qd");
    let spec = &specs[0];
    let mut ea = endpoint(&a.a)?;
    let mut eb = endpoint(&a.b)?;
    for e in [&mut ea, &mut eb] {
        e.opts.hdgst = a.hdgst;
        e.opts.ddgst = a.ddgst;
    }
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        for (e, out) in [(&ea, &mut ra), (&eb, &mut rb)] {
            let o = run_with_progress(&e.opts, spec, None, true)
                .with_context(|| format!("round {round} against {}", e.label))?;
            out.push(Report::build(
                &o,
                &e.label,
                &e.opts.subnqn,
                e.opts.hdgst,
                e.opts.ddgst,
                0,
            ));
        }
    }
    let rep = CompareReport {
        schema_version: 1,
        a: a.a.clone(),
        b: a.b.clone(),
        rounds: a.rounds,
        job: spec.clone(),
        ratios: ratios(&ra, &rb),
        a_runs: ra,
        b_runs: rb,
    };
    println!(
        "{:<15} {:>14} {:>14} {:>8} {:>18}",
        "metric", "A", "B", "B/A", "spread (min–max ±sd)"
    );
    for r in &rep.ratios {
        println!(
            "{:<15} {:>14.1} {:>14.1} {:>8.3} {:>9.3}–{:.3} ±{:.3}",
            r.metric, r.a_mean, r.b_mean, r.ratio, r.ratio_min, r.ratio_max, r.ratio_stddev
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rep)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
