//! Guest images are static, non-PIE, libc-free ELF executables whose entry
//! point is the libos's `_start`.
fn main() {
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    // `exit-code` lives at another address than every other image, so the
    // conformance suite can map it next to itself (DkStreamMapPeBinary).
    // Only for this package: the hostile and bench guests share this script.
    if std::env::var("CARGO_PKG_NAME").as_deref() == Ok("moat-guests") {
        println!("cargo:rustc-link-arg-bin=exit-code=-Wl,--image-base=0x10000000");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
