//! Shared-memory rings between the mediator and a driver: one section per
//! driver incarnation, laid out as [`Layout`] says, used by the mediator
//! through a [`Submitter`] and by the driver through a [`Server`].
//!
//! ```text
//! offset            what                               written by
//! 0                 header: magic, version, depth,     mediator, once, before
//!                   buffer size, the driver's spin      the driver starts
//!                   bound
//! 64                sq_tail, cq_head, mediator_idle    mediator
//! 128               sq_head, cq_tail, driver_idle      driver
//! 4096              submission ring: depth requests    mediator
//! 4096 + 32·depth   completion ring: depth answers     driver
//! pool (page-aligned) depth buffers of buf_size bytes  whoever owns each
//! ```
//!
//! Indices are free-running u32 counters; slot `i` of a ring is
//! `i mod depth` (depth is a power of two). Each side writes only its own
//! cache line of indices and flags, so the two never write the same line.
//!
//! **Ownership.** The mediator keeps at most `depth` requests in flight
//! and gives each its own buffer (`Request::buf`); the buffer is the
//! driver's from the request's publication until its answer is consumed.
//! So neither ring can overflow with a correct peer: the driver never
//! needs `cq_head`, nor the mediator `sq_head` (both are kept up to date
//! for whoever looks).
//!
//! **Checks.** The [`Submitter`] copies every answer out of the section
//! once, word by word, and hands the copy on: a producer index more than
//! `depth` ahead of what was consumed is [`RingError::BadIndex`]; the
//! answer's fields (id, buffer, length, status) are the contract's to
//! check. The [`Server`] checks the mediator's indices the same way, so a
//! driver survives a host bug without a stray access.
//!
//! **Notifications.** A side that runs out of work spins for a while
//! (`spin_ns` for the driver, the mediator's own setting for itself), then
//! sets its idle flag, looks once more, and sleeps on its doorbell. A
//! producer publishes its index, then reads the peer's flag and rings the
//! peer's doorbell only if it is set: a busy pair never rings. Both sides
//! put a full fence between their store and their load, so at least one
//! of them sees the other's (the idle flag, or the new work).

mod shared;

use core::sync::atomic::{fence, Ordering};

pub use shared::Section;

use crate::{DecodeError, Request, Response, DESCRIPTOR, MAX_PAYLOAD};

/// The header's magic, "MOATRING".
pub const MAGIC: u64 = u64::from_le_bytes(*b"MOATRING");
/// The layout version in the header.
pub const VERSION: u32 = 1;
/// The deepest ring (the most requests in flight per section).
pub const MAX_DEPTH: u32 = 1024;
/// The longest a driver may be told to spin before it sleeps (10 ms).
pub const MAX_SPIN_NS: u64 = 10_000_000;
/// Pages of 4 KiB: the header's size and the pool's alignment.
pub const PAGE: usize = 4096;

const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_DEPTH: usize = 12;
const H_BUF_SIZE: usize = 16;
const H_SPIN_NS: usize = 24;
const M_SQ_TAIL: usize = 64;
const M_CQ_HEAD: usize = 68;
const M_IDLE: usize = 72;
const D_SQ_HEAD: usize = 128;
const D_CQ_TAIL: usize = 132;
const D_IDLE: usize = 136;

/// The shape of a section: how deep its rings are, how large each buffer,
/// how long the driver spins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Slots per ring and buffers in the pool: a power of two, 1 to
    /// [`MAX_DEPTH`].
    pub depth: u32,
    /// Bytes per buffer: a multiple of [`PAGE`], at most [`MAX_PAYLOAD`].
    pub buf_size: u32,
    /// How long the driver polls an empty submission ring before it
    /// sleeps on its doorbell, at most [`MAX_SPIN_NS`].
    pub spin_ns: u64,
}

/// What is wrong with a section's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    /// The header does not start with [`MAGIC`].
    BadMagic(u64),
    /// A layout version this code does not know.
    BadVersion(u32),
    /// A depth that is not a power of two from 1 to [`MAX_DEPTH`].
    BadDepth(u32),
    /// A buffer size that is not a multiple of [`PAGE`] from [`PAGE`] to
    /// [`MAX_PAYLOAD`].
    BadBufSize(u32),
    /// A spin bound over [`MAX_SPIN_NS`].
    BadSpin(u64),
    /// A section smaller than the layout needs.
    TooSmall {
        /// Bytes the layout needs.
        need: usize,
        /// Bytes the section has.
        have: usize,
    },
}

impl Layout {
    /// A checked layout.
    pub fn new(depth: u32, buf_size: u32, spin_ns: u64) -> Result<Layout, LayoutError> {
        if !depth.is_power_of_two() || depth > MAX_DEPTH {
            return Err(LayoutError::BadDepth(depth));
        }
        if buf_size == 0 || !(buf_size as usize).is_multiple_of(PAGE) || buf_size > MAX_PAYLOAD {
            return Err(LayoutError::BadBufSize(buf_size));
        }
        if spin_ns > MAX_SPIN_NS {
            return Err(LayoutError::BadSpin(spin_ns));
        }
        Ok(Layout {
            depth,
            buf_size,
            spin_ns,
        })
    }

    fn sq(&self) -> usize {
        PAGE
    }

    fn cq(&self) -> usize {
        PAGE + self.depth as usize * DESCRIPTOR
    }

    /// Where the buffer pool starts.
    pub fn pool(&self) -> usize {
        (self.cq() + self.depth as usize * DESCRIPTOR).next_multiple_of(PAGE)
    }

    /// Where buffer `i` starts (`i < depth`).
    pub fn buf(&self, i: u32) -> usize {
        assert!(i < self.depth, "buffer {i} of {}", self.depth);
        self.pool() + i as usize * self.buf_size as usize
    }

    /// The section size this layout needs.
    pub fn size(&self) -> usize {
        self.pool() + self.depth as usize * self.buf_size as usize
    }

    /// Reads and checks the layout a section's header describes, against
    /// the section's length.
    pub fn read(s: &Section) -> Result<Layout, LayoutError> {
        if s.len() < PAGE {
            return Err(LayoutError::TooSmall {
                need: PAGE,
                have: s.len(),
            });
        }
        let magic = s.load64(H_MAGIC);
        if magic != MAGIC {
            return Err(LayoutError::BadMagic(magic));
        }
        let version = s.load(H_VERSION, Ordering::Relaxed);
        if version != VERSION {
            return Err(LayoutError::BadVersion(version));
        }
        let l = Layout::new(
            s.load(H_DEPTH, Ordering::Relaxed),
            s.load(H_BUF_SIZE, Ordering::Relaxed),
            s.load64(H_SPIN_NS),
        )?;
        if l.size() > s.len() {
            return Err(LayoutError::TooSmall {
                need: l.size(),
                have: s.len(),
            });
        }
        Ok(l)
    }
}

/// What is wrong with a peer's ring indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// The peer's producer index is `ahead` slots past the consumer's, more
    /// than the ring's `depth` (or behind it).
    BadIndex {
        /// The producer index minus the consumer's, wrapping.
        ahead: u32,
        /// The ring's depth.
        depth: u32,
    },
}

fn check_ahead(tail: u32, head: u32, depth: u32) -> Result<u32, RingError> {
    let ahead = tail.wrapping_sub(head);
    if ahead > depth {
        Err(RingError::BadIndex { ahead, depth })
    } else {
        Ok(ahead)
    }
}

/// The mediator's end of a section: it writes requests and reads answers.
#[derive(Debug)]
pub struct Submitter {
    s: Section,
    l: Layout,
    sq_tail: u32,
    cq_head: u32,
}

impl Submitter {
    /// Lays `l` out in `s` (header written, indices and flags zero) and
    /// returns the mediator's end. Do this before the driver can see the
    /// section.
    pub fn create(s: Section, l: Layout) -> Result<Submitter, LayoutError> {
        if l.size() > s.len() {
            return Err(LayoutError::TooSmall {
                need: l.size(),
                have: s.len(),
            });
        }
        s.store64(H_MAGIC, MAGIC);
        s.store(H_VERSION, VERSION, Ordering::Relaxed);
        s.store(H_DEPTH, l.depth, Ordering::Relaxed);
        s.store(H_BUF_SIZE, l.buf_size, Ordering::Relaxed);
        s.store64(H_SPIN_NS, l.spin_ns);
        for off in [M_SQ_TAIL, M_CQ_HEAD, M_IDLE, D_SQ_HEAD, D_CQ_TAIL, D_IDLE] {
            s.store(off, 0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        Ok(Submitter {
            s,
            l,
            sq_tail: 0,
            cq_head: 0,
        })
    }

    /// The section's layout (the mediator's own copy, never re-read).
    pub fn layout(&self) -> Layout {
        self.l
    }

    /// Writes `r` into the next submission slot; the driver sees it after
    /// [`Submitter::publish`]. The caller keeps at most `depth` requests in
    /// flight, so the slot is free.
    pub fn push(&mut self, r: &Request) {
        let slot = (self.sq_tail & (self.l.depth - 1)) as usize;
        self.s
            .write_desc(self.l.sq() + slot * DESCRIPTOR, &r.encode());
        self.sq_tail = self.sq_tail.wrapping_add(1);
    }

    /// Makes the pushed requests visible; returns whether the driver said
    /// it is going to sleep (then ring its doorbell).
    pub fn publish(&mut self) -> bool {
        self.s.store(M_SQ_TAIL, self.sq_tail, Ordering::Release);
        fence(Ordering::SeqCst);
        self.s.load(D_IDLE, Ordering::Relaxed) != 0
    }

    /// How many answers the driver has published and the mediator not yet
    /// taken.
    pub fn ready(&self) -> Result<u32, RingError> {
        let tail = self.s.load(D_CQ_TAIL, Ordering::Acquire);
        check_ahead(tail, self.cq_head, self.l.depth)
    }

    /// Takes the answers the driver has published, up to `max`, each copied
    /// out once and decoded, and hands them to `f` in ring order; stops
    /// early when `f` returns false (the answer it was given counts as
    /// taken). Returns how many were taken.
    pub fn take(
        &mut self,
        max: u32,
        mut f: impl FnMut(Result<Response, DecodeError>) -> bool,
    ) -> Result<u32, RingError> {
        let n = self.ready()?.min(max);
        let mut taken = 0;
        while taken < n {
            let slot = (self.cq_head & (self.l.depth - 1)) as usize;
            let d = self.s.read_desc(self.l.cq() + slot * DESCRIPTOR);
            self.cq_head = self.cq_head.wrapping_add(1);
            taken += 1;
            if !f(Response::decode(&d)) {
                break;
            }
        }
        if taken > 0 {
            self.s.store(M_CQ_HEAD, self.cq_head, Ordering::Release);
        }
        Ok(taken)
    }

    /// Says the mediator is about to sleep on its doorbell, then looks
    /// once more: returns true when it may sleep (nothing arrived in
    /// between; the driver will ring), false when answers are waiting (the
    /// flag is cleared again). A broken index counts as something to look
    /// at.
    pub fn prepare_sleep(&self) -> bool {
        self.s.store(M_IDLE, 1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.ready() == Ok(0) {
            return true;
        }
        self.s.store(M_IDLE, 0, Ordering::Relaxed);
        false
    }

    /// Says the mediator is polling again (the driver need not ring).
    pub fn awake(&self) {
        self.s.store(M_IDLE, 0, Ordering::Relaxed);
    }

    /// Copies `data` into buffer `buf` (a write's bytes), before its
    /// request is pushed.
    pub fn write_buf(&self, buf: u32, data: &[u8]) {
        assert!(data.len() <= self.l.buf_size as usize);
        self.s.copy_in(self.l.buf(buf), data);
    }

    /// Copies the first `out.len()` bytes of buffer `buf` out (a read's
    /// answer, once it has been accepted).
    pub fn read_buf(&self, buf: u32, out: &mut [u8]) {
        assert!(out.len() <= self.l.buf_size as usize);
        self.s.copy_out(self.l.buf(buf), out);
    }
}

/// The driver's end of a section: it reads requests and writes answers.
#[derive(Debug)]
pub struct Server {
    s: Section,
    l: Layout,
    sq_head: u32,
    cq_tail: u32,
}

impl Server {
    /// The driver's end of a section the mediator laid out (its header is
    /// read once and checked against the section's length).
    pub fn attach(s: Section) -> Result<Server, LayoutError> {
        let l = Layout::read(&s)?;
        Ok(Server {
            sq_head: s.load(D_SQ_HEAD, Ordering::Relaxed),
            cq_tail: s.load(D_CQ_TAIL, Ordering::Relaxed),
            s,
            l,
        })
    }

    /// The layout the header gave.
    pub fn layout(&self) -> Layout {
        self.l
    }

    /// How many requests are published and not yet taken.
    pub fn pending(&self) -> Result<u32, RingError> {
        let tail = self.s.load(M_SQ_TAIL, Ordering::Acquire);
        check_ahead(tail, self.sq_head, self.l.depth)
    }

    /// The next request, copied out once and decoded, if one is waiting.
    pub fn next_request(&mut self) -> Result<Option<Result<Request, DecodeError>>, RingError> {
        if self.pending()? == 0 {
            return Ok(None);
        }
        let slot = (self.sq_head & (self.l.depth - 1)) as usize;
        let d = self.s.read_desc(self.l.sq() + slot * DESCRIPTOR);
        self.sq_head = self.sq_head.wrapping_add(1);
        self.s.store(D_SQ_HEAD, self.sq_head, Ordering::Release);
        Ok(Some(Request::decode(&d)))
    }

    /// Writes an answer into the next completion slot; the mediator sees it
    /// after [`Server::publish`].
    pub fn complete(&mut self, r: &Response) {
        self.write_answer(self.cq_tail, &r.encode());
        self.cq_tail = self.cq_tail.wrapping_add(1);
    }

    /// Writes raw descriptor bytes at completion index `at` (any index: a
    /// fault-injecting driver uses it to write late or out of place).
    pub fn write_answer(&self, at: u32, d: &[u8; DESCRIPTOR]) {
        let slot = (at & (self.l.depth - 1)) as usize;
        self.s.write_desc(self.l.cq() + slot * DESCRIPTOR, d);
    }

    /// The completion index the next answer goes to.
    pub fn answer_index(&self) -> u32 {
        self.cq_tail
    }

    /// Moves the completion producer index to `tail` without writing
    /// anything (fault injection: a bad index, an answer published before
    /// it is written).
    pub fn set_answer_index(&mut self, tail: u32) {
        self.cq_tail = tail;
    }

    /// Makes the written answers visible; returns whether the mediator
    /// said it is going to sleep (then ring its doorbell).
    pub fn publish(&mut self) -> bool {
        self.s.store(D_CQ_TAIL, self.cq_tail, Ordering::Release);
        fence(Ordering::SeqCst);
        self.s.load(M_IDLE, Ordering::Relaxed) != 0
    }

    /// Says the driver is about to sleep on its doorbell, then looks once
    /// more: true when it may sleep, false when requests are waiting (the
    /// flag is cleared again). A broken index counts as something to look
    /// at.
    pub fn prepare_sleep(&self) -> bool {
        self.s.store(D_IDLE, 1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.pending() == Ok(0) {
            return true;
        }
        self.s.store(D_IDLE, 0, Ordering::Relaxed);
        false
    }

    /// Says the driver is polling again.
    pub fn awake(&self) {
        self.s.store(D_IDLE, 0, Ordering::Relaxed);
    }

    /// Where buffer `buf`'s first `len` bytes are, or `None` when the
    /// mediator named a buffer or a length the layout does not have: for a
    /// driver that keeps several requests in flight, each in its own buffer,
    /// and hands the buffer to its device until the request completes.
    /// Dereferencing it is the caller's business: the buffer is the
    /// driver's until it answers, and nothing else in the process may use
    /// it meanwhile (a driver hands one buffer to one request at a time).
    pub fn buf_ptr(&self, buf: u32, len: u32) -> Option<core::ptr::NonNull<[u8]>> {
        if buf >= self.l.depth || len > self.l.buf_size {
            return None;
        }
        Some(self.s.ptr(self.l.buf(buf), len as usize))
    }

    /// Buffer `buf`'s first `len` bytes, or `None` when the mediator named
    /// a buffer or a length the layout does not have.
    pub fn buf_mut(&mut self, buf: u32, len: u32) -> Option<&mut [u8]> {
        if buf >= self.l.depth || len > self.l.buf_size {
            return None;
        }
        let off = self.l.buf(buf);
        // SAFETY: the slice borrows `self` mutably, so nothing else in this
        // process uses the section while it lives; the buffer is the
        // driver's until it answers (the ring's rules).
        Some(unsafe { self.s.slice_mut(off, len as usize) })
    }
}

#[cfg(test)]
mod tests;
