//! The in-flight bookkeeping shared by every class, written once: request
//! ids, deadlines and the set of requests awaiting an answer
//! ([`InFlight`]); what a contract does with them the same way whatever its
//! class ([`Requests`], which every contract embeds, over the class's
//! [`ClassOp`]); and the checks every class makes of an answer before its
//! own (`check_header`, `exact_len`, `at_most_len`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moat_service_proto::{status, Request, Response};

use super::{ClientError, ContractLimits, Violation};

/// A request in flight, as [`InFlight`] remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending<T> {
    /// Its id.
    pub id: u64,
    /// What the class remembers of it ([`BlockOp`](super::BlockOp), [`CharOp`](super::CharOp),
    /// [`CallOp`](super::CallOp)).
    pub request: T,
    /// When the client's request was first issued (a re-issue keeps it).
    pub issued: Instant,
    /// When the driver must have answered it (`None`: beyond what an
    /// [`Instant`] can represent, so never).
    pub deadline: Option<Instant>,
}

/// Request ids, deadlines and the set of requests in flight: the part of
/// every contract that does not depend on the class.
///
/// Ids start at 1 and increase by one per issued request; `u64::MAX` is
/// never issued. The set holds at most `max_in_flight` requests; what is
/// remembered of completed requests is only the next id to issue.
#[derive(Debug, Clone)]
pub struct InFlight<T> {
    slots: BTreeMap<u64, Slot<T>>,
    pub(super) next_id: u64,
    max: usize,
    timeout: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Slot<T> {
    request: T,
    issued: Instant,
    deadline: Option<Instant>,
    /// It has a deadline (a net receive buffer has none: a quiet network
    /// is not a fault).
    timed: bool,
}

impl<T: Copy> InFlight<T> {
    /// An empty set that holds at most `max_in_flight` requests (at least
    /// 1) and gives each `timeout` to be answered.
    pub fn new(max_in_flight: usize, timeout: Duration) -> InFlight<T> {
        InFlight {
            slots: BTreeMap::new(),
            next_id: 1,
            max: max_in_flight.max(1),
            timeout,
        }
    }

    /// Records a new request at `now` and returns its id.
    pub fn issue(&mut self, request: T, now: Instant) -> Result<u64, ClientError> {
        self.issue_as(request, now, true)
    }

    /// Records a new request at `now` that no deadline applies to, and
    /// returns its id.
    pub fn issue_untimed(&mut self, request: T, now: Instant) -> Result<u64, ClientError> {
        self.issue_as(request, now, false)
    }

    fn issue_as(&mut self, request: T, now: Instant, timed: bool) -> Result<u64, ClientError> {
        if self.slots.len() >= self.max {
            return Err(ClientError::Busy);
        }
        let id = self.next_id;
        if id == u64::MAX {
            return Err(ClientError::IdsExhausted);
        }
        self.next_id = id + 1;
        self.slots.insert(
            id,
            Slot {
                request,
                issued: now,
                deadline: if timed {
                    now.checked_add(self.timeout)
                } else {
                    None
                },
                timed,
            },
        );
        Ok(id)
    }

    /// The request in flight under `id`, or what is wrong with an answer
    /// to `id`: [`Violation::Unsolicited`] for id 0 or when nothing is in
    /// flight, [`Violation::Duplicate`] for an id completed already,
    /// [`Violation::UnknownId`] for an id never issued.
    pub fn lookup(&self, id: u64) -> Result<Pending<T>, Violation> {
        if let Some(s) = self.slots.get(&id) {
            return Ok(pending(id, s));
        }
        if id == 0 {
            Err(Violation::Unsolicited { id })
        } else if id < self.next_id {
            Err(Violation::Duplicate { id })
        } else if self.slots.is_empty() {
            Err(Violation::Unsolicited { id })
        } else {
            Err(Violation::UnknownId { id })
        }
    }

    /// Removes a request from the set (it is completed).
    pub fn complete(&mut self, id: u64) -> Option<Pending<T>> {
        self.slots.remove(&id).map(|s| pending(id, &s))
    }

    /// The request whose deadline passed first (before `now`), if any; ties
    /// go to the lowest id.
    pub fn expired(&self, now: Instant) -> Option<u64> {
        self.slots
            .iter()
            .filter_map(|(id, s)| s.deadline.filter(|d| now > *d).map(|d| (d, *id)))
            .min()
            .map(|(_, id)| id)
    }

    /// The earliest deadline in the set (when to call
    /// [`InFlight::expired`] next).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slots.values().filter_map(|s| s.deadline).min()
    }

    /// Gives every request in the set a new deadline from `now` (after it
    /// has been sent to a new driver).
    pub fn rearm(&mut self, now: Instant) {
        let deadline = now.checked_add(self.timeout);
        for s in self.slots.values_mut() {
            if s.timed {
                s.deadline = deadline;
            }
        }
    }

    /// Removes every request `drop` says to, returning their ids in issue
    /// order. They count as completed: a later answer to one is a
    /// duplicate.
    pub fn drop_where(&mut self, mut drop: impl FnMut(&T) -> bool) -> Vec<u64> {
        let ids: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| drop(&s.request))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.slots.remove(id);
        }
        ids
    }

    /// Every request in flight, in issue order.
    pub fn pending(&self) -> Vec<Pending<T>> {
        self.slots.iter().map(|(id, s)| pending(*id, s)).collect()
    }

    /// Empties the set and returns the ids it held, in issue order. They
    /// count as completed: a later answer to one is a duplicate.
    pub fn fail_all(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.slots).into_keys().collect()
    }

    /// How many requests are in flight.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether a further request would be refused as busy.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.max
    }

    /// The most requests in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max
    }

    /// The id the next request will get.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }
}

fn pending<T: Copy>(id: u64, s: &Slot<T>) -> Pending<T> {
    Pending {
        id,
        request: s.request,
        issued: s.issued,
        deadline: s.deadline,
    }
}

/// What a class remembers of a request ([`BlockOp`](super::BlockOp),
/// [`CharOp`](super::CharOp), [`CallOp`](super::CallOp)): enough to send it
/// again, under the same id, to a restarted driver.
pub trait ClassOp: Copy {
    /// The service class whose requests these are
    /// ([`class::BLOCK`](moat_service_proto::class::BLOCK) and the others).
    const CLASS: u8;

    /// The request to send for this operation under `id` (its payload, if
    /// any, follows it).
    fn request(&self, id: u64) -> Request;
}

/// The requests in flight under one contract: its [`InFlight`] set, the
/// limits it was made with, and what every class does with them in the
/// same way (issue and encode a request, check an answer's id, class,
/// status and deadline, complete it, re-issue or give up on everything).
///
/// Every contract embeds one and hands it to the provided methods of
/// [`Contract`](super::Contract). Outside this module it has no methods of
/// its own: requests enter it only through a contract's checks.
#[derive(Debug, Clone)]
pub struct Requests<T> {
    limits: ContractLimits,
    pub(super) flight: InFlight<T>,
}

impl<T: ClassOp> Requests<T> {
    /// An empty set under `limits`, as [`ContractLimits::effective`] makes
    /// them.
    pub(super) fn new(limits: ContractLimits) -> Requests<T> {
        let limits = limits.effective();
        Requests {
            limits,
            flight: InFlight::new(limits.max_in_flight, limits.deadline),
        }
    }

    /// The limits in force.
    pub(super) fn limits(&self) -> ContractLimits {
        self.limits
    }

    /// Refuses a request of more than `max_io` bytes.
    pub(super) fn check_max_io(&self, len: u32) -> Result<(), ClientError> {
        let max = self.limits.max_io;
        if len > max {
            Err(ClientError::TooLong { len, max })
        } else {
            Ok(())
        }
    }

    /// Records `op` (already checked by the class) as issued at `now` and
    /// returns the request to send, with its fresh id.
    pub(super) fn issue(&mut self, op: T, now: Instant) -> Result<Request, ClientError> {
        let id = self.flight.issue(op, now)?;
        Ok(op.request(id))
    }

    /// As [`Requests::issue`], for a request without a deadline.
    pub(super) fn issue_untimed(&mut self, op: T, now: Instant) -> Result<Request, ClientError> {
        let id = self.flight.issue_untimed(op, now)?;
        Ok(op.request(id))
    }

    /// See [`InFlight::drop_where`].
    pub(super) fn drop_where(&mut self, drop: impl FnMut(&T) -> bool) -> Vec<u64> {
        self.flight.drop_where(drop)
    }

    /// Checks a driver's answer that arrived at `now`: first what every
    /// class checks (the id is in flight, the class is `T`'s, the status
    /// exists, the deadline has not passed), then the class's own `rule`,
    /// given the request and the status. Only if both accept it is the
    /// request completed; on a violation nothing changes.
    pub(super) fn answer<C>(
        &mut self,
        resp: &Response,
        now: Instant,
        rule: impl FnOnce(&Pending<T>, u8) -> Result<C, Violation>,
    ) -> Result<C, Violation> {
        let p = self.flight.lookup(resp.id)?;
        let st = check_header(resp, T::CLASS)?;
        if p.deadline.is_some_and(|d| now > d) {
            return Err(Violation::Deadline);
        }
        let done = rule(&p, st)?;
        self.flight.complete(p.id);
        Ok(done)
    }

    /// See [`InFlight::expired`].
    pub(super) fn expired(&self, now: Instant) -> Option<u64> {
        self.flight.expired(now)
    }

    /// See [`InFlight::next_deadline`].
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.flight.next_deadline()
    }

    /// See [`InFlight::pending`].
    pub(super) fn pending(&self) -> Vec<Pending<T>> {
        self.flight.pending()
    }

    /// See [`InFlight::len`].
    pub(super) fn len(&self) -> usize {
        self.flight.len()
    }

    /// Re-arms every deadline from `now` and returns the requests to send
    /// again, same ids, in issue order.
    pub(super) fn reissue(&mut self, now: Instant) -> Vec<Request> {
        self.flight.rearm(now);
        self.flight
            .pending()
            .iter()
            .map(|p| p.request.request(p.id))
            .collect()
    }

    /// See [`InFlight::fail_all`].
    pub(super) fn fail_all(&mut self) -> Vec<u64> {
        self.flight.fail_all()
    }
}

/// The checks of an answer's header that every class makes, the block
/// INFO answer's included: the class is the service's and the status
/// exists. Returns the status.
pub(super) fn check_header(resp: &Response, service_class: u8) -> Result<u8, Violation> {
    if resp.class != service_class {
        return Err(Violation::WrongClass {
            id: resp.id,
            expected: service_class,
            got: resp.class,
        });
    }
    if resp.status > status::MAX {
        return Err(Violation::BadStatus {
            id: resp.id,
            status: resp.status,
        });
    }
    Ok(resp.status)
}

/// An answer whose payload must be exactly `expected` bytes.
pub(super) fn exact_len(id: u64, expected: u32, got: u32) -> Result<(), Violation> {
    if got == expected {
        Ok(())
    } else {
        Err(Violation::WrongLength { id, expected, got })
    }
}

/// An answer whose payload may be at most `max` bytes.
pub(super) fn at_most_len(id: u64, max: u32, got: u32) -> Result<(), Violation> {
    if got <= max {
        Ok(())
    } else {
        Err(Violation::TooLong { id, max, got })
    }
}
