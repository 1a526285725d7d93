//! Released ABI versions never change.
//!
//! `frozen/<version>.json` holds the canonical JSON of each released version.
//! If the spec's version is frozen, its JSON must be exactly the frozen one.
//! Otherwise the version must be newer than every frozen one, and a minor
//! bump must keep every call of the newest frozen version of the same major
//! version (same number, arguments and result). `MOAT_BLESS=1` freezes a new
//! version.

use std::path::{Path, PathBuf};

use moat_abi_spec::{parse_version, render_json, spec};
use serde_json::Value;

fn frozen_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("frozen")
}

fn frozen_versions() -> Vec<((u16, u16), PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(frozen_dir()).expect("abi-spec/frozen exists") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(v) = name.strip_suffix(".json") else {
            continue;
        };
        let v = parse_version(v).unwrap_or_else(|| panic!("bad frozen file name {name}"));
        out.push((v, path));
    }
    out.sort();
    out
}

/// Call name -> (number, args as (name, type, len), result).
fn calls_of(json: &Value) -> Vec<(String, Value, Value, Value)> {
    json["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .map(|c| {
            let args: Vec<Value> = c["args"]
                .as_array()
                .expect("args")
                .iter()
                .map(|a| serde_json::json!([a["name"], a["type"], a.get("len")]))
                .collect();
            (
                c["name"].as_str().expect("name").to_string(),
                c["number"].clone(),
                Value::Array(args),
                c["result"].clone(),
            )
        })
        .collect()
}

#[test]
fn abi_is_frozen_or_bumped() {
    let spec = spec();
    let current = render_json(spec);
    let version = spec.version_parts();
    let frozen = frozen_versions();
    let bless = std::env::var("MOAT_BLESS").is_ok_and(|v| v == "1");

    if let Some((_, path)) = frozen.iter().find(|(v, _)| *v == version) {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            text == current,
            "the ABI changed without a version bump: bump `version` in abi-spec/abi.toml and \
             freeze the new version with MOAT_BLESS=1 (abi.toml {} differs from {})",
            spec.version,
            path.display()
        );
        return;
    }

    // A new version.
    for (v, path) in &frozen {
        assert!(
            version > *v,
            "abi.toml version {} is not newer than frozen version {}.{} ({})",
            spec.version,
            v.0,
            v.1,
            path.display()
        );
    }
    if let Some((v, path)) = frozen.iter().rev().find(|(v, _)| v.0 == version.0) {
        let old: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let new: Value = serde_json::from_str(&current).unwrap();
        let new_calls = calls_of(&new);
        for (name, number, args, result) in calls_of(&old) {
            let found = new_calls.iter().find(|c| c.0 == name);
            let Some((_, n, a, r)) = found else {
                panic!(
                    "call {name} of frozen version {}.{} is gone: a minor version only adds calls; \
                     bump the major version to remove it",
                    v.0, v.1
                );
            };
            assert!(
                *n == number && *a == args && *r == result,
                "call {name} changed its number, arguments or result since frozen version {}.{}: \
                 a minor version only adds calls; bump the major version to change it",
                v.0,
                v.1
            );
        }
    }
    let path = frozen_dir().join(format!("{}.json", spec.version));
    if bless {
        std::fs::write(&path, &current).unwrap();
        eprintln!("froze ABI {} in {}", spec.version, path.display());
    } else {
        panic!(
            "ABI version {} is not frozen yet: freeze it with MOAT_BLESS=1 cargo test -p moat-abi-spec \
             (writes {})",
            spec.version,
            path.display()
        );
    }
}

#[test]
fn frozen_files_are_valid_json() {
    for (v, path) in frozen_versions() {
        let j: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            j["version"].as_str(),
            Some(format!("{}.{}", v.0, v.1).as_str()),
            "{}",
            path.display()
        );
    }
}
