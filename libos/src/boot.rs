//! What the host handed over at start-up: the start-up block and the
//! function table it points at.
//!
//! [`crate::rt::start`] stores both once it has checked them; everything
//! that calls the host or reads the block loads them from here. This module
//! uses nothing else of the crate, so the start-up code ([`crate::rt`]), the
//! exception upcall ([`crate::exception`]) and the raw calls ([`crate::raw`])
//! all depend on it without depending on each other.
use core::sync::atomic::{AtomicPtr, Ordering};

use moat_pal::{PalTable, StartupBlock};

static TABLE: AtomicPtr<PalTable> = AtomicPtr::new(core::ptr::null_mut());
static STARTUP: AtomicPtr<StartupBlock> = AtomicPtr::new(core::ptr::null_mut());

/// The function table: the one the start-up block names, read at each
/// call (not kept), so that a host restoring this picoprocess from a
/// checkpoint (on either host) points it at its own table; before the
/// block is stored, the table start-up is checking (null before that).
#[inline]
pub fn table() -> *const PalTable {
    let sb = STARTUP.load(Ordering::Relaxed);
    if sb.is_null() {
        return TABLE.load(Ordering::Relaxed);
    }
    // SAFETY: stored by `rt::start` from the host's start-up block, valid
    // for the life of the picoprocess; the host changes its `table` only
    // while no thread of the picoprocess runs (a restore).
    unsafe { core::ptr::addr_of!((*sb).table).read() }
}

/// The function table, to call through.
///
/// Before start-up has stored a table there is no way to report anything,
/// so this faults (an illegal instruction); the host reports the fault.
#[inline]
pub fn pal_table() -> &'static PalTable {
    let t = table();
    if t.is_null() {
        stop();
    }
    // SAFETY: non-null, so stored by `rt::start` from the host's start-up
    // block; the host keeps the table valid and unchanged for the life of
    // the picoprocess.
    unsafe { &*t }
}

/// The start-up block (null before start-up).
#[inline]
pub fn startup_ptr() -> *mut StartupBlock {
    STARTUP.load(Ordering::Relaxed)
}

/// The start-up block.
pub fn startup() -> &'static StartupBlock {
    let p = startup_ptr();
    assert!(!p.is_null(), "moat-libos: start-up block not set");
    // SAFETY: set once by `rt::start` from the host's block, valid for the
    // process lifetime.
    unsafe { &*p }
}

/// Store the host's function table (done by `rt::start`).
pub(crate) fn set_table(table: *const PalTable) {
    TABLE.store(table as *mut PalTable, Ordering::SeqCst);
}

/// Store the host's start-up block (done by `rt::start`).
pub(crate) fn set_startup(startup: *const StartupBlock) {
    STARTUP.store(startup as *mut StartupBlock, Ordering::SeqCst);
}

/// Fault, for when there is no usable table to exit through.
pub(crate) fn stop() -> ! {
    loop {
        // SAFETY: `ud2` raises an illegal-instruction exception and nothing else.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    }
}
