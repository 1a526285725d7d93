//! Link the driver images like the other guests (static, non-PIE,
//! libc-free), and build the virtio driver images, which live in their own
//! workspace (`virtio/`; see its Cargo.toml for why), into
//! `target/guest-virtio`, copying them next to the other images.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = here.parent().unwrap().to_path_buf();
    for watched in [
        "drivers/virtio",
        "libos/src",
        "libos/virtio",
        "pal/src",
        "guests/build.rs",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    // OUT_DIR is <target>/<profile>/build/<pkg>/out: the images go to <target>/<profile>.
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let profile_dir = out.ancestors().nth(3).unwrap().to_path_buf();
    let target_root = profile_dir.parent().unwrap().to_path_buf();
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let nested_target = target_root.join("guest-virtio");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(root.join("drivers/virtio/Cargo.toml"))
        .arg("--target-dir")
        .arg(&nested_target);
    if release {
        cmd.arg("--release");
    }
    // Nothing of the outer build leaks in (its flags are for host code).
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME" || k == "RUSTFLAGS" || k == "RUSTC_WRAPPER"
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd.status().expect("cannot run cargo for drivers/virtio");
    assert!(status.success(), "building drivers/virtio failed");
    let built = nested_target.join(if release { "release" } else { "debug" });
    for image in ["virtio-blk", "virtio-net"] {
        copy(&built.join(image), &profile_dir.join(image));
    }
}

fn copy(from: &Path, to: &Path) {
    // Replace atomically: a test may be running the previous image.
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    std::fs::rename(&tmp, to).unwrap();
}
