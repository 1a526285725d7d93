//! Hostile guest: maps a shared section past its end (at its end, across
//! it, at an offset that overflows), executable (read-execute, execute
//! only, writable and executable), and makes its mapping executable
//! afterwards. Every attempt must be refused with its exact error; the
//! mapping that is allowed must hold the section's bytes. Needs
//! `--allow shm:`.
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

const SIZE: u64 = 16 << 10;
const PAGE: u64 = 4096;

fn main() -> i32 {
    exit(run())
}

fn run() -> Result<(), i32> {
    let p = pal();
    let s = open_ok("shm:map", WR, create::CREATE_NEW)?;
    setup(p.dk_stream_set_length(s, SIZE), "size")?;
    let inval = Error::InvalidArgument;
    for (offset, size, what) in [
        (SIZE - PAGE, 2 * PAGE, "across the end"),
        (SIZE, PAGE, "at the end"),
        (0, 2 * SIZE, "twice the size"),
        (!(PAGE - 1), PAGE, "at an offset that overflows"),
        (1 << 40, PAGE, "far past the end"),
    ] {
        refused(
            p.dk_stream_map(s, 0, prot::READ, offset, size),
            inval,
            &alloc::format!("map {what}"),
        )?;
    }
    let denied = Error::PermissionDenied;
    refused(
        p.dk_stream_map(s, 0, prot::READ | prot::EXEC, 0, PAGE),
        denied,
        "map read-execute",
    )?;
    refused(
        p.dk_stream_map(s, 0, prot::EXEC, 0, PAGE),
        denied,
        "map execute-only",
    )?;
    refused(
        p.dk_stream_map(s, 0, RWX, 0, PAGE),
        inval,
        "map writable and executable",
    )?;
    let a = setup(p.dk_stream_map(s, 0, RW, 0, SIZE), "map the whole section")?;
    // SAFETY: the whole section is mapped read-write at `a`.
    unsafe {
        core::ptr::write_volatile(
            core::ptr::with_exposed_provenance_mut::<u8>(a as usize + 5),
            0xc3,
        )
    };
    refused(
        p.dk_virtual_memory_protect(a, PAGE, prot::READ | prot::EXEC),
        Error::BadAddress,
        "make the mapping executable",
    )?;
    refused(
        p.dk_virtual_memory_free(a, PAGE),
        Error::BadAddress,
        "free the mapping as memory",
    )?;
    // A second mapping shows the byte written through the first.
    let b = setup(p.dk_stream_map(s, 0, prot::READ, 0, PAGE), "map again")?;
    if sum(b, PAGE) != 0xc3 {
        return Err(escaped("the second mapping shows other bytes"));
    }
    setup(p.dk_stream_unmap(b, PAGE), "unmap")?;
    setup(p.dk_stream_unmap(a, SIZE), "unmap")?;
    println!("mapped within the section only, never executable");
    Ok(())
}
