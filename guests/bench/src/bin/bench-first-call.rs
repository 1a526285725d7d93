//! Spawn benchmark: the picoprocess's first ABI call is a debug print the
//! host times; the second ends it.
#![no_std]
#![no_main]
use moat_libos::moat_pal::{ExceptionInfo, PalTable, StartupBlock};

#[used]
#[link_section = ".moat_abi"]
static MARKER: [u8; 16] = moat_libos::abi_marker();

/// No libos start-up at all: the first thing the image does is an ABI call.
///
/// # Safety
/// Called by the host with a valid start-up block.
#[no_mangle]
pub unsafe extern "C" fn _start(startup: *const StartupBlock) -> ! {
    // SAFETY: reading our own static keeps the marker section.
    let _ = unsafe { core::ptr::read_volatile(&MARKER) };
    // SAFETY: the host passes a valid block and table.
    let t: &PalTable = unsafe { &*(*startup).table };
    let msg = b"first";
    // SAFETY: calling the host's table as the ABI says.
    unsafe {
        (t.dk_debug_string_print)(t.ctx, msg.as_ptr(), msg.len() as u64);
        (t.dk_process_exit)(t.ctx, 0)
    }
}

#[allow(dead_code)]
fn unused(_: ExceptionInfo) {}
