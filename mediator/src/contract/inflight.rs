//! The in-flight bookkeeping shared by every class: request ids,
//! deadlines and the set of requests awaiting an answer ([`InFlight`]),
//! and the checks every class makes of an answer before its own
//! (`check_common`, `exact_len`, `at_most_len`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moat_service_proto::{status, Response};

use super::{ClientError, Violation};

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
                deadline: now.checked_add(self.timeout),
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
            s.deadline = deadline;
        }
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

/// The checks every class makes of an answer before its own: the id is in
/// flight, the class and status are right, the deadline has not passed.
pub(super) fn check_common<T: Copy>(
    flight: &InFlight<T>,
    resp: &Response,
    service_class: u8,
    now: Instant,
) -> Result<(Pending<T>, u8), Violation> {
    let id = resp.id;
    let p = flight.lookup(id)?;
    if resp.class != service_class {
        return Err(Violation::WrongClass {
            id,
            expected: service_class,
            got: resp.class,
        });
    }
    if resp.status > status::MAX {
        return Err(Violation::BadStatus {
            id,
            status: resp.status,
        });
    }
    if p.deadline.is_some_and(|d| now > d) {
        return Err(Violation::Deadline);
    }
    Ok((p, resp.status))
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
