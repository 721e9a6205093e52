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
    let mut snapshots = 0;
    let mut joined = 0;
    let mut left = 0;
    let mut settled_max = 0;
    for seed in 0..n {
        match run_seed(seed) {
            Ok(r) => {
                crashes += r.crashes;
                partitions += r.partitions;
                changes += r.ownership_changes;
                snapshots += r.snapshots_installed;
                joined += u64::from(r.joined);
                left += u64::from(r.left);
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
         {snapshots} snapshots installed, {joined} voters joined, {left} left again, whole again at most {settled_max} ticks after the heal"
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
    // The schedules must actually exercise the faults they claim to.
    assert!(
        n < 20
            || (crashes > 0
                && partitions > 0
                && changes > n
                && snapshots > 0
                && joined > 0
                && left > 0),
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
    let opts = quiet(11);
    assert_eq!((opts.storage_nodes, opts.witnesses), (2, 1));
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

fn quiet(seed: u64) -> SimOptions {
    let mut opts = SimOptions::for_seed(seed);
    opts.drop_ppm = 0;
    opts.duplicate_ppm = 0;
    opts.partition_ppm = 0;
    opts.crash_ppm = 0;
    opts.crash_after_apply_ppm = 0;
    opts.heal_ppm = 0;
    opts.join_at_tick = None;
    opts.leave_after_ticks = None;
    // No scheduled heal inside the test's horizon.
    opts.fault_ticks = 10_000;
    opts
}

#[test]
fn a_partitioned_owner_stops_writing_before_the_new_owner_starts() {
    let mut sim = Sim::new(quiet(20));
    sim.run_until_tick(100).unwrap();
    assert!(sim.can_write(1, 1));
    sim.partition(&[1]);
    // The checker fails the run at the first instant two nodes may write
    // for group 1; every step of the takeover is checked.
    sim.run_until_tick(200).unwrap();
    assert!(
        !sim.can_write(1, 1),
        "cut off from the quorum, its lease ran out"
    );
    let s = sim.node_state(2).unwrap();
    let owner = s.groups[&1].owner.unwrap();
    assert_ne!(owner, 1);
    assert!(sim.can_write(owner, 1));
    // Healed, node 1 comes back non-optimized and, after the healthy time,
    // gets its preferred group back at a new epoch.
    let epoch = s.groups[&1].epoch;
    sim.heal();
    sim.run_until_tick(230).unwrap();
    let s = sim.node_state(1).unwrap();
    assert!(s.nodes[&1].up);
    assert_eq!(
        s.ana_state(1, 1),
        Some(strata_cluster::state::AnaState::NonOptimized)
    );
    sim.run_until_tick(400).unwrap();
    let s = sim.node_state(1).unwrap();
    assert_eq!(s.groups[&1].owner, Some(1), "automatic failback");
    assert!(s.groups[&1].epoch > epoch);
    assert!(sim.can_write(1, 1));
    assert!(!sim.can_write(owner, 1));
}

#[test]
fn a_crashed_node_restarts_from_its_disk_and_catches_up() {
    let mut sim = Sim::new(quiet(22));
    sim.run_until_tick(100).unwrap();
    sim.crash_node(3);
    // Node 3 may have been the leader: an election, the new leader's grace
    // for every node, then the failover.
    sim.run_until_tick(200).unwrap();
    assert_eq!(
        sim.node_state(1).unwrap().groups[&3].owner.map(|o| o != 3),
        Some(true)
    );
    sim.restart_node(3).unwrap();
    let r = sim.run_until_tick(450).unwrap();
    let s1 = sim.node_state(1).unwrap();
    let s3 = sim.node_state(3).unwrap();
    assert_eq!(s1, s3, "the restarted node holds the same committed state");
    assert_eq!(s3.groups[&3].owner, Some(3), "and got its group back");
    assert!(r.crashes == 1);
}
