//! strata-bench: a userspace NVMe/TCP initiator, a fio-style load
//! generator and the tier benchmarks, sharing the target's PDU codec
//! (`strata_target::pdu`) so there is one implementation of the wire format.
//!
//! * [`initiator`]: admin queue ([`initiator::Controller`]) and I/O queues
//!   ([`initiator::IoQueue`]), one TCP connection each.
//! * [`load`]: the load generator, one thread per job.
//! * [`verify`]: self-checking block format for lost/torn/misdirected writes.
//! * [`report`] / [`plot`]: JSON result document, table, SVG/PNG plots.
//! * [`tiers`] / [`compare`]: the tier search and A/B comparison.
//! * [`minitarget`]: a tiny in-process target, the null path the
//!   initiator's overhead is measured against.
//! * [`objbench`]: `strata bench objbacker`, object-backed namespace
//!   throughput against the raw object_store client.
//! * [`soak`]: `strata bench soak`, verified load with misbehaving hosts
//!   and the target's memory sampled.
//! * [`seqio`]: `strata bench seqio`, one sequential pass over a file's
//!   bytes (write + FLUSH, or read with a byte compare), dd's counterpart.
//! * [`s3proxy`]: `strata bench s3-proxy`, an HTTP/1.1 proxy adding a fixed
//!   delay to every request (`bench/s3fs-compare.sh`).
//! * [`opts`] / [`progress`]: target and job options shared by the
//!   commands, and a load run with a progress bar.
//! * [`cli`]: `strata bench run|tiers|compare|objbacker|soak|seqio|s3-proxy` ([`BenchArgs`], [`cli_main`]);
//!   it depends on the commands, they never on it.

pub mod cli;
pub mod compare;
pub mod conn;
pub mod initiator;
pub mod inproc;
pub mod job;
pub mod load;
pub mod minitarget;
pub mod objbench;
pub mod opts;
pub mod plot;
pub mod progress;
pub mod report;
pub mod s3proxy;
pub mod seqio;
pub mod soak;
pub mod stats;
pub mod tiers;
pub mod verify;

pub use cli::{BenchArgs, cli_main};
