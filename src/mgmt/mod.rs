//! The management plane: a gRPC service (`strata-proto`'s
//! `strata.mgmt.v1.Management`) in front of the control plane, where it
//! listens, and `strata ctl`, its command-line client.
//!
//! - [`ops`]: a change as a pure function of the running configuration,
//!   checked by the config file's own parser;
//! - [`server`]: the tonic service; every mutation is one
//!   `Request::Change` to the control plane (the same path SIGHUP takes),
//!   reads come from the last published [`crate::control::View`];
//! - [`listen`]: the Unix socket (default, mode 0600) and the opt-in TCP
//!   address with a bearer token;
//! - [`ctl`]: `strata ctl`.

pub mod convert;
pub mod ctl;
pub mod listen;
pub mod ops;
pub mod server;
