//! `threads N`: starts N threads that each sleep 20 ms, then ends the first
//! thread (DkThreadExit) without waiting for them: the picoprocess ends
//! with the last of its threads (exit 0). A guest whose end is a thread's,
//! not DkProcessExit (the layers' tests use it).
#![no_std]
#![no_main]

use moat_libos::{println, thread};

moat_libos::entry!(main);

fn main() -> i32 {
    let n: u32 = match moat_libos::env::args().get(1).map(|a| a.parse()) {
        Some(Ok(n)) if n <= 64 => n,
        _ => {
            println!("usage: threads N (N at most 64)");
            return 2;
        }
    };
    for _ in 0..n {
        // Detached: the handle is dropped, the thread runs on.
        drop(thread::spawn(|| thread::sleep_micros(20_000)));
    }
    println!("started {n} threads");
    moat_libos::io::try_flush_stdout();
    thread::exit(0)
}
