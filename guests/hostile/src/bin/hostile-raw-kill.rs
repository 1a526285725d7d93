//! Hostile guest: raw kill.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
mod common;
moat_libos::entry!(main);

fn main() -> i32 {
    common::raw(62, (-1i64) as u64, 9, 0, "kill(-1, SIGKILL)")
}
