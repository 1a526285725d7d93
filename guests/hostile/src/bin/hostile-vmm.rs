//! Attacks on the kvm host's own machinery (they are refused or end the
//! picoprocess with a report on linux too, where there is no VM):
//!
//! - `sigbus FILE`: map 64 KiB of a tiny file and hand the unbacked tail
//!   to an ABI call (the host's copy faults);
//! - `vmm-area ADDR`: write to the VM's own memory (page tables at 0x1000,
//!   the IDT at 0x9000, the exception stubs at 0xa000, the call stubs at
//!   0xb000), which the picoprocess may not write;
//! - `nested-rsp`: fault inside an exception handler with a stack pointer
//!   near zero;
//! - `threads N`: start and end N threads one after another, then two at
//!   once (the VMM must not run out of vCPUs).
//!
//! Prints `ESCAPED ...` and exits 42 when an attack got through.
#![no_std]
#![no_main]
extern crate alloc;

#[path = "../common.rs"]
mod common;

use core::arch::asm;
use moat_libos::moat_pal::{access, create, prot};
use moat_libos::{exception, println, raw, ExceptionInfo};

moat_libos::entry!(main);

fn sigbus(file: &str) -> i32 {
    let h = raw::stream_open(
        &alloc::format!("file:{file}"),
        access::READ,
        create::OPEN_EXISTING,
        0,
    )
    .expect("open");
    let m = raw::stream_map(h, 0, prot::READ, 0, 0x10000).expect("map");
    println!("mapped 64 KiB of a small file");
    moat_libos::io::try_flush_stdout();
    // SAFETY: the region is the picoprocess's; the host copies from it.
    let s = unsafe { core::slice::from_raw_parts((m + 0x8000) as *const u8, 16) };
    let r = raw::debug_string_print(s);
    common::escaped(&alloc::format!(
        "debug print of unbacked memory returned {r:?}"
    ))
}

fn vmm_area(addr: u64) -> i32 {
    println!("trying to write {addr:#x}");
    moat_libos::io::try_flush_stdout();
    // SAFETY: deliberately hostile; the write must fault.
    unsafe { (addr as *mut u64).write_volatile(0x9090_9090_9090_9090) };
    common::escaped(&alloc::format!("wrote {addr:#x}"))
}

fn handler(_: &mut ExceptionInfo) -> u32 {
    // Fault again with a stack pointer the host must not trust.
    // SAFETY: deliberately hostile.
    unsafe { asm!("mov rsp, 0x10", "ud2", options(noreturn)) }
}

fn nested_rsp() -> i32 {
    exception::set_handler(handler);
    println!("faulting with a hostile handler");
    moat_libos::io::try_flush_stdout();
    // SAFETY: deliberately hostile.
    unsafe { asm!("ud2") };
    common::escaped("returned from the nested fault")
}

fn threads(n: u64) -> i32 {
    fn body() {}
    for i in 0..n {
        match moat_libos::thread::try_spawn(body) {
            Ok(t) => {
                let _ = t.join();
            }
            Err(e) => {
                println!("thread {i} refused: {}", e.name());
                return 1;
            }
        }
    }
    let a = moat_libos::thread::try_spawn(|| moat_libos::thread::sleep_micros(20_000));
    let b = moat_libos::thread::try_spawn(|| moat_libos::thread::sleep_micros(20_000));
    match (a, b) {
        (Ok(a), Ok(b)) => {
            let _ = a.join();
            let _ = b.join();
            println!("REFUSED nothing: {n} threads and two more at once");
            0
        }
        _ => {
            println!("two threads at once were refused after {n}");
            1
        }
    }
}

fn main() -> i32 {
    let args = moat_libos::env::args();
    match args.get(1).map(|s| s.as_str()) {
        Some("sigbus") => sigbus(args.get(2).map_or("/nonexistent", |s| s.as_str())),
        Some("vmm-area") => vmm_area(
            args.get(2)
                .and_then(|s| moat_libos::env::parse_u64(s))
                .unwrap_or(0x1000),
        ),
        Some("nested-rsp") => nested_rsp(),
        Some("threads") => threads(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100)),
        _ => 2,
    }
}
