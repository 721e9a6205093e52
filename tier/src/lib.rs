//! Strata performance tiers, Basic … Ultra.
//!
//! A tier is a promise made to a customer: "this volume sustains N 4 KiB
//! random-read and M random-write IOPS while p99 latency stays under 1 ms".
//! Each [`TierProfile`] carries the workload that tests the promise (queue
//! depths to sweep and how many jobs) and the reference figures it is judged
//! against. The references are the published MayaScale table, so Strata's
//! tiers can be compared with a known product line like for like.
//!
//! The benchmark (`strata bench tiers`) searches, per tier, for the highest
//! IOPS whose p99 stays under [`Slo::p99_limit_us`], and measures the best
//! queue-depth-1 latency.

use serde::{Deserialize, Serialize};

/// Service tier, from smallest to largest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Basic,
    Standard,
    Medium,
    High,
    Ultra,
}

impl Tier {
    pub const ALL: [Tier; 5] = [
        Tier::Basic,
        Tier::Standard,
        Tier::Medium,
        Tier::High,
        Tier::Ultra,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Basic => "Basic",
            Tier::Standard => "Standard",
            Tier::Medium => "Medium",
            Tier::High => "High",
            Tier::Ultra => "Ultra",
        }
    }

    pub fn profile(self) -> TierProfile {
        // Queue depth and job count grow with the tier because a larger IOPS
        // promise can only be reached with more I/O in flight (Little's law:
        // IOPS = in-flight / latency). The reference column is MayaScale's.
        let (read_ref, write_ref, lat_ref, qd_max, jobs) = match self {
            Tier::Basic => (120_000, 60_000, 218, 16, 1),
            Tier::Standard => (340_000, 110_000, 244, 32, 1),
            Tier::Medium => (650_000, 175_000, 211, 32, 2),
            Tier::High => (1_020_000, 290_000, 268, 64, 2),
            Tier::Ultra => (1_100_000, 585_000, 280, 128, 4),
        };
        TierProfile {
            tier: self,
            name: self.name(),
            read_iops_ref: read_ref,
            write_iops_ref: write_ref,
            best_latency_ref_us: lat_ref,
            block_size: 4096,
            qd_range: 1..=qd_max,
            jobs,
            slo: Slo::default(),
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown tier {s:?} (basic|standard|medium|high|ultra)"))
    }
}

/// The latency objective a tier's IOPS figure is measured under.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// IOPS only count while p99 completion latency stays below this.
    pub p99_limit_us: u64,
}

impl Default for Slo {
    fn default() -> Self {
        Self { p99_limit_us: 1000 }
    }
}

/// Workload and reference figures of one tier.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TierProfile {
    pub tier: Tier,
    pub name: &'static str,
    /// Reference 4 KiB random-read IOPS with p99 < 1 ms.
    pub read_iops_ref: u64,
    /// Reference 4 KiB random-write IOPS with p99 < 1 ms.
    pub write_iops_ref: u64,
    /// Reference best (QD1) latency, microseconds.
    pub best_latency_ref_us: u64,
    pub block_size: u32,
    /// Per-job queue depths the IOPS search may use.
    pub qd_range: std::ops::RangeInclusive<u32>,
    /// Parallel jobs (one I/O queue and one initiator thread each).
    pub jobs: u32,
    pub slo: Slo,
}

impl TierProfile {
    /// Queue depths the search visits: powers of two across `qd_range`, so
    /// the sweep is logarithmic and its cost does not grow with the tier.
    pub fn qd_steps(&self) -> Vec<u32> {
        let mut v = Vec::new();
        let mut qd = (*self.qd_range.start()).max(1);
        while qd <= *self.qd_range.end() {
            v.push(qd);
            qd *= 2;
        }
        if v.last() != Some(self.qd_range.end()) {
            v.push(*self.qd_range.end());
        }
        v
    }

    /// Judges measured figures against the reference. `scale` shrinks the
    /// IOPS references (e.g. target cores here / cores of the reference
    /// system), because a 2-core box cannot be held to a 1M IOPS promise;
    /// latency does not scale with cores, so it is never scaled.
    pub fn judge(&self, m: &Measured, scale: f64) -> Verdict {
        let read_ok = m.read_iops as f64 >= self.read_iops_ref as f64 * scale;
        let write_ok = m.write_iops as f64 >= self.write_iops_ref as f64 * scale;
        let lat_ok = m.best_latency_us <= self.best_latency_ref_us as f64;
        Verdict {
            read_ok,
            write_ok,
            latency_ok: lat_ok,
            met: read_ok && write_ok && lat_ok,
        }
    }
}

/// What the benchmark found for one tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub read_iops: u64,
    pub write_iops: u64,
    pub best_latency_us: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub read_ok: bool,
    pub write_ok: bool,
    pub latency_ok: bool,
    pub met: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_match_the_mayascale_table() {
        let u = Tier::Ultra.profile();
        assert_eq!(
            (u.write_iops_ref, u.read_iops_ref, u.best_latency_ref_us),
            (585_000, 1_100_000, 280)
        );
        let b = Tier::Basic.profile();
        assert_eq!(
            (b.write_iops_ref, b.read_iops_ref, b.best_latency_ref_us),
            (60_000, 120_000, 218)
        );
    }

    #[test]
    fn tiers_grow_monotonically() {
        let p: Vec<_> = Tier::ALL.iter().map(|t| t.profile()).collect();
        for w in p.windows(2) {
            assert!(w[0].read_iops_ref <= w[1].read_iops_ref);
            assert!(w[0].write_iops_ref <= w[1].write_iops_ref);
            assert!(w[0].qd_range.end() * w[0].jobs <= w[1].qd_range.end() * w[1].jobs);
        }
    }

    #[test]
    fn qd_steps_are_powers_of_two_ending_at_max() {
        assert_eq!(Tier::Basic.profile().qd_steps(), vec![1, 2, 4, 8, 16]);
        let mut p = Tier::Basic.profile();
        p.qd_range = 1..=12;
        assert_eq!(p.qd_steps(), vec![1, 2, 4, 8, 12]);
    }

    #[test]
    fn judge_scales_iops_but_not_latency() {
        let p = Tier::Basic.profile();
        let m = Measured {
            read_iops: 12_000,
            write_iops: 6_000,
            best_latency_us: 100.0,
        };
        assert!(!p.judge(&m, 1.0).met);
        assert!(p.judge(&m, 0.1).met);
        let slow = Measured {
            best_latency_us: 500.0,
            ..m
        };
        assert!(!p.judge(&slow, 0.1).met);
    }

    #[test]
    fn parse_tier_names() {
        assert_eq!("ultra".parse::<Tier>().unwrap(), Tier::Ultra);
        assert!("mega".parse::<Tier>().is_err());
    }
}
