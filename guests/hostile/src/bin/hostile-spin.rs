//! Runs away without ever calling the ABI: `spin` (a busy loop), `vmcall`
//! (a hypercall instruction moat does not use; on nested KVM it may never
//! return), `hlt`. The host must end it with a clear report (the kvm
//! host's vCPU watchdog, or the CPU-time limit).
#![no_std]
#![no_main]
extern crate alloc;

#[path = "../common.rs"]
mod common;

use core::arch::asm;

moat_libos::entry!(main);

fn main() -> i32 {
    let args = moat_libos::env::args();
    let mode = args.get(1).map_or("spin", |s| s.as_str());
    moat_libos::println!("running away: {mode}");
    moat_libos::io::try_flush_stdout();
    match mode {
        // SAFETY: deliberately hostile instructions; the host ends us.
        "vmcall" => unsafe { asm!("vmcall", options(nostack)) },
        // SAFETY: as above.
        "hlt" => unsafe { asm!("hlt", options(nostack)) },
        _ => loop {
            core::hint::spin_loop();
        },
    }
    common::escaped(mode)
}
