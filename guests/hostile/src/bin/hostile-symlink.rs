//! Hostile guest: symlink.
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
    // The test makes: escape -> the outside directory, abs -> outside/secret,
    // loop -> loop.
    for (u, acc, cr) in [
        (alloc::format!("{grant}/escape/secret"), RD, OPEN),
        (alloc::format!("{grant}/abs"), RD, OPEN),
        (alloc::format!("{grant}/escape/created-by-guest"), WR, NEW),
        (alloc::format!("{grant}/abs"), WR, NEW),
        (alloc::format!("{grant}/loop"), RD, OPEN),
    ] {
        if let Err(code) = expect_refused(&u, acc, cr) {
            return code;
        }
    }
    // Renaming a granted file out through the link.
    if let Ok(h) = open(&alloc::format!("{grant}/inside"), WR, OPEN, 0) {
        let to = alloc::format!("{grant}/escape/moved-by-guest");
        let r =
            moat_libos::Pal::dk_stream_rename(&moat_libos::pal(), h, to.as_ptr(), to.len() as u64);
        if r >= 0 {
            return escaped("renamed a file out through a symlink");
        }
        moat_libos::println!("REFUSED rename through symlink");
    }
    0
}
