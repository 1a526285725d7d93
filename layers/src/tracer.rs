//! The trace layer: a fixed-size binary [`Record`] per call into the
//! trace ring the monitor drains ([`crate::ring`]), written in the
//! confined process with no system call or message per call: the call
//! number, its argument words, result, thread, start time and duration,
//! the value it wrote out (a new handle, an exit code), and a bounded
//! copy of its first byte-string argument (a URI, what was written or
//! read). The monitor decodes them into strace-like lines, or saves them
//! for `moat trace FILE`.
//!
//! Guest memory is read only through [`GuestAccess`] (checked, copied
//! once); a pointer that does not check leaves the record without data.
//! Bytes are copied when the call returns: a guest thread that changes a
//! buffer while another thread's call runs changes what the trace shows
//! (a trace is the guest's account of itself, for debugging, never
//! evidence; the monitor's own log of brokered requests is what the
//! host decided on).
//! Calls outside the filter cost one bit test. Exits are recorded before
//! they are made.
use crate::ring::{self, Producer, Record, DATA_BYTES, RECORD_WORDS};
use crate::GuestAccess;
use moat_pal::layer::{arg, Layer, ARGS};
use moat_pal::{nr, Pal};
use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The trace layer.
pub struct Tracer {
    inner: &'static dyn Pal,
    mem: &'static dyn GuestAccess,
    ring: &'static Producer,
    /// Which trace layer of the stack this is (0: outermost).
    index: u8,
    /// Bit `nr - 1` set: the call is traced.
    filter: u64,
}

/// The tracer's clock: nanoseconds since the first trace layer started.
fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Small thread numbers, 1 for the first thread that makes a call.
fn tid() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    thread_local! {
        static TID: Cell<u32> = const { Cell::new(0) };
    }
    TID.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

/// Every call.
pub const ALL_CALLS: u64 = (1u64 << moat_pal::CALL_NAMES.len()) - 1;

impl Tracer {
    pub fn new(
        inner: &'static dyn Pal,
        mem: &'static dyn GuestAccess,
        ring: &'static Producer,
        index: u8,
        filter: u64,
    ) -> Tracer {
        let _ = now_ns();
        Tracer {
            inner,
            mem,
            ring,
            index,
            filter,
        }
    }

    fn traced(&self, n: u32) -> bool {
        (1..=64).contains(&n) && self.filter & (1u64 << (n - 1)) != 0
    }

    /// The record of call `n`, `result` as it returned (`None`: not yet,
    /// or never).
    fn record(&self, n: u32, args: &[u64; 6], result: Option<i64>, start: u64) -> Record {
        let mut r = Record {
            ts_ns: start,
            tid: tid(),
            nr: n as u16,
            layer: self.index,
            args: *args,
            ..Default::default()
        };
        if let Some(res) = result {
            r.flags |= ring::F_RETURNED;
            r.result = res;
            r.dur_ns = now_ns().saturating_sub(start).min(u32::MAX as u64) as u32;
        }
        if matches!(n, nr::DK_THREAD_EXIT | nr::DK_PROCESS_EXIT) {
            return r;
        }
        let layout = ARGS.get(n as usize - 1).copied().unwrap_or_default();
        let ok = result.is_some_and(|v| v >= 0);
        for (i, &cell) in layout.iter().enumerate() {
            let (kind, len_at) = (cell & 0xf, (cell >> 4) as usize);
            match kind {
                arg::BYTES_IN | arg::BYTES_OUT if r.data.is_empty() && r.data_arg == 0 => {
                    let len = if kind == arg::BYTES_IN {
                        args[len_at]
                    } else if ok {
                        // What the call wrote: its result bytes, within
                        // the buffer.
                        (result.unwrap_or(0) as u64).min(args[len_at])
                    } else {
                        continue;
                    };
                    let take = len.min(DATA_BYTES as u64);
                    if take == 0 {
                        continue;
                    }
                    if let Ok(b) = self.mem.copy_in(args[i], take) {
                        r.data = b;
                        r.data_arg = i as u8;
                        if take < len {
                            r.flags |= ring::F_TRUNCATED;
                        }
                        if kind == arg::BYTES_OUT {
                            r.flags |= ring::F_DATA_OUT;
                        }
                    }
                }
                arg::HANDLE_OUT | arg::VALUE_OUT if ok && r.flags & ring::F_OUT == 0 => {
                    let width = if kind == arg::VALUE_OUT && n == nr::DK_PROCESS_GET_EXIT_CODE {
                        4
                    } else {
                        8
                    };
                    if let Ok(b) = self.mem.copy_in(args[i], width) {
                        let mut w = [0u8; 8];
                        w[..b.len()].copy_from_slice(&b);
                        r.out = if width == 4 {
                            i32::from_le_bytes([w[0], w[1], w[2], w[3]]) as i64 as u64
                        } else {
                            u64::from_le_bytes(w)
                        };
                        r.flags |= ring::F_OUT;
                    }
                }
                _ => {}
            }
        }
        r
    }

    fn push(&self, r: &Record) {
        let w: [u64; RECORD_WORDS] = r.to_words();
        self.ring.push(&w);
    }

    /// A call the host served without the stack (kvm: a raised
    /// exception): recorded without a result.
    pub fn host_served(&self, n: u32, args: &[u64; 6]) {
        if self.traced(n) {
            let mut r = self.record(n, args, None, now_ns());
            r.flags |= ring::F_HOST_SERVED;
            self.push(&r);
        }
    }
}

impl Layer for Tracer {
    /// The call's start time.
    type Token = u64;

    fn inner(&self) -> &dyn Pal {
        self.inner
    }

    fn enter(&self, n: u32, args: &[u64; 6]) -> u64 {
        if !self.traced(n) {
            return 0;
        }
        let t = now_ns();
        if matches!(n, nr::DK_THREAD_EXIT | nr::DK_PROCESS_EXIT) {
            self.push(&self.record(n, args, None, t));
        }
        t
    }

    fn leave(&self, n: u32, args: &[u64; 6], result: i64, start: u64) {
        if self.traced(n) {
            self.push(&self.record(n, args, Some(result), start));
        }
    }
}
