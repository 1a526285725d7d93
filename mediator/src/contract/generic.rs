//! The generic contract: request/response calls carrying opaque payloads
//! of bounded size, for services whose class has no contract of its own.

use std::time::Instant;

use moat_service_proto::{class, op, status, Request, Response, MAX_PAYLOAD};

use super::inflight::{at_most_len, exact_len};
use super::{ClassOp, ClientError, Contract, ContractLimits, Requests, Violation};

/// What a generic contract remembers of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallOp {
    /// Bytes of the call's opaque request.
    pub len: u32,
}

impl ClassOp for CallOp {
    const CLASS: u8 = class::GENERIC;

    fn request(&self, id: u64) -> Request {
        Request {
            op: op::CALL,
            class: class::GENERIC,
            id,
            offset: 0,
            len: self.len,
            buf: 0,
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
    max_response: u32,
    requests: Requests<CallOp>,
}

impl GenericContract {
    /// A contract whose answers carry at most `max_response` bytes (at most
    /// [`MAX_PAYLOAD`]; a larger value is lowered to it).
    pub fn new(limits: ContractLimits, max_response: u32) -> GenericContract {
        GenericContract {
            max_response: max_response.min(MAX_PAYLOAD),
            requests: Requests::new(limits),
        }
    }

    /// The most bytes an answer may carry.
    pub fn max_response(&self) -> u32 {
        self.max_response
    }

    /// Checks a call of `len` request bytes without issuing it.
    pub fn check_client(&self, len: u32) -> Result<(), ClientError> {
        self.requests.check_max_io(len)
    }

    /// Checks a call and issues it at `now`; returns the request to send
    /// (its `len` bytes follow it).
    pub fn issue(&mut self, len: u32, now: Instant) -> Result<Request, ClientError> {
        self.check_client(len)?;
        self.requests.issue(CallOp { len }, now)
    }
}

impl Contract for GenericContract {
    type Op = CallOp;
    type Completion = CallCompletion;

    fn requests(&self) -> &Requests<CallOp> {
        &self.requests
    }

    fn requests_mut(&mut self) -> &mut Requests<CallOp> {
        &mut self.requests
    }

    /// Checks a driver's answer that arrived at `now`: same id, class,
    /// status and deadline rules as every class; a successful answer
    /// carries at most `max_response` bytes, a failed one nothing.
    fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<CallCompletion, Violation> {
        let max_response = self.max_response;
        self.requests.answer(resp, now, |p, st| {
            if st == status::OK {
                at_most_len(p.id, max_response, resp.len)?;
            } else {
                exact_len(p.id, 0, resp.len)?;
            }
            Ok(CallCompletion {
                id: p.id,
                len: p.request.len,
                status: st,
                payload: resp.len,
            })
        })
    }
}
