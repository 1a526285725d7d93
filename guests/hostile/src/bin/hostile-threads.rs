//! Hostile guest: threads.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
moat_libos::entry!(main);

use moat_libos::moat_pal::Error;
use moat_libos::println;

fn main() -> i32 {
    let mut kids = alloc::vec::Vec::new();
    loop {
        match moat_libos::thread::try_spawn(|| moat_libos::thread::sleep_micros(300_000)) {
            Ok(k) => kids.push(k),
            Err(Error::LimitExceeded) => {
                println!("REFUSED threads after {}", kids.len());
                break;
            }
            Err(e) => {
                println!("unexpected error {}", e.name());
                return 1;
            }
        }
        if kids.len() > 100_000 {
            return common::escaped("a hundred thousand threads");
        }
    }
    for k in kids {
        let _ = k.join();
    }
    0
}
