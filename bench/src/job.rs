//! Job description: what to run, as given on the command line or in a TOML
//! job file.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    /// Random mix of reads and writes (`rwmixread` percent reads).
    Randrw,
    /// Sequential mix of reads and writes.
    Rw,
}

impl Rw {
    pub fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }
    /// Percentage of reads given the mix setting.
    pub fn read_pct(self, rwmixread: u8) -> u8 {
        match self {
            Rw::Read | Rw::Randread => 100,
            Rw::Write | Rw::Randwrite => 0,
            Rw::Randrw | Rw::Rw => rwmixread.min(100),
        }
    }
}

/// A fully resolved job. Sizes are bytes, times milliseconds, so that the
/// JSON report states exactly what ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub rw: Rw,
    /// Percent of I/Os that are reads, for `randrw` and `rw`.
    pub rwmixread: u8,
    pub bs: u32,
    /// Commands kept in flight per job (per I/O queue).
    pub qd: u32,
    /// Parallel jobs: one I/O queue, one TCP connection, one thread each.
    pub jobs: u32,
    /// Start of the region exercised, bytes into the namespace.
    pub offset: u64,
    /// Length of the region; None = to the end of the namespace. Split
    /// evenly among jobs so jobs never touch the same block.
    pub size: Option<u64>,
    pub runtime_ms: Option<u64>,
    /// Stop after this many bytes (after ramp); with neither this nor a
    /// runtime, each job covers its region once.
    pub total_bytes: Option<u64>,
    pub ramp_ms: u64,
    /// Total IOPS cap over all jobs.
    pub rate_iops: Option<u64>,
    pub verify: bool,
    pub seed: u64,
    /// Resolution of the IOPS/bandwidth-over-time series.
    pub interval_ms: u64,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            name: "job".into(),
            rw: Rw::Randread,
            rwmixread: 50,
            bs: 4096,
            qd: 32,
            jobs: 1,
            offset: 0,
            size: None,
            runtime_ms: Some(10_000),
            total_bytes: None,
            ramp_ms: 0,
            rate_iops: None,
            verify: false,
            seed: 0x5747_a7a5,
            interval_ms: 100,
        }
    }
}

impl JobSpec {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.bs > 0 && self.bs.is_multiple_of(512),
            "block size {} must be a multiple of 512",
            self.bs
        );
        ensure!(
            self.qd >= 1 && self.qd <= 4096,
            "queue depth {} out of 1..=4096",
            self.qd
        );
        ensure!(
            self.jobs >= 1 && self.jobs <= 1024,
            "jobs {} out of 1..=1024",
            self.jobs
        );
        ensure!(self.rwmixread <= 100, "rwmixread {} > 100", self.rwmixread);
        ensure!(self.interval_ms >= 10, "interval must be at least 10 ms");
        ensure!(self.rate_iops != Some(0), "rate of 0 IOPS");
        ensure!(self.runtime_ms != Some(0), "runtime of 0");
        Ok(())
    }

    pub fn runtime(&self) -> Option<Duration> {
        self.runtime_ms.map(Duration::from_millis)
    }
}

/// Parses "4k", "1m", "512", "1g" (binary units, as fio).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s
        .strip_suffix("ib")
        .or_else(|| s.strip_suffix('b'))
        .unwrap_or(&s);
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'm')) => (&s[..i], 1 << 20),
        Some((i, 'g')) => (&s[..i], 1 << 30),
        Some((i, 't')) => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} overflows"))
}

/// Parses "10s", "500ms", "2m", "1h" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim().to_ascii_lowercase();
    let (num, ms_per): (&str, f64) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (s.as_str(), 1000.0)
    };
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad duration {s:?}"))?;
    if !(n.is_finite() && n >= 0.0) {
        bail!("bad duration {s:?}");
    }
    Ok(Duration::from_micros((n * ms_per * 1000.0) as u64))
}

/// A size or duration in a job file: a number or a string with a unit.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Val {
    Num(u64),
    Str(String),
}

impl Val {
    fn size(&self) -> Result<u64> {
        match self {
            Val::Num(n) => Ok(*n),
            Val::Str(s) => parse_size(s),
        }
    }
    fn millis(&self) -> Result<u64> {
        match self {
            // Bare numbers are seconds, as on the command line.
            Val::Num(n) => Ok(n * 1000),
            Val::Str(s) => Ok(parse_duration(s)?.as_millis() as u64),
        }
    }
}

/// TOML job file. Every key is optional; unset keys take the defaults of
/// `strata bench run`. Target settings may be given too.
///
/// ```toml
/// target = "127.0.0.1:4420"
/// nqn = "nqn.2024-01.io.strata:default"
/// rw = "randrw"
/// rwmixread = 70
/// bs = "4k"
/// qd = 32
/// jobs = 2
/// runtime = "10s"
/// ramp = "1s"
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub target: Option<String>,
    pub nqn: Option<String>,
    pub nsid: Option<u32>,
    pub name: Option<String>,
    pub rw: Option<Rw>,
    pub rwmixread: Option<u8>,
    pub bs: Option<Val>,
    pub qd: Option<u32>,
    pub jobs: Option<u32>,
    pub offset: Option<Val>,
    pub size: Option<Val>,
    pub runtime: Option<Val>,
    pub total: Option<Val>,
    pub ramp: Option<Val>,
    pub rate_iops: Option<u64>,
    pub verify: Option<bool>,
    pub seed: Option<u64>,
    pub interval: Option<Val>,
    pub hdgst: Option<bool>,
    pub ddgst: Option<bool>,
}

impl JobFile {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading job file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing job file {}", path.display()))
    }

    /// Applies the file's settings on top of `base`.
    pub fn apply(&self, base: &mut JobSpec) -> Result<()> {
        if let Some(v) = &self.name {
            base.name = v.clone();
        }
        if let Some(v) = self.rw {
            base.rw = v;
        }
        if let Some(v) = self.rwmixread {
            base.rwmixread = v;
        }
        if let Some(v) = &self.bs {
            base.bs = u32::try_from(v.size()?).context("bs too large")?;
        }
        if let Some(v) = self.qd {
            base.qd = v;
        }
        if let Some(v) = self.jobs {
            base.jobs = v;
        }
        if let Some(v) = &self.offset {
            base.offset = v.size()?;
        }
        if let Some(v) = &self.size {
            base.size = Some(v.size()?);
        }
        if let Some(v) = &self.total {
            base.total_bytes = Some(v.size()?);
            if self.runtime.is_none() {
                base.runtime_ms = None;
            }
        }
        if let Some(v) = &self.runtime {
            base.runtime_ms = Some(v.millis()?);
        }
        if let Some(v) = &self.ramp {
            base.ramp_ms = v.millis()?;
        }
        if let Some(v) = self.rate_iops {
            base.rate_iops = Some(v);
        }
        if let Some(v) = self.verify {
            base.verify = v;
        }
        if let Some(v) = self.seed {
            base.seed = v;
        }
        if let Some(v) = &self.interval {
            base.interval_ms = v.millis()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_like_fio() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("4q").is_err());
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn job_file_overrides_defaults() {
        let f: JobFile = toml::from_str(
            "rw = \"randrw\"\nrwmixread = 70\nbs = \"8k\"\nqd = 4\nruntime = \"2s\"\nramp = 1\n",
        )
        .unwrap();
        let mut j = JobSpec::default();
        f.apply(&mut j).unwrap();
        assert_eq!((j.rw, j.rwmixread, j.bs, j.qd), (Rw::Randrw, 70, 8192, 4));
        assert_eq!((j.runtime_ms, j.ramp_ms), (Some(2000), 1000));
        assert!(toml::from_str::<JobFile>("bogus = 1").is_err());
    }
}
