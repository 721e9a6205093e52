//! A short `strata bench soak` against `strata serve` (embedded default,
//! RAM namespace): 16 healthy connections of verified mixed I/O and 4
//! misbehaving ones cycling through a host that never reads its answers,
//! one that withholds the last H2CData of its large writes, one that never
//! sends ICReq and one that never sends Connect, for 60 s. The long soak
//! (64 connections, 10 minutes) is `strata bench soak`; see docs/bench.md.

mod support;

use strata_bench::soak::{self, SoakArgs};
use support::Server;

#[test]
fn soak_60s_verified_io_survives_misbehaving_hosts_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(None, dir.path());
    let a = SoakArgs {
        addr: format!("127.0.0.1:{}", srv.port),
        pid: Some(srv.child.id()),
        connections: 16,
        misbehaving: 4,
        duration: "60s".into(),
        size: "128m".into(),
        warmup: "10s".into(),
        sample_interval: "10s".into(),
        ..SoakArgs::defaults()
    };
    let r = soak::run(&a).expect("soak ran");
    let table = r.table();
    println!("{table}");
    let h = &r.healthy;
    assert_eq!(h.io_errors, 0, "healthy I/O failed:\n{table}");
    assert_eq!(h.verify_errors, 0, "verified blocks were wrong:\n{table}");
    assert!(
        h.verified_blocks > 0 && h.reads > 0 && h.writes > 0,
        "{table}"
    );
    for g in &h.groups {
        assert!(
            g.io_error.is_none() && g.verify_errors == 0 && g.verified_blocks > 0,
            "{table}"
        );
    }
    assert!(r.passed, "{table}");

    // Every behaviour ran; the two that only need the connect timeout
    // (~10 s, a protocol timeout) were cut by the target within the run.
    let mb = &r.misbehaving.behaviours;
    assert!(mb.iter().all(|b| b.episodes > 0), "{table}");
    for b in mb
        .iter()
        .filter(|b| b.behaviour == "NoIcReq" || b.behaviour == "NoConnect")
    {
        assert!(b.cut > 0, "{} never cut:\n{table}", b.behaviour);
    }

    // A bound, not a timing: a target that held on to what the misbehaving
    // hosts make it hold would pass it.
    let growth = r.memory.growth_bytes.expect("RSS sampled");
    assert!(
        growth < 256 << 20,
        "target RSS grew by {growth} bytes after warm-up:\n{table}"
    );
    assert!(r.memory.samples.len() >= 5, "{table}");
    drop(srv);
}
