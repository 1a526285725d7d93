//! Threads: `spawn` runs a closure on a new host thread.
use alloc::boxed::Box;
use alloc::sync::Arc;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use moat_pal::timeout;

use crate::{raw, Error, Result};

struct Packet<T> {
    done: AtomicBool,
    result: UnsafeCell<Option<T>>,
}

// SAFETY: the result is written by the thread before `done` is released and
// read by the joiner only after acquiring `done`.
unsafe impl<T: Send> Sync for Packet<T> {}

type Main = Box<dyn FnOnce() + Send + 'static>;

/// A spawned thread; `join` waits for it and returns its closure's result.
/// Dropping it detaches the thread.
pub struct JoinHandle<T> {
    handle: u64,
    packet: Arc<Packet<T>>,
}

impl<T> JoinHandle<T> {
    /// The thread's host handle (signalled when it exits).
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// Whether the thread has finished its closure.
    pub fn is_finished(&self) -> bool {
        self.packet.done.load(Ordering::Acquire)
    }

    /// Wait for the thread to exit; its closure's result.
    pub fn join(self) -> Result<T> {
        crate::sync::wait_one(self.handle, timeout::INFINITE)?;
        if !self.packet.done.load(Ordering::Acquire) {
            // The thread exited without finishing (DkThreadExit inside it).
            return Err(Error::Io);
        }
        // SAFETY: `done` acquired: the thread wrote the result and is gone.
        let r = unsafe { (*self.packet.result.get()).take() };
        r.ok_or(Error::Io)
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        let _ = raw::object_close(self.handle);
    }
}

extern "C" fn thread_start(param: u64) -> ! {
    // SAFETY: `param` is the `Box<Main>` leaked by `try_spawn`, handed to
    // exactly this thread.
    let f: Box<Main> = unsafe { Box::from_raw(param as *mut Main) };
    (*f)();
    raw::thread_exit(0)
}

/// Start a thread running `f`.
pub fn try_spawn<F, T>(f: F) -> Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let packet = Arc::new(Packet {
        done: AtomicBool::new(false),
        result: UnsafeCell::new(None),
    });
    let theirs = packet.clone();
    let main: Main = Box::new(move || {
        let r = f();
        // SAFETY: only this thread writes, before publishing `done`.
        unsafe { *theirs.result.get() = Some(r) };
        theirs.done.store(true, Ordering::Release);
    });
    let param = Box::into_raw(Box::new(main));
    let entry = thread_start as extern "C" fn(u64) -> ! as usize as u64;
    // SAFETY: `thread_start` is an `extern "C" fn(u64) -> !` that takes the
    // boxed closure `param` points to.
    match unsafe { raw::thread_create(entry, param as u64) } {
        Ok(handle) => Ok(JoinHandle { handle, packet }),
        Err(e) => {
            // SAFETY: no thread took the box.
            drop(unsafe { Box::from_raw(param) });
            Err(e)
        }
    }
}

/// Start a thread running `f`; panics if the host refuses.
pub fn spawn<F, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match try_spawn(f) {
        Ok(h) => h,
        Err(e) => panic!("thread::spawn: DkThreadCreate failed: {}", e.name()),
    }
}

/// Sleep at least `micros` microseconds.
pub fn sleep_micros(micros: u64) {
    let _ = raw::thread_delay_execution(micros);
}

/// Give up the processor.
pub fn yield_now() {
    let _ = raw::thread_yield_execution();
}

/// The calling thread's creation parameter (0 for the first thread).
pub fn parameter() -> u64 {
    raw::thread_get_parameter().unwrap_or(0)
}

/// End the calling thread.
pub fn exit(code: i32) -> ! {
    raw::thread_exit(code)
}
