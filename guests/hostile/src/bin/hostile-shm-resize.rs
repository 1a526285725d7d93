//! Hostile guest: sizes a shared section again (growing, shrinking, the
//! same size, zero) while a peer picoprocess (this image again, `peer`)
//! has it mapped and reads it; the peer tries the same from its side.
//! Every attempt must be PermissionDenied, the size must stay, and the
//! peer's view must stay whole: it reads every byte before and after and
//! checks the pattern. Arguments: this image's `file:` URI (granted
//! read-only); needs `--allow shm:`.
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
use moat_libos::moat_pal::{create, prot, Error, StreamAttributes};
use moat_libos::{pal, println, Pal};
use shm::*;

const SIZE: u64 = 64 << 10;
/// The u64 the parent sets when the peer may end.
const DONE: u64 = SIZE - 8;

fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

fn main() -> i32 {
    if arg(1) == "peer" {
        return exit(peer());
    }
    exit(run(&arg(1)))
}

fn resize_all(s: u64, side: &str) -> Result<(), i32> {
    for (len, what) in [
        (2 * SIZE, "grow"),
        (SIZE / 4, "shrink"),
        (SIZE, "the same size"),
        (0, "zero"),
    ] {
        refused(
            pal().dk_stream_set_length(s, len),
            Error::PermissionDenied,
            &alloc::format!("{side}: size again ({what}) while the peer has it mapped"),
        )?;
    }
    Ok(())
}

fn run(me: &str) -> Result<(), i32> {
    let p = pal();
    let s = open_ok("shm:resize", WR, create::CREATE_NEW)?;
    setup(p.dk_stream_set_length(s, SIZE), "size")?;
    let a = setup(p.dk_stream_map(s, 0, RW, 0, SIZE), "map")?;
    for i in 0..DONE {
        // SAFETY: inside the read-write mapping at `a`.
        unsafe {
            core::ptr::write_volatile(
                core::ptr::with_exposed_provenance_mut::<u8>((a + i) as usize),
                pattern(i),
            )
        };
    }
    let mut bell = 0u64;
    setup(p.dk_stream_get_event(s, &mut bell), "doorbell")?;
    let child = moat_libos::process::spawn(me, &["peer"]).map_err(|e| {
        println!("SETUP spawn the peer: {}", e.name());
        SETUP
    })?;
    // The peer rings once it has mapped the section and read it.
    setup(wait(bell, 20_000_000), "the peer's ring")?;
    resize_all(s, "creator")?;
    let mut at = StreamAttributes::default();
    setup(
        p.dk_stream_attributes_query_by_handle(s, &mut at),
        "attributes",
    )?;
    if at.size != SIZE {
        return Err(escaped(&alloc::format!("the size changed to {}", at.size)));
    }
    // SAFETY: the u64 at DONE is inside the mapping, 8-aligned.
    let done = unsafe {
        &*core::ptr::with_exposed_provenance::<core::sync::atomic::AtomicU64>((a + DONE) as usize)
    };
    done.store(1, core::sync::atomic::Ordering::Release);
    setup(p.dk_stream_flush(s), "ring the peer")?;
    match child.wait_timeout(20_000_000) {
        Ok(0) => {
            println!("the peer's view stayed whole");
            Ok(())
        }
        Ok(42) => Err(escaped("the peer")),
        Ok(c) => {
            println!("SETUP the peer exited {c}");
            Err(SETUP)
        }
        Err(e) => {
            println!("SETUP the peer: {}", e.name());
            Err(SETUP)
        }
    }
}

fn check(a: u64) -> Result<(), i32> {
    for i in 0..DONE {
        // SAFETY: inside the peer's mapping at `a`.
        let b = unsafe {
            core::ptr::read_volatile(core::ptr::with_exposed_provenance::<u8>((a + i) as usize))
        };
        if b != pattern(i) {
            return Err(escaped(&alloc::format!("byte {i} changed")));
        }
    }
    Ok(())
}

fn peer() -> Result<(), i32> {
    let p = pal();
    let s = open_ok("shm:resize", WR, create::OPEN_EXISTING)?;
    let a = setup(p.dk_stream_map(s, 0, prot::READ, 0, SIZE), "peer: map")?;
    let mut bell = 0u64;
    setup(p.dk_stream_get_event(s, &mut bell), "peer: doorbell")?;
    check(a)?;
    resize_all(s, "peer")?;
    setup(p.dk_stream_flush(s), "peer: ring")?;
    // Read all of it again and again while the creator tries.
    loop {
        check(a)?;
        if wait(bell, 0) == 0 {
            break;
        }
    }
    check(a)?;
    Ok(())
}
