//! `strata bench …`: the command-line front end (mounted by the `strata`
//! binary through [`BenchArgs`] and [`cli_main`]).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::compare::CompareArgs;
use crate::job::JobFile;
use crate::load::VerifyState;
use crate::opts::{Endpoint, JobArgs, TargetArgs, resolve_jobs};
use crate::progress::run_with_progress;
use crate::report::Report;
use crate::tiers::TiersArgs;

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
    /// One sequential pass over a file's bytes (write [+FLUSH], or read
    /// and compare every byte), like dd with a block device.
    Seqio(crate::seqio::SeqIoArgs),
    /// HTTP/1.1 proxy that adds a fixed delay to every request (S3
    /// clients compared under one network latency).
    S3Proxy(crate::s3proxy::ProxyArgs),
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

/// Entry point for `strata bench`.
pub fn cli_main(args: BenchArgs) -> Result<()> {
    match args.cmd {
        BenchCmd::Run(a) => cmd_run(a),
        BenchCmd::Tiers(a) => crate::tiers::cmd_tiers(a),
        BenchCmd::Compare(a) => crate::compare::cmd_compare(a),
        BenchCmd::Inproc(a) => crate::inproc::cmd_inproc(a),
        BenchCmd::Objbacker(a) => crate::objbench::cmd_objbench(a),
        BenchCmd::Soak(a) => crate::soak::cmd_soak(a),
        BenchCmd::Seqio(a) => crate::seqio::cmd_seqio(a),
        BenchCmd::S3Proxy(a) => crate::s3proxy::cmd_s3_proxy(a),
    }
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
