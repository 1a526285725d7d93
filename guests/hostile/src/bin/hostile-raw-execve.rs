//! Hostile guest: raw execve.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
mod common;
moat_libos::entry!(main);

fn main() -> i32 {
    common::raw(59, c"/bin/sh".as_ptr() as u64, 0, 0, "execve(/bin/sh)")
}
