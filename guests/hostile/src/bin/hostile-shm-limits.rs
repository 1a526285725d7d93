//! Hostile guest: shared sections past their limits. `count`: a session
//! holds at most 64 sections (the 65th is LimitExceeded, the others still
//! open). `open`: a picoprocess holds at most 16 section streams at once.
//! `size` (run with `memory_mib = 64`): a section larger than the memory
//! limit is NoMemory, one of exactly the limit can be made but not mapped
//! whole beside the picoprocess's own memory. Needs `--allow shm:`.
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
use moat_libos::moat_pal::{create, prot, Error};
use moat_libos::{pal, println, Pal};
use shm::*;

fn main() -> i32 {
    exit(match arg(1).as_str() {
        "count" => count(),
        "open" => open_many(),
        "size" => size(),
        other => {
            println!("SETUP unknown mode `{other}`");
            Err(SETUP)
        }
    })
}

fn count() -> Result<(), i32> {
    for i in 0..64 {
        let h = open_ok(&alloc::format!("shm:c{i}"), WR, create::CREATE_NEW)?;
        setup(pal().dk_object_close(h), "close")?;
    }
    let le = Error::LimitExceeded;
    open_refused("shm:c64", WR, create::CREATE_NEW, le)?;
    open_refused("shm:c65", WR, create::OPEN_ALWAYS, le)?;
    // The sections made stay.
    let h = open_ok("shm:c0", WR, create::OPEN_EXISTING)?;
    setup(pal().dk_object_close(h), "close")?;
    Ok(())
}

fn open_many() -> Result<(), i32> {
    let mut held = alloc::vec::Vec::new();
    held.push(open_ok("shm:o", WR, create::CREATE_NEW)?);
    for _ in 1..16 {
        held.push(open_ok("shm:o", WR, create::OPEN_EXISTING)?);
    }
    open_refused("shm:o", WR, create::OPEN_EXISTING, Error::LimitExceeded)?;
    open_refused("shm:o2", WR, create::CREATE_NEW, Error::LimitExceeded)?;
    setup(pal().dk_object_close(held.pop().unwrap_or(0)), "close")?;
    held.push(open_ok("shm:o", WR, create::OPEN_EXISTING)?);
    Ok(())
}

fn size() -> Result<(), i32> {
    let p = pal();
    let s = open_ok("shm:big", WR, create::CREATE_NEW)?;
    let nm = Error::NoMemory;
    for (len, what) in [
        ((64 << 20) + 4096, "one page over the memory limit"),
        (1 << 40, "1 TiB"),
        (!4095, "2^64 - 4096"),
    ] {
        refused(
            p.dk_stream_set_length(s, len),
            nm,
            &alloc::format!("size {what}"),
        )?;
    }
    setup(
        p.dk_stream_set_length(s, 64 << 20),
        "size at the memory limit",
    )?;
    refused(
        p.dk_stream_map(s, 0, prot::READ, 0, 64 << 20),
        nm,
        "map it whole beside the image",
    )?;
    let a = setup(p.dk_stream_map(s, 0, RW, 0, 1 << 20), "map 1 MiB of it")?;
    let _ = sum(a, 1 << 20);
    Ok(())
}
