//! moat's fuzz targets, each a function of one byte slice that panics when
//! the code under test misbehaves (a panic of its own, or a broken
//! invariant the target checks):
//!
//! - [`hypercall_dispatch`]: the hypercall dispatcher and the generated
//!   host adapter (length and pointer checks, copy-in, out-values) against
//!   the ABI spec, over a fake guest memory;
//! - [`monitor_protocol`]: decoding the loader's requests and the broker's
//!   answer to each, against a real session granting one temporary
//!   directory;
//! - [`service_wire`]: the mediator ↔ driver wire and the block contract,
//!   fed client requests and driver answers;
//! - [`manifest`]: manifests (TOML) and device declarations;
//! - [`elf_image`]: the image checks on arbitrary files;
//! - [`checkpoint_file`]: the checkpoint file's reader.
//!
//! The `cargo fuzz` binaries (`fuzz/fuzz_targets/`) call these with
//! libFuzzer's input; `tests/tests/fuzz.rs` runs them over the committed
//! corpus (`fuzz/corpus/<target>/`). [`run`] names them all.
pub mod checkpoint_file;
pub mod elf_image;
pub mod hypercall_dispatch;
pub mod input;
pub mod manifest;
pub mod monitor_protocol;
pub mod seeds;
pub mod service_wire;

/// A target: the function libFuzzer's input goes to.
pub type Target = fn(&[u8]);

/// Every target, by the name of its `cargo fuzz` binary and corpus folder.
pub const TARGETS: [(&str, Target); 6] = [
    ("hypercall_dispatch", hypercall_dispatch::run),
    ("monitor_protocol", monitor_protocol::run),
    ("service_wire", service_wire::run),
    ("manifest", manifest::run),
    ("elf_image", elf_image::run),
    ("checkpoint_file", checkpoint_file::run),
];

/// The libFuzzer options a target's runs take beyond the defaults
/// (`elf_image`: inputs up to [`seeds::MAX_IMAGE_SEED`] bytes, enough for
/// the small real images; larger ones make its corpus tens of megabytes).
pub fn libfuzzer_options(name: &str) -> &'static [&'static str] {
    match name {
        "elf_image" => &["-max_len=65536"],
        _ => &[],
    }
}

/// Run the target `name` on `data`; `false` if there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => {
            f(data);
            true
        }
        None => false,
    }
}
