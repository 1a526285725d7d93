//! The ABI conformance suite as one image (see `conformance/mod.rs`).
#![no_std]
#![no_main]

extern crate alloc;

#[path = "../conformance/mod.rs"]
mod conformance;

moat_libos::entry!(main);

fn main() -> i32 {
    conformance::run()
}
