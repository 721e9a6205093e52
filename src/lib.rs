//! The `strata` package as a library: configuration, the control plane that
//! owns the running state, and `strata serve`. The binary (`main.rs`) and a
//! future management API use the same types.

pub mod cluster;
pub mod config;
pub mod control;
pub mod logging;
pub mod metrics;
pub mod mgmt;
pub mod serve;
pub mod state;
