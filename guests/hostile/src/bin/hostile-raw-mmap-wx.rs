//! Hostile guest: raw mmap wx.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
mod common;
moat_libos::entry!(main);

fn main() -> i32 {
    common::raw(9, 0, 4096, 7, "mmap(PROT_READ|PROT_WRITE|PROT_EXEC)")
}
