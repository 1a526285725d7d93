//! Hostile guest: memory.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
moat_libos::entry!(main);

use common::*;
use moat_libos::moat_pal::Error;
use moat_libos::{pal, println, Pal};

fn main() -> i32 {
    // Allocate and touch 16 MiB chunks until the host says no.
    let chunk = 16u64 << 20;
    let mut total = 0u64;
    loop {
        let r = pal().dk_virtual_memory_alloc(0, chunk, RW);
        if r == Error::NoMemory.code() {
            println!("REFUSED memory after {} MiB", total >> 20);
            return 0;
        }
        if r < 0 {
            println!("unexpected error {r}");
            return 1;
        }
        // SAFETY: freshly allocated RW memory.
        unsafe { core::ptr::write_bytes(r as u64 as *mut u8, 0xa5, chunk as usize) };
        total += chunk;
        if total > (64u64 << 30) {
            return escaped("allocated more than 64 GiB");
        }
    }
}
