//! `counter N [FILE_URI|-] [HOLD_URI]`: prints `tick 0` to `tick N-1`, one line every
//! 10 ms, then exits 0. Two threads share the work: the first paces the
//! ticks (a delay, then a synchronization event to the second, then a
//! wait on a semaphore); the second prints each tick, counting in memory,
//! and with FILE_URI also writes it into a file it keeps open. Its state
//! lives in memory, events, a semaphore and an open file: the guest the
//! checkpoint tests move between hosts. With HOLD_URI it also opens that
//! stream and keeps it, unused (a socket, to show what a checkpoint
//! cannot carry).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};
use moat_libos::stream::Stream;
use moat_libos::sync::{Event, Semaphore};
use moat_libos::{println, thread};
/// Wait without end (DkObjectsWaitAny's INFINITE).
const FOREVER: i64 = -1;

moat_libos::entry!(main);

struct Shared {
    go: Event,
    done: Semaphore,
    count: AtomicU64,
    /// Where the next line goes in the file.
    at: AtomicU64,
    n: u64,
    file: Option<Stream>,
}

fn main() -> i32 {
    let args = moat_libos::env::args();
    let n: u64 = match args.get(1).map(|a| a.parse()) {
        Some(Ok(n)) => n,
        _ => {
            println!("usage: counter N [FILE_URI]");
            return 2;
        }
    };
    let hold = match args.get(3) {
        Some(uri) => match Stream::open_read(uri) {
            Ok(s) => Some(s),
            Err(e) => {
                println!("counter: cannot open {uri}: {e:?}");
                return 1;
            }
        },
        None => None,
    };
    let file = match args.get(2).filter(|a| a.as_str() != "-") {
        Some(uri) => match Stream::create(uri) {
            Ok(s) => Some(s),
            Err(e) => {
                println!("counter: cannot create {uri}: {e:?}");
                return 1;
            }
        },
        None => None,
    };
    let shared = Arc::new(Shared {
        go: Event::synchronization(false).expect("event"),
        done: Semaphore::new(0, 1).expect("semaphore"),
        count: AtomicU64::new(0),
        at: AtomicU64::new(0),
        n,
        file,
    });
    let s = shared.clone();
    let printer = thread::spawn(move || {
        while s.count.load(Ordering::Acquire) < s.n {
            if s.go.wait(FOREVER).is_err() {
                return 1;
            }
            let i = s.count.load(Ordering::Acquire);
            let line = format!("tick {i}\n");
            moat_libos::print!("{line}");
            moat_libos::io::try_flush_stdout();
            if let Some(f) = &s.file {
                let at = s.at.fetch_add(line.len() as u64, Ordering::AcqRel);
                if f.write_all_at(at, line.as_bytes()).is_err() {
                    return 1;
                }
            }
            s.count.store(i + 1, Ordering::Release);
            if s.done.release(1).is_err() {
                return 1;
            }
        }
        0
    });
    for _ in 0..n {
        thread::sleep_micros(10_000);
        if shared.go.set().is_err() || shared.done.acquire(FOREVER).is_err() {
            return 1;
        }
    }
    drop(hold);
    printer.join().unwrap_or(1)
}
