//! The deterministic simulator over many seeds. `STRATA_SIM_SEEDS=N` runs N
//! seeds instead of the default; `STRATA_SIM_SEED=S` makes `replay` run
//! seed S alone (the command is printed with every failure).

use strata_cluster::sim::{Sim, SimOptions, SimReport, run_seed};

const DEFAULT_SEEDS: u64 = 500;

fn replay_hint(seed: u64) -> String {
    format!(
        "replay: STRATA_SIM_SEED={seed} cargo test -p strata-cluster --test sim -- --exact replay --nocapture"
    )
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

#[test]
fn seeds() {
    let n = env_u64("STRATA_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let mut failures = Vec::new();
    let mut crashes = 0;
    let mut partitions = 0;
    let mut changes = 0;
    let mut settled_max = 0;
    for seed in 0..n {
        match run_seed(seed) {
            Ok(r) => {
                crashes += r.crashes;
                partitions += r.partitions;
                changes += r.ownership_changes;
                settled_max = settled_max.max(r.settled_after_ticks);
            }
            Err(e) => {
                eprintln!("seed {seed} failed: {e}\n  {}", replay_hint(seed));
                failures.push(seed);
            }
        }
    }
    eprintln!(
        "{n} seeds: {crashes} crashes, {partitions} partitions, {changes} ownership changes, \
         whole again at most {settled_max} ticks after the heal"
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
    // The schedules must actually exercise the faults they claim to.
    assert!(
        n < 20 || (crashes > 0 && partitions > 0 && changes > n),
        "too few faults"
    );
}

#[test]
fn replay() {
    let seed = env_u64("STRATA_SIM_SEED").unwrap_or(1);
    let r = run_seed(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}\n  {}", replay_hint(seed)));
    eprintln!("{r:?}");
    assert!(r.committed > 0);
}

#[test]
fn one_seed_replays_exactly() {
    for seed in [3, 4] {
        let a: SimReport = run_seed(seed).unwrap();
        let b = run_seed(seed).unwrap();
        assert_eq!(a, b, "seed {seed} is not deterministic");
        assert!(a.events > 1000);
    }
    assert_ne!(
        run_seed(3).unwrap().trace_hash,
        run_seed(5).unwrap().trace_hash
    );
}

#[test]
fn a_witness_keeps_two_storage_nodes_available_when_one_dies() {
    // No random faults; node 1 (a storage node owning group 1) crashes and
    // stays down: the survivor and the witness keep a quorum and the
    // survivor takes group 1 over.
    let mut opts = SimOptions::for_seed(11);
    assert_eq!((opts.storage_nodes, opts.witnesses), (2, 1));
    opts.drop_ppm = 0;
    opts.duplicate_ppm = 0;
    opts.partition_ppm = 0;
    opts.crash_ppm = 0;
    let mut sim = Sim::new(opts);
    let r = sim.run_until_tick(100).unwrap();
    assert!(
        r.ownership_changes >= 2,
        "both groups got their first owner"
    );
    sim.crash_node(1);
    sim.run_until_tick(250).unwrap();
    let s = sim.node_state(2).unwrap();
    assert_eq!(s.groups[&1].owner, Some(2));
    assert!(s.groups[&1].epoch >= 2);
    assert!(!s.nodes[&1].up);
    assert!(
        sim.can_write(2, 1),
        "the survivor writes for the moved group"
    );
}
