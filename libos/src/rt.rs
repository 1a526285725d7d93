//! Start-up: LibOsInitialize.
//!
//! [`start`] checks the start-up block and the function table the host
//! passed, stores them in [`crate::boot`], registers the exception upcall and
//! runs `main`.
use moat_pal::{nr, StartupBlock, ABI_VERSION, NUM_CALLS, STARTUP_MAGIC};

use crate::boot::{self, stop};

pub use crate::boot::{startup, startup_ptr, table};

/// Exit code when the host's start-up block or ABI version does not fit.
pub const EXIT_ABI_MISMATCH: i32 = 126;

/// Whether a host ABI version `host` can run an image built for `ours`:
/// same major, and the host's minor at least ours.
pub const fn version_compatible(host: u32, ours: u32) -> bool {
    host >> 16 == ours >> 16 && (host & 0xffff) >= (ours & 0xffff)
}

// A 1.1 host runs a 1.0 image; a 1.0 host refuses a 1.1 image.
const _: () = assert!(version_compatible(0x0001_0001, 0x0001_0000));
const _: () = assert!(!version_compatible(0x0001_0000, 0x0001_0001));
const _: () = assert!(!version_compatible(0x0002_0000, 0x0001_0000));

/// Number of calls this libos uses (the table must have at least these):
/// every call of its ABI version, as [`crate::raw::calls`] wraps them all.
const NEEDED_CALLS: u64 = NUM_CALLS as u64;

/// The calls that say why the image refuses a host (DkDebugStringPrint,
/// DkProcessExit): every table of the same major version has them at the
/// same numbers (a minor version only adds calls), so an image can tell
/// an older host of its major version why it does not start.
const REPORT_CALLS: u64 = if nr::DK_DEBUG_STRING_PRINT > nr::DK_PROCESS_EXIT {
    nr::DK_DEBUG_STRING_PRINT as u64
} else {
    nr::DK_PROCESS_EXIT as u64
};

/// The body of `_start` (see [`crate::entry!`]).
///
/// # Safety
/// `startup` is the start-up block the host passed, or garbage the checks
/// below reject as far as they can.
pub unsafe fn start(startup: *const StartupBlock, main: fn() -> i32) -> ! {
    if startup.is_null() {
        // No usable table: nothing to exit through. Fault; the host reports it.
        stop();
    }
    // SAFETY: non-null block handed to us by the host.
    let sb = unsafe { &*startup };
    let table = sb.table;
    let (table_usable, can_report) = if table.is_null() {
        (false, false)
    } else {
        // SAFETY: non-null table pointer from the host.
        let t = unsafe { &*table };
        (
            version_compatible(t.abi_version, ABI_VERSION)
                && u64::from(t.num_calls) >= NEEDED_CALLS,
            t.abi_version >> 16 == ABI_VERSION >> 16 && u64::from(t.num_calls) >= REPORT_CALLS,
        )
    };
    let why = if sb.magic != STARTUP_MAGIC {
        Some("moat-libos: bad start-up block magic; is this a moat host?")
    } else if !version_compatible(sb.abi_version, ABI_VERSION) {
        Some("moat-libos: the host's ABI version does not fit this image's")
    } else if !table_usable {
        Some("moat-libos: the host's function table is missing, too old or too short")
    } else {
        None
    };
    if let Some(why) = why {
        if !can_report {
            stop();
        }
        boot::set_table(table);
        crate::debug::print_fmt(format_args!(
            "{why} (image ABI {}.{}, host {}.{})\n",
            ABI_VERSION >> 16,
            ABI_VERSION & 0xffff,
            sb.abi_version >> 16,
            sb.abi_version & 0xffff
        ));
        crate::process::exit_now(EXIT_ABI_MISMATCH);
    }
    boot::set_table(table);
    boot::set_startup(startup);
    crate::exception::register_upcall();
    let code = main();
    crate::process::exit(code)
}
