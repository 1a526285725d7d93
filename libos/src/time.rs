//! Time: the host's clock (a call), and a spin count calibrated against
//! it once, so that a bounded poll never asks the host for the time (on
//! kvm every call is a VM exit).
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::raw;

/// Wall-clock microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    raw::system_time_query().unwrap_or(0)
}

/// Microseconds elapsed since `start` (a [`now_micros`] value); 0 if the
/// clock went back.
pub fn elapsed_micros(start: u64) -> u64 {
    now_micros().saturating_sub(start)
}

/// A measurement remembered for the host it was made on: a picoprocess
/// carried to the other host (a checkpoint, a template) measures again.
pub(crate) struct PerHost {
    /// The host kind it was made on, plus one (0: none yet).
    on: AtomicU32,
    value: AtomicU64,
}

impl PerHost {
    pub(crate) const fn new() -> PerHost {
        PerHost {
            on: AtomicU32::new(0),
            value: AtomicU64::new(0),
        }
    }

    /// The value for this host, measured by `measure` the first time.
    pub(crate) fn get(&self, measure: impl FnOnce() -> u64) -> u64 {
        let host = crate::env::host_kind().wrapping_add(1);
        if self.on.load(Ordering::Acquire) == host {
            return self.value.load(Ordering::Relaxed);
        }
        let v = measure();
        self.value.store(v, Ordering::Relaxed);
        self.on.store(host, Ordering::Release);
        v
    }
}

/// Pause instructions per microsecond, measured once per host (50,000 of
/// them against the clock, a few hundred microseconds) and remembered.
pub fn spins_per_micro() -> u64 {
    static MEASURED: PerHost = PerHost::new();
    MEASURED.get(|| {
        const N: u64 = 50_000;
        let t0 = now_micros();
        for _ in 0..N {
            core::hint::spin_loop();
        }
        let us = elapsed_micros(t0).max(1);
        (N / us).clamp(1, 10_000)
    })
}
