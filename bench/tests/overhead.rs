//! The initiator's own cost, measured against the null path: the
//! in-process target that answers every command at once. What is left per
//! I/O is the initiator (encode, syscalls, parse, bookkeeping) plus the
//! kernel's loopback TCP, which any NVMe/TCP initiator pays.

use std::sync::Arc;

use strata_bench::initiator::ConnectOpts;
use strata_bench::job::{JobSpec, Rw};
use strata_bench::load::{self, Progress};
use strata_bench::minitarget::MiniTarget;
use strata_bench::report::Report;

#[test]
fn initiator_cpu_per_io_against_null_target() {
    let t = MiniTarget::null().unwrap();
    let o = ConnectOpts::new(t.addr, t.subnqn());
    for (rw, qd) in [(Rw::Randread, 1), (Rw::Randread, 32), (Rw::Randwrite, 32)] {
        let spec = JobSpec {
            rw,
            qd,
            jobs: 1,
            runtime_ms: Some(700),
            ramp_ms: 100,
            ..JobSpec::default()
        };
        let out = load::run(
            &o,
            &spec,
            None,
            Arc::new(Progress::default()),
            &mut |_, _| {},
        )
        .unwrap();
        let r = Report::build(&out, "null", t.subnqn(), false, false, 0);
        eprintln!(
            "null path {rw:?} qd{qd}: {:.0} IOPS, p50 {:.1} µs, initiator {:.2} µs CPU/IO, {:.2} cores",
            r.summary.iops, r.summary.all.p50_us, r.cpu.us_per_io, r.cpu.utilization_cores
        );
        assert!(r.cpu.us_per_io > 0.0);
        // Generous: an unoptimised build on a shared 2-core machine. The
        // point is that the figure is measured and reported, and that a
        // per-I/O allocation or syscall storm would blow through it.
        assert!(r.cpu.us_per_io < 200.0, "{}", r.table());
    }
}
