//! The generic contract: request/response calls carrying opaque payloads
//! of bounded size, for services whose class has no contract of its own.

use std::time::Instant;

use moat_service_proto::{class, op, status, Request, Response, MAX_PAYLOAD};

use super::inflight::{at_most_len, check_common, exact_len};
use super::{ClientError, Contract, ContractLimits, InFlight, Pending, Violation};

/// What a generic contract remembers of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallOp {
    /// Bytes of the call's opaque request.
    pub len: u32,
}

impl CallOp {
    fn request(&self, id: u64) -> Request {
        Request {
            op: op::CALL,
            class: class::GENERIC,
            id,
            offset: 0,
            len: self.len,
            payload: self.len,
        }
    }
}

/// An accepted answer to a generic call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallCompletion {
    /// The call's id.
    pub id: u64,
    /// Bytes of the call's request.
    pub len: u32,
    /// The driver's status ([`status::OK`] to [`status::MAX`]).
    pub status: u8,
    /// Payload bytes that follow the answer's header (the opaque answer).
    pub payload: u32,
}

/// The contract of a generic request/response service: a CALL carries an
/// opaque request of 0 to `max_io` bytes and is answered with an opaque
/// answer of 0 to `max_response` bytes on success, none on failure.
#[derive(Debug, Clone)]
pub struct GenericContract {
    limits: ContractLimits,
    max_response: u32,
    flight: InFlight<CallOp>,
}

impl GenericContract {
    /// A contract whose answers carry at most `max_response` bytes (at most
    /// [`MAX_PAYLOAD`]; a larger value is lowered to it).
    pub fn new(limits: ContractLimits, max_response: u32) -> GenericContract {
        let limits = limits.effective();
        GenericContract {
            limits,
            max_response: max_response.min(MAX_PAYLOAD),
            flight: InFlight::new(limits.max_in_flight, limits.deadline),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> ContractLimits {
        self.limits
    }

    /// The most bytes an answer may carry.
    pub fn max_response(&self) -> u32 {
        self.max_response
    }

    /// Checks a call of `len` request bytes without issuing it.
    pub fn check_client(&self, len: u32) -> Result<(), ClientError> {
        if len > self.limits.max_io {
            Err(ClientError::TooLong {
                len,
                max: self.limits.max_io,
            })
        } else {
            Ok(())
        }
    }

    /// Checks a call and issues it at `now`; returns the request to send
    /// (its `len` bytes follow it).
    pub fn issue(&mut self, len: u32, now: Instant) -> Result<Request, ClientError> {
        self.check_client(len)?;
        let c = CallOp { len };
        let id = self.flight.issue(c, now)?;
        Ok(c.request(id))
    }

    /// Checks a driver's answer that arrived at `now`: same id, class,
    /// status and deadline rules as every class; a successful answer
    /// carries at most `max_response` bytes, a failed one nothing.
    pub fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<CallCompletion, Violation> {
        let (p, st) = check_common(&self.flight, resp, class::GENERIC, now)?;
        if st == status::OK {
            at_most_len(p.id, self.max_response, resp.len)?;
        } else {
            exact_len(p.id, 0, resp.len)?;
        }
        self.flight.complete(p.id);
        Ok(CallCompletion {
            id: p.id,
            len: p.request.len,
            status: st,
            payload: resp.len,
        })
    }

    /// The id of a call whose deadline passed before `now`.
    pub fn expired(&self, now: Instant) -> Option<u64> {
        self.flight.expired(now)
    }

    /// The earliest deadline of a call in flight.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.flight.next_deadline()
    }

    /// The calls in flight, in issue order.
    pub fn in_flight(&self) -> Vec<Pending<CallOp>> {
        self.flight.pending()
    }

    /// How many calls are in flight.
    pub fn in_flight_len(&self) -> usize {
        self.flight.len()
    }

    /// After a restart: re-arms every in-flight deadline from `now` and
    /// returns the calls, same ids, in issue order.
    pub fn reissue(&mut self, now: Instant) -> Vec<Request> {
        self.flight.rearm(now);
        self.flight
            .pending()
            .iter()
            .map(|p| p.request.request(p.id))
            .collect()
    }

    /// Gives up on every call in flight; returns their ids in issue order.
    pub fn fail_all(&mut self) -> Vec<u64> {
        self.flight.fail_all()
    }
}

impl Contract for GenericContract {
    type Completion = CallCompletion;

    fn class(&self) -> u8 {
        class::GENERIC
    }

    fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<CallCompletion, Violation> {
        GenericContract::check_response(self, resp, now)
    }

    fn expired(&self, now: Instant) -> Option<u64> {
        GenericContract::expired(self, now)
    }

    fn next_deadline(&self) -> Option<Instant> {
        GenericContract::next_deadline(self)
    }

    fn in_flight_len(&self) -> usize {
        GenericContract::in_flight_len(self)
    }

    fn reissue(&mut self, now: Instant) -> Vec<Request> {
        GenericContract::reissue(self, now)
    }

    fn fail_all(&mut self) -> Vec<u64> {
        GenericContract::fail_all(self)
    }
}
