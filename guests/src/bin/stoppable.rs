//! Registers an abort event, says `ready`, waits for the host's stop
//! request, says `stopping` and exits 7 (for the embedding tests).
#![no_std]
#![no_main]
use moat_libos::sync::{wait_one, Event};
use moat_libos::{pal, println, Pal};

moat_libos::entry!(main);

fn main() -> i32 {
    let ev = Event::notification(false).expect("event");
    if pal().dk_abort_event_register(ev.handle()) < 0 {
        return 1;
    }
    println!("ready");
    moat_libos::io::try_flush_stdout();
    if wait_one(ev.handle(), 30_000_000).is_err() {
        return 2;
    }
    println!("stopping");
    7
}
