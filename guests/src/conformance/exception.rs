//! Exception upcalls: DkThreadRaiseException and a resumed memory fault.
//! These run last.
use core::sync::atomic::{AtomicU64, Ordering};

use moat_libos::moat_pal::{exception_disposition, exception_kind};
use moat_libos::{exception, ExceptionInfo, Pal};

use super::{ensure, ok, p, Case, Ctx, R};

pub const CASES: &[Case] = &[
    ("exception_raise", exception_raise),
    ("exception_null_read_resume", exception_null_read_resume),
];

static SEEN_KIND: AtomicU64 = AtomicU64::new(0);
static SEEN_CODE: AtomicU64 = AtomicU64::new(0);
static SEEN_ARG: AtomicU64 = AtomicU64::new(0);
static SEEN_ADDR: AtomicU64 = AtomicU64::new(0);
static RECOVER: AtomicU64 = AtomicU64::new(0);

fn record(info: &mut ExceptionInfo) {
    SEEN_KIND.store(u64::from(info.kind), Ordering::SeqCst);
    SEEN_CODE.store(u64::from(info.code), Ordering::SeqCst);
    SEEN_ARG.store(info.arg, Ordering::SeqCst);
    SEEN_ADDR.store(info.fault_addr, Ordering::SeqCst);
}

fn raise_handler(info: &mut ExceptionInfo) -> u32 {
    record(info);
    exception_disposition::RESUME
}

fn exception_raise(_: &Ctx) -> R {
    SEEN_KIND.store(0, Ordering::SeqCst);
    let old = exception::set_handler(raise_handler);
    let r = p().dk_thread_raise_exception(0x42, 0xdead_beef);
    match old {
        Some(h) => {
            exception::set_handler(h);
        }
        None => {
            exception::clear_handler();
        }
    }
    let d = ok(r, "DkThreadRaiseException")?;
    ensure!(
        d == u64::from(exception_disposition::RESUME),
        "returned {} (expected the handler's RESUME)",
        d
    );
    let kind = SEEN_KIND.load(Ordering::SeqCst);
    ensure!(
        kind == u64::from(exception_kind::RAISED),
        "handler saw kind {} (expected RAISED)",
        kind
    );
    let code = SEEN_CODE.load(Ordering::SeqCst);
    ensure!(code == 0x42, "handler saw code {:#x}", code);
    let arg = SEEN_ARG.load(Ordering::SeqCst);
    ensure!(arg == 0xdead_beef, "handler saw arg {:#x}", arg);
    Ok(())
}

fn fault_handler(info: &mut ExceptionInfo) -> u32 {
    record(info);
    let to = RECOVER.load(Ordering::SeqCst);
    if info.kind == exception_kind::MEMORY_FAULT && to != 0 {
        info.rip = to;
        RECOVER.store(0, Ordering::SeqCst);
        exception_disposition::RESUME
    } else {
        exception_disposition::TERMINATE
    }
}

/// Read address 0x40; a handler that moves rip to the recovery label makes
/// the read look like it was skipped. Returns whether the fault happened
/// (the register set to 1 before the read is left 1 only if the
/// instruction after the read was skipped).
fn faulting_read() -> u64 {
    let skipped: u64;
    // SAFETY: the read of 0x40 faults; the handler resumes at label 2,
    // which continues with the same registers.
    unsafe {
        core::arch::asm!(
            "lea {tmp}, [rip + 2f]",
            "mov qword ptr [{slot}], {tmp}",
            "mov {flag}, 1",
            "mov {tmp}, qword ptr [0x40]",
            "mov {flag}, 0",
            "2:",
            slot = in(reg) RECOVER.as_ptr(),
            tmp = out(reg) _,
            flag = out(reg) skipped,
            options(nostack),
        );
    }
    skipped
}

fn exception_null_read_resume(_: &Ctx) -> R {
    SEEN_KIND.store(0, Ordering::SeqCst);
    let old = exception::set_handler(fault_handler);
    let skipped = faulting_read();
    match old {
        Some(h) => {
            exception::set_handler(h);
        }
        None => {
            exception::clear_handler();
        }
    }
    ensure!(skipped == 1, "the faulting read was not skipped");
    let kind = SEEN_KIND.load(Ordering::SeqCst);
    ensure!(
        kind == u64::from(exception_kind::MEMORY_FAULT),
        "handler saw kind {} (expected MEMORY_FAULT)",
        kind
    );
    let addr = SEEN_ADDR.load(Ordering::SeqCst);
    ensure!(
        addr == 0x40,
        "handler saw fault_addr {:#x} (expected 0x40)",
        addr
    );
    Ok(())
}
