//! Fast-path call costs measured inside the picoprocess: prints one line
//! per operation, `NAME NANOSECONDS_PER_CALL`.
#![no_std]
#![no_main]
use moat_libos::moat_pal::{access, create};
use moat_libos::stream::Stream;
use moat_libos::{pal, println, Pal};

moat_libos::entry!(main);

#[path = "../per_call.rs"]
mod per_call;
use per_call::per_call;

fn main() -> i32 {
    let n: u64 = moat_libos::env::args()
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let p = pal();
    let t = per_call(n, || {
        core::hint::black_box(p.dk_system_time_query());
    });
    println!("time_query {t:.1}");
    let null = Stream::open("null:", access::WRITE, create::OPEN_EXISTING, 0).expect("null:");
    let buf = [0x5au8; 4096];
    let h = null.handle();
    let w = per_call(n / 4, || {
        let r = p.dk_stream_write(h, 0, buf.as_ptr(), 4096);
        assert_eq!(r, 4096);
    });
    println!("null_write_4k {w:.1}");
    // The PAL's own share: the same call with nothing for the kernel to do.
    let z = per_call(n, || {
        let r = p.dk_stream_write(h, 0, buf.as_ptr(), 0);
        assert_eq!(r, 0);
    });
    println!("pal_only_write_0 {z:.1}");
    0
}
