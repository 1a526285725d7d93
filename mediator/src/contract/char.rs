//! The char contract: a character device's writes and reads of a bounded
//! number of bytes, for the stream-like device classes (a serial line, a
//! console).

use std::time::Instant;

use moat_service_proto::{class, op, status, Request, Response};

use super::inflight::{at_most_len, exact_len};
use super::{ClassOp, ClientError, Contract, ContractLimits, Requests, Violation};

/// What a char contract remembers of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CharOp {
    /// [`op::CHAR_WRITE`] or [`op::CHAR_READ`].
    pub op: u8,
    /// Bytes written, or the most bytes the read may return.
    pub len: u32,
}

impl ClassOp for CharOp {
    const CLASS: u8 = class::CHAR;

    fn request(&self, id: u64) -> Request {
        Request {
            op: self.op,
            class: class::CHAR,
            id,
            offset: 0,
            len: self.len,
            buf: 0,
        }
    }
}

/// An accepted answer to a char request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CharCompletion {
    /// The request's id.
    pub id: u64,
    /// The request's operation.
    pub op: u8,
    /// The request's length.
    pub len: u32,
    /// The driver's status ([`status::OK`] to [`status::MAX`]).
    pub status: u8,
    /// Payload bytes that follow the answer's header (the bytes read).
    pub payload: u32,
}

/// The contract of a character device: writes of 1 to `max_io` bytes,
/// answered with a status and no bytes; reads of up to `len` bytes (1 to
/// `max_io`), answered with 0 to `len` bytes on success and none on failure.
///
/// A re-issued write may reach the device twice (the crashed driver may
/// have written it before crashing): char services get at-least-once
/// delivery across a restart.
#[derive(Debug, Clone)]
pub struct CharContract {
    requests: Requests<CharOp>,
}

impl CharContract {
    /// A contract (see [`ContractLimits::effective`] for how the limits are
    /// applied).
    pub fn new(limits: ContractLimits) -> CharContract {
        CharContract {
            requests: Requests::new(limits),
        }
    }

    /// Checks a client's request without issuing it: a write or read of 1
    /// to `max_io` bytes.
    pub fn check_client(&self, op: u8, len: u32) -> Result<(), ClientError> {
        match op {
            op::CHAR_WRITE | op::CHAR_READ => {
                if len == 0 {
                    Err(ClientError::ZeroLength)
                } else {
                    self.requests.check_max_io(len)
                }
            }
            _ => Err(ClientError::UnsupportedOp { op }),
        }
    }

    /// Checks a client's request and issues it at `now`; returns the
    /// request to send (a write's `len` bytes follow it).
    pub fn issue(&mut self, op: u8, len: u32, now: Instant) -> Result<Request, ClientError> {
        self.check_client(op, len)?;
        self.requests.issue(CharOp { op, len }, now)
    }
}

impl Contract for CharContract {
    type Op = CharOp;
    type Completion = CharCompletion;

    fn requests(&self) -> &Requests<CharOp> {
        &self.requests
    }

    fn requests_mut(&mut self) -> &mut Requests<CharOp> {
        &mut self.requests
    }

    /// Checks a driver's answer that arrived at `now`: same id, class,
    /// status and deadline rules as every class; a successful read carries
    /// at most the request's length, anything else carries nothing.
    fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<CharCompletion, Violation> {
        self.requests.answer(resp, now, |p, st| {
            let c = p.request;
            if st == status::OK && c.op == op::CHAR_READ {
                at_most_len(p.id, c.len, resp.len)?;
            } else {
                exact_len(p.id, 0, resp.len)?;
            }
            Ok(CharCompletion {
                id: p.id,
                op: c.op,
                len: c.len,
                status: st,
                payload: resp.len,
            })
        })
    }
}
