//! Runs away without ever calling the ABI: `spin` (a busy loop), `vmcall`
//! (a hypercall instruction moat does not use), `hlt`. The host must end
//! it with a clear report (the kvm host's vCPU watchdog, or the CPU-time
//! limit). KVM answers a `vmcall` from CPL 3 itself, without leaving the
//! VM: it writes `-KVM_EPERM` (-1) to `rax` and goes on (some nested KVMs
//! never return from it instead). That refusal is reported as
//! `REFUSED vmcall rax=-1` and exit code 3; anything else it did is an
//! escape.
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
        "vmcall" => {
            let mut rax: i64 = 0x1234;
            // SAFETY: deliberately hostile instruction; the host ends us or
            // KVM refuses it.
            unsafe { asm!("vmcall", inout("rax") rax, options(nostack)) };
            if rax == -1 {
                moat_libos::println!("REFUSED vmcall rax={rax}");
                return 3;
            }
            return common::escaped(&alloc::format!("vmcall rax={rax:#x}"));
        }
        // SAFETY: as above.
        "hlt" => unsafe { asm!("hlt", options(nostack)) },
        _ => loop {
            core::hint::spin_loop();
        },
    }
    common::escaped(mode)
}
