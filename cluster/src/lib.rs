//! The cluster core of Strata (issue #10): Raft-coordinated nodes that agree
//! on who owns each ANA group, under which fencing epoch.
//!
//! **Sans-IO.** Nothing in this crate opens a socket, reads a clock or spawns
//! a thread. Time arrives as ticks, messages as bytes, and disk access goes
//! through the [`disk::Dir`] trait, so the production driver and the
//! deterministic simulator ([`sim`]) run exactly the same code.
//!
//! | module | concept |
//! |---|---|
//! | [`state`] | the replicated state machine: nodes, ANA groups and epochs, the management document |
//! | [`disk`] | the file-system seam: [`disk::OsDir`] (std::fs, fsync) and [`disk::MemDir`] (the simulator's disk, which loses unsynced bytes on a crash) |
//! | [`log_store`] | the durable Raft log, hard state and snapshot, implementing raft-rs's `Storage` |
//! | [`node`] | one member: raft-rs's `RawNode` in its Ready loop, the state machine, policy and leases |
//! | [`policy`] | failover and failback as a pure function of state and liveness |
//! | [`lease`] | write leases renewed through a quorum, and the wait a new owner must observe |
//! | [`sim`] | the deterministic simulator and its checkers |

pub mod disk;
pub mod lease;
pub mod log_store;
mod logger;
pub mod node;
pub mod policy;
pub mod sim;
pub mod state;

pub use logger::raft_logger;
