//! A mediated block device: clients read, write and flush through
//! [`MediatedBlock`]; a driver picoprocess serves them over shared-memory
//! rings (`moat_service_proto::ring`); the mediator in between checks every
//! answer against the block contract and survives the driver.
//!
//! **The path of a request.** A client's call puts its request into the
//! submission ring itself (a write's bytes copied into the request's
//! buffer) and, if the driver said it sleeps, rings its doorbell. Then the
//! client polls the completion ring for up to [`Config::spin`]: it takes
//! every answer there, checks each against the contract, marks its request
//! done, and returns as soon as its own is (a read's bytes copied once from
//! the buffer into the client's). Only one client polls at a time; the
//! others, and a poller whose spin ran out, sleep until the one that takes
//! their answer wakes them. When nobody polls, the mediator's idle flag
//! asks the driver to ring, and the supervisor thread takes the answers.
//! So a busy pair rings no doorbell, and no request is handed between
//! threads on its way (`core.rs`, `supervisor.rs`).
//!
//! **Depth.** Up to [`Config::max_in_flight`] requests are in flight at
//! once (the ring and the buffer pool are that deep), from any number of
//! threads, and one thread can keep many in flight with the split form:
//! [`MediatedBlock::submit_read`] / [`submit_write`](MediatedBlock::submit_write)
//! return a [`Ticket`], [`MediatedBlock::wait_read`] / [`wait`](MediatedBlock::wait)
//! collect it, and [`MediatedBlock::wait_any`] waits for whichever of many
//! tickets completes first (the thread that calls it polls and sleeps as
//! a waiting client does).
//!
//! **Recovery.** When the driver crashes, breaks the contract (a wrong id,
//! length, status or buffer, a broken ring index, a malformed descriptor)
//! or misses a deadline, the mediator kills it, starts a new incarnation
//! on a new section (nothing in a dead driver's memory is read again),
//! checks its geometry, and re-issues every request that was in flight,
//! same ids, so each client request completes exactly once. After
//! [`Config::max_failed_restarts`] restarts in a row without a single
//! completed request, the circuit opens: pending and new requests fail
//! with an error saying so, until [`Config::retry_after`] has passed.
//!
//! The files: `core.rs` (the state behind the lock: submit, take and check,
//! collect, re-issue), `supervisor.rs` (deadlines, doorbell, restarts,
//! shutdown), `link.rs` (one incarnation: process, section, handshake),
//! `region.rs` (the mapped section and the doorbells).

mod core;
pub(crate) mod link;
mod parts;
pub(crate) mod region;
pub(crate) mod standby;
mod supervisor;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moat_monitor::Host;
use moat_policy::Policy;
use moat_service_proto::op;
use moat_service_proto::ring::{Layout, MAX_DEPTH, MAX_SPIN_NS, PAGE};

use self::core::Core;
use self::region::Bell;
use crate::contract::{BlockContract, ContractLimits, Geometry};

/// How long a client polls with pause instructions only; after that it
/// yields the core between looks (see [`Config::spin`]).
const YIELD_AFTER: Duration = Duration::from_micros(5);

/// The shared section a block driver serves on (`shm:moat-blk`).
pub const SECTION: &str = "moat-blk";

/// How to start the driver picoprocess.
#[derive(Debug, Clone)]
pub struct DriverSpec {
    pub image: PathBuf,
    /// The driver's arguments, naming the section [`SECTION`] where the
    /// driver expects it.
    pub args: Vec<String>,
    pub host: Host,
    /// Grants and devices of the driver (the section is added).
    pub policy: Policy,
    /// Driver faults to inject: incarnation `n` gets
    /// `SEED+n:PER_MILLION:KINDS` as its last argument.
    pub faults: Option<FaultPlan>,
    /// Where the driver's console goes (default: nowhere).
    pub console: bool,
    /// Descriptors handed to the driver's devices, by device name (see
    /// `moat_monitor::Sandbox::device_file`): a NIC's wire, a UART's line.
    /// Each incarnation gets its own copy; these outlive them all.
    pub files: Vec<(String, Arc<std::fs::File>)>,
}

/// Seeded driver faults (see `moat_libos::service::Faults`).
#[derive(Debug, Clone)]
pub struct FaultPlan {
    pub seed: u64,
    pub per_million: u32,
    pub kinds: String,
}

/// Mediator settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// A request not answered within this ends the driver.
    pub deadline: Duration,
    /// A new driver must report its geometry within this (starting a
    /// picoprocess takes longer than answering a request).
    pub start_timeout: Duration,
    /// Bytes per request to the driver (client requests are split): the
    /// size of each buffer in the section, rounded up to 4 KiB.
    pub max_io: u32,
    /// Requests in flight at once: the depth of the rings and the number
    /// of buffers, rounded up to a power of two (at most 1024).
    pub max_in_flight: usize,
    /// Restarts in a row, with no request completed in between, before
    /// the circuit opens.
    pub max_failed_restarts: u32,
    /// How long an open circuit fails requests before trying again.
    pub retry_after: Duration,
    /// Serve reads only: every write fails with `EROFS` before it reaches
    /// a driver.
    pub read_only: bool,
    /// How long each side polls for the other before it sleeps on its
    /// doorbell: a client for its answer, the driver for requests (at most
    /// 10 ms). Polling costs a core while it lasts; on a machine with
    /// cores to spare a longer spin keeps a busy pair from ever ringing,
    /// on a loaded one a shorter spin gives the core back sooner. 0 never
    /// polls (every request then costs two doorbells).
    pub spin: Duration,
    /// Start drivers after the first from a template (a checkpoint of the
    /// first incarnation taken at its first stream open, before it opened
    /// its file, device or section; see `moat_monitor::Sandbox::template`)
    /// instead of booting the image again. Off with fault injection: each
    /// incarnation's faults are its arguments, and a template would repeat
    /// the first one's. A template that cannot be taken or started is
    /// given up for good (`Counters::template`), and drivers boot.
    pub templates: bool,
    /// With a template, keep the next driver restored and past its
    /// handshake before it is needed (on its own section; a second driver
    /// process, idle, sleeping on its doorbell): a crash then switches to
    /// it without starting a process.
    pub standby: bool,
}

impl Default for Config {
    /// 2 s deadlines, 128 KiB requests, 128 in flight (a 16 MiB section),
    /// 50 µs of polling.
    fn default() -> Config {
        Config {
            deadline: Duration::from_secs(2),
            start_timeout: Duration::from_secs(2),
            max_io: 128 << 10,
            max_in_flight: 128,
            max_failed_restarts: 5,
            retry_after: Duration::from_secs(1),
            read_only: false,
            spin: Duration::from_micros(50),
            templates: true,
            standby: true,
        }
    }
}

/// What the mediator has seen.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Client requests received (after splitting into requests of at most
    /// [`Config::max_io`] bytes). Once the device is shut down, every one
    /// of them is either `completed` or `failed`.
    pub submitted: u64,
    /// Requests sent to drivers (re-issues included).
    pub requests: u64,
    /// Client requests completed (once each).
    pub completed: u64,
    /// Client requests failed with an error.
    pub failed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Violations by kind (including `crash` and `deadline`).
    pub violations: BTreeMap<&'static str, u64>,
    /// Drivers started after the first.
    pub restarts: u64,
    /// Requests re-issued to a new driver.
    pub reissued: u64,
    /// Time from detecting a fault to a new driver ready, per recovery.
    /// (The last [`crate::block::MAX_RECOVERIES`] at most.)
    pub recovery: Vec<Duration>,
    /// Times the circuit opened.
    pub circuit_opened: u64,
    /// Why the last driver start failed, if one did.
    pub last_start_failure: Option<String>,
    /// Driver starts that failed (did not come up, or no geometry).
    pub failed_starts: u64,
    /// Completions the contract let through for a request already
    /// answered to its client (must stay 0).
    pub duplicate_completions: u64,
    /// Times the mediator rang the driver's doorbell (the driver slept).
    pub kicks: u64,
    /// Times the driver rang the mediator's (nobody polled).
    pub bells: u64,
    /// The most requests in flight to a driver at once.
    pub peak_in_flight: usize,
    /// Drivers started from the template (switches to a standby
    /// included).
    pub from_template: u64,
    /// Restarts that switched to a standby driver.
    pub from_standby: u64,
    /// Why there is no template, if one was wanted and given up.
    pub template: Option<String>,
    /// What the drivers' VMMs counted (kvm only): VM exits by reason and
    /// the work of the virtio-blk I/O threads, summed over incarnations (a
    /// given-up incarnation's as it stood when it was given up).
    pub vm: Option<moat_monitor::VmStats>,
}

impl Counters {
    /// A recovery-time percentile (0.0 to 1.0), if any recovery happened.
    pub fn recovery_percentile(&self, p: f64) -> Option<Duration> {
        if self.recovery.is_empty() {
            return None;
        }
        let mut v = self.recovery.clone();
        v.sort();
        let i = ((v.len() - 1) as f64 * p).round() as usize;
        Some(v[i])
    }

    pub fn faults(&self) -> u64 {
        self.violations.values().sum()
    }
}

fn io_err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// Locks the engine state; a client thread that panicked while holding it
/// left it consistent (no method panics between two related updates), so
/// the poison is ignored.
/// Recovery times kept at most: a driver that fails forever (and moves
/// something each time) does not grow the counters without bound.
pub const MAX_RECOVERIES: usize = 4096;

/// Records a recovery time, keeping the last [`MAX_RECOVERIES`].
pub(crate) fn record_recovery(v: &mut Vec<Duration>, d: Duration) {
    if v.len() >= MAX_RECOVERIES {
        v.drain(..MAX_RECOVERIES / 2);
    }
    v.push(d);
}

fn lock(m: &Mutex<Core>) -> MutexGuard<'_, Core> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the clients, their tickets and the supervisor share.
pub(crate) struct Inner {
    core: Mutex<Core>,
    /// Wakes the supervisor.
    control: Arc<Bell>,
    config: Config,
    spec: DriverSpec,
    layout: Layout,
    /// The driver's template (see [`Config::templates`]).
    template: Mutex<link::Template>,
    /// The next driver, ready (see [`Config::standby`]).
    standby: Mutex<standby::Slot>,
}

/// Owns the supervisor: the last clone of a [`MediatedBlock`] to go shuts
/// the device down.
struct Device {
    inner: Arc<Inner>,
    geometry: Geometry,
    supervisor: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Device {
    fn drop(&mut self) {
        shutdown(&self.inner, &self.supervisor);
    }
}

fn shutdown(inner: &Inner, supervisor: &Mutex<Option<std::thread::JoinHandle<()>>>) {
    {
        let mut c = lock(&inner.core);
        if !c.closing {
            c.closing = true;
            c.fail_queued("the mediator is shutting down");
        }
    }
    inner.control.ring();
    let t = supervisor.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = t {
        let _ = t.join();
    }
}

/// A block device served by a driver picoprocess through the mediator.
/// Cheap to clone; every clone is the same device, shut down when the last
/// one is dropped (or by [`MediatedBlock::shutdown`]).
#[derive(Clone)]
pub struct MediatedBlock {
    dev: Arc<Device>,
}

/// Requests submitted together (one client request, split into parts of
/// at most `max_io` bytes), to be collected with [`MediatedBlock::wait`]
/// or [`MediatedBlock::wait_read`]. Dropping it uncollected abandons it:
/// it still completes, and its result is thrown away.
pub struct Ticket {
    inner: Arc<Inner>,
    /// (part key, byte offset within the client request, length).
    parts: Vec<(u64, usize, u32)>,
    /// The bytes the whole request covers.
    len: usize,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.parts.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut c = lock(&self.inner.core);
        for (key, _, _) in self.parts.drain(..) {
            c.abandon(key, now);
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("parts", &self.parts.len())
            .field("len", &self.len)
            .finish()
    }
}

impl MediatedBlock {
    /// Start the driver, check its geometry, and serve.
    pub fn start(mut spec: DriverSpec, config: Config) -> io::Result<MediatedBlock> {
        let depth = (config.max_in_flight.clamp(1, MAX_DEPTH as usize) as u32).next_power_of_two();
        let buf_size = (config.max_io.clamp(1, moat_service_proto::MAX_PAYLOAD) as usize)
            .next_multiple_of(PAGE) as u32;
        let spin_ns = (config.spin.as_nanos() as u64).min(MAX_SPIN_NS);
        let layout = Layout::new(depth, buf_size, spin_ns)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        let limits = ContractLimits {
            max_io: config.max_io,
            deadline: config.deadline,
            max_in_flight: depth as usize,
        };
        spec.policy
            .allow(&format!("shm:{SECTION}"), moat_policy::Access::Rw)
            .map_err(|e| io_err(e.to_string()))?;
        let control = Arc::new(Bell::new()?);
        let inner = Arc::new(Inner {
            core: Mutex::new(Core::new(
                config.clone(),
                BlockContract::new(limits),
                control.clone(),
            )),
            control,
            // Faults are each incarnation's arguments: a template would
            // repeat the first one's.
            template: Mutex::new(if config.templates && spec.faults.is_none() {
                link::Template::Wanted(0)
            } else {
                link::Template::Off(None)
            }),
            standby: Mutex::new(standby::Slot::default()),
            config,
            spec,
            layout,
        });
        // The first start is retried like a restart: a driver that fails
        // its handshake gets the same number of chances.
        let mut tries = 0;
        let link = loop {
            match supervisor::start_incarnation(&inner) {
                Ok(l) => break l,
                Err(e) => {
                    tries += 1;
                    if tries > inner.config.max_failed_restarts {
                        return Err(e);
                    }
                }
            }
        };
        let geometry = {
            let mut c = lock(&inner.core);
            c.install(link, Instant::now());
            c.contract
                .geometry()
                .ok_or_else(|| io_err("no geometry after the handshake"))?
        };
        standby::replenish(&inner, standby::template_of(&inner));
        let for_thread = inner.clone();
        let thread = std::thread::Builder::new()
            .name("moat-mediator".into())
            .spawn(move || supervisor::run(for_thread))?;
        Ok(MediatedBlock {
            dev: Arc::new(Device {
                inner,
                geometry,
                supervisor: Mutex::new(Some(thread)),
            }),
        })
    }

    pub fn capacity(&self) -> u64 {
        self.dev.geometry.capacity
    }

    pub fn block_size(&self) -> u32 {
        self.dev.geometry.block_size
    }

    /// Whether writes are refused ([`Config::read_only`]).
    pub fn is_read_only(&self) -> bool {
        self.dev.inner.config.read_only
    }

    /// The most bytes one request to the driver carries.
    pub fn max_io(&self) -> u32 {
        self.dev.inner.config.max_io
    }

    /// The most requests to the driver in flight at once (the depth of
    /// the rings: [`Config::max_in_flight`], rounded up).
    pub fn max_in_flight(&self) -> usize {
        self.dev.inner.layout.depth as usize
    }

    pub fn counters(&self) -> Counters {
        lock(&self.dev.inner.core).counters()
    }

    /// Kill the current driver picoprocess (fault injection from
    /// outside: the mediator notices, as for any crash).
    pub fn kill_driver(&self) {
        let c = lock(&self.dev.inner.core);
        if let Some(l) = &c.link {
            l.proc.killer().kill();
        }
    }

    /// Checks a client range against the geometry.
    fn check_range(&self, offset: u64, len: usize) -> Result<(), String> {
        let g = self.dev.geometry;
        let bs = u64::from(g.block_size);
        if len == 0 {
            return Err("the request covers no bytes".into());
        }
        if !offset.is_multiple_of(bs) || !(len as u64).is_multiple_of(bs) {
            return Err(format!(
                "offset {offset} and length {len} must both be multiples of the block size {bs}"
            ));
        }
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > g.capacity)
        {
            return Err(format!(
                "{len} bytes at offset {offset} go past the end of the device ({} bytes)",
                g.capacity
            ));
        }
        Ok(())
    }

    /// Refuses a client request before it is split: counted submitted
    /// and failed.
    fn refuse(&self, kind: io::ErrorKind, why: String) -> io::Error {
        let mut c = lock(&self.dev.inner.core);
        c.counters.submitted += 1;
        c.counters.failed += 1;
        io::Error::new(kind, why)
    }

    fn submit(&self, op: u8, offset: u64, len: usize, data: Option<Arc<[u8]>>) -> Ticket {
        let inner = &self.dev.inner;
        let max = inner.config.max_io as usize;
        let now = Instant::now();
        let mut parts = Vec::with_capacity(len.div_ceil(max).max(1));
        let mut c = lock(&inner.core);
        let mut at = 0;
        loop {
            let n = (len - at).min(max);
            let d = data.as_ref().map(|d| (d.clone(), at));
            let key = c.submit(op, offset + at as u64, n as u32, d, now);
            parts.push((key, at, n as u32));
            at += n;
            if at >= len {
                break;
            }
        }
        Ticket {
            inner: inner.clone(),
            parts,
            len,
        }
    }

    /// Starts reading `len` bytes at `offset` (both multiples of the block
    /// size); collect them with [`MediatedBlock::wait_read`].
    pub fn submit_read(&self, offset: u64, len: usize) -> io::Result<Ticket> {
        if let Err(why) = self.check_range(offset, len) {
            return Err(self.refuse(io::ErrorKind::InvalidInput, why));
        }
        Ok(self.submit(op::READ, offset, len, None))
    }

    /// Starts writing `data` at `offset` (both multiples of the block
    /// size); the bytes are copied now. Collect with [`MediatedBlock::wait`].
    pub fn submit_write(&self, offset: u64, data: &[u8]) -> io::Result<Ticket> {
        if self.is_read_only() {
            return Err(self.refuse(
                io::ErrorKind::ReadOnlyFilesystem,
                "the device is served read-only".into(),
            ));
        }
        if let Err(why) = self.check_range(offset, data.len()) {
            return Err(self.refuse(io::ErrorKind::InvalidInput, why));
        }
        Ok(self.submit(op::WRITE, offset, data.len(), Some(Arc::from(data))))
    }

    /// Starts a flush (every write completed before it is made durable).
    pub fn submit_flush(&self) -> io::Result<Ticket> {
        Ok(self.submit(op::FLUSH, 0, 0, None))
    }

    /// Whether every part of `t` is done (then a wait returns at once);
    /// takes what the driver has answered first.
    pub fn is_done(&self, t: &Ticket) -> bool {
        let mut c = lock(&self.dev.inner.core);
        c.reap(Instant::now());
        t.parts.iter().all(|(k, _, _)| c.is_done(*k))
    }

    /// Waits for a write or a flush (or a read whose bytes are not
    /// wanted).
    pub fn wait(&self, t: Ticket) -> io::Result<()> {
        self.collect(t, None)
    }

    /// Waits for a read and copies its bytes into `buf` (as long as the
    /// request).
    pub fn wait_read(&self, t: Ticket, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() != t.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a buffer of {} bytes for a read of {}", buf.len(), t.len),
            ));
        }
        self.collect(t, Some(buf))
    }

    fn collect(&self, mut t: Ticket, mut buf: Option<&mut [u8]>) -> io::Result<()> {
        let parts = std::mem::take(&mut t.parts);
        let mut result = Ok(());
        let mut rest = parts.into_iter();
        for (key, at, n) in rest.by_ref() {
            let out = buf.as_deref_mut().map(|b| &mut b[at..at + n as usize]);
            if let Err(e) = self.wait_part(key, out) {
                result = Err(e);
                break;
            }
        }
        // After a failed part the rest are abandoned (the ticket's drop).
        t.parts = rest.collect();
        result
    }

    /// Waits for one part: polls the completion ring for up to
    /// [`Config::spin`] if no other client does, else (and then) sleeps
    /// until whoever takes the answer wakes it.
    fn wait_part(&self, key: u64, mut out: Option<&mut [u8]>) -> io::Result<()> {
        let inner = &*self.dev.inner;
        let spin = inner.config.spin;
        let mut polling: Option<Instant> = None;
        let mut parked = false;
        loop {
            let now = Instant::now();
            let mut c = lock(&inner.core);
            if parked {
                c.sleepers -= 1;
                parked = false;
            }
            if polling.is_some() && !c.poller {
                // The role was taken away (the driver was given up on).
                polling = None;
            }
            if let Some(r) = c.collect(key, out.as_deref_mut()) {
                if polling.is_some() {
                    c.end_poll(now);
                }
                return r;
            }
            if c.link.is_some() && !spin.is_zero() && (polling.is_some() || !c.poller) {
                let since = *polling.get_or_insert_with(|| {
                    c.poller = true;
                    if let Some(l) = c.link.as_ref() {
                        l.ring.awake();
                    }
                    now
                });
                c.reap(now);
                if c.is_done(key) {
                    continue;
                }
                let polled = now.duration_since(since);
                if c.poller && polled < spin {
                    drop(c);
                    if polled < YIELD_AFTER {
                        for _ in 0..8 {
                            std::hint::spin_loop();
                        }
                    } else {
                        // Polling this long: the driver may be waiting for
                        // this very core (a busy machine); let it run.
                        std::thread::yield_now();
                    }
                    continue;
                }
                c.poller = false;
                polling = None;
            }
            // Sleep; whoever takes the answer wakes this thread, and if
            // nobody polls the driver is asked to ring.
            c.sleepers += 1;
            parked = true;
            if !c.poller {
                c.make_idle(now);
            }
            if c.is_done(key) {
                continue;
            }
            c.set_waiter(key, std::thread::current());
            drop(c);
            std::thread::park_timeout(inner.config.deadline.max(Duration::from_millis(10)));
        }
    }

    /// Waits until at least one of `tickets` is done, and pushes the index
    /// of every done one onto `done`: for a thread that keeps many requests
    /// in flight and collects them as they complete (the FUSE export's
    /// completion thread). It waits as a client does: it polls the
    /// completion ring for up to [`Config::spin`] if no other client does,
    /// then sleeps until whoever takes the answer of one of `tickets`
    /// wakes it.
    ///
    /// `interrupt` is asked between looks whether to return early, with
    /// nothing done (say, because the caller has new tickets to add); it
    /// must be quick and must not use this device. Its argument is true
    /// when the thread is about to sleep: from then on, whoever makes the
    /// answer true must unpark the thread. After one sleep this returns
    /// whatever woke it, so a caller loops.
    pub fn wait_any(
        &self,
        tickets: &[Ticket],
        interrupt: &dyn Fn(bool) -> bool,
        done: &mut Vec<usize>,
    ) {
        let inner = &*self.dev.inner;
        let spin = inner.config.spin;
        let mut polling: Option<Instant> = None;
        let mut parked = false;
        loop {
            let now = Instant::now();
            let mut c = lock(&inner.core);
            if parked {
                c.sleepers -= 1;
            }
            if polling.is_some() && !c.poller {
                // The role was taken away (the driver was given up on).
                polling = None;
            }
            if polling.is_some() {
                c.reap(now);
            }
            let before = done.len();
            done_tickets(&c, tickets, done);
            if done.len() > before || parked || interrupt(false) {
                if polling.is_some() {
                    c.end_poll(now);
                }
                return;
            }
            if c.link.is_some() && !spin.is_zero() && (polling.is_some() || !c.poller) {
                let since = *polling.get_or_insert_with(|| {
                    c.poller = true;
                    if let Some(l) = c.link.as_ref() {
                        l.ring.awake();
                    }
                    now
                });
                let polled = now.duration_since(since);
                if polled.is_zero() {
                    // Just became the poller: look at once.
                    continue;
                }
                if c.poller && polled < spin {
                    drop(c);
                    if polled < YIELD_AFTER {
                        for _ in 0..8 {
                            std::hint::spin_loop();
                        }
                    } else {
                        std::thread::yield_now();
                    }
                    continue;
                }
                c.poller = false;
                polling = None;
            }
            // Sleep until the answer of one of them is taken (whoever takes
            // it wakes this thread); if nobody polls, the driver is asked
            // to ring.
            c.sleepers += 1;
            parked = true;
            if !c.poller {
                c.make_idle(now);
            }
            done_tickets(&c, tickets, done);
            if done.len() > before {
                continue;
            }
            let me = std::thread::current();
            for t in tickets {
                for &(key, _, _) in &t.parts {
                    if !c.is_done(key) {
                        c.set_waiter(key, me.clone());
                    }
                }
            }
            drop(c);
            if interrupt(true) {
                continue;
            }
            std::thread::park_timeout(inner.config.deadline.max(Duration::from_millis(10)));
        }
    }

    /// Read `buf.len()` bytes at `offset` (both multiples of the block
    /// size); a request over `max_io` goes to the driver as parts, all in
    /// flight at once.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let t = self.submit_read(offset, buf.len())?;
        self.wait_read(t, buf)
    }

    /// Write `data` at `offset` (both multiples of the block size).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let t = self.submit_write(offset, data)?;
        self.wait(t)
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        let t = self.submit_flush()?;
        self.wait(t)
    }

    /// Stop: requests in flight are finished (given up to the deadline),
    /// requests not yet sent fail, the driver is ended. Returns once all of
    /// that is done; later calls return at once. Bounded: the deadline plus
    /// ending the driver.
    pub fn shutdown(&self) {
        shutdown(&self.dev.inner, &self.dev.supervisor);
    }
}

/// Pushes the index of every ticket whose parts are all done.
fn done_tickets(c: &Core, tickets: &[Ticket], done: &mut Vec<usize>) {
    for (i, t) in tickets.iter().enumerate() {
        if t.parts.iter().all(|&(key, _, _)| c.is_done(key)) {
            done.push(i);
        }
    }
}
