//! Locks, condition variables, events, semaphores and one-time
//! initialisation over the ABI's events and semaphores.
//!
//! Every type that holds a host handle closes it on `Drop`.
use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use moat_pal::timeout;

use crate::{raw, Error, Result};

/// Wait until one of `handles` is signalled; returns its index.
/// `timeout_micros`: 0 polls, negative ([`timeout::INFINITE`]) waits for ever.
pub fn wait_any(handles: &[u64], timeout_micros: i64) -> Result<usize> {
    raw::objects_wait_any(handles, timeout_micros)
}

/// Wait for one object; `Ok(())` when it was signalled.
pub fn wait_one(handle: u64, timeout_micros: i64) -> Result<()> {
    raw::objects_wait_any(&[handle], timeout_micros).map(|_| ())
}

fn close_handle(h: u64) {
    if h != 0 {
        let _ = raw::object_close(h);
    }
}

// ------------------------------------------------------------------ RawLock

const UNLOCKED: u32 = 0;
const LOCKED: u32 = 1;
const CONTENDED: u32 = 2;

/// A mutual-exclusion lock without data: an atomic fast path, and a
/// synchronization event (created on first contention) to sleep on.
pub struct RawLock {
    state: AtomicU32,
    event: AtomicU64,
}

impl RawLock {
    /// An unlocked lock (no host object yet).
    pub const fn new() -> Self {
        RawLock {
            state: AtomicU32::new(UNLOCKED),
            event: AtomicU64::new(0),
        }
    }

    /// Take the lock if it is free.
    #[inline]
    pub fn try_lock(&self) -> bool {
        self.state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Take the lock, sleeping while another thread holds it.
    #[inline]
    pub fn lock(&self) {
        if !self.try_lock() {
            self.lock_slow();
        }
    }

    #[cold]
    fn lock_slow(&self) {
        for _ in 0..100 {
            core::hint::spin_loop();
            if self.state.load(Ordering::Relaxed) == UNLOCKED && self.try_lock() {
                return;
            }
        }
        let ev = self.event_handle();
        loop {
            if self.state.swap(CONTENDED, Ordering::Acquire) == UNLOCKED {
                return;
            }
            match ev {
                // The unlocker sets the auto-reset event after it sees
                // CONTENDED; the bounded wait only guards against surprises.
                Some(ev) => {
                    let _ = raw::objects_wait_any(&[ev], 100_000);
                }
                None => {
                    let _ = raw::thread_yield_execution();
                }
            }
        }
    }

    /// Release the lock.
    ///
    /// # Safety
    /// The calling context must hold the lock.
    #[inline]
    pub unsafe fn unlock(&self) {
        if self.state.swap(UNLOCKED, Ordering::Release) == CONTENDED {
            let ev = self.event.load(Ordering::Acquire);
            if ev != 0 {
                let _ = raw::event_set(ev);
            }
        }
    }

    /// Whether some thread holds the lock.
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNLOCKED
    }

    fn event_handle(&self) -> Option<u64> {
        let ev = self.event.load(Ordering::Acquire);
        if ev != 0 {
            return Some(ev);
        }
        let new = raw::synchronization_event_create(false).ok()?;
        match self
            .event
            .compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Some(new),
            Err(other) => {
                close_handle(new);
                Some(other)
            }
        }
    }
}

impl Default for RawLock {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RawLock {
    fn drop(&mut self) {
        close_handle(*self.event.get_mut());
    }
}

// SAFETY: `lock`/`unlock` give mutual exclusion with acquire/release ordering.
unsafe impl talc::lock_api::RawMutex for RawLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawLock::new();
    type GuardMarker = talc::lock_api::GuardSend;

    fn lock(&self) {
        RawLock::lock(self)
    }

    fn try_lock(&self) -> bool {
        RawLock::try_lock(self)
    }

    unsafe fn unlock(&self) {
        // SAFETY: lock_api only unlocks what it locked.
        unsafe { RawLock::unlock(self) }
    }
}

// ------------------------------------------------------------------ Mutex

/// A lock around a value.
pub struct Mutex<T: ?Sized> {
    raw: RawLock,
    data: UnsafeCell<T>,
}

// SAFETY: the lock gives exclusive access to `data` across threads.
unsafe impl<T: ?Sized + Send> Send for Mutex<T> {}
// SAFETY: as above.
unsafe impl<T: ?Sized + Send> Sync for Mutex<T> {}

impl<T> Mutex<T> {
    pub const fn new(value: T) -> Self {
        Mutex {
            raw: RawLock::new(),
            data: UnsafeCell::new(value),
        }
    }

    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Take the lock.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.raw.lock();
        MutexGuard { lock: self }
    }

    /// Take the lock if it is free.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        if self.raw.try_lock() {
            Some(MutexGuard { lock: self })
        } else {
            None
        }
    }

    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

impl<T: Default> Default for Mutex<T> {
    fn default() -> Self {
        Mutex::new(T::default())
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.try_lock() {
            Some(g) => f.debug_struct("Mutex").field("data", &&*g).finish(),
            None => f.write_str("Mutex { <locked> }"),
        }
    }
}

/// Access to a locked [`Mutex`]'s value; unlocks on drop.
pub struct MutexGuard<'a, T: ?Sized> {
    lock: &'a Mutex<T>,
}

impl<T: ?Sized> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T: ?Sized> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T: ?Sized> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the guard holds the lock.
        unsafe { self.lock.raw.unlock() }
    }
}

// ------------------------------------------------------------------ Condvar

/// A condition variable for [`Mutex`]. Wake-ups may be spurious: wait in a
/// loop that checks the condition.
pub struct Condvar {
    waiters: AtomicU32,
    sem: AtomicU64,
}

const CONDVAR_MAX: u32 = i32::MAX as u32;

impl Condvar {
    pub const fn new() -> Self {
        Condvar {
            waiters: AtomicU32::new(0),
            sem: AtomicU64::new(0),
        }
    }

    fn sem(&self) -> Result<u64> {
        let s = self.sem.load(Ordering::Acquire);
        if s != 0 {
            return Ok(s);
        }
        let new = raw::semaphore_create(0, CONDVAR_MAX)?;
        match self
            .sem
            .compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(new),
            Err(other) => {
                close_handle(new);
                Ok(other)
            }
        }
    }

    /// Unlock, wait for a notification, lock again.
    pub fn wait<'a, T: ?Sized>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.wait_timeout(guard, timeout::INFINITE).0
    }

    /// Like [`Condvar::wait`], for at most `timeout_micros`; the flag is
    /// `true` when the wait timed out.
    pub fn wait_timeout<'a, T: ?Sized>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout_micros: i64,
    ) -> (MutexGuard<'a, T>, bool) {
        let mutex = guard.lock;
        let sem = match self.sem() {
            Ok(s) => s,
            Err(_) => {
                // No host object: degrade to a short sleep (a spurious wake-up).
                drop(guard);
                let _ = raw::thread_yield_execution();
                return (mutex.lock(), false);
            }
        };
        self.waiters.fetch_add(1, Ordering::SeqCst);
        drop(guard);
        let r = raw::objects_wait_any(&[sem], timeout_micros);
        let timed_out = r.is_err();
        if timed_out {
            // Take ourselves off the waiter count, unless a notifier already
            // did so and released a permit for us: then consume that permit.
            let mut n = self.waiters.load(Ordering::SeqCst);
            loop {
                if n == 0 {
                    let _ = raw::objects_wait_any(&[sem], timeout::INFINITE);
                    break;
                }
                match self
                    .waiters
                    .compare_exchange(n, n - 1, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => break,
                    Err(m) => n = m,
                }
            }
        }
        (mutex.lock(), timed_out)
    }

    /// Wake one waiter.
    pub fn notify_one(&self) {
        let mut n = self.waiters.load(Ordering::SeqCst);
        while n > 0 {
            match self
                .waiters
                .compare_exchange(n, n - 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    if let Ok(s) = self.sem() {
                        let _ = raw::semaphore_release(s, 1);
                    }
                    return;
                }
                Err(m) => n = m,
            }
        }
    }

    /// Wake every waiter.
    pub fn notify_all(&self) {
        let n = self.waiters.swap(0, Ordering::SeqCst);
        if n > 0 {
            if let Ok(s) = self.sem() {
                let _ = raw::semaphore_release(s, n);
            }
        }
    }
}

impl Default for Condvar {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Condvar {
    fn drop(&mut self) {
        close_handle(*self.sem.get_mut());
    }
}

// ------------------------------------------------------------------ Event

/// A host event: notification (manual-reset) or synchronization (auto-reset).
#[derive(Debug)]
pub struct Event {
    handle: u64,
}

impl Event {
    /// A manual-reset event: stays set until cleared.
    pub fn notification(initial: bool) -> Result<Event> {
        Ok(Event {
            handle: raw::notification_event_create(initial)?,
        })
    }

    /// An auto-reset event: a wait that sees it set clears it.
    pub fn synchronization(initial: bool) -> Result<Event> {
        Ok(Event {
            handle: raw::synchronization_event_create(initial)?,
        })
    }

    /// Take ownership of an event handle.
    ///
    /// # Safety
    /// `handle` must be an event handle nobody else closes.
    pub unsafe fn from_raw(handle: u64) -> Event {
        Event { handle }
    }

    pub fn handle(&self) -> u64 {
        self.handle
    }

    pub fn into_raw(self) -> u64 {
        let h = self.handle;
        core::mem::forget(self);
        h
    }

    pub fn set(&self) -> Result<()> {
        raw::event_set(self.handle).map(|_| ())
    }

    pub fn clear(&self) -> Result<()> {
        raw::event_clear(self.handle).map(|_| ())
    }

    pub fn peek(&self) -> Result<bool> {
        raw::event_peek(self.handle)
    }

    /// Wait until set (consuming it if auto-reset); `Err(TimedOut)` on timeout.
    pub fn wait(&self, timeout_micros: i64) -> Result<()> {
        wait_one(self.handle, timeout_micros)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        close_handle(self.handle);
    }
}

// ------------------------------------------------------------------ Semaphore

/// A host counting semaphore.
#[derive(Debug)]
pub struct Semaphore {
    handle: u64,
}

impl Semaphore {
    pub fn new(initial: u32, max: u32) -> Result<Semaphore> {
        Ok(Semaphore {
            handle: raw::semaphore_create(initial, max)?,
        })
    }

    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// Add `count`; returns the count before.
    pub fn release(&self, count: u32) -> Result<u32> {
        raw::semaphore_release(self.handle, count).map(|v| v as u32)
    }

    pub fn peek(&self) -> Result<u32> {
        raw::semaphore_peek(self.handle).map(|v| v as u32)
    }

    /// Wait until positive, then decrement; `Err(TimedOut)` on timeout.
    pub fn acquire(&self, timeout_micros: i64) -> Result<()> {
        wait_one(self.handle, timeout_micros)
    }
}

impl Drop for Semaphore {
    fn drop(&mut self) {
        close_handle(self.handle);
    }
}

// ------------------------------------------------------------------ Once

const INCOMPLETE: u32 = 0;
const RUNNING: u32 = 1;
const COMPLETE: u32 = 2;

/// Run something exactly once.
pub struct Once {
    state: AtomicU32,
}

impl Once {
    pub const fn new() -> Self {
        Once {
            state: AtomicU32::new(INCOMPLETE),
        }
    }

    pub fn is_completed(&self) -> bool {
        self.state.load(Ordering::Acquire) == COMPLETE
    }

    /// Run `f` if no call has yet; other callers wait until it has run.
    pub fn call_once<F: FnOnce()>(&self, f: F) {
        if self.is_completed() {
            return;
        }
        if self
            .state
            .compare_exchange(INCOMPLETE, RUNNING, Ordering::Acquire, Ordering::Acquire)
            .is_ok()
        {
            f();
            self.state.store(COMPLETE, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while !self.is_completed() {
            spins += 1;
            if spins < 64 {
                core::hint::spin_loop();
            } else if spins < 1024 {
                let _ = raw::thread_yield_execution();
            } else {
                let _ = raw::thread_delay_execution(100);
            }
        }
    }
}

impl Default for Once {
    fn default() -> Self {
        Self::new()
    }
}

/// A value set at most once.
pub struct OnceCell<T> {
    once: Once,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once before `COMPLETE` is published with
// release ordering and only read after observing it with acquire ordering.
unsafe impl<T: Send + Sync> Sync for OnceCell<T> {}
// SAFETY: owning the cell owns the value.
unsafe impl<T: Send> Send for OnceCell<T> {}

impl<T> OnceCell<T> {
    pub const fn new() -> Self {
        OnceCell {
            once: Once::new(),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    pub fn get(&self) -> Option<&T> {
        if self.once.is_completed() {
            // SAFETY: complete means initialised.
            Some(unsafe { (*self.value.get()).assume_init_ref() })
        } else {
            None
        }
    }

    pub fn get_or_init<F: FnOnce() -> T>(&self, f: F) -> &T {
        self.once.call_once(|| {
            // SAFETY: only the single `call_once` runner writes.
            unsafe { (*self.value.get()).write(f()) };
        });
        // SAFETY: call_once returned, so the value is initialised.
        unsafe { (*self.value.get()).assume_init_ref() }
    }
}

impl<T> Default for OnceCell<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Drop for OnceCell<T> {
    fn drop(&mut self) {
        if self.once.is_completed() {
            // SAFETY: complete means initialised; we own it.
            unsafe { self.value.get_mut().assume_init_drop() };
        }
    }
}

/// A value computed on first use.
pub struct Lazy<T, F = fn() -> T> {
    cell: OnceCell<T>,
    init: UnsafeCell<Option<F>>,
}

// SAFETY: `init` is taken only inside the single `call_once` runner.
unsafe impl<T: Send + Sync, F: Send> Sync for Lazy<T, F> {}

impl<T, F: FnOnce() -> T> Lazy<T, F> {
    pub const fn new(init: F) -> Self {
        Lazy {
            cell: OnceCell::new(),
            init: UnsafeCell::new(Some(init)),
        }
    }

    pub fn force(this: &Self) -> &T {
        this.cell.get_or_init(|| {
            // SAFETY: only the single initialiser reaches here.
            let f = unsafe { (*this.init.get()).take() };
            match f {
                Some(f) => f(),
                None => panic!("Lazy instance previously poisoned"),
            }
        })
    }
}

impl<T, F: FnOnce() -> T> Deref for Lazy<T, F> {
    type Target = T;
    fn deref(&self) -> &T {
        Lazy::force(self)
    }
}

/// `Err(TimedOut)` helper for callers that want a bool.
pub fn timed_out<T>(r: &Result<T>) -> bool {
    matches!(r, Err(Error::TimedOut))
}
