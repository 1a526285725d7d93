//! `hostile-kvm-ports MODE FIRST [LAST]`: I/O port access from the
//! picoprocess on the kvm host, where code runs with IOPL 3 and every
//! `in` and `out` leaves the VM for the VMM to decide. MODE is `in8`,
//! `in16`, `in32`, `out8`, `out16`, `out32`, `ins` or `outs` (string
//! I/O, four bytes); the image tries every port from FIRST to LAST (hex,
//! LAST defaults to FIRST) in order. None is granted, so the first one
//! must end the picoprocess with a sandbox violation naming it; a port
//! that lets the image go on prints `ESCAPED` and exits 42.
#![no_std]
#![no_main]
extern crate alloc;

#[path = "../common.rs"]
mod common;

use core::arch::asm;
use moat_libos::println;

moat_libos::entry!(main);

fn hex(s: &str) -> Option<u16> {
    u16::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// One access of `mode` to `port`.
fn access(mode: &str, port: u16) -> bool {
    let mut buf = [0x5au8; 4];
    let p = buf.as_mut_ptr();
    // SAFETY: deliberately hostile port I/O; the VMM decides each access.
    // The string forms move four bytes from or to our own buffer.
    unsafe {
        match mode {
            "in8" => asm!("in al, dx", in("dx") port, out("al") _),
            "in16" => asm!("in ax, dx", in("dx") port, out("ax") _),
            "in32" => asm!("in eax, dx", in("dx") port, out("eax") _),
            "out8" => asm!("out dx, al", in("dx") port, in("al") 0x5au8),
            "out16" => asm!("out dx, ax", in("dx") port, in("ax") 0x5a5au16),
            "out32" => asm!("out dx, eax", in("dx") port, in("eax") 0x5a5a_5a5au32),
            "ins" => asm!("rep insb", in("dx") port, inout("rdi") p => _, inout("rcx") 4usize => _),
            "outs" => {
                asm!("rep outsb", in("dx") port, inout("rsi") p => _, inout("rcx") 4usize => _)
            }
            _ => return false,
        }
    }
    core::hint::black_box(buf);
    true
}

fn main() -> i32 {
    let mode = common::arg(1);
    let (Some(first), last) = (hex(&common::arg(2)), common::arg(3)) else {
        println!("usage: hostile-kvm-ports MODE FIRST [LAST]");
        return 2;
    };
    let last = hex(&last).unwrap_or(first);
    println!("trying {mode} on ports {first:#x}..={last:#x}");
    moat_libos::io::try_flush_stdout();
    for port in first..=last {
        if !access(&mode, port) {
            println!("unknown mode {mode}");
            return 2;
        }
        println!("ESCAPED {mode} port {port:#x}");
    }
    common::ESCAPED
}
