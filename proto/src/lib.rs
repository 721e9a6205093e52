//! Strata's wire schemas: protobuf messages and tonic services, generated at
//! build time from `proto/` (with a vendored protoc, see `build.rs`).
//!
//! - [`mgmt::v1`]: the management API `strata serve` answers and
//!   `strata ctl` calls (docs/MANAGEMENT.md);
//! - [`cluster::v1`]: the Raft transport between cluster members.

pub mod mgmt {
    pub mod v1 {
        tonic::include_proto!("strata.mgmt.v1");
    }
}

pub mod cluster {
    pub mod v1 {
        tonic::include_proto!("strata.cluster.v1");
    }
}
