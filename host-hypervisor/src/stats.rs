//! The VMM's side of its statistics page (`moat_host_common::vmstats`):
//! the page the monitor handed over with the configuration, mapped once at
//! start-up, and the counters every thread adds to (relaxed atomic adds:
//! a few nanoseconds against the microseconds of the exit being counted).
//!
//! Without a page (a VMM started by hand, or by an older monitor) counting
//! does nothing.
use moat_host_common::sys;
use moat_host_common::vmstats::{Counter, COUNTERS, SIZE};
use moat_pal::prot;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const _: () = assert!(COUNTERS as u64 * 8 <= SIZE);

static PAGE: OnceLock<&'static [AtomicU64; COUNTERS]> = OnceLock::new();

/// Maps the page behind `fd` for the rest of the process's life and
/// counts there from now on. Call once, before the VMM confines itself.
pub fn install(fd: OwnedFd) -> Result<(), String> {
    let addr =
        sys::mmap_fd(0, SIZE, prot::READ | prot::WRITE, fd.as_raw_fd(), 0, true).map_err(|e| {
            format!(
                "cannot map the statistics page: {}",
                std::io::Error::from_raw_os_error(e)
            )
        })?;
    // SAFETY: `addr` is a fresh page-aligned shared mapping of SIZE bytes
    // (more than COUNTERS words) that is never unmapped, so it lives for
    // 'static; AtomicU64 has u64's layout, and every access to the page
    // from this process goes through these atomics (the monitor's side
    // reads it with atomics too).
    let page = unsafe { &*(addr as *const [AtomicU64; COUNTERS]) };
    PAGE.set(page)
        .map_err(|_| "the statistics page is installed twice".to_string())
}

/// Adds `n` to counter `c`.
pub fn add(c: Counter, n: u64) {
    if let Some(p) = PAGE.get() {
        p[c as usize].fetch_add(n, Ordering::Relaxed);
    }
}

/// Adds one to counter `c`.
pub fn count(c: Counter) {
    add(c, 1);
}
