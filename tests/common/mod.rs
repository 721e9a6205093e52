//! Helpers shared by the integration tests (`mod common;` in `tests/*.rs`).
pub mod guest;
