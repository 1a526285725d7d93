//! Hostile guest: shared sections past the policy. `denied` (granted
//! `shm:granted` only): every way to open or query another section is
//! PermissionDenied, and the grant is exact. `names`: names outside the
//! rules (1 to 64 of `[A-Za-z0-9._-]`) are InvalidUri. `readonly`
//! (granted `shm:ro` read-only, a section the host made): it opens and
//! maps read-only only, and cannot size it; it reads the host's bytes and
//! rings the host.
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

fn main() -> i32 {
    exit(match arg(1).as_str() {
        "denied" => denied(),
        "names" => names(),
        "readonly" => readonly(),
        other => {
            println!("SETUP unknown mode `{other}`");
            Err(SETUP)
        }
    })
}

fn attrs(uri: &str) -> (i64, StreamAttributes) {
    let mut a = StreamAttributes::default();
    let r = pal().dk_stream_attributes_query(uri.as_ptr(), uri.len() as u64, &mut a);
    (r, a)
}

fn denied() -> Result<(), i32> {
    let pd = Error::PermissionDenied;
    for cr in [
        create::OPEN_EXISTING,
        create::OPEN_ALWAYS,
        create::CREATE_NEW,
    ] {
        open_refused("shm:secret", RD, cr, pd)?;
        open_refused("shm:secret", WR, cr, pd)?;
        open_refused("shm:granted2", WR, cr, pd)?;
    }
    refused(attrs("shm:secret").0, pd, "attributes of shm:secret")?;
    // The exact grant works.
    let g = open_ok("shm:granted", WR, create::CREATE_NEW)?;
    setup(pal().dk_stream_set_length(g, 4096), "size shm:granted")?;
    Ok(())
}

fn names() -> Result<(), i32> {
    let long = alloc::format!("shm:{}", "n".repeat(65));
    for uri in [
        "shm:",
        "shm:a/b",
        "shm:../x",
        "shm:a b",
        "shm:\u{e9}",
        "shm:a\0b",
        "shm:a:b",
        "SHM:x",
        long.as_str(),
    ] {
        open_refused(uri, WR, create::OPEN_ALWAYS, Error::InvalidUri)?;
        refused(
            attrs(uri).0,
            Error::InvalidUri,
            &alloc::format!("attributes of {uri:?}"),
        )?;
    }
    // The longest name is fine.
    let max = alloc::format!("shm:{}", "n".repeat(64));
    open_ok(&max, WR, create::CREATE_NEW)?;
    Ok(())
}

fn readonly() -> Result<(), i32> {
    let p = pal();
    let pd = Error::PermissionDenied;
    open_refused("shm:ro", WR, create::OPEN_EXISTING, pd)?;
    open_refused("shm:ro", RD, create::OPEN_ALWAYS, pd)?;
    open_refused("shm:ro2", RD, create::CREATE_NEW, pd)?;
    let s = open_ok("shm:ro", RD, create::OPEN_EXISTING)?;
    let (r, a) = attrs("shm:ro");
    setup(r, "attributes of shm:ro")?;
    if a.writable != 0 || a.size == 0 {
        return Err(escaped(&alloc::format!(
            "shm:ro reports writable {} size {}",
            a.writable,
            a.size
        )));
    }
    refused(
        p.dk_stream_map(s, 0, prot::READ | prot::WRITE, 0, 4096),
        pd,
        "map shm:ro writable",
    )?;
    refused(p.dk_stream_set_length(s, 8192), pd, "size shm:ro")?;
    let m = setup(p.dk_stream_map(s, 0, prot::READ, 0, a.size), "map shm:ro")?;
    let mut host = [0u8; 4];
    for (i, b) in host.iter_mut().enumerate() {
        // SAFETY: inside the read-only mapping at `m`.
        *b = unsafe {
            core::ptr::read_volatile(core::ptr::with_exposed_provenance::<u8>(m as usize + i))
        };
    }
    if &host != b"HOST" {
        println!("SETUP shm:ro holds {host:?}");
        return Err(SETUP);
    }
    refused(
        p.dk_virtual_memory_protect(m, 4096, prot::READ | prot::WRITE),
        Error::BadAddress,
        "make the read-only mapping writable",
    )?;
    setup(p.dk_stream_flush(s), "ring the host")?;
    Ok(())
}
