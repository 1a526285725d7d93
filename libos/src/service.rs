//! The server side of a mediated service: the safe mediator in the host
//! lays out a shared section (`shm:NAME`, ABI 1.1) as request and answer
//! rings with a buffer pool (`moat_service_proto::ring`), and the driver
//! serves it. [`serve_block`] runs the loop for a [`BlockDevice`]; the
//! driver only implements the device.
//!
//! The loop takes every request published, answers each in its own buffer
//! (a read straight into it, a write straight from it) and publishes the
//! answer at once; when the ring is empty it polls for the spin bound the
//! mediator wrote in the header (pausing, then yielding the processor
//! where a yield is cheap: [`yield_cost`]), then says it sleeps and waits on the
//! section's doorbell. It rings the mediator's doorbell only when the
//! mediator said it sleeps.
//!
//! [`Faults`] makes a driver misbehave on purpose, for the mediator's
//! tests and fault campaigns: a seeded, reproducible choice, per request,
//! of crashing, hanging, lying, flooding or breaking the ring.
use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;

use moat_service_proto::ring::{Section, Server};
pub use moat_service_proto::status;
use moat_service_proto::{class, op, Request, Response};

use crate::sync::Event;
use crate::{Error, Result};

/// A block device as a driver sees it. Offsets and lengths are checked
/// against the geometry before these are called. `Err` is a status code.
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

    /// Rings the mediator's doorbell.
    fn ring(&self) {
        let _ = self.section.ring();
    }
}

/// Pause iterations per microsecond, measured once: the spin bound is
/// counted in iterations, so polling never asks the host for the time.
fn spins_per_micro() -> u64 {
    const N: u64 = 200_000;
    let t0 = crate::time::now_micros();
    for _ in 0..N {
        core::hint::spin_loop();
    }
    let us = crate::time::elapsed_micros(t0).max(1);
    (N / us).clamp(1, 10_000)
}

/// Polling pauses this long before it starts yielding the processor.
const PAUSE_FIRST_MICROS: u64 = 5;

/// Yields dearer than this (µs) are not used while polling.
const CHEAP_YIELD_MICROS: u64 = 2;

/// What one `DkThreadYieldExecution` costs, in pause iterations, if it is
/// cheap enough to poll with. Polling yields after its first
/// [`PAUSE_FIRST_MICROS`] so that a driver waiting for work does not keep
/// a core from the threads that make the work (a 2-core machine: the
/// client, the kernel, other programs), which measured several times
/// faster behind a FUSE export and on a busy machine. Where a yield leaves
/// the guest (a VM exit on kvm, tens of µs), polling only pauses: an exit
/// per poll would cost more than it saves.
fn yield_cost(per_micro: u64) -> Option<u64> {
    const N: u64 = 16;
    let t0 = crate::time::now_micros();
    for _ in 0..N {
        let _ = crate::raw::thread_yield_execution();
    }
    let us = crate::time::elapsed_micros(t0);
    (us <= CHEAP_YIELD_MICROS * N).then(|| (us * per_micro / N).max(1))
}

/// Serve `dev` on the section `shm:NAME` until the driver is ended (the
/// mediator ends it when it is done). With `faults`, misbehave as they say.
/// Returns only on an error: the section cannot be opened or mapped, or
/// the mediator's side of it is broken.
pub fn serve_block(
    name: &str,
    dev: &mut dyn BlockDevice,
    mut faults: Option<Faults>,
) -> Result<()> {
    let shared = Shared::open(name)?;
    // The mediator writes the header before it starts the driver, and
    // rings once it has: wait for a valid one.
    let mut srv = loop {
        match Server::attach(shared.section()) {
            Ok(s) => break s,
            Err(_) => match shared.bell.wait(1_000_000) {
                Ok(()) | Err(Error::TimedOut) => {}
                Err(e) => return Err(e),
            },
        }
    };
    let (capacity, block) = dev.geometry();
    let per_micro = spins_per_micro();
    let spin = srv.layout().spin_ns / 1000 * per_micro;
    let pause_for = PAUSE_FIRST_MICROS * per_micro;
    let yield_cost = yield_cost(per_micro);
    let depth = srv.layout().depth;
    loop {
        let req = match srv.next_request() {
            Ok(Some(Ok(r))) => r,
            // The host wrote a bad index or descriptor: nothing sensible
            // to answer.
            Ok(Some(Err(_))) | Err(_) => return Err(Error::InvalidArgument),
            Ok(None) => {
                let mut n = 0;
                while n < spin && srv.pending() == Ok(0) {
                    match yield_cost {
                        Some(cost) if n >= pause_for => {
                            let _ = crate::raw::thread_yield_execution();
                            n += cost;
                        }
                        _ => {
                            core::hint::spin_loop();
                            n += 1;
                        }
                    }
                }
                if srv.pending() == Ok(0) && srv.prepare_sleep() {
                    match shared.bell.wait(moat_pal::timeout::INFINITE) {
                        Ok(()) | Err(Error::TimedOut) => {}
                        Err(e) => return Err(e),
                    }
                }
                srv.awake();
                continue;
            }
        };
        let resp = answer(&mut srv, dev, &req, capacity, block);
        let f = faults.as_mut().map_or(0, |f| f.pick());
        misbehave(&mut srv, &shared, f, resp, depth);
    }
}

/// Carries out one request in its buffer; returns the answer to give.
fn answer(
    srv: &mut Server,
    dev: &mut dyn BlockDevice,
    req: &Request,
    capacity: u64,
    block: u32,
) -> Response {
    let mut resp = Response {
        status: status::OK,
        class: class::BLOCK,
        buf: req.buf,
        id: req.id,
        len: 0,
    };
    let in_range = |off: u64, len: u64| {
        off.is_multiple_of(block as u64)
            && len.is_multiple_of(block as u64)
            && off.checked_add(len).is_some_and(|e| e <= capacity)
    };
    let result = match req.op {
        op::INFO => match srv.buf_mut(req.buf, 16) {
            Some(b) => {
                b[..8].copy_from_slice(&capacity.to_le_bytes());
                b[8..16].copy_from_slice(&(block as u64).to_le_bytes());
                resp.len = 16;
                Ok(())
            }
            None => Err(status::INVALID),
        },
        op::READ if in_range(req.offset, req.len as u64) => match srv.buf_mut(req.buf, req.len) {
            Some(b) => dev.read(req.offset, b).map(|()| resp.len = req.len),
            None => Err(status::INVALID),
        },
        op::WRITE if in_range(req.offset, req.len as u64) => match srv.buf_mut(req.buf, req.len) {
            Some(b) => dev.write(req.offset, b),
            None => Err(status::INVALID),
        },
        op::FLUSH => dev.flush(),
        op::DISCARD if in_range(req.offset, req.len as u64) => {
            dev.discard(req.offset, req.len as u64)
        }
        op::READ | op::WRITE | op::DISCARD => Err(status::INVALID),
        _ => Err(status::UNSUPPORTED),
    };
    if let Err(st) = result {
        resp.status = st;
        resp.len = 0;
    }
    resp
}

/// Gives the answer, or, with fault `f`, does what the fault says instead.
fn misbehave(srv: &mut Server, shared: &Shared, f: u32, mut resp: Response, depth: u32) {
    let send = |srv: &mut Server, r: &Response| {
        srv.complete(r);
        if srv.publish() {
            shared.ring();
        }
    };
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
