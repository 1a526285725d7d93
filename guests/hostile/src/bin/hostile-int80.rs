//! Hostile guest: int80.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
mod common;
moat_libos::entry!(main);

fn main() -> i32 {
    moat_libos::println!("trying int 0x80 getpid");
    moat_libos::io::try_flush_stdout();
    let r: i64;
    // SAFETY: deliberately hostile: the 32-bit system call gate.
    unsafe { core::arch::asm!("int 0x80", inlateout("rax") 20i64 => r, options(nostack)) };
    common::escaped(&alloc::format!("int 0x80 returned {r}"))
}
