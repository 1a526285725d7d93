//! The char contract: a character device's writes and reads of a bounded
//! number of bytes, for the stream-like device classes (a serial line, a
//! console).
//!
//! - Handshake: a new driver is sent INFO (id 0) and must answer it with
//!   success and no bytes before anything else: that is how the mediator
//!   knows it is up. Until then client requests are refused
//!   ([`ClientError::NotReady`]) and every other answer is unsolicited.
//! - Writes ([`op::CHAR_WRITE`]) carry 1 to `max_io` bytes and are
//!   answered with a status and no bytes, within the deadline.
//! - Reads ([`op::CHAR_READ`]) lend the driver a buffer of `len` bytes;
//!   it is answered with 0 to `len` bytes when some come. A read has no
//!   deadline: a serial line may be silent forever, and that is not a
//!   fault.
//! - Restarts: everything in flight is sent again to the new driver
//!   after its handshake, same ids, in issue order
//!   ([`Contract::reissue`]). A re-issued write may reach the device twice
//!   (the old driver may have sent it before it died): char services get
//!   at-least-once delivery of writes across a restart.

use std::time::Instant;

use moat_service_proto::{class, op, status, Request, Response};

use super::inflight::{at_most_len, check_header, exact_len};
use super::{ClassOp, ClientError, Contract, ContractLimits, InfoProblem, Requests, Violation};

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

/// The contract of a character device (see the module docs): writes of 1
/// to `max_io` bytes, answered with a status and no bytes; reads of up to
/// `len` bytes (1 to `max_io`), without a deadline, answered with 0 to
/// `len` bytes on success and none on failure.
///
/// A contract made with [`CharContract::new`] is ready at once (no
/// handshake); one made with [`CharContract::with_handshake`] waits for a
/// driver's answer to [`CharContract::info_request`].
#[derive(Debug, Clone)]
pub struct CharContract {
    /// INFO sent to a (new) driver, its answer awaited.
    handshake: bool,
    /// Requests may be issued and answered (a driver is up).
    ready: bool,
    requests: Requests<CharOp>,
}

impl CharContract {
    /// A contract that needs no handshake (see [`ContractLimits::effective`]
    /// for how the limits are applied).
    pub fn new(limits: ContractLimits) -> CharContract {
        CharContract {
            handshake: false,
            ready: true,
            requests: Requests::new(limits),
        }
    }

    /// A contract with no driver yet: nothing is issued until a driver
    /// has answered [`CharContract::info_request`].
    pub fn with_handshake(limits: ContractLimits) -> CharContract {
        CharContract {
            ready: false,
            ..CharContract::new(limits)
        }
    }

    /// Whether requests may be issued and answered.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Starts the handshake with a new driver: the INFO request (id 0).
    /// Until [`CharContract::check_info`] accepts its answer, requests
    /// are refused ([`ClientError::NotReady`]) and any other answer is
    /// [`Violation::Unsolicited`].
    pub fn info_request(&mut self) -> Request {
        self.handshake = true;
        self.ready = false;
        Request {
            op: op::INFO,
            class: class::CHAR,
            id: 0,
            offset: 0,
            len: 0,
            buf: 0,
        }
    }

    /// Checks the driver's answer to INFO: success, no bytes. Then the
    /// requests in flight are to be sent again ([`Contract::reissue`]).
    pub fn check_info(&mut self, resp: &Response) -> Result<(), Violation> {
        let id = resp.id;
        if !self.handshake || id != 0 {
            return Err(Violation::Unsolicited { id });
        }
        let st = check_header(resp, class::CHAR)?;
        if st != status::OK {
            return Err(Violation::BadInfo(InfoProblem::Failed(st)));
        }
        exact_len(id, 0, resp.len)?;
        self.handshake = false;
        self.ready = true;
        Ok(())
    }

    /// Checks a client's request without issuing it: a write or read of 1
    /// to `max_io` bytes, once a driver is up.
    pub fn check_client(&self, op: u8, len: u32) -> Result<(), ClientError> {
        match op {
            op::CHAR_WRITE | op::CHAR_READ => {
                if !self.ready {
                    Err(ClientError::NotReady)
                } else if len == 0 {
                    Err(ClientError::ZeroLength)
                } else {
                    self.requests.check_max_io(len)
                }
            }
            _ => Err(ClientError::UnsupportedOp { op }),
        }
    }

    /// Checks a client's request and issues it at `now`; returns the
    /// request to send (a write's `len` bytes follow it). A read gets no
    /// deadline.
    pub fn issue(&mut self, op: u8, len: u32, now: Instant) -> Result<Request, ClientError> {
        self.check_client(op, len)?;
        let o = CharOp { op, len };
        if op == op::CHAR_READ {
            self.requests.issue_untimed(o, now)
        } else {
            self.requests.issue(o, now)
        }
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
    /// Nothing is accepted during a handshake.
    fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<CharCompletion, Violation> {
        if self.handshake {
            return Err(Violation::Unsolicited { id: resp.id });
        }
        self.requests.answer(resp, now, |p, st| {
            let c = p.request;
            if st == status::OK && c.op == op::CHAR_READ {
                // A read answers when bytes came: at least one.
                if resp.len == 0 {
                    return Err(Violation::WrongLength {
                        id: p.id,
                        expected: 1,
                        got: 0,
                    });
                }
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

    /// Nothing is late during a handshake: the deadlines are the old
    /// driver's until the requests are sent again.
    fn expired(&self, now: Instant) -> Option<u64> {
        self.ready.then(|| self.requests.expired(now)).flatten()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.ready.then(|| self.requests.next_deadline()).flatten()
    }
}
