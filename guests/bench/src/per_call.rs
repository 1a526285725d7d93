//! Shared by the bench images: time a call inside the picoprocess.
use moat_libos::{pal, Pal};

/// Nanoseconds per call of `f` over `n` calls, after `n / 10` warm-up
/// calls, timed with the PAL's own clock (microseconds).
pub fn per_call(n: u64, f: impl Fn()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let t0 = pal().dk_system_time_query();
    for _ in 0..n {
        f();
    }
    let t1 = pal().dk_system_time_query();
    (t1 - t0) as f64 * 1000.0 / n as f64
}
