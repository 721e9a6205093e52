//! Object-store servers and clients for the end-to-end objbacker tests
//! (from strata-testkit), and what strata's layout means in a bucket.
#![allow(dead_code)]

use object_store::ObjectStore;
pub use strata_testkit::objstores::*;

/// The data objects under `prefix`: every key but the superblock copy.
pub async fn data_objects(store: &dyn ObjectStore, prefix: &str) -> Vec<(String, u64)> {
    let p = (!prefix.is_empty()).then_some(prefix);
    list(store, p)
        .await
        .into_iter()
        .filter(|(k, _)| !k.ends_with(strata_objbacker::SUPERBLOCK_NAME))
        .collect()
}

/// The key of data object `i` under `prefix` (`{prefix}/{i:08}`).
pub fn data_key(prefix: &str, i: u64) -> String {
    if prefix.is_empty() {
        format!("{i:08}")
    } else {
        format!("{prefix}/{i:08}")
    }
}
