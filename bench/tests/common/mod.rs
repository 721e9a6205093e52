//! Shared test helpers.
#![allow(dead_code)]

use serde_json::Value;
/// Children that die with the test: own process group, killed by the
/// kernel when the test process dies.
#[allow(unused_imports)]
pub use strata_testkit::{guard_command, kill_and_reap};

/// A JSON Schema validator for the subset of draft 2020-12 that
/// `bench/schema/result.schema.json` uses: type (incl. arrays of types),
/// const, enum, minimum, maximum, minItems, required, properties,
/// additionalProperties=false, items, oneOf, $ref to #/$defs. An unknown
/// keyword fails the check, so the schema cannot silently outgrow it.
pub fn validate(schema: &Value, root: &Value, v: &Value, path: &str) -> Result<(), String> {
    let Some(obj) = schema.as_object() else {
        return Err(format!("{path}: schema is not an object"));
    };
    for (k, s) in obj {
        match k.as_str() {
            "$schema" | "$id" | "title" | "description" | "$defs" => {}
            "$ref" => {
                let name = s
                    .as_str()
                    .and_then(|r| r.strip_prefix("#/$defs/"))
                    .ok_or_else(|| format!("{path}: unsupported $ref {s}"))?;
                let target = &root["$defs"][name];
                validate(target, root, v, path)?;
            }
            "type" => {
                let types: Vec<&str> = match s {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => return Err(format!("{path}: bad type keyword")),
                };
                let ok = types.iter().any(|t| match *t {
                    "object" => v.is_object(),
                    "array" => v.is_array(),
                    "string" => v.is_string(),
                    "boolean" => v.is_boolean(),
                    "null" => v.is_null(),
                    "number" => v.is_number(),
                    "integer" => v.is_u64() || v.is_i64(),
                    _ => false,
                });
                if !ok {
                    return Err(format!("{path}: {v} is not of type {types:?}"));
                }
            }
            "const" => {
                if v != s {
                    return Err(format!("{path}: {v} != const {s}"));
                }
            }
            "enum" => {
                if !s.as_array().is_some_and(|a| a.contains(v)) {
                    return Err(format!("{path}: {v} not in {s}"));
                }
            }
            "minimum" => {
                if let (Some(x), Some(m)) = (v.as_f64(), s.as_f64())
                    && x < m
                {
                    return Err(format!("{path}: {x} < minimum {m}"));
                }
            }
            "maximum" => {
                if let (Some(x), Some(m)) = (v.as_f64(), s.as_f64())
                    && x > m
                {
                    return Err(format!("{path}: {x} > maximum {m}"));
                }
            }
            "minItems" => {
                if let Some(a) = v.as_array()
                    && (a.len() as u64) < s.as_u64().unwrap_or(0)
                {
                    return Err(format!("{path}: fewer than {s} items"));
                }
            }
            "required" => {
                if let Some(o) = v.as_object() {
                    for r in s.as_array().into_iter().flatten() {
                        let r = r.as_str().unwrap_or_default();
                        if !o.contains_key(r) {
                            return Err(format!("{path}: missing required {r}"));
                        }
                    }
                }
            }
            "properties" => {
                if let Some(o) = v.as_object() {
                    for (pk, ps) in s.as_object().into_iter().flatten() {
                        if let Some(pv) = o.get(pk) {
                            validate(ps, root, pv, &format!("{path}.{pk}"))?;
                        }
                    }
                }
            }
            "additionalProperties" => {
                if s == &Value::Bool(false) {
                    if let Some(o) = v.as_object() {
                        let props = obj.get("properties").and_then(Value::as_object);
                        for key in o.keys() {
                            if !props.is_some_and(|p| p.contains_key(key)) {
                                return Err(format!("{path}: unexpected property {key}"));
                            }
                        }
                    }
                } else {
                    return Err(format!("{path}: unsupported additionalProperties"));
                }
            }
            "items" => {
                if let Some(a) = v.as_array() {
                    for (i, item) in a.iter().enumerate() {
                        validate(s, root, item, &format!("{path}[{i}]"))?;
                    }
                }
            }
            "oneOf" => {
                let n = s
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|sub| validate(sub, root, v, path).is_ok())
                    .count();
                if n != 1 {
                    let errs: Vec<String> = s
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|sub| validate(sub, root, v, path).err())
                        .collect();
                    return Err(format!("{path}: matches {n} of oneOf: {errs:?}"));
                }
            }
            other => return Err(format!("{path}: validator does not know keyword {other}")),
        }
    }
    Ok(())
}

pub fn schema() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/result.schema.json"
    ))
    .expect("schema file");
    serde_json::from_str(&text).expect("schema is JSON")
}

pub fn check_against_schema(doc: &Value) -> Result<(), String> {
    let s = schema();
    validate(&s, &s, doc, "$")
}

/// The `strata` binary built from the current sources by the same cargo,
/// profile and target directory as this test: `cargo build --bin strata`
/// (a no-op when it is up to date), and the executable path cargo reports
/// for it. Never a binary found lying around (no `$STRATA_BIN`, no fixed
/// `build/debug/strata` lookup): a stale one cannot be picked up. The bench
/// crate cannot use `env!("CARGO_BIN_EXE_strata")` (the binary is in the
/// root package, which has no serde_json these tests need). Panics with
/// cargo's output when the build fails or `probe` is not a subcommand.
pub fn strata_bin(probe: &[&str]) -> std::path::PathBuf {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::OnceLock;
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    let bin = BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("bench/ has a parent")
            .to_path_buf();
        // This test runs as <target-dir>/<profile-dir>/deps/<test>-<hash>.
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary is in <target-dir>/<profile>/deps")
            .to_path_buf();
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_string(),
            Some(p) => p.to_string(),
            None => panic!("no profile directory above {}", exe.display()),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(&cargo)
            .args(["build", "--bin", "strata", "--message-format=json"])
            .arg("--profile")
            .arg(&profile)
            .current_dir(&root)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
        assert!(
            out.status.success(),
            "`cargo build --bin strata --profile {profile}` failed ({})",
            out.status
        );
        let bin = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "strata")
            .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
            .next_back()
            .expect("cargo reported no executable for the strata binary");
        // Same target directory and profile as this test: the binary cargo
        // just built for it, not one from another build tree.
        assert_eq!(
            bin.parent(),
            Some(profile_dir.as_path()),
            "cargo built {} outside this test's {}",
            bin.display(),
            profile_dir.display()
        );
        bin
    });
    let ok = Command::new(bin)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} (just built) has no `{}`",
        bin.display(),
        probe.join(" ")
    );
    bin.clone()
}
