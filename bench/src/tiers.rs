//! `strata bench tiers`: per tier, the highest 4 KiB random read and write
//! IOPS whose p99 stays under the SLO, and the best QD1 latency.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use strata_tier::{Measured, Tier, TierProfile, Verdict};

use crate::initiator::ConnectOpts;
use crate::job::{JobSpec, Rw, parse_duration, parse_size};
use crate::opts::{Endpoint, TargetArgs};
use crate::plot::{Series, qd_chart};
use crate::progress::run_with_progress;
use crate::report::Report;

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

/// One measured point of a search.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub rw: Rw,
    pub qd: u32,
    pub jobs: u32,
    pub iops: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TierResult {
    pub profile: TierProfile,
    pub measured: Measured,
    /// QD at which the read / write maximum under the SLO was found.
    pub read_qd: Option<u32>,
    pub write_qd: Option<u32>,
    pub target_cores: u32,
    pub read_iops_per_core: f64,
    pub write_iops_per_core: f64,
    pub verdict: Verdict,
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TiersReport {
    pub schema_version: u32,
    pub target: String,
    pub subnqn: String,
    pub step_ms: u64,
    pub ref_scale: f64,
    /// QD1 random-read latency, shared by all tiers (the workload is
    /// the same for every tier).
    pub qd1_read: Step,
    pub tiers: Vec<TierResult>,
}

/// Settings of a tier search.
pub struct SearchOpts {
    pub step_ms: u64,
    pub ramp_ms: u64,
    pub size: Option<u64>,
    pub target_cores: u32,
    pub ref_scale: f64,
    pub progress: bool,
}

/// Runs the search for `tiers`. Identical (rw, qd, jobs) steps are measured
/// once and shared, because lower tiers' sweeps are prefixes of higher ones.
pub fn search(
    opts: &ConnectOpts,
    label: &str,
    tiers: &[Tier],
    so: &SearchOpts,
) -> Result<TiersReport> {
    let mut cache: HashMap<(Rw, u32, u32), Step> = HashMap::new();
    let mut measure = |rw: Rw, qd: u32, jobs: u32| -> Result<Step> {
        if let Some(s) = cache.get(&(rw, qd, jobs)) {
            return Ok(s.clone());
        }
        let spec = JobSpec {
            name: format!("{rw:?}-qd{qd}-j{jobs}"),
            rw,
            bs: 4096,
            qd,
            jobs,
            size: so.size,
            runtime_ms: Some(so.step_ms),
            ramp_ms: so.ramp_ms,
            ..JobSpec::default()
        };
        let out = run_with_progress(opts, &spec, None, so.progress)?;
        let r = Report::build(&out, label, &opts.subnqn, opts.hdgst, opts.ddgst, 0);
        let s = Step {
            rw,
            qd,
            jobs,
            iops: r.summary.iops,
            p99_us: r.summary.all.p99_us,
            mean_us: r.summary.all.mean_us,
        };
        cache.insert((rw, qd, jobs), s.clone());
        Ok(s)
    };
    let qd1 = measure(Rw::Randread, 1, 1)?;
    let mut out = Vec::new();
    for &t in tiers {
        let p = t.profile();
        let limit = p.slo.p99_limit_us as f64;
        let mut steps = Vec::new();
        let mut best = [(0f64, None::<u32>); 2];
        for (i, rw) in [Rw::Randread, Rw::Randwrite].into_iter().enumerate() {
            for qd in p.qd_steps() {
                let s = measure(rw, qd, p.jobs)?;
                let ok = s.p99_us < limit;
                if ok && s.iops > best[i].0 {
                    best[i] = (s.iops, Some(qd));
                }
                steps.push(s);
                // Deeper queues only add latency once p99 is over the limit.
                if !ok {
                    break;
                }
            }
        }
        let measured = Measured {
            read_iops: best[0].0 as u64,
            write_iops: best[1].0 as u64,
            best_latency_us: qd1.mean_us,
        };
        let cores = so.target_cores.max(1);
        out.push(TierResult {
            verdict: p.judge(&measured, so.ref_scale),
            read_iops_per_core: best[0].0 / f64::from(cores),
            write_iops_per_core: best[1].0 / f64::from(cores),
            read_qd: best[0].1,
            write_qd: best[1].1,
            target_cores: cores,
            measured,
            profile: p,
            steps,
        });
    }
    Ok(TiersReport {
        schema_version: 1,
        target: label.to_string(),
        subnqn: opts.subnqn.clone(),
        step_ms: so.step_ms,
        ref_scale: so.ref_scale,
        qd1_read: qd1,
        tiers: out,
    })
}

impl TiersReport {
    pub fn table(&self) -> String {
        let mut o = format!(
            "{:<9} {:>16} {:>16} {:>13} {:>20} {:>9}\n",
            "tier",
            "read IOPS@<1ms",
            "write IOPS@<1ms",
            "best lat µs",
            "IOPS/core (r / w)",
            "SLO met?"
        );
        for t in &self.tiers {
            let p = &t.profile;
            o += &format!(
                "{:<9} {:>16} {:>16} {:>13.1} {:>20} {:>9}\n",
                p.name,
                format!("{} ({}K)", t.measured.read_iops, p.read_iops_ref / 1000),
                format!("{} ({}K)", t.measured.write_iops, p.write_iops_ref / 1000),
                t.measured.best_latency_us,
                format!("{:.0} / {:.0}", t.read_iops_per_core, t.write_iops_per_core),
                if t.verdict.met { "yes" } else { "no" }
            );
        }
        o += &format!(
            "(reference in parentheses; best latency = mean QD1 4K random read; {} target core(s); reference scale {})\n",
            self.tiers.first().map_or(1, |t| t.target_cores),
            self.ref_scale
        );
        o
    }

    pub fn plot(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        let mut series = Vec::new();
        for t in &self.tiers {
            for rw in [Rw::Randread, Rw::Randwrite] {
                let pts: Vec<_> = t
                    .steps
                    .iter()
                    .filter(|s| s.rw == rw)
                    .map(|s| (f64::from(s.qd), s.iops))
                    .collect();
                if !pts.is_empty() {
                    series.push(Series {
                        label: format!("{} {:?} (jobs={})", t.profile.name, rw, t.profile.jobs),
                        points: pts,
                    });
                }
            }
        }
        qd_chart(
            "Tiers: 4K IOPS against queue depth",
            series,
            dir,
            "tiers_iops_vs_qd",
        )
    }
}

pub fn cmd_tiers(a: TiersArgs) -> Result<()> {
    let ep = Endpoint::resolve(&a.target, None)?;
    let tiers = if a.tier.is_empty() {
        Tier::ALL.to_vec()
    } else {
        a.tier.clone()
    };
    let so = SearchOpts {
        step_ms: parse_duration(&a.step_time)?.as_millis() as u64,
        ramp_ms: parse_duration(&a.ramp)?.as_millis() as u64,
        size: a.size.as_deref().map(parse_size).transpose()?,
        target_cores: a
            .target_cores
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32)),
        ref_scale: a.ref_scale,
        progress: !a.no_progress,
    };
    let r = search(&ep.opts, &ep.label, &tiers, &so)?;
    print!("{}", r.table());
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(d) = &a.plot {
        for f in r.plot(d)? {
            eprintln!("plot: {}", f.display());
        }
    }
    Ok(())
}
