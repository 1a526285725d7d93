//! Hostile guest: dotdot.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
moat_libos::entry!(main);

use common::*;

fn main() -> i32 {
    let grant = arg(1);
    for u in [
        alloc::format!("{grant}/../secret"),
        alloc::format!("{grant}/./../secret"),
        alloc::format!("{grant}/sub/../../secret"),
        alloc::format!("{grant}/%2e%2e/secret"),
        alloc::string::String::from("file:../secret"),
        alloc::string::String::from("file://etc/passwd"),
        alloc::format!("{grant}/../secret\0"),
    ] {
        if let Err(code) = expect_refused(&u, RD, OPEN) {
            return code;
        }
    }
    // Creating through `..` must not create anything either.
    if let Err(code) = expect_refused(&alloc::format!("{grant}/../created-by-guest"), WR, NEW) {
        return code;
    }
    0
}
