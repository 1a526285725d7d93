//! The thread calls: each guest thread is an OS thread of the loader,
//! running guest code on a guest stack (with a guard page) and a signal
//! stack for exception upcalls; the thread limit is counted before the
//! thread exists.
use super::{exec_region, LinuxPal, EXIT_CODE, EXIT_SLOT, PARAM};
use crate::objects::{Object, ThreadObj};
use crate::{signals, sys};
use moat_pal::host_calls::ThreadCalls;
use moat_pal::{Error, PalResult};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

impl ThreadCalls for LinuxPal {
    fn thread_create(&self, entry: u64, param: u64) -> PalResult<u64> {
        if !exec_region(self, entry) {
            return Err(Error::BadAddress);
        }
        // Count the thread before it exists, so the limit holds under races.
        let live = self.threads_live.fetch_add(1, Ordering::AcqRel);
        if live >= self.max_threads {
            self.threads_live.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::LimitExceeded);
        }
        let undo = |e: Error| {
            self.threads_live.fetch_sub(1, Ordering::AcqRel);
            Err(e)
        };
        let done = match sys::eventfd() {
            Ok(fd) => Arc::new(Object::Thread(ThreadObj { done: fd })),
            Err(_) => return undo(Error::LimitExceeded),
        };
        let h = match self.handles.lock().unwrap().insert(done.clone()) {
            Ok(h) => h,
            Err(e) => return undo(e),
        };
        let me: &'static LinuxPal = crate::pal::global();
        let spawned = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || me.run_guest_thread(entry, param, param, Some(h), Some(done)));
        if spawned.is_err() {
            let _ = self.close_handle(h);
            return undo(Error::NoMemory);
        }
        Ok(h)
    }

    fn thread_delay_execution(&self, micros: u64) -> PalResult<()> {
        if micros > 1 << 40 {
            return Err(Error::InvalidArgument);
        }
        // With freezing on, a freeze cuts the delay short (the checkpoint
        // layer carries it as the delay left).
        let Some(wake) = crate::freeze::wake_fd().filter(|_| !signals::in_upcall()) else {
            std::thread::sleep(Duration::from_micros(micros));
            return Ok(());
        };
        let end = std::time::Instant::now() + Duration::from_micros(micros);
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || crate::freeze::freezing() {
                return Ok(());
            }
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            if left < Duration::from_millis(2) {
                std::thread::sleep(left);
                continue;
            }
            let _ = sys::poll(&[(wake, libc::POLLIN)], ms.saturating_sub(1).max(1));
        }
    }

    fn thread_yield_execution(&self) -> PalResult<()> {
        std::thread::yield_now();
        Ok(())
    }

    fn thread_exit(&self, code: i32) -> ! {
        let slot = EXIT_SLOT.with(|s| s.get());
        if slot.is_null() {
            sys::exit_process(code);
        }
        EXIT_CODE.with(|c| c.set(code));
        crate::freeze::exiting();
        // SAFETY: slot points at the `saved` local of run_guest_thread on
        // this thread, written by run_on_stack; nothing in the frames we
        // abandon (this call and guest code) owns resources.
        unsafe { sys::leave_guest(*slot) }
    }

    fn thread_get_parameter(&self) -> PalResult<u64> {
        Ok(PARAM.with(|p| p.get()))
    }

    fn thread_raise_exception(&self, code: u32, arg: u64) -> PalResult<u64> {
        let mut info = moat_pal::ExceptionInfo {
            kind: moat_pal::exception_kind::RAISED,
            code,
            fault_addr: 0,
            arg,
            rip: 0,
            rsp: 0,
        };
        match signals::call_upcall(&mut info) {
            Some(d) => Ok(d as u64),
            None => signals::die(
                crate::protocol::ReportKind::Exception,
                format_args!("unhandled raised exception (code {code}, argument {arg:#x}): no exception handler is registered"),
                134,
            ),
        }
    }
}
