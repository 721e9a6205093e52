//! strata-testkit: what Strata's tests across the workspace need more than
//! once, in one place.
//!
//! * [`net`]: [`free_port`], ports that stay unique within a test process.
//! * [`process`]: children that cannot outlive the test (own process group,
//!   killed by the kernel when the test process dies, killed on drop).
//! * [`host`]: a blocking NVMe/TCP host connection ([`host::Client`]) for
//!   sending exactly the bytes a test wants, built on the sans-IO host
//!   builders in `strata_target::host` that product code uses too.
//! * [`objstores`]: real object-store protocol servers on 127.0.0.1 (S3 by
//!   s3s-fs, Azure Blob by Azurite, GCS's XML API on s3s-fs) and clients to
//!   look inside them.
//!
//! Dev-only: the crate is never a normal dependency, so a test server never
//! ends up in the `strata` binary.

pub mod host;
pub mod net;
pub mod objstores;
pub mod process;

pub use net::free_port;
pub use process::{ChildGuard, guard_command, has_exited, kill_and_reap, wait_until};
