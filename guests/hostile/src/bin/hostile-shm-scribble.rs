//! Hostile guest: a peer that scribbles over a shared section while the
//! other side reads it. The scribbler (this image, `scribbler`) writes
//! random words over every byte, unmaps and remaps its own view, closes
//! its stream, tries to size the section again, and ends; the reader
//! reads every byte all the while and after it ended: it must never
//! fault. Arguments: this image's `file:` URI (granted read-only), or
//! `host` to scribble over the host's section `shm:host` (the host reads
//! it). Needs `--allow shm:`.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
#[path = "../shm.rs"]
mod shm;
moat_libos::entry!(main);

use common::*;
use moat_libos::moat_pal::{create, Error};
use moat_libos::{pal, println, Pal};
use shm::*;

const SIZE: u64 = 64 << 10;

fn main() -> i32 {
    match arg(1).as_str() {
        "scribbler" => exit(scribble("shm:scribble", SIZE)),
        "host" => exit(scribble("shm:host", 0)),
        me => exit(read(me)),
    }
}

fn read(me: &str) -> Result<(), i32> {
    let p = pal();
    let s = open_ok("shm:scribble", WR, create::CREATE_NEW)?;
    setup(p.dk_stream_set_length(s, SIZE), "size")?;
    let a = setup(p.dk_stream_map(s, 0, RW, 0, SIZE), "map")?;
    let child = moat_libos::process::spawn(me, &["scribbler"]).map_err(|e| {
        println!("SETUP spawn the scribbler: {}", e.name());
        SETUP
    })?;
    let mut passes = 0u64;
    let code = loop {
        let _ = sum(a, SIZE);
        passes += 1;
        if let Ok(Some(c)) = child.try_exit_code() {
            break c;
        }
    };
    // Its view is gone with it; ours stays.
    let _ = sum(a, SIZE);
    match code {
        0 => {
            println!("REFUSED scribbling peer: the reader read {passes} times and did not fault");
            Ok(())
        }
        42 => Err(escaped("the scribbler")),
        c => {
            println!("SETUP the scribbler exited {c}");
            Err(SETUP)
        }
    }
}

/// Scribble over `uri` (sized `size`, or 0: ask its attributes).
fn scribble(uri: &str, size: u64) -> Result<(), i32> {
    let p = pal();
    let s = open_ok(uri, WR, create::OPEN_EXISTING)?;
    let size = if size != 0 {
        size
    } else {
        let mut at = moat_libos::moat_pal::StreamAttributes::default();
        setup(
            p.dk_stream_attributes_query_by_handle(s, &mut at),
            "attributes",
        )?;
        at.size
    };
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ moat_libos::time::now_micros();
    let t0 = moat_libos::time::now_micros();
    let mut round = 0u64;
    while moat_libos::time::now_micros() < t0 + 500_000 {
        let a = setup(p.dk_stream_map(s, 0, RW, 0, size), "scribbler: map")?;
        for i in (0..size).step_by(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // SAFETY: inside our read-write mapping at `a`, 8-aligned.
            unsafe {
                core::ptr::write_volatile(
                    core::ptr::with_exposed_provenance_mut::<u64>((a + i) as usize),
                    x,
                )
            };
        }
        // Ring whoever listens, now and then.
        if round.is_multiple_of(4) {
            let _ = p.dk_stream_flush(s);
        }
        setup(p.dk_stream_unmap(a, size), "scribbler: unmap")?;
        round += 1;
    }
    // Leave one view mapped, and try what would take the reader's away.
    let _ = setup(p.dk_stream_map(s, 0, RW, 0, size), "scribbler: map")?;
    for len in [size / 2, size * 2] {
        refused(
            p.dk_stream_set_length(s, len),
            Error::PermissionDenied,
            "scribbler: size the section again",
        )?;
    }
    setup(p.dk_object_close(s), "scribbler: close")?;
    println!("scribbled {round} times");
    Ok(())
}
