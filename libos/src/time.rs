//! Time.
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
