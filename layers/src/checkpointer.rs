//! The checkpoint layer: what a picoprocess holds at the ABI, kept so
//! that the host can freeze it and write it down (`moat checkpoint`), and
//! the per-thread call state that lets a thread be stopped at a guest
//! instruction boundary however it is occupied.
//!
//! The layer keeps what only the ABI knows: each handle's meaning (a
//! stream's URI, access and options as the PAL got them; an event's
//! kind; a semaphore's maximum; a thread, a process, a device event),
//! with its references, and the abort events registered. The host keeps
//! the rest (memory, the objects' state, the threads' registers) and asks
//! the layer for its part when it writes a checkpoint
//! ([`Checkpointer::held`]).
//!
//! Threads: while the host freezes the picoprocess ([`FreezeHost`]),
//! a thread inside a call stops as the outermost call returns to guest
//! code ([`FreezeHost::stop_on_return`]). The two calls that may block
//! for good, `DkObjectsWaitAny` and `DkThreadDelayExecution`, are cut
//! short by the host while it freezes and are carried as a call to make
//! again ([`moat_checkpoint::Restart`]) with the time that was left;
//! every other call completes first (a stream read that waits for data
//! holds the freeze up until data comes or the freeze gives up).
//!
//! Templates: armed ([`Checkpointer::arm_template`]), the layer takes a
//! checkpoint of the picoprocess at its first `DkStreamOpen`, before the
//! open is made: the thread is carried as making that open, and the
//! picoprocess goes on (the open made now). What a template holds is
//! what the picoprocess built before it opened anything but its console:
//! its image, its memory, its threads. Each start from it opens again,
//! under the grants of that start (a driver's fresh section, say).
//!
//! The layer is innermost in the stack (`names` puts it there), so the
//! URIs it records are the ones the PAL opened (after any `remap`).
use crate::GuestAccess;
use moat_checkpoint::Restart;
use moat_pal::layer::Layer;
use moat_pal::{nr, Error, Pal};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// What the host does for the layer while it freezes the picoprocess.
pub trait FreezeHost: Sync {
    /// A freeze is under way: threads stop at their next guest boundary.
    fn freezing(&self) -> bool;
    /// Stop the calling thread as it returns to guest code (it is leaving
    /// its outermost call); with `restart`, carry it as making that call
    /// again.
    fn stop_on_return(&self, restart: Option<Restart>);
    /// Take the template now: the freeze has begun when this returns
    /// true (the calling thread is then carried by `stop_on_return` as it
    /// leaves the call). False: no template is wanted after all.
    fn take_template(&self) -> bool {
        false
    }
    /// Whether the calling thread can be carried as making its call again
    /// (a registered guest thread, outside an exception upcall).
    fn can_carry(&self) -> bool {
        false
    }
}

/// What a handle was made as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Made {
    Stream {
        uri: String,
        access: u32,
        options: u32,
    },
    NotificationEvent,
    SynchronizationEvent,
    Semaphore {
        max: u32,
    },
    Thread,
    Process,
    /// A device stream's interrupt event (DkStreamGetEvent).
    DeviceEvent,
}

/// The checkpoint layer.
pub struct Checkpointer {
    inner: &'static dyn Pal,
    mem: &'static dyn GuestAccess,
    host: &'static dyn FreezeHost,
    /// Live handles: what each was made as, and its references.
    held: Mutex<HashMap<u64, (Made, u32)>>,
    /// DkAbortEventRegister's events, latest last (0 clears).
    abort: Mutex<Vec<u64>>,
    /// The first stream open takes a template.
    template: AtomicBool,
}

thread_local! {
    /// Calls this thread is inside (an exception upcall inside a call
    /// makes calls of its own).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// This thread's stream open was not made: the template is being
    /// taken, and the thread is carried as making it.
    static TEMPLATE_CUT: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is inside a call of a picoprocess that has
/// a checkpoint layer (for the host's freeze signal handler: reading a
/// thread-local cell is safe there).
pub fn in_call() -> bool {
    DEPTH.with(|d| d.get() > 0)
}

/// When a call that may be made again began.
#[derive(Clone, Copy, Default)]
pub struct Began(Option<Instant>);

/// The largest string the layer copies in for its records (longer URIs
/// are refused by the PAL anyway).
const MAX_URI: u64 = 4096;

impl Checkpointer {
    pub fn new(
        inner: &'static dyn Pal,
        mem: &'static dyn GuestAccess,
        host: &'static dyn FreezeHost,
    ) -> Checkpointer {
        Checkpointer {
            inner,
            mem,
            host,
            held: Mutex::new(HashMap::new()),
            abort: Mutex::new(Vec::new()),
            template: AtomicBool::new(false),
        }
    }

    /// Take a template at the picoprocess's first `DkStreamOpen` (before
    /// any guest code runs, so that no open comes first).
    pub fn arm_template(&self) {
        self.template.store(true, Ordering::Release);
    }

    /// What handle `h` was made as, and its references, if it is live.
    pub fn held(&self, h: u64) -> Option<(Made, u32)> {
        self.held.lock().unwrap().get(&h).cloned()
    }

    /// Every live handle the layer knows.
    pub fn handles(&self) -> Vec<(u64, Made, u32)> {
        let mut v: Vec<_> = self
            .held
            .lock()
            .unwrap()
            .iter()
            .map(|(h, (m, r))| (*h, m.clone(), *r))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    /// The abort events registered, oldest first (the last one is in
    /// force unless it is 0).
    pub fn abort_events(&self) -> Vec<u64> {
        self.abort.lock().unwrap().clone()
    }

    /// A restore made handle `h` again: what it was made as.
    pub fn restored(&self, h: u64, m: Made, refs: u32) {
        self.held.lock().unwrap().insert(h, (m, refs));
    }

    /// A restore registered `e` as the abort event again.
    pub fn restored_abort(&self, e: u64) {
        self.abort.lock().unwrap().push(e);
    }

    /// Whether the URI at `uri` names the console (opened lazily by a
    /// runtime, carried as the restoring run's: no reason for a template
    /// to wait).
    fn console(&self, uri: u64, len: u64) -> bool {
        let Ok(b) = self.mem.copy_in(uri, len.min(7)) else {
            return false;
        };
        [&b"stdin:"[..], b"stdout:", b"stderr:"]
            .iter()
            .any(|c| b.starts_with(c))
    }

    fn out_handle(&self, at: u64) -> Option<u64> {
        let b = self.mem.copy_in(at, 8).ok()?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn add(&self, h: Option<u64>, m: Made) {
        if let Some(h) = h {
            self.held.lock().unwrap().insert(h, (m, 1));
        }
    }

    /// Record what a successful call made or closed.
    fn track(&self, n: u32, a: &[u64; 6]) {
        match n {
            nr::DK_STREAM_OPEN => {
                let uri = (a[1] <= MAX_URI)
                    .then(|| self.mem.copy_in(a[0], a[1]).ok())
                    .flatten()
                    .and_then(|b| String::from_utf8(b).ok());
                if let Some(uri) = uri {
                    let m = Made::Stream {
                        uri,
                        access: a[2] as u32,
                        options: a[4] as u32,
                    };
                    self.add(self.out_handle(a[5]), m);
                }
            }
            nr::DK_NOTIFICATION_EVENT_CREATE => {
                self.add(self.out_handle(a[1]), Made::NotificationEvent)
            }
            nr::DK_SYNCHRONIZATION_EVENT_CREATE => {
                self.add(self.out_handle(a[1]), Made::SynchronizationEvent)
            }
            nr::DK_SEMAPHORE_CREATE => {
                self.add(self.out_handle(a[2]), Made::Semaphore { max: a[1] as u32 })
            }
            nr::DK_THREAD_CREATE => self.add(self.out_handle(a[2]), Made::Thread),
            nr::DK_PROCESS_CREATE => self.add(self.out_handle(a[4]), Made::Process),
            nr::DK_STREAM_GET_EVENT => self.add(self.out_handle(a[1]), Made::DeviceEvent),
            nr::DK_OBJECT_REFERENCE => {
                if let Some(e) = self.held.lock().unwrap().get_mut(&a[0]) {
                    e.1 = e.1.saturating_add(1);
                }
            }
            nr::DK_OBJECT_CLOSE => {
                let mut held = self.held.lock().unwrap();
                if let Some(e) = held.get_mut(&a[0]) {
                    e.1 -= 1;
                    if e.1 == 0 {
                        held.remove(&a[0]);
                    }
                }
            }
            nr::DK_ABORT_EVENT_REGISTER => {
                let mut ab = self.abort.lock().unwrap();
                ab.retain(|&e| e != a[0]);
                ab.push(a[0]);
            }
            _ => {}
        }
    }
}

/// The result a host gives a wait or a delay it cut short for a freeze.
const CUT: i64 = Error::TimedOut.code();

impl Layer for Checkpointer {
    type Token = Began;

    fn inner(&self) -> &dyn Pal {
        self.inner
    }

    fn enter(&self, n: u32, _args: &[u64; 6]) -> Began {
        DEPTH.with(|d| d.set(d.get() + 1));
        match n {
            nr::DK_OBJECTS_WAIT_ANY | nr::DK_THREAD_DELAY_EXECUTION => Began(Some(Instant::now())),
            _ => Began(None),
        }
    }

    fn leave(&self, n: u32, a: &[u64; 6], result: i64, began: Began) {
        if result >= 0 {
            self.track(n, a);
        }
        let depth = DEPTH.with(|d| {
            let v = d.get().saturating_sub(1);
            d.set(v);
            v
        });
        let template = TEMPLATE_CUT.with(|c| c.replace(false));
        if depth > 0 || !self.host.freezing() {
            return;
        }
        if template && n == nr::DK_STREAM_OPEN {
            return self.host.stop_on_return(Some(Restart { nr: n, args: *a }));
        }
        // A wait or delay that ended before its time while freezing was
        // cut short: carried as the same call with the time left.
        let restart = began.0.and_then(|t0| {
            let spent = t0.elapsed().as_micros() as u64;
            match n {
                nr::DK_OBJECTS_WAIT_ANY if result == CUT => {
                    let timeout = a[2] as i64;
                    let left = if timeout < 0 {
                        Some(timeout)
                    } else {
                        (timeout as u64)
                            .checked_sub(spent)
                            .filter(|&l| l > 0)
                            .map(|l| l as i64)
                    };
                    left.map(|l| Restart {
                        nr: n,
                        args: [a[0], a[1], l as u64, 0, 0, 0],
                    })
                }
                nr::DK_THREAD_DELAY_EXECUTION if result == 0 => {
                    a[0].checked_sub(spent).filter(|&l| l > 0).map(|l| Restart {
                        nr: n,
                        args: [l, 0, 0, 0, 0, 0],
                    })
                }
                _ => None,
            }
        });
        self.host.stop_on_return(restart);
    }

    fn dk_stream_open(
        &self,
        uri: *const u8,
        uri_len: u64,
        access: u32,
        create: u32,
        options: u32,
        stream: *mut u64,
    ) -> i64 {
        // The outermost call only (an open inside an exception upcall is
        // no place to carry a thread at).
        if DEPTH.with(|d| d.get()) == 1
            && self.template.load(Ordering::Acquire)
            && !self.console(uri as u64, uri_len)
        {
            if self.host.freezing() && self.host.can_carry() {
                // A checkpoint under way: this open is carried as made
                // again, and the template waits for it after the thaw.
                TEMPLATE_CUT.with(|c| c.set(true));
                return CUT;
            }
            if self.template.swap(false, Ordering::AcqRel) {
                if self.host.take_template() {
                    TEMPLATE_CUT.with(|c| c.set(true));
                    return CUT;
                }
                // Declined here (an upcall, say): the next open tries.
                self.template.store(true, Ordering::Release);
            }
        }
        self.inner
            .dk_stream_open(uri, uri_len, access, create, options, stream)
    }

    fn dk_thread_exit(&self, code: i32) -> ! {
        DEPTH.with(|d| d.set(0));
        self.inner.dk_thread_exit(code)
    }

    fn dk_process_exit(&self, code: i32) -> ! {
        DEPTH.with(|d| d.set(0));
        self.inner.dk_process_exit(code)
    }
}
