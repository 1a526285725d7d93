//! Hostile guest: raw ptrace.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
mod common;
moat_libos::entry!(main);

fn main() -> i32 {
    common::raw(101, 16, 1, 0, "ptrace(PTRACE_ATTACH, 1)")
}
