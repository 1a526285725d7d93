//! The committed generated files are what the renderers produce.
//!
//! `MOAT_BLESS=1 cargo test -p moat-abi-spec` rewrites them. The Rust files
//! are compared, and written, after `rustfmt --edition 2021` (the
//! renderers do not lay them out), as `cargo fmt` keeps them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    // abi-spec/ -> workspace root
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn bless() -> bool {
    std::env::var("MOAT_BLESS").is_ok_and(|v| v == "1")
}

fn check(rel: &str, expected: &str) {
    let path = root().join(rel);
    if bless() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current != expected {
            std::fs::write(&path, expected).unwrap();
            eprintln!("blessed {rel}");
        }
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current != expected {
        let line = current
            .lines()
            .zip(expected.lines())
            .position(|(a, b)| a != b)
            .map(|i| i + 1)
            .unwrap_or_else(|| current.lines().count().min(expected.lines().count()) + 1);
        panic!(
            "{rel} is out of date with abi-spec/abi.toml (first difference at line {line}); \
             run `MOAT_BLESS=1 cargo test -p moat-abi-spec` to regenerate it"
        );
    }
}

#[test]
fn abi_md_is_up_to_date() {
    check("abi-spec/ABI.md", &moat_abi_spec::render("md").unwrap());
}

#[test]
fn c_header_is_up_to_date() {
    check(
        "abi-spec/include/moat_abi.h",
        &moat_abi_spec::render("c").unwrap(),
    );
}

#[test]
fn pal_abi_rs_is_up_to_date() {
    check(
        "pal/src/abi.rs",
        &rustfmt(&moat_abi_spec::render_rust(moat_abi_spec::spec())),
    );
}

/// rustfmt (edition 2021) applied to `src`.
fn rustfmt(src: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("rustfmt")
        .args(["--edition", "2021", "--emit", "stdout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rustfmt (installed with the Rust toolchain)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(src.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "rustfmt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What layers are written against, laid out by rustfmt.
#[test]
fn pal_layer_rs_is_up_to_date() {
    let src = moat_abi_spec::render_rust_layer(moat_abi_spec::spec());
    check("pal/src/layer.rs", &rustfmt(&src));
}

/// The dispatcher, laid out by rustfmt.
#[test]
fn pal_dispatch_rs_is_up_to_date() {
    let src = moat_abi_spec::render_rust_dispatch(moat_abi_spec::spec());
    check("pal/src/dispatch.rs", &rustfmt(&src));
}

/// libos's raw calls, laid out by rustfmt.
#[test]
fn libos_raw_calls_rs_is_up_to_date() {
    let src = moat_abi_spec::render_libos_raw_calls(moat_abi_spec::spec());
    check("libos/src/raw/calls.rs", &rustfmt(&src));
}

/// The typed host side and its adapter, laid out by rustfmt.
#[test]
fn pal_host_calls_rs_is_up_to_date() {
    let src = moat_abi_spec::render_rust_host(moat_abi_spec::spec());
    check("pal/src/host_calls.rs", &rustfmt(&src));
}
