//! The initiator against the null path: the in-process target that answers
//! every command at once. This test checks that such a run completes: every
//! I/O issued is accounted for, none failed, and the CPU figure is produced.
//! It asserts no time or speed: the per-I/O figure itself is a benchmark —
//! `strata bench run --target null --rw randread --qd 32` reports it
//! (`cpu.us_per_io`), against a baseline from the same run.

use std::sync::Arc;

use strata_bench::initiator::ConnectOpts;
use strata_bench::job::{JobSpec, Rw};
use strata_bench::load::{self, Progress};
use strata_bench::minitarget::MiniTarget;
use strata_bench::report::Report;

#[test]
fn initiator_run_against_null_target_completes_without_errors() {
    let t = MiniTarget::null().unwrap();
    let o = ConnectOpts::new(t.addr, t.subnqn());
    for (rw, qd) in [(Rw::Randread, 1), (Rw::Randread, 32), (Rw::Randwrite, 32)] {
        let spec = JobSpec {
            rw,
            qd,
            jobs: 1,
            // A fixed I/O count, not a time window: the assertions below do
            // not depend on how fast this machine is.
            runtime_ms: None,
            size: Some(4 << 20),
            ..JobSpec::default()
        };
        // A failed completion makes the run an error.
        let out = load::run(
            &o,
            &spec,
            None,
            Arc::new(Progress::default()),
            &mut |_, _| {},
        )
        .unwrap_or_else(|e| panic!("{rw:?} qd{qd} against the null target: {e:#}"));
        let r = Report::build(&out, "null", t.subnqn(), false, false, 0);
        let want = (4u64 << 20) / u64::from(spec.bs);
        let ios: u64 = r.jobs.iter().map(|j| j.ios).sum();
        eprintln!("null path {rw:?} qd{qd}: {ios} I/Os completed");
        assert_eq!(ios, want, "every I/O of the job completed\n{}", r.table());
        let (reads, writes): (u64, u64) = r
            .jobs
            .iter()
            .map(|j| (j.reads, j.writes))
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
        match rw {
            Rw::Randread => assert_eq!((reads, writes), (want, 0)),
            _ => assert_eq!((reads, writes), (0, want)),
        }
        assert_eq!(r.verify.error_count, 0, "{:?}", r.verify.errors);
        // Measured (not bounded): the benchmark reports it.
        assert!(r.cpu.us_per_io > 0.0, "{}", r.table());
    }
}
