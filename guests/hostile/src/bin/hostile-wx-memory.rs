//! Hostile guest: wx memory.
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
    let p = pal();
    let r = p.dk_virtual_memory_alloc(0, 4096, RWX);
    if r >= 0 {
        return escaped("allocated writable+executable memory");
    }
    let a = p.dk_virtual_memory_alloc(0, 4096, RW);
    if a < 0 {
        return escaped("could not even allocate RW memory");
    }
    if p.dk_virtual_memory_protect(a as u64, 4096, RWX) >= 0 {
        return escaped("made memory writable+executable");
    }
    // Protection of memory the guest does not own (its own image text).
    let text = main as *const () as usize as u64 & !0xfff;
    if p.dk_virtual_memory_protect(text, 4096, RW) != Error::BadAddress.code() {
        return escaped("changed the protection of image text");
    }
    if p.dk_virtual_memory_free(text, 4096) != Error::BadAddress.code() {
        return escaped("freed image text");
    }
    println!("REFUSED writable+executable memory");
    0
}
