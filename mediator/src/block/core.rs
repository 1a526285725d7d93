//! The engine's state, behind one lock: the contract, the live driver
//! incarnation's ring, and every client request from submission to
//! collection. Whoever holds the lock drives it: a client submitting
//! writes the request into the ring; a client waiting for its answer, or
//! the supervisor woken by the driver's doorbell, takes what the driver
//! published, checks each answer against the contract right there, and
//! marks the request done (waking its client if it sleeps). No request is
//! handed from thread to thread on its way.
//!
//! A client request of more than `max_io` bytes is split into parts; a
//! part is what the contract and the ring see. A part's life:
//!
//! ```text
//!   Queued ──issue──▶ Issued{buf} ────accepted answer──▶ Done ──collect──▶ gone
//!     │                  │    ▲                              ▲
//!     │                  │    └── driver replaced: re-issued ─┘ (same id,
//!     │                  │        on the new section, a new buffer)
//!     └──────────────────┴──▶ Done(error): refused, circuit open, shut down
//! ```
//!
//! A read's buffer stays the part's until its client copies the bytes out
//! (collect), so the copy to the client is the only one; a write's bytes
//! are kept by the mediator until its answer, so a re-issue never reads a
//! dead driver's section.

use std::collections::{HashMap, VecDeque};

use super::parts::Parts;
use std::io;
use std::sync::Arc;
use std::thread::Thread;
use std::time::Instant;

use moat_service_proto::ring::RingError;
use moat_service_proto::{op, status, DecodeError, Response};

use super::link::Link;
use super::region::{Bell, Region};
use super::{io_err, Config, Counters};
use crate::contract::{BlockContract, ClientError, Contract, Violation};
use moat_monitor::VmStats;

/// A write's bytes: the client's data (shared by its parts) and where this
/// part's start.
pub(crate) type WriteData = (Arc<[u8]>, usize);

/// One part of a client request.
pub(crate) struct Part {
    pub(crate) op: u8,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) data: Option<WriteData>,
    pub(crate) state: State,
    /// The client thread parked waiting for it.
    pub(crate) waiter: Option<Thread>,
    /// Its ticket was dropped: nobody will collect it.
    pub(crate) abandoned: bool,
}

pub(crate) enum State {
    Queued,
    Issued { id: u64, buf: u32 },
    Done(io::Result<Option<ReadData>>),
}

/// An accepted read answer: its bytes, in the section of the incarnation
/// that wrote them.
pub(crate) struct ReadData {
    region: Arc<Region>,
    buf: u32,
    len: u32,
    generation: u64,
}

pub(crate) struct Core {
    pub(crate) config: Config,
    pub(crate) contract: BlockContract,
    /// The live incarnation, once its handshake passed.
    pub(crate) link: Option<Link>,
    /// Incarnations given up on, for the supervisor to end.
    pub(crate) dead: Vec<Link>,
    /// The generation of the last incarnation started.
    pub(crate) generation: u64,
    /// Driver starts so far (each picks its fault seed).
    pub(crate) incarnations: u64,
    parts: Parts<Part>,
    /// Parts waiting for a driver, a free buffer or room in the contract.
    queue: VecDeque<u64>,
    pub(crate) counters: Counters,
    /// What the VMMs of the incarnations given up on had counted (kvm).
    pub(crate) vm_past: Option<VmStats>,
    /// Restarts in a row without progress (see `Config::max_failed_restarts`).
    pub(crate) failed_restarts: u32,
    /// The live driver completed a request.
    pub(crate) progress: bool,
    pub(crate) circuit_open_until: Option<Instant>,
    /// A client thread is polling the completion ring.
    pub(crate) poller: bool,
    /// Client threads parked until their answer is taken. While there are
    /// any and nobody polls, the driver is asked to ring (the mediator's
    /// idle flag); otherwise answers may wait in the ring until the next
    /// client looks (nobody is waiting for them).
    pub(crate) sleepers: usize,
    /// Shutting down: nothing new is accepted.
    pub(crate) closing: bool,
    /// Wakes the supervisor (a link broke, shutdown).
    control: Arc<Bell>,
    scratch: Vec<Result<Response, DecodeError>>,
}

impl Core {
    pub(crate) fn new(config: Config, contract: BlockContract, control: Arc<Bell>) -> Core {
        Core {
            config,
            contract,
            link: None,
            dead: Vec::new(),
            generation: 0,
            incarnations: 0,
            parts: Parts::new(),
            queue: VecDeque::new(),
            counters: Counters::default(),
            vm_past: None,
            failed_restarts: 0,
            progress: false,
            circuit_open_until: None,
            poller: false,
            sleepers: 0,
            closing: false,
            control,
            scratch: Vec::new(),
        }
    }

    /// Accepts a client part (already checked against the geometry) and
    /// issues it if it can; returns its key.
    pub(crate) fn submit(
        &mut self,
        op: u8,
        offset: u64,
        len: u32,
        data: Option<WriteData>,
        now: Instant,
    ) -> u64 {
        self.counters.submitted += 1;
        let key = self.parts.insert(Part {
            op,
            offset,
            len,
            data,
            state: State::Queued,
            waiter: None,
            abandoned: false,
        });
        if self.closing {
            self.finish(key, Err(io_err("the mediator has shut down")));
        } else {
            self.queue.push_back(key);
            self.pump(now);
        }
        key
    }

    /// Issues queued parts while there is a driver, a free buffer and room
    /// in the contract, and publishes them in one go.
    pub(crate) fn pump(&mut self, now: Instant) {
        if self.circuit_open_until.is_some() {
            let why = format!(
                "the driver failed {} restarts in a row; the mediator is not retrying yet",
                self.config.max_failed_restarts
            );
            while let Some(key) = self.queue.pop_front() {
                self.finish(key, Err(io_err(why.clone())));
            }
            return;
        }
        let mut pushed = false;
        while let Some(&key) = self.queue.front() {
            let Some(link) = self.link.as_mut() else {
                break;
            };
            let Some(&buf) = link.free.last() else {
                break;
            };
            let Some(p) = self.parts.get(key) else {
                self.queue.pop_front();
                continue;
            };
            match self.contract.issue(p.op, p.offset, p.len, now) {
                Ok(mut req) => {
                    link.free.pop();
                    req.buf = buf;
                    if let Some((data, at)) = &p.data {
                        link.ring.write_buf(buf, &data[*at..*at + p.len as usize]);
                    }
                    link.ring.push(&req);
                    link.owners[buf as usize] = Some(key);
                    pushed = true;
                    if let Some(p) = self.parts.get_mut(key) {
                        p.state = State::Issued { id: req.id, buf };
                    }
                    self.counters.requests += 1;
                    self.queue.pop_front();
                }
                Err(ClientError::Busy) => break,
                Err(e) => {
                    self.queue.pop_front();
                    self.finish(
                        key,
                        Err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())),
                    );
                }
            }
        }
        if pushed {
            let n = self.contract.in_flight_len();
            self.counters.peak_in_flight = self.counters.peak_in_flight.max(n);
            self.publish();
        }
    }

    fn publish(&mut self) {
        if let Some(link) = self.link.as_mut() {
            if link.ring.publish() {
                link.region.kick();
                self.counters.kicks += 1;
            }
        }
    }

    /// Takes every answer the live driver has published and checks each
    /// against the contract; the first violation ends the incarnation.
    pub(crate) fn reap(&mut self, now: Instant) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let depth = link.ring.layout().depth;
        let mut got = std::mem::take(&mut self.scratch);
        let taken = link.ring.take(depth, |a| {
            got.push(a);
            true
        });
        let mut broke = match taken {
            Err(RingError::BadIndex { ahead, depth }) => Some(Violation::BadIndex { ahead, depth }),
            Ok(_) => None,
        };
        for a in got.drain(..) {
            if broke.is_some() {
                break;
            }
            let r = match a {
                Err(e) => Err(Violation::BadHeader(e)),
                Ok(r) => self.accept(r, now),
            };
            broke = r.err();
        }
        self.scratch = got;
        if let Some(v) = broke {
            self.violation(v.kind());
        }
    }

    /// One answer, copied out of the section already: first the buffer it
    /// names (the transport's rule: a request's answer is in the request's
    /// own buffer), then the contract.
    fn accept(&mut self, r: Response, now: Instant) -> Result<(), Violation> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        let depth = link.ring.layout().depth;
        // The part that owns the buffer the answer names, if it is the
        // answer's request.
        let owner = link
            .owners
            .get(r.buf as usize)
            .copied()
            .flatten()
            .filter(|&k| matches!(self.parts.get(k).map(|p| &p.state), Some(State::Issued { id, .. }) if *id == r.id));
        let Some(key) = owner else {
            // Not the buffer of that request: a buffer fault if the id is
            // in flight, else whatever the contract makes of the id.
            let issued = self.parts.iter().find_map(|(_, p)| match p.state {
                State::Issued { id, buf } if id == r.id => Some(buf),
                _ => None,
            });
            if let Some(expected) = issued {
                return Err(if r.buf >= depth {
                    Violation::OutsidePool {
                        id: r.id,
                        buf: r.buf,
                        buffers: depth,
                    }
                } else {
                    Violation::WrongBuffer {
                        id: r.id,
                        buf: r.buf,
                        expected,
                    }
                });
            }
            self.contract.check_response(&r, now)?;
            // Accepted for no issued part: cannot happen while the two are
            // kept together, and is counted if it does.
            self.counters.duplicate_completions += 1;
            return Ok(());
        };
        let done = self.contract.check_response(&r, now)?;
        self.failed_restarts = 0;
        self.progress = true;
        let buf = r.buf;
        link.owners[buf as usize] = None;
        let result = if done.status == status::OK {
            if done.op == op::READ {
                self.counters.bytes_read += u64::from(done.len);
                Ok(Some(ReadData {
                    region: link.region.clone(),
                    buf,
                    len: done.len,
                    generation: link.generation,
                }))
            } else {
                link.free.push(buf);
                if done.op == op::WRITE {
                    self.counters.bytes_written += u64::from(done.len);
                }
                Ok(None)
            }
        } else {
            link.free.push(buf);
            Err(io_err(format!(
                "the driver reported status {} ({}) for request {}",
                done.status,
                status_name(done.status),
                done.id
            )))
        };
        self.finish(key, result);
        Ok(())
    }

    /// Marks a part done, counts it, wakes its client; an abandoned part
    /// is dropped at once.
    pub(crate) fn finish(&mut self, key: u64, result: io::Result<Option<ReadData>>) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        if result.is_ok() {
            self.counters.completed += 1;
        } else {
            self.counters.failed += 1;
        }
        p.state = State::Done(result);
        p.data = None;
        if let Some(t) = p.waiter.take() {
            t.unpark();
        }
        if p.abandoned {
            self.collect(key, None);
        }
    }

    /// Whether a part is done (or unknown).
    pub(crate) fn is_done(&self, key: u64) -> bool {
        self.parts
            .get(key)
            .is_none_or(|p| matches!(p.state, State::Done(_)))
    }

    /// A done part's result, its read bytes copied into `out` (once, from
    /// the section); its buffer is free again. `None` while it is not done.
    pub(crate) fn collect(&mut self, key: u64, out: Option<&mut [u8]>) -> Option<io::Result<()>> {
        if !self.is_done(key) {
            return None;
        }
        let p = self.parts.remove(key)?;
        let State::Done(r) = p.state else {
            return None;
        };
        Some(r.map(|data| {
            if let Some(d) = data {
                if let Some(out) = out {
                    let n = out.len().min(d.len as usize);
                    d.region.read_buf(d.buf, &mut out[..n]);
                }
                if let Some(link) = self.link.as_mut() {
                    if link.generation == d.generation {
                        link.free.push(d.buf);
                    }
                }
            }
        }))
    }

    /// The client no longer wants a part: dropped now if done, when done
    /// otherwise.
    pub(crate) fn abandon(&mut self, key: u64, now: Instant) {
        if self.is_done(key) {
            self.collect(key, None);
            self.pump(now);
        } else if let Some(p) = self.parts.get_mut(key) {
            p.abandoned = true;
            p.waiter = None;
        }
    }

    /// Parks `t` as the waiter of a part not yet done.
    pub(crate) fn set_waiter(&mut self, key: u64, t: Thread) {
        if let Some(p) = self.parts.get_mut(key) {
            p.waiter = Some(t);
        }
    }

    /// The live driver broke its contract, crashed or missed a deadline:
    /// counted, the incarnation is given up on (the supervisor ends it and
    /// starts the next), its requests stay in flight for the next.
    pub(crate) fn violation(&mut self, kind: &'static str) {
        *self.counters.violations.entry(kind).or_insert(0) += 1;
        if let Some(l) = self.link.take() {
            if let Some(s) = l.proc.vm_stats() {
                self.vm_past.get_or_insert_with(VmStats::default).add(&s);
            }
            self.dead.push(l);
        }
        self.poller = false;
        self.control.ring();
    }

    /// The counters, with what the drivers' VMMs counted so far.
    pub(crate) fn counters(&self) -> Counters {
        let mut c = self.counters.clone();
        let live = self.link.as_ref().and_then(|l| l.proc.vm_stats());
        c.vm = match (live, self.vm_past) {
            (Some(mut s), past) => {
                s.add(&past.unwrap_or_default());
                Some(s)
            }
            (None, past) => past,
        };
        c
    }

    /// A poller is done polling: if anyone sleeps, the driver is to ring
    /// from now on; otherwise the flag stays down (the next client to wait
    /// looks at the ring itself, and a driver that is answering fast rings
    /// nobody).
    pub(crate) fn end_poll(&mut self, now: Instant) {
        self.poller = false;
        if self.sleepers > 0 {
            self.make_idle(now);
        }
    }

    /// Says the mediator sleeps (the driver rings from now on), taking
    /// whatever arrived meanwhile first.
    pub(crate) fn make_idle(&mut self, now: Instant) {
        loop {
            match self.link.as_ref() {
                Some(l) if !l.ring.prepare_sleep() => self.reap(now),
                _ => break,
            }
        }
        self.pump(now);
    }

    /// Installs a new incarnation whose handshake passed, and re-issues on
    /// it, same ids, every request in flight, then what was queued.
    pub(crate) fn install(&mut self, mut link: Link, now: Instant) -> u64 {
        self.progress = false;
        let again = self.contract.reissue(now);
        let n = again.len() as u64;
        let by_id: HashMap<u64, u64> = self
            .parts
            .iter()
            .filter_map(|(k, p)| match p.state {
                State::Issued { id, .. } => Some((id, k)),
                _ => None,
            })
            .collect();
        for mut req in again {
            let Some(&key) = by_id.get(&req.id) else {
                continue;
            };
            let Some(p) = self.parts.get_mut(key) else {
                continue;
            };
            let buf = link
                .free
                .pop()
                .expect("a section has a buffer for every request in flight");
            req.buf = buf;
            if let Some((data, at)) = &p.data {
                link.ring.write_buf(buf, &data[*at..*at + p.len as usize]);
            }
            link.ring.push(&req);
            link.owners[buf as usize] = Some(key);
            p.state = State::Issued { id: req.id, buf };
        }
        self.link = Some(link);
        self.counters.reissued += n;
        self.counters.requests += n;
        if n > 0 {
            self.publish();
        }
        self.pump(now);
        n
    }

    /// Fails every request in flight and queued (the circuit opened).
    pub(crate) fn open_circuit(&mut self, now: Instant) {
        self.circuit_open_until = Some(now + self.config.retry_after);
        self.counters.circuit_opened += 1;
        let why = format!(
            "the driver failed {} restarts in a row",
            self.config.max_failed_restarts
        );
        let ids = self.contract.fail_all();
        for key in self.issued_keys(ids) {
            self.finish(key, Err(io_err(why.clone())));
        }
        self.pump(now);
    }

    /// Fails everything not done (the mediator is shutting down).
    pub(crate) fn fail_everything(&mut self, why: &str) {
        let ids = self.contract.fail_all();
        for key in self.issued_keys(ids) {
            self.finish(key, Err(io_err(why)));
        }
        while let Some(key) = self.queue.pop_front() {
            self.finish(key, Err(io_err(why)));
        }
    }

    /// The keys of the issued parts with these request ids.
    fn issued_keys(&self, ids: Vec<u64>) -> Vec<u64> {
        let ids: std::collections::HashSet<u64> = ids.into_iter().collect();
        self.parts
            .iter()
            .filter_map(|(k, p)| match p.state {
                State::Issued { id, .. } if ids.contains(&id) => Some(k),
                _ => None,
            })
            .collect()
    }

    /// Fails what is queued (not yet sent to any driver).
    pub(crate) fn fail_queued(&mut self, why: &str) {
        while let Some(key) = self.queue.pop_front() {
            self.finish(key, Err(io_err(why)));
        }
    }
}

fn status_name(s: u8) -> &'static str {
    match s {
        status::IO_ERROR => "I/O error",
        status::UNSUPPORTED => "unsupported",
        status::INVALID => "invalid request",
        _ => "unknown",
    }
}
