//! The sandboxed picoprocess loader of host-linux. Started by the monitor
//! only; not meant to be run by hand.
//!
//! `no_main`: the C runtime calls `main` directly, skipping the Rust
//! runtime's start-up (which reads /proc/self/maps for the main thread's
//! stack guard and installs signal handlers we replace anyway).
#![no_main]

#[no_mangle]
pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    moat_host_linux::main()
}
