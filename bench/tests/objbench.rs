//! `strata bench objbacker` with tiny settings against a real `strata serve`
//! child and the embedded S3 server. Asserts only that every figure is
//! produced and positive, and what coalescing can guarantee (no more PUTs
//! than writes); no timed thresholds.
//!
//! The binary is the one `common::strata_bin` has cargo build from the
//! current sources, with this test's profile.

mod common;

use std::path::PathBuf;

use strata_bench::objbench::{self, Backend, ObjBenchArgs, S3Args, Settings};
use strata_testkit::objstores::{self, S3s};

fn strata_bin() -> PathBuf {
    common::strata_bin(&["objbacker", "--help"])
}

fn tiny(backend: Backend) -> Settings {
    tiny_at(backend, Default::default())
}

fn tiny_at(backend: Backend, s3: S3Args) -> Settings {
    Settings::from_args(&ObjBenchArgs {
        backend,
        size: "64MiB".into(),
        buckets: 3,
        qd: 8,
        runtime: "1s".into(),
        latency_ms: 20.0,
        rounds: 1,
        rand_size: "8MiB".into(),
        strata_bin: None,
        dir: None,
        json: None,
        s3,
    })
    .unwrap()
}

#[test]
fn objbacker_bench_s3_produces_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let rep = objbench::run(&tiny(Backend::S3), &strata_bin(), Some(dir.path()), true)
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprint!("{}", rep.table());

    // The JSON document, as `--json` writes it.
    let v = serde_json::to_value(&rep).unwrap();
    let text = serde_json::to_string_pretty(&v).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["rounds"].as_array().unwrap().len(), 1);
    for name in [
        "raw_write",
        "raw_read",
        "nvme_write",
        "nvme_read",
        "raw_lat_write",
        "raw_lat_read",
        "nvme_lat_write",
        "nvme_lat_read",
    ] {
        let f = v["throughput"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("figure {name} missing:\n{text}"));
        for k in ["mean", "min", "max"] {
            assert!(f[k].as_f64().unwrap() > 0.0, "{name}.{k}:\n{text}");
        }
    }
    let ratios = v["ratios"].as_array().unwrap();
    assert_eq!(ratios.len(), 8, "{text}");
    for f in ratios {
        assert!(f["mean"].as_f64().unwrap() > 0.0, "{}:\n{text}", f["name"]);
    }
    let r = &v["rounds"][0];
    for side in ["raw", "nvme", "raw_lat", "nvme_lat"] {
        for op in ["write", "read"] {
            let t = &r[side][op];
            assert!(t["ios"].as_u64().unwrap() > 0, "{side}.{op}:\n{text}");
            assert!(t["bytes_per_s"].as_f64().unwrap() > 0.0, "{side}.{op}");
        }
    }
    assert!(r["nvme"]["flush_s"].as_f64().unwrap() > 0.0);

    let c = &v["coalescing"];
    assert_eq!(c["puts_exact"], true, "counted at the S3 server");
    let (writes, puts) = (c["writes"].as_u64().unwrap(), c["puts"].as_u64().unwrap());
    assert!(writes > 0 && puts > 0, "{c}");
    assert!(c["put_bytes"].as_u64().unwrap() > 0, "{c}");
    // Coalescing can only reduce PUTs.
    assert!(puts <= writes, "{c}");
    assert!(c["writes_per_put"].as_f64().unwrap() >= 1.0, "{c}");
}

/// `--s3-endpoint`: the store a default build (no embedded server) needs.
/// Every figure is produced; PUTs are not counted there.
#[test]
fn objbacker_bench_against_an_s3_endpoint() {
    objstores::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    for k in 0..3 {
        std::fs::create_dir_all(root.join(format!("ext-{k}"))).unwrap();
    }
    let s3 = S3s::start(&root, true);
    let s = tiny_at(
        Backend::S3,
        S3Args {
            s3_endpoint: Some(s3.endpoint()),
            s3_bucket: Some("ext".into()),
            s3_access_key: Some(objstores::AK.into()),
            s3_secret_key: Some(objstores::SK.into()),
            s3_region: None,
        },
    );
    let rep = objbench::run(&s, &strata_bin(), Some(&dir.path().join("work")), true)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let v = serde_json::to_value(&rep).unwrap();
    for f in v["throughput"].as_array().unwrap() {
        assert!(f["mean"].as_f64().unwrap() > 0.0, "{f}");
    }
    assert_eq!(v["coalescing"]["puts_exact"], false);
    assert!(
        v["settings"].get("s3").is_none(),
        "credentials stay out of the report"
    );
    let store = objstores::s3_store(&s3.endpoint(), "ext-0");
    let keys = objstores::runtime().block_on(objstores::list(store.as_ref(), None));
    assert!(
        !keys.is_empty(),
        "the namespace wrote to the external store"
    );
}
