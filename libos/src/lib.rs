//! moat-libos: what runs inside a moat picoprocess, on top of the PAL ABI.
//!
//! A guest image is a `#![no_std] #![no_main]` binary that says
//! `moat_libos::entry!(main);` with `fn main() -> i32`. The libos then gives
//! it a global allocator over `DkVirtualMemoryAlloc`, a panic handler that
//! reports `panicked at FILE:LINE: MESSAGE` on stderr and exits 101,
//! streams with [`io::Read`]/[`io::Write`], `print!`/`println!`, threads,
//! locks and events, time, randomness, child processes, arguments,
//! exception handlers, and shared sections ([`section`]: memory shared
//! with the session's other picoprocesses or the host, with doorbells).
//!
//! The libos calls the host through [`raw`]: [`raw::calls`], generated from
//! `abi-spec/abi.toml`, calls the host's function table with one function
//! per ABI call, and `raw` wraps each as a `Result` (by
//! [`moat_pal::decode`]). [`pal()`] gives the same table as a
//! [`moat_pal::Pal`], for guests that want the trait.
#![no_std]

extern crate alloc;

pub mod alloc_impl;
pub mod boot;
pub mod debug;
pub mod device;
pub mod env;
pub mod exception;
pub mod fs;
pub mod io;
mod mem;
pub mod panic;
pub mod process;
pub mod random;
pub mod raw;
pub mod rt;
pub mod section;
pub mod service;
pub mod stream;
pub mod sync;
pub mod thread;
pub mod time;

pub use moat_pal;
pub use moat_pal::{
    Error, ExceptionInfo, ImageInfo, Pal, PalTable, StartupBlock, StreamAttributes, TablePal,
};

/// Result of a libos operation.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// The host's function table as a [`Pal`].
///
/// Before [`rt::start`] has stored the table (only code that runs before
/// `_start`, which there is none of) this points at nothing; calling through
/// it then faults.
#[inline]
pub fn pal() -> TablePal {
    let sb = boot::startup_ptr();
    if sb.is_null() {
        // SAFETY: the table pointer was stored by `rt::start` from the
        // start-up block, which the host keeps valid for the life of the
        // picoprocess.
        return unsafe { TablePal::new(boot::table()) };
    }
    // Through the start-up block's table field, read at each call: a
    // `TablePal` kept across a checkpoint and restore reaches the
    // restoring host's table (see `boot::table`).
    // SAFETY: the block is valid for the life of the picoprocess and its
    // `table` field always holds the current host's table.
    unsafe { TablePal::through(core::ptr::addr_of!((*sb).table)) }
}

/// The 16 bytes the `.moat_abi` section of every image holds:
/// `b"MOATABI\0"`, the ABI version (little-endian u32), then a zero u32.
pub const fn abi_marker() -> [u8; 16] {
    let magic = *b"MOATABI\0";
    let v = moat_pal::ABI_VERSION.to_le_bytes();
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        out[i] = magic[i];
        i += 1;
    }
    let mut j = 0;
    while j < 4 {
        out[8 + j] = v[j];
        j += 1;
    }
    out
}

/// Define the image's entry point `_start` around `fn main() -> i32`.
///
/// `_start` checks the start-up block's magic and ABI version, stores the
/// function table, registers the exception upcall, runs `main`, flushes
/// stdout and ends the picoprocess with `main`'s result. It also places the
/// ABI marker in the `.moat_abi` section, by which host tools find images.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[used]
        #[link_section = ".moat_abi"]
        static __MOAT_ABI_MARKER: [u8; 16] = $crate::abi_marker();

        /// The image's ELF entry point (LibOsInitialize).
        ///
        /// # Safety
        /// Called once by the host with a valid start-up block.
        #[no_mangle]
        pub unsafe extern "C" fn _start(startup: *const $crate::StartupBlock) -> ! {
            // SAFETY: reading our own static; the volatile read keeps the
            // linker from discarding the `.moat_abi` section.
            let _ = unsafe { ::core::ptr::read_volatile(&__MOAT_ABI_MARKER) };
            let main: fn() -> i32 = $main;
            // SAFETY: the host passes the start-up block it keeps valid.
            unsafe { $crate::rt::start(startup, main) }
        }
    };
}

/// Print to stdout (buffered; flushed at each newline and at exit).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::io::_print(::core::format_args!($($arg)*)) };
}

/// Print a line to stdout.
#[macro_export]
macro_rules! println {
    () => { $crate::io::_print(::core::format_args!("\n")) };
    ($($arg:tt)*) => { $crate::io::_print_nl(::core::format_args!($($arg)*)) };
}

/// Print to stderr (unbuffered).
#[macro_export]
macro_rules! eprint {
    ($($arg:tt)*) => { $crate::io::_eprint(::core::format_args!($($arg)*)) };
}

/// Print a line to stderr.
#[macro_export]
macro_rules! eprintln {
    () => { $crate::io::_eprint(::core::format_args!("\n")) };
    ($($arg:tt)*) => { $crate::io::_eprint_nl(::core::format_args!($($arg)*)) };
}
