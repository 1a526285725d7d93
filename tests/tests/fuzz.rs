//! The fuzz targets (`fuzz/`) as part of the test suite, so they never rot:
//!
//! - `corpus_replays`: every committed corpus input (`fuzz/corpus/<target>/`)
//!   through the same target code, compiled as a normal test (the targets
//!   are the library `moat-fuzz-targets`); runs everywhere.
//! - `each_target_fuzzes_briefly`: where `cargo fuzz` is installed, builds
//!   the targets with it and runs each for a few seconds from the committed
//!   corpus (new inputs go to a temporary folder, never into the
//!   repository); a crash fails the test, naming the input libFuzzer saved
//!   under `fuzz/artifacts/<target>/`. Without cargo-fuzz it says so and
//!   passes, unless `MOAT_REQUIRE_FUZZ` is set (as `.ci/run` sets it).
//!
//! `fuzz/README.md` says how the targets are built (stable Rust with
//! `RUSTC_BOOTSTRAP=1`) and how to run them for longer.
use std::path::{Path, PathBuf};
use std::process::Command;

/// Seconds each target runs in `each_target_fuzzes_briefly`.
const FUZZ_SECONDS: u32 = 5;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

#[test]
fn corpus_replays() {
    for (name, target) in moat_fuzz_targets::TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name}: no corpus in {}", dir.display());
        for f in &files {
            let data = std::fs::read(f).unwrap();
            let r = std::panic::catch_unwind(|| target(&data));
            assert!(r.is_ok(), "{name} fails on {}", f.display());
        }
        eprintln!("{name}: {} corpus inputs replayed", files.len());
    }
    moat_fuzz_targets::monitor_protocol::cleanup();
}

#[test]
fn each_target_fuzzes_briefly() {
    let installed = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        assert!(
            std::env::var_os("MOAT_REQUIRE_FUZZ").is_none(),
            "MOAT_REQUIRE_FUZZ is set but `cargo fuzz` is not installed (cargo install cargo-fuzz)"
        );
        eprintln!(
            "skipped: `cargo fuzz` is not installed (the corpus is replayed by corpus_replays)"
        );
        return;
    }
    let fuzz = fuzz_dir();
    // cargo-fuzz needs nightly features; stable Rust has them behind
    // RUSTC_BOOTSTRAP (see fuzz/README.md).
    let build = cargo()
        .current_dir(&fuzz)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "build", "-O"])
        .status()
        .unwrap();
    assert!(build.success(), "cargo fuzz build failed");
    for (name, _) in moat_fuzz_targets::TARGETS {
        let scratch = tempfile::tempdir().unwrap();
        let corpus = fuzz.join("corpus").join(name);
        let out = cargo()
            .current_dir(&fuzz)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "-O", name])
            .arg(scratch.path())
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={FUZZ_SECONDS}"))
            .args(moat_fuzz_targets::libfuzzer_options(name))
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        assert!(
            out.status.success(),
            "fuzz target {name} failed:\n{}",
            tail.join("\n")
        );
        let done = log.lines().rfind(|l| l.contains("DONE")).unwrap_or("");
        eprintln!("{name}: {done}");
    }
}
