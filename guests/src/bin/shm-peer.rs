//! The other side of the conformance suite's `shm_child_peer` case:
//! opens the shared section `shm:NAME` the parent made (arguments: NAME,
//! SEED), checks the parent's pattern in its first 256 bytes, answers
//! with the pattern inverted in the second page and rings; then echoes
//! the parent's round counter (the u64 at 8192) to 8200 and rings back
//! after each ring, until the counter is `u64::MAX`. Exit 0, or the step
//! that failed: 10 open, 11 size, 12 map, 13 pattern, 14 resize allowed,
//! 15 ring, 16 wait, 17 round out of order.
#![no_std]
#![no_main]

use core::sync::atomic::Ordering;
use moat_libos::section::Section;

moat_libos::entry!(main);

const PAGE: u64 = 4096;

fn main() -> i32 {
    let args = moat_libos::env::args();
    let (Some(name), Some(seed)) = (args.get(1), args.get(2)) else {
        moat_libos::eprintln!("usage: shm-peer NAME SEED");
        return 2;
    };
    let seed = seed.parse::<u8>().unwrap_or(0);
    let Ok(s) = Section::open(name, true) else {
        return 10;
    };
    if s.size() != Ok(4 * PAGE) {
        return 11;
    }
    let Ok(m) = s.map() else {
        return 12;
    };
    let Ok(bell) = s.doorbell() else {
        return 16;
    };
    let mut pattern = [0u8; 256];
    if m.read(0, &mut pattern).is_err() {
        return 13;
    }
    for (i, b) in pattern.iter_mut().enumerate() {
        if *b != (i as u8).wrapping_mul(7).wrapping_add(seed) {
            return 13;
        }
        *b = !*b;
    }
    // The parent sized it: nobody may size it again.
    if s.stream().set_length(8 * PAGE) != Err(moat_libos::Error::PermissionDenied) {
        return 14;
    }
    if m.write(PAGE, &pattern).is_err() || s.ring().is_err() {
        return 15;
    }
    let (Some(counter), Some(echo)) = (m.atomic_u64(2 * PAGE), m.atomic_u64(2 * PAGE + 8)) else {
        return 12;
    };
    let mut last = 0u64;
    loop {
        if bell.wait(20_000_000).is_err() {
            return 16;
        }
        let r = counter.load(Ordering::Acquire);
        if r == u64::MAX {
            return 0;
        }
        if r != last + 1 {
            return 17;
        }
        last = r;
        echo.store(r, Ordering::Release);
        if s.ring().is_err() {
            return 15;
        }
    }
}
