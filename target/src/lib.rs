//! strata-target: an NVMe/TCP target.
//!
//! **Architecture invariant:** everything except [`bdev`]'s device
//! implementations and [`transport`] is sans-IO. The PDU codec ([`pdu`]), the
//! controller ([`ctrlr`]), discovery ([`discovery`]), the queue-pair state
//! machine ([`queue`]) and the host-side command builders ([`host`]) take
//! bytes, commands and `now` and return actions; they hold no sockets and
//! read no clocks. [`transport`] is the thin driver that owns sockets and
//! reactors.

pub mod bdev;
pub mod ctrlr;
pub mod discovery;
pub mod host;
pub mod pdu;
pub mod queue;
pub mod spec;
pub mod stats;
pub mod subsystem;
pub mod transport;
