//! A mediated network interface: Ethernet frames between a client and a
//! NIC driver picoprocess, through the net contract
//! ([`crate::contract::NetContract`]) over the same rings and sections as
//! block. A crashing, stalling or lying driver is replaced by a new one
//! on a fresh section; the interface (MAC address, MTU) stays as the
//! client knows it. Frames being sent when a driver is replaced are lost
//! (counted), never sent twice; receive buffers are lent to the new
//! driver.
//!
//! One pump thread does the work: it takes the driver's answers, checks
//! each with the contract, hands received frames to the client's queue,
//! lends receive buffers, sends queued frames, watches deadlines and the
//! driver's exit, and restarts the driver. Clients only queue frames and
//! take received ones ([`MediatedNet::send`], [`MediatedNet::recv`]).

pub mod export;
pub mod tap;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moat_service_proto::ring::Layout;
use moat_service_proto::{op, status, Response};

use crate::block::link::{end, Link, Template};
use crate::block::region::{wait_readable, Bell};
use crate::block::standby;
use crate::block::{DriverSpec, SECTION};
use crate::contract::{Contract, ContractLimits, NetContract, NetInfo, Violation, MAX_MTU};

/// How long after a receive buffer came back failed none is lent.
const RX_PAUSE: Duration = Duration::from_millis(10);

/// Settings of a mediated interface.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// A frame not sent within this ends the driver.
    pub deadline: Duration,
    /// A new driver must report its interface within this.
    pub start_timeout: Duration,
    /// Receive buffers lent to the driver at once.
    pub rx_buffers: usize,
    /// Requests in flight at once (receive buffers included): the ring's
    /// depth, a power of two.
    pub depth: u32,
    /// Frames received and not yet taken by the client beyond which new
    /// ones are dropped (counted).
    pub rx_queue: usize,
    /// Frames waiting to be sent beyond which new ones are dropped.
    pub tx_queue: usize,
    /// Restarts in a row without a frame moving before the mediator gives
    /// up (the interface then fails every call).
    pub max_failed_restarts: u32,
    /// Restart drivers from a template of the first one (taken at its
    /// first open, its wire's; sealed), as block drivers are
    /// (`crate::block::Config::templates`). Off with fault injection.
    pub templates: bool,
    /// Keep the next driver restored from the template and past its
    /// handshake, and switch to it at a restart (as
    /// `crate::block::Config::standby`): a second idle driver process.
    /// Only for drivers that stay off the wire until they are lent a
    /// receive buffer or given a frame (`virtio-net` does: its device
    /// reads the wire only into buffers lent; `net-soft` connects its
    /// wire at once, which would take the wire from the driver serving).
    /// Off by default.
    pub standby: bool,
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig {
            deadline: Duration::from_secs(2),
            start_timeout: Duration::from_secs(2),
            rx_buffers: 32,
            depth: 64,
            rx_queue: 1024,
            tx_queue: 1024,
            max_failed_restarts: 5,
            templates: true,
            standby: false,
        }
    }
}

/// What the mediator has seen of an interface.
#[derive(Debug, Clone, Default)]
pub struct NetCounters {
    /// Frames the driver put on the wire.
    pub sent: u64,
    /// Frames the driver said it could not send.
    pub send_failed: u64,
    /// Frames lost to a driver's replacement (sent by the old driver, or
    /// not: never again).
    pub send_dropped: u64,
    /// Frames dropped before the driver: the send queue was full.
    pub tx_queue_drops: u64,
    /// Frames received and accepted.
    pub received: u64,
    /// Frames received and dropped: the client's queue was full.
    pub rx_queue_drops: u64,
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
    /// Restarts that switched to a standby driver.
    pub from_standby: u64,
    /// Receive buffers a driver answered with a failure (lent again after
    /// a pause, so a driver failing every one cannot keep the pump busy).
    pub receive_failed: u64,
    /// What the drivers' VMMs counted (kvm only), ended drivers' included.
    pub vm: Option<moat_monitor::VmStats>,
}

struct Core {
    contract: NetContract,
    link: Option<Link>,
    /// The buffer each request in flight owns, by id.
    owners: HashMap<u64, u32>,
    /// Receive buffers lent to the driver.
    rx_lent: usize,
    tx: VecDeque<Vec<u8>>,
    rx: VecDeque<Vec<u8>>,
    counters: NetCounters,
    /// The interface gave up (too many restarts in a row without a frame
    /// moving).
    failed: Option<String>,
    /// A frame moved (sent or received) since the last restart.
    progress: bool,
    /// Restarts in a row without a frame moving.
    barren: u32,
    /// The drivers' template (see `crate::block::link`).
    template: Template,
    /// The current driver was killed from outside (`kill_driver`): its
    /// restart is no sign of a driver that cannot serve.
    killed: bool,
    generation: u64,
    /// No receive buffer is lent before this (one came back failed).
    rx_paused: Option<Instant>,
}

struct Inner {
    core: Mutex<Core>,
    /// Shutting down (read without the core lock, which a restart holds).
    closing: std::sync::atomic::AtomicBool,
    /// Wakes the pump (a frame queued, a kill, shutdown).
    wake: Bell,
    /// Wakes clients waiting for a frame.
    received: Condvar,
    spec: DriverSpec,
    layout: Layout,
    config: NetConfig,
    /// The next driver, ready (see [`NetConfig::standby`]).
    standby: Mutex<standby::Slot>,
}

impl standby::Owner for Inner {
    fn slot(&self) -> &Mutex<standby::Slot> {
        &self.standby
    }
    fn spec(&self) -> &DriverSpec {
        &self.spec
    }
    fn layout(&self) -> Layout {
        self.layout
    }
    fn start_timeout(&self) -> Duration {
        self.config.start_timeout
    }
    fn info(&self) -> moat_service_proto::Request {
        NetContract::INFO
    }
    fn wanted(&self) -> bool {
        self.config.standby
    }
    fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
    fn failed(&self, why: String) {
        lock(&self.core).counters.last_start_failure = Some(format!("standby: {why}"));
    }
}

/// The template to make a standby from, if there is one.
fn template_of(c: &Core) -> Option<Arc<std::fs::File>> {
    match &c.template {
        Template::Have(f, _) => Some(f.clone()),
        _ => None,
    }
}

/// A network interface served by a driver picoprocess through the
/// mediator. Cheap to clone; shut down by [`MediatedNet::shutdown`] or
/// when the last clone goes.
#[derive(Clone)]
pub struct MediatedNet {
    dev: Arc<Device>,
}

struct Device {
    inner: Arc<Inner>,
    info: NetInfo,
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

impl MediatedNet {
    /// Starts the driver and its handshake (it must report a valid
    /// interface), lends it receive buffers, and starts the pump. The
    /// driver's arguments name the section [`SECTION`].
    pub fn start(mut spec: DriverSpec, config: NetConfig) -> io::Result<MediatedNet> {
        let depth = config.depth.clamp(4, 1024).next_power_of_two();
        // Half the ring at most: sends always find room.
        let mut config = config;
        config.rx_buffers = config.rx_buffers.clamp(1, depth as usize / 2);
        let buf = (u32::from(MAX_MTU) + crate::contract::FRAME_OVERHEAD).next_multiple_of(4096);
        let layout = Layout::new(depth, buf, 50_000)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        spec.policy
            .allow(&format!("shm:{SECTION}"), moat_policy::Access::Rw)
            .map_err(|e| io_err(e.to_string()))?;
        let limits = ContractLimits {
            max_io: buf,
            deadline: config.deadline,
            max_in_flight: depth as usize,
        };
        let inner = Arc::new(Inner {
            core: Mutex::new(Core {
                contract: NetContract::new(limits),
                link: None,
                owners: HashMap::new(),
                rx_lent: 0,
                tx: VecDeque::new(),
                rx: VecDeque::new(),
                counters: NetCounters::default(),
                failed: None,
                progress: false,
                barren: 0,
                template: Template::Off(None),
                killed: false,
                generation: 0,
                rx_paused: None,
            }),
            closing: std::sync::atomic::AtomicBool::new(false),
            wake: Bell::new()?,
            received: Condvar::new(),
            spec,
            layout,
            config,
            standby: Mutex::new(standby::Slot::default()),
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
            standby::replenish(&inner, template_of(&c));
        }
        let info = lock(&inner.core)
            .contract
            .info()
            .ok_or_else(|| io_err("no interface after the handshake"))?;
        let own = inner.clone();
        let pump = std::thread::Builder::new()
            .name("moat-net".into())
            .spawn(move || crate::pump::run(own))?;
        Ok(MediatedNet {
            dev: Arc::new(Device {
                inner,
                info,
                pump: Mutex::new(Some(pump)),
            }),
        })
    }

    /// The interface (MAC address and MTU) its drivers report.
    pub fn info(&self) -> NetInfo {
        self.dev.info
    }

    /// Queues a frame to send. A frame the interface cannot carry (shorter
    /// than a header, longer than the MTU allows) is refused; a frame that
    /// finds the send queue full is dropped and counted, as a NIC would.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let inner = &self.dev.inner;
        let mut c = lock(&inner.core);
        if let Some(why) = &c.failed {
            return Err(io_err(why.clone()));
        }
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let max = self.dev.info.max_frame();
        if !(crate::contract::ETH_HEADER..=max).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a frame of {len} bytes cannot be sent: frames are 14 to {max} bytes"),
            ));
        }
        if c.tx.len() >= inner.config.tx_queue {
            c.counters.tx_queue_drops += 1;
            return Ok(());
        }
        c.tx.push_back(frame.to_vec());
        drop(c);
        inner.wake.ring();
        Ok(())
    }

    /// The next frame received, waiting up to `limit` for one.
    pub fn recv(&self, limit: Duration) -> Option<Vec<u8>> {
        let inner = &self.dev.inner;
        let until = Instant::now() + limit;
        let mut c = lock(&inner.core);
        loop {
            if let Some(f) = c.rx.pop_front() {
                return Some(f);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || inner.closing.load(Ordering::SeqCst) {
                return None;
            }
            // A failed interface receives nothing: the wait runs out.
            c = inner
                .received
                .wait_timeout(c, left)
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

    pub fn counters(&self) -> NetCounters {
        let c = lock(&self.dev.inner.core);
        let mut counters = c.counters.clone();
        if let Some(live) = c.link.as_ref().and_then(|l| l.proc.vm_stats()) {
            counters.vm.get_or_insert_with(Default::default).add(&live);
        }
        counters
    }

    /// Why the interface gave up, if it did (its driver failed again and
    /// again without moving a frame): it sends and receives nothing more.
    pub fn failed(&self) -> Option<String> {
        lock(&self.dev.inner.core).failed.clone()
    }

    /// Ends the driver and the pump; frames not sent are lost.
    pub fn shutdown(&self) {
        shutdown(&self.dev.inner, &self.dev.pump);
    }
}

fn shutdown(inner: &Inner, pump: &Mutex<Option<std::thread::JoinHandle<()>>>) {
    inner.closing.store(true, Ordering::SeqCst);
    inner.wake.ring();
    inner.received.notify_all();
    let t = pump.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = t {
        let _ = t.join();
    }
}

/// Starts a driver on a fresh section, runs its handshake, and lends it
/// the receive buffers (those of the last driver again, same ids, and
/// new ones up to the configured number). Sends of the last driver are
/// dropped.
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
        |resp, bytes| {
            c.contract
                .check_info(resp, bytes)
                .map(|_| ())
                .map_err(|v| v.to_string())
        },
        |link| {
            if let Some(s) = link.proc.vm_stats() {
                c.counters.vm.get_or_insert_with(Default::default).add(&s);
            }
        },
    );
    let (link, restored) = match started {
        Ok(l) => l,
        Err(e) => {
            c.counters.last_start_failure = Some(e.to_string());
            return Err(e);
        }
    };
    if restored {
        c.counters.from_template += 1;
    }
    install(inner, c, link);
    Ok(())
}

/// Switches to the standby driver, if one is ready and the contract
/// accepts its INFO answer (taken when it came up).
fn promote(inner: &Arc<Inner>, c: &mut Core) -> bool {
    let Some(sb) = standby::take(&**inner) else {
        return false;
    };
    let _ = c.contract.info_request();
    if let Err(v) = c.contract.check_info(&sb.info.0, &sb.info.1) {
        c.counters.last_start_failure = Some(format!("standby handshake: {v}"));
        end(sb.link);
        return false;
    }
    c.generation += 1;
    let mut link = sb.link;
    link.generation = c.generation;
    c.counters.from_template += 1;
    c.counters.from_standby += 1;
    install(inner, c, link);
    standby::replenish(inner, template_of(c));
    true
}

/// Makes `link`, whose handshake the contract accepted, the driver: the
/// sends of the last are dropped, the receive buffers lent to it again.
fn install(inner: &Inner, c: &mut Core, mut link: Link) {
    let now = Instant::now();
    let r = c.contract.restart(now);
    c.counters.send_dropped += r.dropped.len() as u64;
    c.owners.clear();
    // A fresh section has a buffer for every request in flight.
    c.rx_lent = r.relent.len();
    for mut req in r.relent {
        let buf = link.free.pop().expect("a fresh section's buffers");
        req.buf = buf;
        c.owners.insert(req.id, buf);
        link.ring.push(&req);
    }
    c.link = Some(link);
    top_up_receive(inner, c, now);
    if let Some(link) = &mut c.link {
        if link.ring.publish() {
            link.region.kick();
        }
    }
}

/// Lends receive buffers until `rx_buffers` are lent (sends never take
/// their place: see `send_queued`).
fn top_up_receive(inner: &Inner, c: &mut Core, now: Instant) {
    if c.rx_paused.is_some_and(|until| now < until) {
        // The pump sleeps 50 ms at most: it comes back to lend them.
        return;
    }
    c.rx_paused = None;
    let Some(link) = c.link.as_mut() else { return };
    while c.rx_lent < inner.config.rx_buffers {
        let Some(&buf) = link.free.last() else { break };
        let Ok(mut req) = c.contract.lend_receive(now) else {
            break;
        };
        link.free.pop();
        req.buf = buf;
        c.owners.insert(req.id, buf);
        link.ring.push(&req);
        c.rx_lent += 1;
    }
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
    // Only a frame moved is progress: a driver failing everything is
    // not spared the give-up.
    c.progress |= done.status == status::OK;
    if done.op == op::NET_TX {
        link.free.push(buf);
        if done.status == status::OK {
            c.counters.sent += 1;
        } else {
            c.counters.send_failed += 1;
        }
        return Ok(());
    }
    if done.status != status::OK {
        c.counters.receive_failed += 1;
        c.rx_paused = Some(now + RX_PAUSE);
    } else {
        // Copied out once, after the contract accepted its length.
        let mut frame = vec![0u8; done.frame as usize];
        link.region.read_buf(buf, &mut frame);
        if c.rx.len() < inner.config.rx_queue {
            c.rx.push_back(frame);
            c.counters.received += 1;
            inner.received.notify_all();
        } else {
            c.counters.rx_queue_drops += 1;
        }
    }
    // The buffer goes back to the pool; `top_up_receive` lends it again.
    link.free.push(buf);
    c.rx_lent = c.rx_lent.saturating_sub(1);
    Ok(())
}

/// Sends what is queued while buffers are free, leaving room for the
/// receive buffers not lent yet: a stream of sends never starves
/// receiving (the acknowledgements of the stream itself come that way).
fn send_queued(inner: &Inner, c: &mut Core, now: Instant) {
    let Some(link) = c.link.as_mut() else { return };
    let reserve = inner.config.rx_buffers.saturating_sub(c.rx_lent);
    while let Some(frame) = c.tx.front() {
        if link.free.len() <= reserve {
            break;
        }
        let Some(&buf) = link.free.last() else { break };
        let Ok(mut req) = c.contract.transmit(frame.len() as u32, now) else {
            break;
        };
        link.free.pop();
        link.ring.write_buf(buf, frame);
        req.buf = buf;
        c.owners.insert(req.id, buf);
        link.ring.push(&req);
        c.tx.pop_front();
    }
}

fn violation(c: &mut Core, kind: &'static str) {
    *c.counters.violations.entry(kind).or_default() += 1;
}

/// Replaces the driver after a fault at `t0`; gives up after
/// `max_failed_restarts` restarts in a row without a frame moving (starts
/// that fail included), backing off between those.
fn restart(inner: &Arc<Inner>, c: &mut Core, t0: Instant) {
    let moved = std::mem::take(&mut c.progress) | std::mem::take(&mut c.killed);
    let max = inner.config.max_failed_restarts;
    if let Err(n) = crate::pump::back_off(&mut c.barren, moved, max) {
        c.failed = Some(format!(
            "the interface's driver failed {n} times in a row without moving a frame"
        ));
        inner.received.notify_all();
        return;
    }
    if let Some(old) = c.link.take() {
        old.proc.killer().kill();
        let _ = wait_readable([Some(old.exit.as_fd())], inner.config.deadline);
        keep_vm_stats(c, &old);
        end(old);
    }
    c.counters.restarts += 1;
    if promote(inner, c) {
        crate::block::record_recovery(&mut c.counters.recovery, t0.elapsed());
        return;
    }
    let closing = || inner.closing.load(Ordering::SeqCst);
    match crate::pump::start_retrying(max, closing, || start_driver(inner, c)) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            c.failed = Some(format!("the interface's driver cannot be started: {e}"));
            inner.received.notify_all();
            return;
        }
    }
    crate::block::record_recovery(&mut c.counters.recovery, t0.elapsed());
    standby::replenish(inner, template_of(c));
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
        top_up_receive(self, c, now);
        send_queued(self, c, now);
    }
    fn finish(&self, c: &mut Core) {
        if let Some(mut l) = c.link.take() {
            let _ = l.proc.kill();
            let _ = l.proc.wait();
            keep_vm_stats(c, &l);
        }
        // `closing` is set, or the interface gave up: no standby is kept
        // after this.
        standby::discard(self);
        self.received.notify_all();
    }
}

/// Adds what an ended driver's VMM counted to the counters.
fn keep_vm_stats(c: &mut Core, l: &Link) {
    if let Some(s) = l.proc.vm_stats() {
        c.counters.vm.get_or_insert_with(Default::default).add(&s);
    }
}
