//! Hostile guest: raw write fd.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
mod common;
moat_libos::entry!(main);

fn main() -> i32 {
    common::raw(
        1,
        1,
        c"x".as_ptr() as u64,
        1,
        "write(1) on an inherited descriptor number",
    )
}
