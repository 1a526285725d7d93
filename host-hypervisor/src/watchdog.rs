//! The vCPU watchdog: one thread per VM that ends a vCPU run which passes
//! its deadline (at most 50 ms late). A run is armed with the thread
//! running it; when it is late, the watchdog signals that thread (a no-op
//! handler, so KVM_RUN returns EINTR), again every 10 ms until the run is
//! disarmed (a signal that lands just before KVM_RUN would otherwise be
//! lost).
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub(crate) struct Watchdog {
    shared: Arc<(Mutex<DogState>, Condvar)>,
}

struct Slot {
    until: Instant,
    target: libc::pthread_t,
    fired: Arc<AtomicBool>,
}

struct DogState {
    armed: HashMap<u64, Slot>,
    quit: bool,
}

/// How often the watchdog looks at the armed runs.
const POLL: Duration = Duration::from_millis(50);

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

extern "C" fn kick(_: libc::c_int) {}

/// A run armed on one vCPU; disarm it when KVM_RUN returns.
pub(crate) struct Armed<'a> {
    dog: &'a Watchdog,
    slot: u64,
    fired: Arc<AtomicBool>,
}

impl Armed<'_> {
    /// Disarm; whether the watchdog fired during the run.
    pub(crate) fn disarm(self) -> bool {
        let (m, _) = &*self.dog.shared;
        m.lock()
            .unwrap_or_else(|e| e.into_inner())
            .armed
            .remove(&self.slot);
        self.fired.load(Ordering::Acquire)
    }
}

impl Watchdog {
    pub(crate) fn new() -> std::io::Result<Watchdog> {
        Watchdog::confined(None)
    }

    /// A watchdog whose thread first runs `confine` (its seccomp filter);
    /// if that fails, the process ends: a VMM does not run unconfined.
    pub(crate) fn confined(
        confine: Option<fn() -> Result<(), String>>,
    ) -> std::io::Result<Watchdog> {
        static HANDLER: std::sync::Once = std::sync::Once::new();
        HANDLER.call_once(|| {
            // SAFETY: a no-op handler, installed once for the process.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = kick as *const () as usize;
                libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
            }
        });
        let shared = Arc::new((
            Mutex::new(DogState {
                armed: HashMap::new(),
                quit: false,
            }),
            Condvar::new(),
        ));
        let s2 = shared.clone();
        std::thread::Builder::new()
            .name("moat-vcpu-watchdog".into())
            .stack_size(64 << 10)
            .spawn(move || {
                if let Some(f) = confine {
                    if let Err(e) = f() {
                        moat_host_common::signals::die(
                            moat_host_common::protocol::ReportKind::Startup,
                            format_args!("vmm watchdog: {e}"),
                            moat_host_common::protocol::EXIT_HOST_FAILURE,
                        );
                    }
                }
                let (m, cv) = &*s2;
                let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if st.quit {
                        return;
                    }
                    let now = Instant::now();
                    let mut next: Option<Instant> = None;
                    for s in st.armed.values() {
                        if now >= s.until {
                            s.fired.store(true, Ordering::Release);
                            // SAFETY: signalling a thread that is running a
                            // vCPU (it disarms before it ends); the handler
                            // does nothing.
                            unsafe { libc::pthread_kill(s.target, kick_signal()) };
                            let again = now + Duration::from_millis(10);
                            next = Some(next.map_or(again, |n| n.min(again)));
                        } else {
                            next = Some(next.map_or(s.until, |n| n.min(s.until)));
                        }
                    }
                    // Arming a run does not wake this thread (that would
                    // cost every exit a futex wake and two context
                    // switches): it looks again at least every POLL, so a
                    // deadline is noticed at most POLL late.
                    let wait = next.map_or(POLL, |t| t.saturating_duration_since(now).min(POLL));
                    st = cv
                        .wait_timeout(st, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })?;
        Ok(Watchdog { shared })
    }

    /// Arm a run of vCPU `slot` on the calling thread.
    pub(crate) fn arm(&self, slot: u64, deadline: Duration) -> Armed<'_> {
        let (m, cv) = &*self.shared;
        let fired = Arc::new(AtomicBool::new(false));
        m.lock().unwrap_or_else(|e| e.into_inner()).armed.insert(
            slot,
            Slot {
                until: Instant::now() + deadline,
                // SAFETY: pthread_self has no preconditions.
                target: unsafe { libc::pthread_self() },
                fired: fired.clone(),
            },
        );
        // Short deadlines (tests) are rare: wake the watchdog for those only.
        if deadline < POLL {
            cv.notify_one();
        }
        Armed {
            dog: self,
            slot,
            fired,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (m, cv) = &*self.shared;
        m.lock().unwrap_or_else(|e| e.into_inner()).quit = true;
        cv.notify_one();
    }
}
