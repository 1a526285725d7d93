//! Time: the host's clock (a call), and a spin count calibrated against
//! it once, so that a bounded poll never asks the host for the time (on
//! kvm every call is a VM exit).
use core::sync::atomic::{AtomicU64, Ordering};

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

/// Pause instructions per microsecond, measured once (50,000 of them
/// against the clock, a few hundred microseconds) and remembered.
pub fn spins_per_micro() -> u64 {
    static MEASURED: AtomicU64 = AtomicU64::new(0);
    let known = MEASURED.load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    const N: u64 = 50_000;
    let t0 = now_micros();
    for _ in 0..N {
        core::hint::spin_loop();
    }
    let us = elapsed_micros(t0).max(1);
    let v = (N / us).clamp(1, 10_000);
    MEASURED.store(v, Ordering::Relaxed);
    v
}
