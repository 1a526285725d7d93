//! What a request of the export waits for before it goes to the backend:
//! the lock on the blocks a write covers (no two overlapping writes are
//! ever at the backend at once) and, on an asynchronous backend, a place
//! among the requests in flight (their number is bounded). Both are held
//! by guards that can move to the thread that completes the request, and
//! are given back when it drops them.
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Exclusive locks on ranges of blocks, held by writes.
#[derive(Debug, Default)]
pub(super) struct RangeLocks {
    state: Mutex<Ranges>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct Ranges {
    /// The held ranges of blocks, `start..end`; they never overlap.
    held: Vec<(u64, u64)>,
    /// Threads waiting for a range (nobody is woken when there are none).
    waiting: usize,
}

impl RangeLocks {
    /// Waits until no held range overlaps the blocks `start..end`, then
    /// holds them until the guard is dropped (by any thread).
    pub(super) fn lock(self: &Arc<Self>, start: u64, end: u64) -> RangeGuard {
        let mut s = self.state();
        while s.held.iter().any(|&(s, e)| s < end && start < e) {
            s.waiting += 1;
            s = self
                .released
                .wait(s)
                .unwrap_or_else(PoisonError::into_inner);
            s.waiting -= 1;
        }
        s.held.push((start, end));
        RangeGuard {
            locks: self.clone(),
            range: (start, end),
        }
    }

    fn state(&self) -> MutexGuard<'_, Ranges> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A held range of blocks: released on drop.
pub(super) struct RangeGuard {
    locks: Arc<RangeLocks>,
    range: (u64, u64),
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut s = self.locks.state();
        // Held ranges never overlap, so this one is there exactly once.
        if let Some(i) = s.held.iter().position(|&r| r == self.range) {
            s.held.swap_remove(i);
        }
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.locks.released.notify_all();
        }
    }
}

/// The bound on requests in flight on an asynchronous backend: a request
/// takes a [`Permit`] before it is started, and waits for one while
/// `max` are in flight.
#[derive(Debug)]
pub(super) struct DepthGate {
    state: Mutex<Depth>,
    freed: Condvar,
    max: usize,
}

#[derive(Debug, Default)]
struct Depth {
    in_flight: usize,
    waiting: usize,
}

impl DepthGate {
    /// At most `max` in flight (at least 1).
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Depth::default()),
            freed: Condvar::new(),
            max: max.max(1),
        })
    }

    /// Waits until fewer than `max` requests are in flight, and counts one
    /// more until the permit is dropped (by any thread).
    pub(super) fn enter(self: &Arc<Self>) -> Permit {
        let mut d = self.state();
        while d.in_flight >= self.max {
            d.waiting += 1;
            d = self.freed.wait(d).unwrap_or_else(PoisonError::into_inner);
            d.waiting -= 1;
        }
        d.in_flight += 1;
        Permit(self.clone())
    }

    fn state(&self) -> MutexGuard<'_, Depth> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A place among the requests in flight: given back on drop.
pub(super) struct Permit(Arc<DepthGate>);

impl Drop for Permit {
    fn drop(&mut self) {
        let mut d = self.0.state();
        d.in_flight -= 1;
        let wake = d.waiting > 0;
        drop(d);
        if wake {
            self.0.freed.notify_one();
        }
    }
}
