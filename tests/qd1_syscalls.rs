//! The driver's syscall budget at QD1, counted by the driver itself
//! (`Transport::counters`): every `read`, `writev` and zero-timeout `poll`
//! a reactor issues on a connection socket, and every epoll sleep.
//!
//! The design (docs/ARCHITECTURE.md, "The QD1 round trip"): in steady
//! state one I/O costs one `read` that returns its capsule, one `writev`
//! that sends its data and response, and at most one more look at the
//! socket that finds nothing to do: a `poll` that found the capsule (a poll
//! instead of an empty read is what keeps the socket lock out of the
//! host's way), or, when the hint has learned that the host's next bytes
//! are usually already there, nothing (a direct read), at the price of one
//! empty `read` whenever the guess is wrong, which flips it back. While it
//! waits for the next command the connection polls with `poll` only. A
//! stale epoll wakeup (the hot path read the bytes before tokio saw the
//! event) costs one empty `poll`.
//!
//! Counts, not time: the assertions hold however fast or loaded the
//! machine is, because they bound syscalls per completed I/O, and the
//! waiting cost (empty polls, sleeps) is reported, not asserted.

use std::sync::Arc;

use strata_bench::initiator::ConnectOpts;
use strata_bench::job::{JobSpec, Rw};
use strata_bench::load::{self, Progress};
use strata_target::bdev::ram::RamBdev;
use strata_target::ctrlr::Target;
use strata_target::subsystem::TargetConfig;
use strata_target::transport::{Transport, TransportConfig};

const NQN: &str = "nqn.2026-12.dev.strata:syscalls";

fn run(t: &Transport, addr: std::net::SocketAddr, rw: Rw, ios: u64) {
    let spec = JobSpec {
        rw,
        qd: 1,
        jobs: 1,
        runtime_ms: None,
        size: Some(ios * 4096),
        ..JobSpec::default()
    };
    let before = t.counters();
    let out = load::run(
        &ConnectOpts::new(addr, NQN),
        &spec,
        None,
        Arc::new(Progress::default()),
        &mut |_, _| {},
    )
    .unwrap_or_else(|e| panic!("{rw:?} QD1: {e:#}"));
    let after = t.counters();
    let done: u64 = out.jobs.iter().map(|j| j.reads + j.writes).sum();
    assert_eq!(done, ios, "every I/O of the region completed");
    let d = |f: fn(&strata_target::transport::TransportCounters) -> u64| f(&after) - f(&before);
    let (reads, sends, ready, empty_reads) = (
        d(|c| c.recv_data),
        d(|c| c.send),
        d(|c| c.probe_ready),
        d(|c| c.recv_empty),
    );
    eprintln!(
        "{rw:?} QD1, {ios} I/Os: read {reads}, writev {sends}, poll found data {ready}, \
         empty read {empty_reads}, empty poll {}, sleeps {}, spins {}",
        d(|c| c.probe_empty),
        d(|c| c.parks),
        d(|c| c.spins)
    );
    // Connect, Identify, Set Features, keep-alive and teardown: a few
    // dozen PDUs of setup on top of the I/Os.
    let setup = 64;
    assert!(
        reads <= ios + setup,
        "{reads} data-carrying reads for {ios} I/Os: more than one per I/O"
    );
    assert!(
        sends <= ios + setup,
        "{sends} writevs for {ios} I/Os: more than one per I/O"
    );
    assert!(
        ready + empty_reads <= ios + setup,
        "{ready} polls that found data and {empty_reads} empty reads for {ios} I/Os: \
         more than one extra look per I/O"
    );
    // A read without a poll first is a guess, made only after a poll found
    // the host's bytes already waiting; a wrong guess turns polling back on.
    // So empty reads never outnumber those polls: a wait loop that reads
    // instead of polling fails here.
    assert!(
        empty_reads <= ready + setup,
        "{empty_reads} empty reads against {ready} polls that found data: \
         the wait loop is reading, not polling"
    );
}

#[test]
fn qd1_steady_state_costs_one_read_one_writev_one_poll_per_io() {
    let bdev = RamBdev::new("syscalls", 64 << 20, 512).unwrap();
    let target = Target::new(TargetConfig::single_namespace(NQN, bdev, 1));
    let cfg = TransportConfig {
        reactors: 1,
        pin_cores: false,
        ..TransportConfig::default()
    };
    let mut t = Transport::start(target, cfg).unwrap();
    let addr = t.add_listener("127.0.0.1:0".parse().unwrap(), 1).unwrap();
    for rw in [Rw::Randread, Rw::Randwrite] {
        run(&t, addr, rw, 4096);
    }
    t.shutdown();
}
