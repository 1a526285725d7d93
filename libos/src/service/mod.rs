//! The server side of a mediated service: the safe mediator in the host
//! lays out a shared section (`shm:NAME`, ABI 1.1) as request and answer
//! rings with a buffer pool (`moat_service_proto::ring`), and the driver
//! serves it. [`serve_block`] runs the loop for a [`BlockDevice`]; the
//! driver only implements the device.
//!
//! The loop takes the requests published, as many as the device holds,
//! and lends each its own buffer (a read lands straight in it, a write
//! goes straight from it); it answers each request as the device reports
//! it, and publishes the answers of each round at once. When there is
//! nothing to do it polls for the spin bound the mediator wrote in the
//! header (pausing, then yielding the processor where a yield is cheap:
//! `yield_cost`); then, with requests in flight, it waits for the device
//! ([`QueuedBlockDevice::wait`], its interrupt), and otherwise says it
//! sleeps and waits on the section's doorbell. It rings the mediator's
//! doorbell only when the mediator said it sleeps. A [`BlockDevice`]
//! (one request at a time) is served as a queue of one ([`serve_block`]),
//! a [`QueuedBlockDevice`] with [`serve_queued`].
//!
//! [`net::serve_net`] and [`char::serve_char`] serve the network and
//! character classes over the same rings.
//!
//! [`Faults`] makes a driver misbehave on purpose, for the mediator's
//! tests and fault campaigns: a seeded, reproducible choice, per request,
//! of crashing, hanging, lying, flooding or breaking the ring.
use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;

use moat_service_proto::ring::{Section, Server};
use moat_service_proto::{class, Request, Response};
pub use moat_service_proto::{op, status};

use crate::sync::Event;
use crate::{Error, Result};

/// A block device as a driver sees it, one request at a time. Offsets and
/// lengths are checked against the geometry before these are called.
/// `Err` is a status code.
pub trait BlockDevice {
    /// Capacity in bytes and block size.
    fn geometry(&mut self) -> (u64, u32);
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> core::result::Result<(), u8>;
    fn write(&mut self, offset: u64, data: &[u8]) -> core::result::Result<(), u8>;
    fn flush(&mut self) -> core::result::Result<(), u8>;
    fn discard(&mut self, _offset: u64, _len: u64) -> core::result::Result<(), u8> {
        Err(status::UNSUPPORTED)
    }
}

/// One request the loop lends a [`QueuedBlockDevice`].
#[derive(Debug, Clone, Copy)]
pub struct BlockRequest {
    /// `op::READ`, `op::WRITE`, `op::FLUSH` or `op::DISCARD`.
    pub op: u8,
    /// Byte offset (checked against the geometry).
    pub offset: u64,
    /// Bytes (checked against the geometry).
    pub len: u32,
    /// The request's buffer in the section: `len` bytes to fill (a read)
    /// or to write; empty for a flush or a discard.
    pub buf: NonNull<[u8]>,
}

/// A block device that holds several requests at once (a virtio queue).
/// The service loop starts requests as the mediator publishes them, each
/// in its own buffer of the section (the device reads or fills it in
/// place), and answers each as the device reports it; it polls while
/// anything is in flight and calls [`QueuedBlockDevice::wait`] only after
/// the device has been quiet for the spin bound.
pub trait QueuedBlockDevice {
    /// Capacity in bytes and block size.
    fn geometry(&mut self) -> (u64, u32);
    /// Whether a request of kind `op` can start now (the loop keeps it
    /// until it can).
    fn can_start(&self, op: u8) -> bool;
    /// Starts request `tag`; `Err(status)`: it failed at once (and will
    /// not be reported).
    ///
    /// # Safety
    ///
    /// `r.buf` stays valid for reads and writes, and nothing else uses it,
    /// until [`QueuedBlockDevice::complete`] reports `tag`.
    unsafe fn start(&mut self, tag: u32, r: &BlockRequest) -> core::result::Result<(), u8>;
    /// Reports each request that completed since the last call, once;
    /// returns how many.
    fn complete(&mut self, done: &mut dyn FnMut(u32, core::result::Result<(), u8>)) -> usize;
    /// Requests started and not yet reported.
    fn in_flight(&self) -> usize;
    /// Sleeps until a request may have completed, at most `micros`.
    fn wait(&mut self, micros: u64);
}

pub use moat_service_proto::fault;

/// Seeded fault injection: before answering each request, with
/// probability `per_million / 1e6`, one of the enabled kinds.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub seed: u64,
    pub per_million: u32,
    pub kinds: u32,
}

impl Faults {
    /// Parse `SEED:PER_MILLION:KIND[,KIND...]` (KIND from
    /// [`fault::NAMES`], or `all`).
    pub fn parse(s: &str) -> Option<Faults> {
        let mut it = s.splitn(3, ':');
        let seed = crate::env::parse_u64(it.next()?)?;
        let per_million = crate::env::parse_u64(it.next()?)?.min(1_000_000) as u32;
        let kinds = fault::parse(it.next()?).ok()?;
        // Mixed, so that nearby seeds (one per driver incarnation) give
        // unrelated fault sequences.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let seed = z ^ (z >> 31);
        (kinds != 0).then_some(Faults {
            seed,
            per_million,
            kinds,
        })
    }

    fn rng(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.seed | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.seed = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// The fault to inject before this answer, if any.
    fn pick(&mut self) -> u32 {
        if self.rng() % 1_000_000 >= self.per_million as u64 {
            return 0;
        }
        let n = self.kinds.count_ones() as u64;
        let mut k = self.rng() % n;
        for bit in 0..32 {
            if self.kinds & (1 << bit) != 0 {
                if k == 0 {
                    return 1 << bit;
                }
                k -= 1;
            }
        }
        0
    }
}

pub mod char;
pub mod net;

/// The shared section, mapped, with its doorbell.
struct Shared {
    section: crate::section::Section,
    map: crate::section::SectionMap,
    /// Set when the mediator rings.
    bell: Event,
}

impl Shared {
    fn open(name: &str) -> Result<Shared> {
        let section = crate::section::Section::open(name, true)?;
        let map = section.map()?;
        let bell = section.doorbell()?;
        Ok(Shared { section, map, bell })
    }

    fn section(&self) -> Section {
        let base = NonNull::new(self.map.addr() as *mut u8).expect("a mapped section");
        // SAFETY: the mapping (page-aligned, `len` bytes, read-write) lives
        // as long as `self.map`, which `Shared` keeps until the driver
        // ends; the driver makes no other references into it.
        unsafe { Section::new(base, self.map.len() as usize) }
    }

    /// The server side of the rings. The mediator writes the header
    /// before it starts the driver, and rings once it has: this waits for
    /// a valid one.
    fn attach(&self) -> Result<Server> {
        loop {
            match Server::attach(self.section()) {
                Ok(s) => return Ok(s),
                Err(_) => match self.bell.wait(1_000_000) {
                    Ok(()) | Err(Error::TimedOut) => {}
                    Err(e) => return Err(e),
                },
            }
        }
    }

    /// Rings the mediator's doorbell.
    fn ring(&self) {
        let _ = self.section.ring();
    }
}

/// How long the loop polls a device with requests in flight before it
/// waits for it (at least; the mediator's spin bound if longer). A device
/// answers within microseconds unless the thread that serves it waits for
/// a core (on two cores shared by a client, the driver's vCPU and the
/// device's I/O thread, it often does); each wait is a VM exit on kvm, so
/// the bound is long: 1 ms of polling costs less than a stream of exits.
const BUSY_SPIN_MICROS: u64 = 1000;

/// Polling pauses this long before it starts yielding the processor.
const PAUSE_FIRST_MICROS: u64 = 5;

/// Yields dearer than this (µs) are not used while polling.
const CHEAP_YIELD_MICROS: u64 = 2;

/// What one `DkThreadYieldExecution` costs, in pause iterations, if it is
/// cheap enough to poll with. An idle loop yields after its first
/// [`PAUSE_FIRST_MICROS`] so that a driver waiting for work does not keep
/// a core from the threads that make the work (a 2-core machine: the
/// client, the kernel, other programs), which measured several times
/// faster behind a FUSE export and on a busy machine. Where a yield leaves
/// the guest (a VM exit on kvm, tens of µs), polling only pauses: an exit
/// per poll would cost more than it saves.
fn yield_cost(per_micro: u64) -> Option<u64> {
    // Measured once per host (u64::MAX: dear).
    static MEASURED: crate::time::PerHost = crate::time::PerHost::new();
    match MEASURED.get(|| measure_yield(per_micro).unwrap_or(u64::MAX)) {
        u64::MAX => None,
        v => Some(v),
    }
}

/// The serving loop's start-up measurements (how fast a pause is, how
/// dear a yield), made now and remembered. A driver calls this before it
/// opens its file, device or section: a template of it (taken at its
/// first open, see the mediator) then carries them, and a driver
/// restored from it serves at once.
pub fn prepare() {
    let _ = yield_cost(crate::time::spins_per_micro());
}

fn measure_yield(per_micro: u64) -> Option<u64> {
    const N: u64 = 16;
    let t0 = crate::time::now_micros();
    for _ in 0..N {
        let _ = crate::raw::thread_yield_execution();
    }
    let us = crate::time::elapsed_micros(t0);
    (us <= CHEAP_YIELD_MICROS * N).then(|| (us * per_micro / N).max(1))
}

/// A serving loop's polling between requests: for the mediator's spin
/// bound when idle (pausing first, then yielding where a yield is cheap),
/// for [`BUSY_SPIN_MICROS`] at least while the device holds requests.
pub(crate) struct Idle {
    quiet: u64,
    spin: u64,
    busy_spin: u64,
    pause_for: u64,
    yield_cost: Option<u64>,
}

impl Idle {
    pub(crate) fn new(spin_ns: u64) -> Idle {
        let per_micro = crate::time::spins_per_micro();
        let spin = (spin_ns / 1000 * per_micro).max(1);
        Idle {
            quiet: 0,
            spin,
            busy_spin: spin.max(BUSY_SPIN_MICROS * per_micro),
            pause_for: PAUSE_FIRST_MICROS * per_micro,
            yield_cost: yield_cost(per_micro),
        }
    }

    /// Something happened: the next quiet spell polls from the start.
    pub(crate) fn reset(&mut self) {
        self.quiet = 0;
    }

    /// One look's worth of polling (`busy`: the device holds requests);
    /// false once the bound ran out, when the loop should sleep (and the
    /// next spell starts from the start).
    pub(crate) fn poll(&mut self, busy: bool) -> bool {
        let bound = if busy { self.busy_spin } else { self.spin };
        if self.quiet >= bound {
            self.quiet = 0;
            return false;
        }
        match self.yield_cost {
            // Idle and polling for a while: let the threads that make the
            // work have the core.
            Some(cost) if self.quiet >= self.pause_for && !busy => {
                let _ = crate::raw::thread_yield_execution();
                self.quiet += cost;
            }
            _ => {
                core::hint::spin_loop();
                self.quiet += 1;
            }
        }
        true
    }
}

/// How long [`QueuedBlockDevice::wait`] may sleep at a time.
const WAIT_MICROS: u64 = 1_000_000;

/// Serve `dev` on the section `shm:NAME` until the driver is ended (the
/// mediator ends it when it is done). With `faults`, misbehave as they say.
/// Returns only on an error: the section cannot be opened or mapped, or
/// the mediator's side of it is broken.
pub fn serve_block(name: &str, dev: &mut dyn BlockDevice, faults: Option<Faults>) -> Result<()> {
    serve_queued(name, &mut Immediate { dev, done: None }, faults)
}

/// Serve a device that holds several requests at once (see the module
/// docs), like [`serve_block`].
pub fn serve_queued(
    name: &str,
    dev: &mut dyn QueuedBlockDevice,
    mut faults: Option<Faults>,
) -> Result<()> {
    let shared = Shared::open(name)?;
    let mut srv = shared.attach()?;
    let geometry = dev.geometry();
    let mut idle = Idle::new(srv.layout().spin_ns);
    let depth = srv.layout().depth;
    // The request each buffer is lent to the device for, by buffer index:
    // a buffer is lent to one request at a time.
    let mut lent: Vec<Option<Request>> = vec![None; depth as usize];
    // A request the device cannot take yet (it is full, or a flush waits
    // for what is in flight).
    let mut deferred: Option<Request> = None;
    loop {
        let mut progress = false;
        let mut answered = false;
        // Start what the mediator published, while the device takes it.
        loop {
            let req = match deferred.take() {
                Some(r) => r,
                None => match srv.next_request() {
                    Ok(None) => break,
                    Ok(Some(Ok(r))) => r,
                    // The host wrote a bad index or descriptor: nothing
                    // sensible to answer.
                    Ok(Some(Err(_))) | Err(_) => return Err(Error::InvalidArgument),
                },
            };
            match begin(&mut srv, dev, &mut lent, &req, geometry)? {
                Begun::Started => progress = true,
                Begun::Answer(resp) => {
                    finish(&mut srv, &shared, &mut faults, resp, depth);
                    progress = true;
                    answered = true;
                }
                Begun::Later => {
                    deferred = Some(req);
                    break;
                }
            }
        }
        // Answer what the device completed.
        dev.complete(&mut |tag, result| {
            // A tag the loop did not lend: the device's bug, nothing to
            // answer.
            let Some(req) = lent.get_mut(tag as usize).and_then(Option::take) else {
                return;
            };
            let resp = Response {
                status: result.err().unwrap_or(status::OK),
                class: class::BLOCK,
                buf: req.buf,
                id: req.id,
                len: if result.is_ok() && req.op == op::READ {
                    req.len
                } else {
                    0
                },
            };
            finish(&mut srv, &shared, &mut faults, resp, depth);
            answered = true;
        });
        if answered {
            progress = true;
            if srv.publish() {
                shared.ring();
            }
        }
        if progress {
            idle.reset();
            continue;
        }
        // Nothing happened: poll for the spin bound, then sleep.
        if idle.poll(dev.in_flight() > 0) {
            continue;
        }
        if dev.in_flight() > 0 {
            // The device completes (or the mediator sends more) soon.
            dev.wait(WAIT_MICROS);
        } else if srv.prepare_sleep() {
            match shared.bell.wait(moat_pal::timeout::INFINITE) {
                Ok(()) | Err(Error::TimedOut) => {}
                Err(e) => return Err(e),
            }
            srv.awake();
        }
    }
}

/// What became of a request the loop took.
enum Begun {
    /// Lent to the device with its buffer.
    Started,
    /// Answered at once.
    Answer(Response),
    /// The device cannot take it yet.
    Later,
}

/// Starts one request on the device, or answers it at once (INFO, a
/// request out of range, an unknown operation, a device that refused it).
/// Fails if the mediator named a buffer already lent out.
fn begin(
    srv: &mut Server,
    dev: &mut dyn QueuedBlockDevice,
    lent: &mut [Option<Request>],
    req: &Request,
    (capacity, block): (u64, u32),
) -> Result<Begun> {
    let mut resp = Response {
        status: status::OK,
        class: class::BLOCK,
        buf: req.buf,
        id: req.id,
        len: 0,
    };
    let Some(slot) = lent.get_mut(req.buf as usize) else {
        resp.status = status::INVALID;
        return Ok(Begun::Answer(resp));
    };
    if slot.is_some() {
        // Two requests in one buffer: the mediator broke the ring's rules.
        return Err(Error::InvalidArgument);
    }
    let in_range = |off: u64, len: u64| {
        off.is_multiple_of(block as u64)
            && len.is_multiple_of(block as u64)
            && off.checked_add(len).is_some_and(|e| e <= capacity)
    };
    let data = match req.op {
        op::INFO => {
            match srv.buf_mut(req.buf, 16) {
                Some(b) => {
                    b[..8].copy_from_slice(&capacity.to_le_bytes());
                    b[8..16].copy_from_slice(&(block as u64).to_le_bytes());
                    resp.len = 16;
                }
                None => resp.status = status::INVALID,
            }
            return Ok(Begun::Answer(resp));
        }
        op::READ | op::WRITE if in_range(req.offset, req.len as u64) => {
            srv.buf_ptr(req.buf, req.len)
        }
        op::FLUSH => Some(NonNull::slice_from_raw_parts(NonNull::dangling(), 0)),
        op::DISCARD if in_range(req.offset, req.len as u64) => {
            Some(NonNull::slice_from_raw_parts(NonNull::dangling(), 0))
        }
        op::READ | op::WRITE | op::DISCARD => None,
        _ => {
            resp.status = status::UNSUPPORTED;
            return Ok(Begun::Answer(resp));
        }
    };
    let Some(buf) = data else {
        resp.status = status::INVALID;
        return Ok(Begun::Answer(resp));
    };
    if !dev.can_start(req.op) {
        return Ok(Begun::Later);
    }
    let r = BlockRequest {
        op: req.op,
        offset: req.offset,
        len: req.len,
        buf,
    };
    // SAFETY: `buf` is this request's buffer in the mapped section (or
    // empty), lent to no other request (checked above, and marked below
    // until the device reports it), and the loop touches it no more
    // until then; the section stays mapped while the loop runs.
    match unsafe { dev.start(req.buf, &r) } {
        Ok(()) => {
            *slot = Some(*req);
            Ok(Begun::Started)
        }
        Err(st) => {
            resp.status = st;
            Ok(Begun::Answer(resp))
        }
    }
}

/// Gives one answer (not yet published), or misbehaves instead.
fn finish(
    srv: &mut Server,
    shared: &Shared,
    faults: &mut Option<Faults>,
    resp: Response,
    depth: u32,
) {
    let f = faults.as_mut().map_or(0, |f| f.pick());
    misbehave(srv, shared, f, resp, depth);
}

/// A [`BlockDevice`] as a queue of one: each request runs as it starts.
struct Immediate<'a> {
    dev: &'a mut dyn BlockDevice,
    done: Option<(u32, core::result::Result<(), u8>)>,
}

impl QueuedBlockDevice for Immediate<'_> {
    fn geometry(&mut self) -> (u64, u32) {
        self.dev.geometry()
    }

    fn can_start(&self, _op: u8) -> bool {
        self.done.is_none()
    }

    unsafe fn start(&mut self, tag: u32, r: &BlockRequest) -> core::result::Result<(), u8> {
        let result = match r.op {
            // SAFETY: the caller lends the buffer until it is reported,
            // which is after this use.
            op::READ => self.dev.read(r.offset, unsafe { &mut *r.buf.as_ptr() }),
            // SAFETY: as for a read.
            op::WRITE => self.dev.write(r.offset, unsafe { &*r.buf.as_ptr() }),
            op::FLUSH => self.dev.flush(),
            op::DISCARD => self.dev.discard(r.offset, r.len as u64),
            _ => Err(status::UNSUPPORTED),
        };
        self.done = Some((tag, result));
        Ok(())
    }

    fn complete(&mut self, done: &mut dyn FnMut(u32, core::result::Result<(), u8>)) -> usize {
        match self.done.take() {
            Some((tag, r)) => {
                done(tag, r);
                1
            }
            None => 0,
        }
    }

    fn in_flight(&self) -> usize {
        usize::from(self.done.is_some())
    }

    fn wait(&mut self, _micros: u64) {}
}

/// Gives the answer (the caller publishes it), or, with fault `f`, does
/// what the fault says instead.
fn misbehave(srv: &mut Server, shared: &Shared, f: u32, mut resp: Response, depth: u32) {
    let send = |srv: &mut Server, r: &Response| srv.complete(r);
    match f {
        fault::CRASH => crate::process::exit_now(1),
        fault::PANIC => panic!("injected fault: panic while serving request {}", resp.id),
        fault::HANG => loop {
            let _ = crate::raw::thread_delay_execution(1_000_000);
        },
        fault::OOM => {
            let mut hog: Vec<Vec<u8>> = Vec::new();
            loop {
                // Each chunk touched, so the memory is really used.
                hog.push(vec![0x5a; 1 << 20]);
            }
        }
        fault::DOUBLE => {
            send(srv, &resp);
            send(srv, &resp);
        }
        fault::WRONG_ID => {
            resp.id = resp.id.wrapping_add(1_000_003);
            send(srv, &resp);
        }
        fault::WRONG_LEN => {
            resp.len = if resp.len > 0 { resp.len - 1 } else { 512 };
            send(srv, &resp);
        }
        fault::BAD_STATUS => {
            resp.status = 0x7f;
            send(srv, &resp);
        }
        fault::FLOOD => {
            // A ring's worth of answers nobody asked for.
            for i in 0..depth as u64 {
                let junk = Response {
                    id: resp.id ^ (i << 32) ^ 0xdead,
                    len: 0,
                    ..resp
                };
                srv.complete(&junk);
            }
            if srv.publish() {
                shared.ring();
            }
        }
        fault::BAD_INDEX => {
            srv.complete(&resp);
            let at = srv.answer_index();
            srv.set_answer_index(at.wrapping_add(depth + 5));
            if srv.publish() {
                shared.ring();
            }
        }
        fault::OUTSIDE_POOL => {
            resp.buf = depth + 7;
            send(srv, &resp);
        }
        fault::WRONG_BUF => {
            resp.buf = (resp.buf + 1) % depth.max(2);
            send(srv, &resp);
        }
        fault::TORN => {
            // Published first, written after: the mediator may read what
            // the slot held a lap ago.
            let at = srv.answer_index();
            srv.set_answer_index(at.wrapping_add(1));
            if srv.publish() {
                shared.ring();
            }
            for _ in 0..2000 {
                core::hint::spin_loop();
            }
            srv.write_answer(at, &resp.encode());
        }
        _ => send(srv, &resp),
    }
}
