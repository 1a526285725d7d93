//! Attacks shared by the hostile guest images. Each image tries one way
//! out. Conventions the tests rely on:
//! - `REFUSED <what>` lines for every attempt the PAL refused properly;
//! - `ESCAPED <what>` and exit code 42 if an attempt got through;
//! - raw system calls are expected to end the picoprocess with the
//!   violation exit code before they return.
#![allow(dead_code)]
use core::arch::asm;
use moat_libos::moat_pal::{access, create, decode, open_option, prot, Error};
use moat_libos::{pal, println, Pal};

pub const ESCAPED: i32 = 42;

/// A raw system call from guest code (outside the PAL).
pub unsafe fn raw_syscall(nr: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    let r: i64;
    // SAFETY: the caller accepts whatever the kernel (or the sandbox) does.
    unsafe {
        asm!("syscall", inlateout("rax") nr as i64 => r, in("rdi") a1, in("rsi") a2, in("rdx") a3,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    r
}

pub fn escaped(what: &str) -> i32 {
    println!("ESCAPED {what}");
    ESCAPED
}

/// A raw system call that must never return.
pub fn raw(nr: u64, a1: u64, a2: u64, a3: u64, what: &str) -> i32 {
    println!("trying {what}");
    moat_libos::io::try_flush_stdout();
    // SAFETY: deliberately hostile; the sandbox ends us.
    let r = unsafe { raw_syscall(nr, a1, a2, a3) };
    escaped(&alloc::format!("{what} returned {r}"))
}

pub fn open(uri: &str, acc: u32, cr: u32, opt: u32) -> Result<u64, Error> {
    let mut h = 0u64;
    decode(pal().dk_stream_open(uri.as_ptr(), uri.len() as u64, acc, cr, opt, &mut h)).map(|_| h)
}

/// Expect an open to fail; anything else is an escape.
pub fn expect_refused(uri: &str, acc: u32, cr: u32) -> Result<(), i32> {
    match open(uri, acc, cr, 0) {
        Err(e) => {
            println!("REFUSED {uri}: {}", e.name());
            Ok(())
        }
        Ok(h) => {
            let mut buf = [0u8; 64];
            let n = pal().dk_stream_read(h, 0, buf.as_mut_ptr(), 64);
            Err(escaped(&alloc::format!("opened {uri} (read {n} bytes)")))
        }
    }
}

pub fn arg(i: usize) -> alloc::string::String {
    moat_libos::env::args().get(i).cloned().unwrap_or_default()
}

pub const RW: u32 = prot::READ | prot::WRITE;
pub const RWX: u32 = prot::READ | prot::WRITE | prot::EXEC;
pub const RD: u32 = access::READ;
pub const WR: u32 = access::READ | access::WRITE;
pub const OPEN: u32 = create::OPEN_EXISTING;
pub const NEW: u32 = create::CREATE_ALWAYS;
pub const DIR: u32 = open_option::DIRECTORY;
