//! What the `hostile-shm-*` images share: expecting an exact error from a
//! call on a shared section (`REFUSED what: Error` when it comes,
//! `ESCAPED` and exit 42 when anything else does), and small wrappers.
//! A step that should work and does not ends the image with exit 3
//! (`SETUP what: Error`), so a test tells a refusal from a broken set-up.
#![allow(dead_code)]
use crate::common::escaped;
use moat_libos::moat_pal::{decode, Error};
use moat_libos::{pal, println, Pal};

/// Exit code of a set-up step that failed.
pub const SETUP: i32 = 3;

/// The raw result `r` must be the error `want`.
pub fn refused(r: i64, want: Error, what: &str) -> Result<(), i32> {
    if r == want.code() {
        println!("REFUSED {what}: {}", want.name());
        return Ok(());
    }
    let got = match decode(r) {
        Ok(v) => alloc::format!("Ok({v})"),
        Err(e) => alloc::format!("Err({})", e.name()),
    };
    Err(escaped(&alloc::format!(
        "{what}: {got} (expected {})",
        want.name()
    )))
}

/// The raw result `r` must be a success: its value.
pub fn setup(r: i64, what: &str) -> Result<u64, i32> {
    decode(r).map_err(|e| {
        println!("SETUP {what}: {}", e.name());
        SETUP
    })
}

/// DkStreamOpen as a raw result (the handle in `h`).
pub fn open_raw(uri: &str, acc: u32, cr: u32, h: &mut u64) -> i64 {
    pal().dk_stream_open(uri.as_ptr(), uri.len() as u64, acc, cr, 0, h)
}

/// DkStreamOpen that must work.
pub fn open_ok(uri: &str, acc: u32, cr: u32) -> Result<u64, i32> {
    let mut h = 0u64;
    setup(
        open_raw(uri, acc, cr, &mut h),
        &alloc::format!("open {uri}"),
    )?;
    Ok(h)
}

/// DkStreamOpen that must fail with `want` (a handle it gave is closed).
pub fn open_refused(uri: &str, acc: u32, cr: u32, want: Error) -> Result<(), i32> {
    let mut h = 0u64;
    let r = open_raw(uri, acc, cr, &mut h);
    if r >= 0 {
        let _ = pal().dk_object_close(h);
    }
    refused(r, want, &alloc::format!("open {uri}"))
}

/// Wait on one handle (`timeout` in microseconds): the raw result.
pub fn wait(h: u64, timeout: i64) -> i64 {
    let hs = [h];
    pal().dk_objects_wait_any(1, hs.as_ptr(), timeout)
}

/// Read every byte of [addr, addr+len) (volatile): a sum, so nothing is
/// optimised away. A fault here is what the tests look for.
pub fn sum(addr: u64, len: u64) -> u64 {
    let mut s = 0u64;
    for i in 0..len {
        // SAFETY: the caller mapped [addr, addr+len) readable; another
        // process may change the bytes, which a volatile read tolerates.
        let b = unsafe {
            core::ptr::read_volatile(core::ptr::with_exposed_provenance::<u8>(
                (addr + i) as usize,
            ))
        };
        s = s.wrapping_add(b as u64);
    }
    s
}

/// The result of `main`.
pub fn exit(r: Result<(), i32>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(code) => code,
    }
}

/// Error as a result code, for `refused`.
pub fn code(e: Result<u64, Error>) -> i64 {
    match e {
        Ok(v) => v as i64,
        Err(e) => e.code(),
    }
}
