//! `bench-ckpt MIB`: a picoprocess to checkpoint (`moat-bench
//! checkpoint`). Prints `up` at once (its first output), touches MIB MiB
//! of memory, prints `ready`, then prints a `.` about every 50 µs for as
//! long as it lives: a restored one shows it is running again within
//! 50 µs of its first call.
#![no_std]
#![no_main]
extern crate alloc;
use moat_libos::{pal, print, println, Pal};

moat_libos::entry!(main);

fn main() -> i32 {
    let mib: usize = moat_libos::env::args()
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    println!("up");
    moat_libos::io::try_flush_stdout();
    // Every page written (not zero: a checkpoint writes zero pages as
    // holes).
    let mut mem = alloc::vec![0u8; mib << 20];
    for (i, b) in mem.iter_mut().enumerate().step_by(64) {
        *b = (i >> 6) as u8 | 1;
    }
    core::hint::black_box(&mem);
    println!("ready");
    moat_libos::io::try_flush_stdout();
    let p = pal();
    loop {
        let t0 = p.dk_system_time_query();
        while p.dk_system_time_query().wrapping_sub(t0) < 50 {
            core::hint::spin_loop();
        }
        print!(".");
        moat_libos::io::try_flush_stdout();
    }
}
