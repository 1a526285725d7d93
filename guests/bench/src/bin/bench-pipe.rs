//! Pipe round trips between two picoprocesses: the parent serves
//! `pipe.server:bench`, a child it starts connects as the client; they
//! bounce one byte N times. The parent prints `pipe_round_trip NS`.
#![no_std]
#![no_main]
use moat_libos::moat_pal::{access, create};
use moat_libos::stream::Stream;
use moat_libos::{pal, println, Pal};

moat_libos::entry!(main);

fn main() -> i32 {
    let args = moat_libos::env::args();
    let role = args.get(1).map(|s| s.as_str()).unwrap_or("");
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let rw = access::READ | access::WRITE;
    let mut b = [0u8; 1];
    if role == "client" {
        let mut s =
            Stream::open("pipe.client:bench", rw, create::OPEN_EXISTING, 0).expect("client");
        for _ in 0..n {
            if s.read(&mut b) != Ok(1) || s.write(&b) != Ok(1) {
                return 1;
            }
        }
        return 0;
    }
    let me = args.get(3).cloned().unwrap_or_default();
    let nn = alloc_fmt(n);
    let child = moat_libos::process::spawn(&me, &["client", &nn]).expect("spawn client");
    let mut s = Stream::open("pipe.server:bench", rw, create::OPEN_EXISTING, 0).expect("server");
    // Warm-up round trip.
    let t0 = pal().dk_system_time_query();
    for _ in 0..n {
        if s.write(&b) != Ok(1) || s.read(&mut b) != Ok(1) {
            return 1;
        }
    }
    let t1 = pal().dk_system_time_query();
    if child.wait() != Ok(0) {
        return 2;
    }
    println!(
        "pipe_round_trip {:.1}",
        (t1 - t0) as f64 * 1000.0 / n as f64
    );
    0
}

fn alloc_fmt(n: u64) -> alloc::string::String {
    alloc::format!("{n}")
}

extern crate alloc;
