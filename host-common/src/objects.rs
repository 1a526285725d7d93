//! Kernel objects of the Linux PAL. Every waitable object has a
//! descriptor that is readable exactly while the object is signalled, so
//! DkObjectsWaitAny is one poll() over any mix of kinds. A shared
//! section's doorbell ([`Object::Doorbell`]) is an eventfd shared with
//! other processes: its count is the kernel's, taken by one read.
use crate::sys;
use moat_pal::{stream_kind, Error, PalResult};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    Notification,
    Synchronization,
    Semaphore,
}

/// Events and semaphores: the count lives under a lock; the eventfd holds
/// 1 while the count is positive, 0 otherwise.
pub struct SyncObj {
    pub kind: SyncKind,
    pub fd: OwnedFd,
    state: Mutex<(u32, u32)>, // (count, max)
    /// Set by a signal handler (which cannot take the lock): the next
    /// locked operation applies it as a set.
    pending_set: std::sync::atomic::AtomicBool,
}

impl SyncObj {
    pub fn new(kind: SyncKind, initial: u32, max: u32) -> PalResult<SyncObj> {
        let fd = sys::eventfd().map_err(|_| Error::LimitExceeded)?;
        if initial > 0 {
            sys::eventfd_signal(fd.as_raw_fd());
        }
        Ok(SyncObj {
            kind,
            fd,
            state: Mutex::new((initial, max)),
            pending_set: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Async-signal-safe set: mark it and wake waiters; whoever next takes
    /// the lock applies it (see `state`).
    pub fn set_from_signal(&self) {
        self.pending_set
            .store(true, std::sync::atomic::Ordering::Release);
        sys::eventfd_signal(self.fd.as_raw_fd());
    }

    /// The locked state, with a set made by a signal handler applied.
    fn state(&self) -> std::sync::MutexGuard<'_, (u32, u32)> {
        let mut s = self.state.lock().unwrap();
        self.apply_pending(&mut s);
        s
    }

    fn apply_pending(&self, s: &mut (u32, u32)) {
        if self
            .pending_set
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            if s.0 == 0 {
                s.0 = 1;
            }
            // Readable again, even if a drain raced with the handler.
            sys::eventfd_signal(self.fd.as_raw_fd());
        }
    }

    /// Drain the descriptor (the count went to 0), keeping a set that a
    /// signal handler made meanwhile.
    fn drain(&self, s: &mut (u32, u32)) {
        sys::eventfd_drain(self.fd.as_raw_fd());
        self.apply_pending(s);
    }

    pub fn set(&self) {
        let mut s = self.state();
        if s.0 == 0 {
            s.0 = 1;
            sys::eventfd_signal(self.fd.as_raw_fd());
        }
    }

    pub fn clear(&self) {
        let mut s = self.state();
        if s.0 > 0 {
            s.0 = 0;
            self.drain(&mut s);
        }
    }

    pub fn count(&self) -> u32 {
        self.state().0
    }

    /// A semaphore's maximum (1 for events).
    pub fn max(&self) -> u32 {
        self.state().1
    }

    /// Semaphore release: the count before, or LimitExceeded (unchanged).
    pub fn release(&self, n: u32) -> PalResult<u32> {
        let mut s = self.state();
        let prev = s.0;
        let new = prev.checked_add(n).ok_or(Error::LimitExceeded)?;
        if new > s.1 {
            return Err(Error::LimitExceeded);
        }
        s.0 = new;
        if prev == 0 {
            sys::eventfd_signal(self.fd.as_raw_fd());
        }
        Ok(prev)
    }

    /// A wait saw the descriptor readable: take the object as its kind
    /// says. False if another waiter got there first.
    pub fn try_acquire(&self) -> bool {
        let mut s = self.state();
        if s.0 == 0 {
            return false;
        }
        match self.kind {
            SyncKind::Notification => {}
            SyncKind::Synchronization | SyncKind::Semaphore => {
                s.0 -= 1;
                if s.0 == 0 {
                    self.drain(&mut s);
                }
            }
        }
        true
    }
}

/// A stream: a descriptor the monitor brokered (or accepted locally).
pub struct StreamObj {
    pub fd: OwnedFd,
    pub kind: u32,
    pub uri: Mutex<String>,
    pub readable: bool,
    pub writable: bool,
    pub append: bool,
    /// For a `dev:` stream (kind `DEVICE`), the device's index in the
    /// host's device set: calls on the stream are dispatched by this, not
    /// by looking its name up.
    pub device: Option<u32>,
    /// For a `shm:` stream (kind `SHM`): the section's side. `fd` is then
    /// this side's doorbell.
    pub section: Option<SectionObj>,
}

/// A side of a shared section, as one stream handle holds it (see
/// `crate::pal::section`).
pub struct SectionObj {
    /// Whether this open made the section (the creator side).
    pub creator: bool,
    /// The other side's doorbell, rung by DkStreamFlush.
    pub peer_bell: OwnedFd,
    /// The memory, once the section is sized: a sealed descriptor
    /// (read-only unless the stream is writable) and the size.
    pub memory: std::sync::OnceLock<(OwnedFd, u64)>,
    /// Counts the open section streams of the picoprocess while it lives.
    pub open: OpenCount,
}

/// One of a bounded number of things open at once: takes a slot from a
/// shared counter, gives it back when dropped.
pub struct OpenCount(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl OpenCount {
    /// A slot of `counter` if fewer than `max` are taken.
    pub fn take(
        counter: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
        max: usize,
    ) -> Option<OpenCount> {
        use std::sync::atomic::Ordering;
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| OpenCount(counter.clone()))
    }
}

impl Drop for OpenCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl StreamObj {
    pub fn seekable(&self) -> bool {
        self.kind == stream_kind::FILE
    }
}

/// Threads and child processes: the descriptor becomes readable when they end.
pub struct ThreadObj {
    pub done: OwnedFd,
}

pub struct ProcessObj {
    /// Read end of the monitor's exit-code pipe (non-blocking).
    pub pipe: OwnedFd,
    pub code: Mutex<Option<i32>>,
}

impl ProcessObj {
    pub fn exit_code(&self) -> PalResult<i32> {
        let mut c = self.code.lock().unwrap();
        if let Some(v) = *c {
            return Ok(v);
        }
        let mut b = [0u8; 4];
        let addr = b.as_mut_ptr() as u64;
        match sys::read(self.pipe.as_raw_fd(), addr, 4) {
            Ok(4) => {
                let v = i32::from_le_bytes(b);
                *c = Some(v);
                Ok(v)
            }
            Ok(0) => {
                // The monitor closed without a code: it was killed with us.
                *c = Some(137);
                Ok(137)
            }
            Ok(_) => Err(Error::Io),
            Err(e) if e == libc::EAGAIN => Err(Error::WouldBlock),
            Err(_) => Err(Error::Io),
        }
    }
}

pub enum Object {
    Stream(StreamObj),
    Sync(SyncObj),
    Thread(ThreadObj),
    Process(ProcessObj),
    /// DkStreamGetEvent: signalled while the stream's descriptor is readable.
    Readiness(OwnedFd),
    /// DkStreamGetEvent of a shared section: this side's doorbell, an
    /// auto-reset event whose count lives in a non-blocking eventfd shared
    /// with the other side (which rings it by writing it).
    Doorbell(OwnedFd),
}

impl Object {
    /// The descriptor poll() watches for this object, and whether a ready
    /// result must still be taken (events and semaphores).
    pub fn wait_fd(&self) -> RawFd {
        match self {
            Object::Stream(s) => s.fd.as_raw_fd(),
            Object::Sync(s) => s.fd.as_raw_fd(),
            Object::Thread(t) => t.done.as_raw_fd(),
            Object::Process(p) => p.pipe.as_raw_fd(),
            Object::Readiness(fd) | Object::Doorbell(fd) => fd.as_raw_fd(),
        }
    }

    /// A wait saw the descriptor readable: take the object as its kind
    /// says (events, semaphores, doorbells). False if another waiter
    /// (of this process or, for a doorbell, of another) got there first.
    pub fn try_acquire(&self) -> bool {
        match self {
            Object::Sync(s) => s.try_acquire(),
            Object::Doorbell(fd) => {
                let rung = doorbell_take(fd.as_raw_fd());
                // What the other side wrote before it rang is visible.
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                rung
            }
            _ => true,
        }
    }
}

/// Consume the rings of a doorbell (one read of its eventfd, which resets
/// it): whether it had any.
pub fn doorbell_take(fd: RawFd) -> bool {
    let mut v = [0u8; 8];
    matches!(sys::read(fd, v.as_mut_ptr() as u64, 8), Ok(8))
}
