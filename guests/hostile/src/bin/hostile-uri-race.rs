//! Hostile guest: uri race.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
moat_libos::entry!(main);

use common::*;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use moat_libos::{pal, println, Pal};

static STOP: AtomicBool = AtomicBool::new(false);

fn main() -> i32 {
    // Two URIs of the same length: one granted, one not. A second thread
    // flips the buffer between them while the first opens it.
    let good = arg(1);
    let bad = arg(2);
    if good.len() != bad.len() || good.is_empty() {
        println!("usage: hostile-uri-race GOOD BAD (same length)");
        return 2;
    }
    let buf: &'static [AtomicU8] = alloc::vec::Vec::leak(good.bytes().map(AtomicU8::new).collect());
    let good_b: &'static [u8] = alloc::vec::Vec::leak(good.clone().into_bytes());
    let bad_b: &'static [u8] = alloc::vec::Vec::leak(bad.clone().into_bytes());
    let flipper = moat_libos::thread::spawn(move || {
        let mut i = 0u64;
        while !STOP.load(Ordering::Relaxed) {
            let src = if i.is_multiple_of(2) { bad_b } else { good_b };
            for (d, s) in buf.iter().zip(src) {
                d.store(*s, Ordering::Relaxed);
            }
            i += 1;
        }
    });
    let mut opened = 0;
    for _ in 0..3000 {
        let mut h = 0u64;
        let r = pal().dk_stream_open(
            buf.as_ptr() as *const u8,
            buf.len() as u64,
            RD,
            OPEN,
            0,
            &mut h,
        );
        if r >= 0 {
            opened += 1;
            let mut data = [0u8; 64];
            let n = pal().dk_stream_read(h, 0, data.as_mut_ptr(), 64);
            pal().dk_object_close(h);
            if n > 0 && data[..n as usize].starts_with(b"TOPSECRET") {
                STOP.store(true, Ordering::Relaxed);
                return escaped("read the secret through a racing URI");
            }
        }
    }
    STOP.store(true, Ordering::Relaxed);
    let _ = flipper.join();
    println!("REFUSED racing URI ({opened} opens of the granted file, none of the other)");
    0
}
