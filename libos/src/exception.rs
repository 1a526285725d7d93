//! Exception upcalls (LibOsExceptionDispatch).
//!
//! The libos registers one upcall for the whole process at start-up; it
//! calls the handler set with [`set_handler`], or ends the process
//! (TERMINATE) when there is none.
use core::sync::atomic::{AtomicUsize, Ordering};

use moat_pal::{exception_disposition, ExceptionInfo};

use crate::{raw, Result};

/// An exception handler: returns a `moat_pal::exception_disposition` value
/// (RESUME after fixing `info.rip`/`info.rsp`, or TERMINATE).
pub type Handler = fn(&mut ExceptionInfo) -> u32;

static HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Install `handler` for every thread; returns the previous one.
pub fn set_handler(handler: Handler) -> Option<Handler> {
    let old = HANDLER.swap(handler as usize, Ordering::SeqCst);
    from_usize(old)
}

/// Remove the handler; exceptions then end the process.
pub fn clear_handler() -> Option<Handler> {
    from_usize(HANDLER.swap(0, Ordering::SeqCst))
}

fn from_usize(v: usize) -> Option<Handler> {
    if v == 0 {
        None
    } else {
        // SAFETY: only `set_handler` stores non-zero values, all `Handler`s.
        Some(unsafe { core::mem::transmute::<usize, Handler>(v) })
    }
}

/// DkThreadRaiseException: the disposition the handler returned.
pub fn raise(code: u32, arg: u64) -> Result<u64> {
    raw::thread_raise_exception(code, arg)
}

/// The upcall the host calls on the faulting thread.
///
/// # Safety
/// `info` is null or points to an ExceptionInfo only this call uses.
pub unsafe extern "C" fn dispatch(info: *mut ExceptionInfo) -> i64 {
    if info.is_null() {
        return i64::from(exception_disposition::TERMINATE);
    }
    match from_usize(HANDLER.load(Ordering::SeqCst)) {
        // SAFETY: the host passes a valid, exclusive ExceptionInfo.
        Some(h) => i64::from(h(unsafe { &mut *info })),
        None => i64::from(exception_disposition::TERMINATE),
    }
}

/// Store [`dispatch`] in the start-up block (done by `_start`).
pub(crate) fn register_upcall() {
    let sb = crate::boot::startup_ptr();
    if !sb.is_null() {
        let f = dispatch as unsafe extern "C" fn(*mut ExceptionInfo) -> i64 as usize as u64;
        // SAFETY: the block stays valid and writable for the process lifetime.
        unsafe { core::ptr::addr_of_mut!((*sb).exception_upcall).write_volatile(f) };
    }
}
