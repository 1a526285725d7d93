//! Hostile guest: fd handles.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
moat_libos::entry!(main);

use moat_libos::moat_pal::Error;
use moat_libos::{pal, println, Pal};

fn main() -> i32 {
    // Descriptor numbers are not handles: every small number and every
    // forged generation is refused.
    let msg = b"x";
    for h in (0u64..64).chain((1..8).map(|g| (g << 32) | 3)) {
        let r = pal().dk_stream_write(h, 0, msg.as_ptr(), 1);
        if r != Error::BadHandle.code() {
            return common::escaped(&alloc::format!("wrote through handle {h:#x}: {r}"));
        }
    }
    println!("REFUSED descriptor numbers and forged handles");
    0
}
