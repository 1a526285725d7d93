//! Hostile guest: raw open.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
mod common;
moat_libos::entry!(main);

fn main() -> i32 {
    common::raw(
        257,
        (-100i64) as u64,
        c"/etc/passwd".as_ptr() as u64,
        0,
        "openat(/etc/passwd)",
    )
}
