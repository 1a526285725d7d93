//! What a VMM thread that runs a vCPU knows about its guest thread, for
//! the PAL ([`crate::pal`]) and the vCPU loop ([`crate::pico`]) alike:
//! its DkThreadGetParameter value (a thread-local, set when the thread
//! starts), the thread objects DkThreadCreate hands out, and the lines
//! layers write to the picoprocess's log.
use moat_host_common::objects::{Object, ThreadObj};
use moat_host_common::sys;
use moat_pal::Error;
use std::cell::Cell;
use std::sync::Arc;

thread_local! {
    static PARAM: Cell<u64> = const { Cell::new(0) };
}

/// Set DkThreadGetParameter of the calling vCPU thread (once, as it
/// starts its guest thread).
pub fn set_thread_param(param: u64) {
    PARAM.with(|p| p.set(param));
}

/// DkThreadGetParameter of the calling vCPU thread.
pub fn thread_param() -> u64 {
    PARAM.with(|p| p.get())
}

/// Send a layer's line to the monitor.
pub(crate) fn layer_line(line: std::fmt::Arguments<'_>) {
    if let Some(p) = moat_host_common::pal::global_opt() {
        p.tell(&moat_host_common::protocol::Request::Debug {
            text: line.to_string(),
        });
    }
}

/// A thread object for DkThreadCreate (waitable; signalled at its end).
pub fn thread_object() -> Result<Arc<Object>, Error> {
    let done = sys::eventfd().map_err(|_| Error::LimitExceeded)?;
    Ok(Arc::new(Object::Thread(ThreadObj { done })))
}
