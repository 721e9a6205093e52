//! Strata's wire schemas: protobuf messages and tonic services, generated at
//! build time from `proto/` (with a vendored protoc, see `build.rs`).
//!
//! - [`mgmt::v1`]: the management API `strata serve` answers and
//!   `strata ctl` calls (docs/MANAGEMENT.md).

pub mod mgmt {
    pub mod v1 {
        tonic::include_proto!("strata.mgmt.v1");
    }
}
