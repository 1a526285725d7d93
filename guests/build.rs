//! Guest images are static, non-PIE, libc-free ELF executables whose entry
//! point is the libos's `_start`.
fn main() {
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
