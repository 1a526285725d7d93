//! A mediated serial line: bytes between a client and a UART driver
//! picoprocess, through the char contract
//! ([`crate::contract::CharContract`]) over the same rings and sections as
//! block. A crashing, stalling or lying driver is replaced by a new one on
//! a fresh section, after the new one answered INFO.
//!
//! What the client can count on across a driver's replacement:
//!
//! - **Writes are kept until acknowledged.** The bytes the client writes
//!   stay with the mediator until the driver says it has sent them to the
//!   UART; a write the dead driver had not acknowledged is sent again to
//!   the new one. Delivery toward the UART is at least once: a byte the
//!   old driver sent just before it died, unacknowledged, is sent twice
//!   ([`SerialCounters::reissued`] counts the bytes sent again, an upper
//!   bound on the duplicates).
//! - **Bytes come back in order.** Reads are lent to the driver in order,
//!   answered in order, and lent again under the same ids to a new driver.
//! - **What the driver took and had not delivered is lost.** Bytes the
//!   driver had taken out of the UART and not yet handed over when it
//!   died are gone, as an overrun loses them on a real line, and so are
//!   those in the UART's receive FIFO (the device dies with the driver's
//!   VMM). The driver bounds this: it takes bytes from the UART only into
//!   a read buffer the mediator has lent it, and answers as soon as it has
//!   drained what was ready. Bytes nobody has asked for stay on the line's
//!   far side.
//!
//! A read has no deadline (a serial line may be silent forever); a write
//! does. The mediator lends reads only while the client's queue has room
//! for what they could bring, so a client that stops reading holds the
//! line back: the UART's FIFO fills, then the line's far end, which drops
//! what it cannot deliver (the VMM never blocks on a line).
//!
//! One pump thread does the work, as for a NIC (`crate::net`): it takes
//! the driver's answers, checks each with the contract, hands bytes read
//! to the client's queue, lends reads, issues queued bytes as writes,
//! watches deadlines and the driver's exit, and restarts the driver.
//! Clients only queue bytes and take received ones
//! ([`MediatedSerial::write`], [`MediatedSerial::read`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moat_service_proto::ring::Layout;
use moat_service_proto::{op, status, Response};

use crate::block::link::{end, Link, Template};
use crate::block::region::{wait_readable, Bell};
use crate::block::{DriverSpec, SECTION};
use crate::contract::{CharContract, Contract, ContractLimits, Violation};

/// The size of each buffer of the section: the most bytes one write or
/// read request carries.
const BUF: u32 = 4096;

/// Settings of a mediated serial line.
#[derive(Debug, Clone)]
pub struct SerialConfig {
    /// A write not acknowledged within this ends the driver.
    pub deadline: Duration,
    /// A new driver must answer INFO within this.
    pub start_timeout: Duration,
    /// Reads lent to the driver at once.
    pub read_buffers: usize,
    /// The most bytes one read asks for (at most 4096).
    pub read_len: u32,
    /// The most bytes one write carries (at most 4096).
    pub write_len: u32,
    /// Writes in flight at once. A UART sends one byte after another, so
    /// queuing more in the driver gains nothing, and each write's
    /// deadline runs from when it is issued: with `writes_in_flight`
    /// writes of `write_len` bytes the last must be sent within the
    /// deadline even on a busy machine, where a VM exit per byte is slow.
    pub writes_in_flight: usize,
    /// Requests in flight at once (reads included): the ring's depth, a
    /// power of two.
    pub depth: u32,
    /// Bytes received and not yet taken by the client beyond which no
    /// read is lent.
    pub rx_queue: usize,
    /// Bytes waiting to be written beyond which [`MediatedSerial::write`]
    /// waits.
    pub tx_queue: usize,
    /// Restarts in a row without a byte moving before the mediator gives
    /// up (the line then fails every call).
    pub max_failed_restarts: u32,
    /// Restart drivers from a template of the first one (taken at its
    /// first open, its device's; sealed), as block drivers are. Off with
    /// fault injection.
    pub templates: bool,
}

impl Default for SerialConfig {
    fn default() -> SerialConfig {
        SerialConfig {
            deadline: Duration::from_secs(2),
            start_timeout: Duration::from_secs(5),
            read_buffers: 2,
            read_len: 1024,
            write_len: 256,
            writes_in_flight: 2,
            depth: 16,
            rx_queue: 64 << 10,
            tx_queue: 64 << 10,
            max_failed_restarts: 5,
            templates: true,
        }
    }
}

/// How long after a read the driver answered with a failure no read is
/// lent.
const READ_PAUSE: Duration = Duration::from_millis(10);

/// What the mediator has seen of a serial line.
#[derive(Debug, Clone, Default)]
pub struct SerialCounters {
    /// Bytes the client wrote (queued).
    pub written: u64,
    /// Bytes drivers acknowledged as sent to the UART.
    pub sent: u64,
    /// Bytes in writes a driver answered with a failure (not sent again).
    pub write_failed: u64,
    /// Reads a driver answered with a failure (lent again after a pause,
    /// so a driver failing every read cannot keep the pump busy).
    pub read_failed: u64,
    /// Bytes sent again to a new driver because the old one had not
    /// acknowledged them: each may have reached the UART twice.
    pub reissued: u64,
    /// Bytes received and handed to the client's queue.
    pub received: u64,
    /// Violations by kind (and `crash`).
    pub violations: BTreeMap<&'static str, u64>,
    /// Drivers started after the first.
    pub restarts: u64,
    /// Why the last start failed, if one did.
    pub last_start_failure: Option<String>,
    /// From a fault seen to a new driver ready, per restart.
    /// (The last [`crate::block::MAX_RECOVERIES`] at most.)
    pub recovery: Vec<Duration>,
    /// Drivers started from the template.
    pub from_template: u64,
    /// Why there is no template, if one was wanted and given up.
    pub template: Option<String>,
}

struct Core {
    contract: CharContract,
    link: Option<Link>,
    /// The buffer each request in flight owns, by id.
    owners: HashMap<u64, u32>,
    /// The bytes of each write in flight, by id (sent again to a new
    /// driver).
    writes: BTreeMap<u64, Vec<u8>>,
    /// Reads lent to the driver.
    reads_lent: usize,
    tx: VecDeque<u8>,
    rx: VecDeque<u8>,
    counters: SerialCounters,
    /// The line gave up (too many restarts in a row without progress).
    failed: Option<String>,
    /// A byte moved (acknowledged or received) since the last restart.
    progress: bool,
    /// Restarts in a row without a byte moving.
    barren: u32,
    template: Template,
    /// The current driver was killed from outside (`kill_driver`).
    killed: bool,
    generation: u64,
    /// No read is lent before this (a read failed).
    reads_paused: Option<Instant>,
}

struct Inner {
    core: Mutex<Core>,
    /// Shutting down (read without the core lock, which a restart holds).
    closing: AtomicBool,
    /// Wakes the pump (bytes queued, bytes taken, a kill, shutdown).
    wake: Bell,
    /// Wakes clients: bytes received, room to write, writes acknowledged.
    changed: Condvar,
    spec: DriverSpec,
    layout: Layout,
    config: SerialConfig,
}

/// A serial line served by a UART driver picoprocess through the
/// mediator (see the module docs). Cheap to clone; shut down by
/// [`MediatedSerial::shutdown`] or when the last clone goes.
#[derive(Clone)]
pub struct MediatedSerial {
    dev: Arc<Device>,
}

struct Device {
    inner: Arc<Inner>,
    pump: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Device {
    fn drop(&mut self) {
        shutdown(&self.inner, &self.pump);
    }
}

fn lock(m: &Mutex<Core>) -> MutexGuard<'_, Core> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl MediatedSerial {
    /// Starts the driver and its handshake, lends it reads, and starts the
    /// pump. The driver's arguments name the section [`SECTION`].
    pub fn start(mut spec: DriverSpec, config: SerialConfig) -> io::Result<MediatedSerial> {
        let depth = config.depth.clamp(4, 1024).next_power_of_two();
        let mut config = config;
        // Half the ring at most: writes always find room.
        config.read_buffers = config.read_buffers.clamp(1, depth as usize / 2);
        config.read_len = config.read_len.clamp(1, BUF);
        config.write_len = config.write_len.clamp(1, BUF);
        config.tx_queue = config.tx_queue.max(1);
        let layout = Layout::new(depth, BUF, 50_000)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        spec.policy
            .allow(&format!("shm:{SECTION}"), moat_policy::Access::Rw)
            .map_err(|e| io_err(e.to_string()))?;
        let limits = ContractLimits {
            max_io: BUF,
            deadline: config.deadline,
            max_in_flight: depth as usize,
        };
        let inner = Arc::new(Inner {
            core: Mutex::new(Core {
                contract: CharContract::with_handshake(limits),
                link: None,
                owners: HashMap::new(),
                writes: BTreeMap::new(),
                reads_lent: 0,
                tx: VecDeque::new(),
                rx: VecDeque::new(),
                counters: SerialCounters::default(),
                failed: None,
                progress: false,
                barren: 0,
                template: Template::Off(None),
                killed: false,
                reads_paused: None,
                generation: 0,
            }),
            closing: AtomicBool::new(false),
            wake: Bell::new()?,
            changed: Condvar::new(),
            spec,
            layout,
            config,
        });
        {
            let mut c = lock(&inner.core);
            // Faults are each driver's arguments: a template would repeat
            // the first one's.
            if inner.config.templates && inner.spec.faults.is_none() {
                c.template = Template::Wanted(0);
            }
            let mut tries = 0;
            while let Err(e) = start_driver(&inner, &mut c) {
                tries += 1;
                if tries > inner.config.max_failed_restarts {
                    return Err(e);
                }
            }
        }
        let own = inner.clone();
        let pump = std::thread::Builder::new()
            .name("moat-serial".into())
            .spawn(move || crate::pump::run(own))?;
        Ok(MediatedSerial {
            dev: Arc::new(Device {
                inner,
                pump: Mutex::new(Some(pump)),
            }),
        })
    }

    /// Queues bytes to write, waiting while the queue is full; returns how
    /// many were queued (all of `bytes` unless the line failed or is shut
    /// down, which is an error if none were).
    pub fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        let inner = &self.dev.inner;
        let mut c = lock(&inner.core);
        let mut at = 0;
        while at < bytes.len() {
            if let Some(why) = &c.failed {
                return if at > 0 {
                    Ok(at)
                } else {
                    Err(io_err(why.clone()))
                };
            }
            if inner.closing.load(Ordering::SeqCst) {
                return if at > 0 {
                    Ok(at)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the serial line is shut down",
                    ))
                };
            }
            let room = inner.config.tx_queue.saturating_sub(c.tx.len());
            if room == 0 {
                inner.wake.ring();
                c = inner
                    .changed
                    .wait_timeout(c, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            let n = room.min(bytes.len() - at);
            c.tx.extend(&bytes[at..at + n]);
            c.counters.written += n as u64;
            at += n;
            inner.wake.ring();
        }
        Ok(at)
    }

    /// Takes received bytes into `buf`, waiting up to `limit` for at least
    /// one; 0 if none came. Fails once the line has failed and nothing
    /// received is left.
    pub fn read(&self, buf: &mut [u8], limit: Duration) -> io::Result<usize> {
        let inner = &self.dev.inner;
        let until = Instant::now() + limit;
        let mut c = lock(&inner.core);
        loop {
            if !c.rx.is_empty() && !buf.is_empty() {
                let n = buf.len().min(c.rx.len());
                for (d, s) in buf.iter_mut().zip(c.rx.drain(..n)) {
                    *d = s;
                }
                // Room for another read, maybe.
                inner.wake.ring();
                return Ok(n);
            }
            if let Some(why) = &c.failed {
                return Err(io_err(why.clone()));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || buf.is_empty() || inner.closing.load(Ordering::SeqCst) {
                return Ok(0);
            }
            c = inner
                .changed
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits up to `limit` until every byte written so far has been
    /// acknowledged by a driver (or failed); whether it was.
    pub fn flush(&self, limit: Duration) -> bool {
        let inner = &self.dev.inner;
        let until = Instant::now() + limit;
        let mut c = lock(&inner.core);
        loop {
            if c.tx.is_empty() && c.writes.is_empty() {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || c.failed.is_some() || inner.closing.load(Ordering::SeqCst) {
                return false;
            }
            c = inner
                .changed
                .wait_timeout(c, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Kills the current driver (fault injection): it is replaced.
    pub fn kill_driver(&self) {
        let mut c = lock(&self.dev.inner.core);
        if let Some(l) = &c.link {
            l.proc.killer().kill();
            c.killed = true;
        }
    }

    /// Drivers started after the first so far (as in the counters).
    pub fn restarts(&self) -> u64 {
        lock(&self.dev.inner.core).counters.restarts
    }

    pub fn counters(&self) -> SerialCounters {
        lock(&self.dev.inner.core).counters.clone()
    }

    /// Why the line gave up, if it did (its driver failed again and again
    /// without moving a byte): it moves nothing more.
    pub fn failed(&self) -> Option<String> {
        lock(&self.dev.inner.core).failed.clone()
    }

    /// Ends the driver and the pump; bytes not acknowledged are lost.
    pub fn shutdown(&self) {
        shutdown(&self.dev.inner, &self.dev.pump);
    }
}

fn shutdown(inner: &Inner, pump: &Mutex<Option<std::thread::JoinHandle<()>>>) {
    inner.closing.store(true, Ordering::SeqCst);
    inner.wake.ring();
    inner.changed.notify_all();
    let t = pump.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = t {
        let _ = t.join();
    }
}

/// Starts a driver on a fresh section, runs its handshake, and sends it
/// what the last one left in flight (same ids, in order: writes with
/// their bytes, reads lent again); then lends reads up to the configured
/// number.
fn start_driver(inner: &Inner, c: &mut Core) -> io::Result<()> {
    c.generation += 1;
    let info = c.contract.info_request();
    let started = crate::pump::start(
        crate::pump::Start {
            spec: &inner.spec,
            layout: inner.layout,
            generation: c.generation,
            info,
            timeout: inner.config.start_timeout,
        },
        &mut c.template,
        &mut c.counters.template,
        |resp, _| c.contract.check_info(resp).map_err(|v| v.to_string()),
        |_| {},
    );
    let (mut link, restored) = match started {
        Ok(l) => l,
        Err(e) => {
            c.counters.last_start_failure = Some(e.to_string());
            return Err(e);
        }
    };
    if restored {
        c.counters.from_template += 1;
    }
    let now = Instant::now();
    c.owners.clear();
    c.reads_lent = 0;
    for mut req in c.contract.reissue(now) {
        // A fresh section has a buffer for every request in flight.
        let buf = link.free.pop().expect("a fresh section's buffers");
        if req.op == op::CHAR_WRITE {
            let bytes = c.writes.get(&req.id).map_or(&[][..], |b| b.as_slice());
            link.ring.write_buf(buf, bytes);
            c.counters.reissued += bytes.len() as u64;
        } else {
            c.reads_lent += 1;
        }
        req.buf = buf;
        c.owners.insert(req.id, buf);
        link.ring.push(&req);
    }
    c.link = Some(link);
    top_up_reads(inner, c, now);
    if let Some(link) = &mut c.link {
        if link.ring.publish() {
            link.region.kick();
        }
    }
    Ok(())
}

/// Lends reads until `read_buffers` are lent, while the client's queue
/// has room for all they could bring.
fn top_up_reads(inner: &Inner, c: &mut Core, now: Instant) {
    if c.reads_paused.is_some_and(|until| now < until) {
        // The pump sleeps 50 ms at most: it comes back to lend them.
        return;
    }
    c.reads_paused = None;
    let Some(link) = c.link.as_mut() else { return };
    let len = inner.config.read_len;
    while c.reads_lent < inner.config.read_buffers {
        let could_bring = (c.reads_lent + 1) * len as usize;
        if c.rx.len() + could_bring > inner.config.rx_queue {
            break;
        }
        let Some(&buf) = link.free.last() else { break };
        let Ok(mut req) = c.contract.issue(op::CHAR_READ, len, now) else {
            break;
        };
        link.free.pop();
        req.buf = buf;
        c.owners.insert(req.id, buf);
        link.ring.push(&req);
        c.reads_lent += 1;
    }
}

/// Issues queued bytes as writes while buffers are free, leaving room for
/// the reads not lent yet.
fn send_queued(inner: &Inner, c: &mut Core, now: Instant) {
    let Some(link) = c.link.as_mut() else { return };
    let reserve = inner.config.read_buffers.saturating_sub(c.reads_lent);
    while !c.tx.is_empty() {
        if link.free.len() <= reserve || c.writes.len() >= inner.config.writes_in_flight.max(1) {
            break;
        }
        let Some(&buf) = link.free.last() else { break };
        let n = c.tx.len().min(inner.config.write_len as usize);
        let Ok(mut req) = c.contract.issue(op::CHAR_WRITE, n as u32, now) else {
            break;
        };
        link.free.pop();
        let bytes: Vec<u8> = c.tx.drain(..n).collect();
        link.ring.write_buf(buf, &bytes);
        req.buf = buf;
        c.owners.insert(req.id, buf);
        c.writes.insert(req.id, bytes);
        link.ring.push(&req);
    }
    inner.changed.notify_all();
}

/// Checks and applies one answer; a violation to restart for.
fn answer(inner: &Inner, c: &mut Core, a: Response, now: Instant) -> Result<(), Violation> {
    let Some(link) = c.link.as_mut() else {
        return Ok(());
    };
    let depth = inner.layout.depth;
    if a.buf >= depth {
        return Err(Violation::OutsidePool {
            id: a.id,
            buf: a.buf,
            buffers: depth,
        });
    }
    if let Some(&owned) = c.owners.get(&a.id) {
        if owned != a.buf {
            return Err(Violation::WrongBuffer {
                id: a.id,
                buf: a.buf,
                expected: owned,
            });
        }
    }
    let done = c.contract.check_response(&a, now)?;
    let buf = c.owners.remove(&done.id).unwrap_or(a.buf);
    link.free.push(buf);
    if done.op == op::CHAR_WRITE {
        let n = c.writes.remove(&done.id).map_or(0, |b| b.len()) as u64;
        if done.status == status::OK {
            c.counters.sent += n;
        } else {
            c.counters.write_failed += n;
        }
        c.progress = true;
        inner.changed.notify_all();
        return Ok(());
    }
    c.reads_lent = c.reads_lent.saturating_sub(1);
    if done.status != status::OK {
        c.counters.read_failed += 1;
        c.reads_paused = Some(now + READ_PAUSE);
    }
    if done.status == status::OK && done.payload > 0 {
        // Copied out once, after the contract accepted its length.
        let mut bytes = vec![0u8; done.payload as usize];
        link.region.read_buf(buf, &mut bytes);
        c.rx.extend(bytes);
        c.counters.received += u64::from(done.payload);
        c.progress = true;
        inner.changed.notify_all();
    }
    Ok(())
}

fn violation(c: &mut Core, kind: &'static str) {
    *c.counters.violations.entry(kind).or_default() += 1;
}

/// Replaces the driver after a fault at `t0`; gives up after
/// `max_failed_restarts` restarts in a row without a byte moving (starts
/// that fail included), backing off between those.
fn restart(inner: &Inner, c: &mut Core, t0: Instant) {
    let moved = std::mem::take(&mut c.progress) | std::mem::take(&mut c.killed);
    let max = inner.config.max_failed_restarts;
    if let Err(n) = crate::pump::back_off(&mut c.barren, moved, max) {
        c.failed = Some(format!(
            "the serial line's driver failed {n} times in a row without moving a byte"
        ));
        inner.changed.notify_all();
        return;
    }
    if let Some(old) = c.link.take() {
        old.proc.killer().kill();
        let _ = wait_readable([Some(old.exit.as_fd())], inner.config.deadline);
        end(old);
    }
    c.counters.restarts += 1;
    let closing = || inner.closing.load(Ordering::SeqCst);
    match crate::pump::start_retrying(max, closing, || start_driver(inner, c)) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            c.failed = Some(format!("the serial line's driver cannot be started: {e}"));
            inner.changed.notify_all();
            return;
        }
    }
    crate::block::record_recovery(&mut c.counters.recovery, t0.elapsed());
}

impl crate::pump::Pumped for Inner {
    type Core = Core;

    fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }
    fn wake(&self) -> &Bell {
        &self.wake
    }
    fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
    fn depth(&self) -> u32 {
        self.layout.depth
    }
    fn link(c: &mut Core) -> &mut Option<Link> {
        &mut c.link
    }
    fn stopped(c: &Core) -> bool {
        c.failed.is_some()
    }
    fn answer(&self, c: &mut Core, a: Response, now: Instant) -> Result<(), Violation> {
        answer(self, c, a, now)
    }
    fn expired(c: &mut Core, now: Instant) -> bool {
        c.contract.expired(now).is_some()
    }
    fn violation(c: &mut Core, kind: &'static str) {
        violation(c, kind)
    }
    fn restart(self: &Arc<Self>, c: &mut Core, t0: Instant) {
        restart(self, c, t0)
    }
    fn refill(&self, c: &mut Core, now: Instant) {
        top_up_reads(self, c, now);
        send_queued(self, c, now);
    }
    fn finish(&self, c: &mut Core) {
        if let Some(mut l) = c.link.take() {
            let _ = l.proc.kill();
            let _ = l.proc.wait();
        }
        self.changed.notify_all();
    }
}
