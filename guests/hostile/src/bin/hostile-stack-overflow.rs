//! Hostile guest: stack overflow.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
moat_libos::entry!(main);

#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    let buf = [n; 64];
    // SAFETY: read_volatile keeps the frame from being optimised away.
    let v = unsafe { core::ptr::read_volatile(&buf[(n % 64) as usize]) };
    recurse(n + 1).wrapping_add(v)
}

fn main() -> i32 {
    moat_libos::println!("recursing");
    moat_libos::io::try_flush_stdout();
    let r = recurse(0);
    common::escaped(&alloc::format!("recursion ended: {r}"))
}
