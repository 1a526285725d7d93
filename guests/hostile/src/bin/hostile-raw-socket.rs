//! Hostile guest: raw socket.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
mod common;
moat_libos::entry!(main);

fn main() -> i32 {
    common::raw(41, 2, 1, 0, "socket(AF_INET, SOCK_STREAM)")
}
