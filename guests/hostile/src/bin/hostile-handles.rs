//! Hostile guest: handles.
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
    // Print first: stdout's own handle must exist before the table is full.
    println!("creating handles");
    let mut n = 0u64;
    loop {
        let mut h = 0u64;
        let r = pal().dk_notification_event_create(0, &mut h);
        if r == Error::LimitExceeded.code() {
            println!("REFUSED handles after {n}");
            return 0;
        }
        if r < 0 {
            println!("unexpected error {r}");
            return 1;
        }
        n += 1;
        if n > 1_000_000 {
            return common::escaped("a million handles");
        }
    }
}
