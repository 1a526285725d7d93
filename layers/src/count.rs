//! The example layer: counts the picoprocess's calls by name and writes
//! one summary line to its log when it ends (`DkProcessExit`, or the last
//! thread's `DkThreadExit`):
//!
//! ```text
//! count: 41 calls: DkStreamWrite 12, DkVirtualMemoryAlloc 9, ...
//! ```
//!
//! How to write a layer, in full: a struct holding the PAL below; an
//! `impl Layer` that names it in `inner` and overrides what the layer
//! cares about (here only the `enter` and `leave` hooks; a layer that
//! changes a call overrides that call's method); `Layered(..)` makes it a
//! `Pal` (see `Stack::build`). A picoprocess killed by the host (a fault,
//! a violation, a stop request) writes no summary.
use crate::LogSink;
use moat_pal::layer::Layer;
use moat_pal::{nr, Pal, CALL_NAMES};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// The counting layer.
pub struct Count {
    inner: &'static dyn Pal,
    log: LogSink,
    /// Calls by number (index `nr - 1`).
    calls: [AtomicU64; CALL_NAMES.len()],
    /// Threads running: the first, plus every thread created, minus every
    /// DkThreadExit. The summary goes out when it reaches 0.
    threads: AtomicI64,
    reported: AtomicBool,
}

impl Count {
    pub fn new(inner: &'static dyn Pal, log: LogSink) -> Count {
        Count {
            inner,
            log,
            calls: [const { AtomicU64::new(0) }; CALL_NAMES.len()],
            threads: AtomicI64::new(1),
            reported: AtomicBool::new(false),
        }
    }

    /// The summary line (without `count: `): calls by count, most first.
    pub fn summary(&self) -> String {
        let mut by: Vec<(u64, usize)> = self
            .calls
            .iter()
            .enumerate()
            .map(|(i, c)| (c.load(Ordering::Relaxed), i))
            .filter(|&(n, _)| n > 0)
            .collect();
        by.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let total: u64 = by.iter().map(|&(n, _)| n).sum();
        let list: Vec<String> = by
            .iter()
            .map(|&(n, i)| format!("{} {n}", CALL_NAMES[i]))
            .collect();
        format!("{total} calls: {}", list.join(", "))
    }

    fn report(&self) {
        if !self.reported.swap(true, Ordering::AcqRel) {
            (self.log)(format_args!("count: {}", self.summary()));
        }
    }
}

impl Layer for Count {
    type Token = ();

    fn inner(&self) -> &dyn Pal {
        self.inner
    }

    fn enter(&self, n: u32, _args: &[u64; 6]) {
        if let Some(c) = (n as usize).checked_sub(1).and_then(|i| self.calls.get(i)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        match n {
            nr::DK_PROCESS_EXIT => self.report(),
            nr::DK_THREAD_EXIT if self.threads.fetch_sub(1, Ordering::AcqRel) == 1 => self.report(),
            _ => {}
        }
    }

    fn leave(&self, n: u32, _args: &[u64; 6], result: i64, _token: ()) {
        if n == nr::DK_THREAD_CREATE && result == 0 {
            self.threads.fetch_add(1, Ordering::AcqRel);
        }
    }
}
