//! The result document (JSON, schema in `bench/schema/result.schema.json`,
//! described in `docs/bench.md`) and the human table.

use serde::{Deserialize, Serialize};

use crate::initiator::ControllerInfo;
use crate::job::JobSpec;
use crate::load::RunOutput;
use crate::stats::{LatencySummary, cdf_points, new_hist};
use crate::verify::VerifyError;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub tool: String,
    pub started_unix_ms: u64,
    pub target: TargetInfo,
    pub job: JobSpec,
    pub summary: Summary,
    pub cpu: Cpu,
    pub jobs: Vec<JobReport>,
    pub timeline: Timeline,
    pub latency_cdf: Vec<CdfPoint>,
    pub verify: VerifyReport,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetInfo {
    pub addr: String,
    pub subnqn: String,
    pub nsid: u32,
    pub model: String,
    pub serial: String,
    pub cntlid: u16,
    pub lba_size: u32,
    pub ns_bytes: u64,
    pub in_capsule_data: u32,
    pub maxh2cdata: u32,
    pub max_transfer: Option<u32>,
    pub io_queues: u16,
    pub hdgst: bool,
    pub ddgst: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Measurement window (after ramp), seconds.
    pub window_s: f64,
    pub ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    pub bw_bytes_per_s: f64,
    pub read_bw_bytes_per_s: f64,
    pub write_bw_bytes_per_s: f64,
    pub read: LatencySummary,
    pub write: LatencySummary,
    pub all: LatencySummary,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Cpu {
    /// CPU time of the job threads inside the window, seconds.
    pub initiator_cpu_s: f64,
    /// Initiator CPU per completed I/O, microseconds.
    pub us_per_io: f64,
    /// Cores kept busy by the initiator's job threads.
    pub utilization_cores: f64,
    /// CPU of the whole process for the run, including setup and teardown.
    pub process_cpu_s: f64,
    pub wall_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobReport {
    pub job: u32,
    pub qid: u16,
    pub ios: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub iops: f64,
    pub read: LatencySummary,
    pub write: LatencySummary,
    pub cpu_s: f64,
    pub us_per_io: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timeline {
    pub interval_ms: u64,
    /// IOPS in each interval, all jobs together.
    pub iops: Vec<f64>,
    pub bw_bytes_per_s: Vec<f64>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct CdfPoint {
    pub latency_us: f64,
    pub fraction: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub enabled: bool,
    pub seed: u32,
    pub blocks_checked: u64,
    pub error_count: u64,
    pub errors: Vec<VerifyError>,
}

impl Report {
    pub fn build(
        out: &RunOutput,
        addr: &str,
        subnqn: &str,
        hdgst: bool,
        ddgst: bool,
        seed: u32,
    ) -> Self {
        let info: &ControllerInfo = &out.info;
        let mut rh = new_hist();
        let mut wh = new_hist();
        let mut s = Summary::default();
        let mut cpu_ns = 0u64;
        let mut window = 0f64;
        let mut jobs = Vec::new();
        let mut tl: Vec<(u64, u64)> = Vec::new();
        let mut verify = VerifyReport {
            enabled: out.spec.verify,
            seed,
            ..Default::default()
        };
        for j in &out.jobs {
            let _ = rh.add(&j.read_hist);
            let _ = wh.add(&j.write_hist);
            let w = j.window.as_secs_f64();
            window = window.max(w);
            let ios = j.reads + j.writes;
            s.ios += ios;
            s.bytes += j.read_bytes + j.write_bytes;
            s.read_bw_bytes_per_s += rate(j.read_bytes, w);
            s.write_bw_bytes_per_s += rate(j.write_bytes, w);
            s.read_iops += rate(j.reads, w);
            s.write_iops += rate(j.writes, w);
            cpu_ns += j.cpu_ns;
            if tl.len() < j.timeline.len() {
                tl.resize(j.timeline.len(), (0, 0));
            }
            for (a, b) in tl.iter_mut().zip(&j.timeline) {
                a.0 += b.0;
                a.1 += b.1;
            }
            verify.blocks_checked += j.verified_blocks;
            verify.error_count += j.verify_error_count;
            verify.errors.extend(j.verify_errors.iter().cloned());
            jobs.push(JobReport {
                job: j.job,
                qid: j.qid,
                ios,
                reads: j.reads,
                writes: j.writes,
                bytes: j.read_bytes + j.write_bytes,
                iops: rate(ios, w),
                read: LatencySummary::of(&j.read_hist),
                write: LatencySummary::of(&j.write_hist),
                cpu_s: j.cpu_ns as f64 / 1e9,
                us_per_io: per_io_us(j.cpu_ns, ios),
            });
        }
        s.window_s = window;
        s.iops = s.read_iops + s.write_iops;
        s.bw_bytes_per_s = s.read_bw_bytes_per_s + s.write_bw_bytes_per_s;
        s.read = LatencySummary::of(&rh);
        s.write = LatencySummary::of(&wh);
        let mut all = rh.clone();
        let _ = all.add(&wh);
        s.all = LatencySummary::of(&all);
        let ivl = out.spec.interval_ms as f64 / 1000.0;
        // A partial last bucket would read as a dip that never happened.
        let full = ((window / ivl) + 1e-9).floor() as usize;
        tl.truncate(full.max(1).min(tl.len()));
        Self {
            schema_version: SCHEMA_VERSION,
            tool: format!("strata-bench {}", env!("CARGO_PKG_VERSION")),
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
                .saturating_sub(out.wall.as_millis() as u64),
            target: TargetInfo {
                addr: addr.to_string(),
                subnqn: subnqn.to_string(),
                nsid: info.nsid,
                model: info.model.clone(),
                serial: info.serial.clone(),
                cntlid: info.cntlid,
                lba_size: info.lba_size,
                ns_bytes: info.ns_blocks * u64::from(info.lba_size),
                in_capsule_data: info.in_capsule_data,
                maxh2cdata: info.maxh2cdata,
                max_transfer: info.max_transfer,
                io_queues: info.io_queues,
                hdgst,
                ddgst,
            },
            job: out.spec.clone(),
            summary: s.clone(),
            cpu: Cpu {
                initiator_cpu_s: cpu_ns as f64 / 1e9,
                us_per_io: per_io_us(cpu_ns, s.ios),
                utilization_cores: if window > 0.0 {
                    cpu_ns as f64 / 1e9 / window
                } else {
                    0.0
                },
                process_cpu_s: out.process_cpu_ns as f64 / 1e9,
                wall_s: out.wall.as_secs_f64(),
            },
            jobs,
            timeline: Timeline {
                interval_ms: out.spec.interval_ms,
                iops: tl.iter().map(|b| b.0 as f64 / ivl).collect(),
                bw_bytes_per_s: tl.iter().map(|b| b.1 as f64 / ivl).collect(),
            },
            latency_cdf: cdf_points(&all)
                .into_iter()
                .map(|(l, f)| CdfPoint {
                    latency_us: l,
                    fraction: f,
                })
                .collect(),
            verify,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let j = &self.job;
        o += &format!(
            "{}: rw={:?} bs={} qd={} jobs={} window={:.2}s  target {} ({})\n",
            j.name,
            j.rw,
            human_bytes(j.bs as f64),
            j.qd,
            j.jobs,
            self.summary.window_s,
            self.target.addr,
            self.target.subnqn
        );
        o += &format!(
            "{:<6} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "", "IOPS", "BW", "min µs", "mean µs", "p50 µs", "p99 µs", "p99.9 µs", "max µs"
        );
        let row = |name: &str, iops: f64, bw: f64, l: &LatencySummary| {
            format!(
                "{:<6} {:>12.0} {:>10}/s {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
                name,
                iops,
                human_bytes(bw),
                l.min_us,
                l.mean_us,
                l.p50_us,
                l.p99_us,
                l.p999_us,
                l.max_us
            )
        };
        let s = &self.summary;
        if s.read.count > 0 {
            o += &row("read", s.read_iops, s.read_bw_bytes_per_s, &s.read);
        }
        if s.write.count > 0 {
            o += &row("write", s.write_iops, s.write_bw_bytes_per_s, &s.write);
        }
        if s.read.count > 0 && s.write.count > 0 {
            o += &row("all", s.iops, s.bw_bytes_per_s, &s.all);
        }
        if self.jobs.len() > 1 {
            for jr in &self.jobs {
                let l = if jr.reads >= jr.writes {
                    &jr.read
                } else {
                    &jr.write
                };
                let bw = if s.window_s > 0.0 {
                    jr.bytes as f64 / s.window_s
                } else {
                    0.0
                };
                o += &row(&format!("job{}", jr.job), jr.iops, bw, l);
            }
        }
        o += &format!(
            "initiator CPU: {:.2} µs/IO, {:.2} cores busy ({:.2}s CPU in window, process {:.2}s over {:.2}s wall)\n",
            self.cpu.us_per_io,
            self.cpu.utilization_cores,
            self.cpu.initiator_cpu_s,
            self.cpu.process_cpu_s,
            self.cpu.wall_s
        );
        if self.verify.enabled {
            o += &format!(
                "verify: {} blocks checked, {} errors\n",
                self.verify.blocks_checked, self.verify.error_count
            );
            for e in &self.verify.errors {
                o += &format!("  {e}\n");
            }
        }
        o
    }
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

fn per_io_us(cpu_ns: u64, ios: u64) -> f64 {
    if ios > 0 {
        cpu_ns as f64 / 1000.0 / ios as f64
    } else {
        0.0
    }
}

pub fn human_bytes(b: f64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0}{}", U[i])
    } else {
        format!("{v:.1}{}", U[i])
    }
}
