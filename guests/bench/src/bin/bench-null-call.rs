//! Null ABI call round trips, measured inside the picoprocess: calls with
//! little or no host work, so on kvm what is left is the hypercall (an
//! `out` exit to the VMM and back). Prints one line per call,
//! `NAME NANOSECONDS_PER_CALL`.
#![no_std]
#![no_main]
use moat_libos::{pal, println, Pal};

moat_libos::entry!(main);

#[path = "../per_call.rs"]
mod per_call;
use per_call::per_call;

fn main() -> i32 {
    let n: u64 = moat_libos::env::args()
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let p = pal();
    // DkThreadGetParameter: a thread-local read in the host, no system call.
    let t = per_call(n, || {
        core::hint::black_box(p.dk_thread_get_parameter());
    });
    println!("thread_get_parameter {t:.1}");
    // DkEventPeek: a handle-table look-up and a counter read.
    let mut ev = 0u64;
    assert_eq!(p.dk_notification_event_create(0, &mut ev), 0);
    let t = per_call(n, || {
        assert_eq!(p.dk_event_peek(ev), 0);
    });
    println!("event_peek {t:.1}");
    // DkSystemTimeQuery: the host's vDSO clock read.
    let t = per_call(n, || {
        core::hint::black_box(p.dk_system_time_query());
    });
    println!("time_query {t:.1}");
    0
}
