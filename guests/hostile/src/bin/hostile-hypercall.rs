//! Hypercalls with numbers the ABI does not have, made directly with the
//! KVM host's `out` to the hypercall port (kvm only: on linux the `out`
//! instruction itself is a fault). Each must come back as an error code,
//! with the picoprocess and the host intact; then a real call still works.
//! With `exception-port`: write to the VMM's exception port from guest
//! code, which must end the picoprocess as a violation.
#![no_std]
#![no_main]
extern crate alloc;

#[path = "../common.rs"]
mod common;

use core::arch::asm;
use moat_libos::{pal, println, Pal};

moat_libos::entry!(main);

/// `out 0x50, eax` with call number `nr` and junk arguments.
fn hypercall(nr: u32) -> i64 {
    let r: i64;
    // SAFETY: deliberately malformed; the VMM answers in rax.
    unsafe {
        asm!("out 0x50, eax", inlateout("rax") nr as u64 => r,
             in("rsi") 0xdead_beef_u64, in("rdx") u64::MAX, in("rcx") 1u64,
             options(nostack));
    }
    r
}

fn main() -> i32 {
    if moat_libos::env::args().get(1).map(|s| s.as_str()) == Some("exception-port") {
        // Fake an exception report: the VMM's own port, from guest code.
        println!("trying out 0x51");
        moat_libos::io::try_flush_stdout();
        // SAFETY: deliberately hostile; the VMM ends us.
        unsafe { asm!("mov al, 14", "out 0x51, al", out("al") _, options(nostack)) };
        return common::escaped("out 0x51 returned");
    }
    let n = moat_libos::moat_pal::NUM_CALLS;
    for nr in [0, n + 1, 1000, u32::MAX] {
        let r = hypercall(nr);
        if r >= 0 {
            return common::escaped(&alloc::format!("call {nr} answered {r}"));
        }
        println!("REFUSED call number {nr} ({r})");
    }
    // The picoprocess goes on: a real call works.
    if pal().dk_system_time_query() <= 0 {
        return common::escaped("time query failed after bad calls");
    }
    println!("REFUSED all unknown calls; still running");
    0
}
