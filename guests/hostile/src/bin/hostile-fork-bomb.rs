//! Hostile guest: fork bomb.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
moat_libos::entry!(main);

use common::*;
use moat_libos::moat_pal::Error;
use moat_libos::println;

fn main() -> i32 {
    // Each generation starts two copies of itself, five generations deep:
    // 62 picoprocesses alive at the peak unless the process limit stops it.
    let me = arg(1);
    let depth: u32 = arg(2).parse().unwrap_or(0);
    if depth > 5 {
        return 0;
    }
    let next = alloc::format!("{}", depth + 1);
    let mut kids = alloc::vec::Vec::new();
    let mut refused = false;
    for _ in 0..2 {
        match moat_libos::process::spawn(&me, &[&me, &next]) {
            Ok(c) => kids.push(c),
            Err(Error::LimitExceeded) => {
                refused = true;
                break;
            }
            Err(e) => {
                println!("spawn failed: {}", e.name());
                break;
            }
        }
    }
    let mut child_refused = false;
    for k in kids {
        if k.wait() == Ok(0) {
            child_refused = true;
        }
    }
    if depth == 0 {
        if refused || child_refused {
            println!("REFUSED fork bomb (process limit reached)");
            return 0;
        }
        return escaped("no process limit was reached");
    }
    if refused || child_refused {
        0
    } else {
        1
    }
}
