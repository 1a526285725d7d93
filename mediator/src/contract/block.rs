//! The block contract: an INFO handshake that fixes the device's geometry,
//! then reads, writes, flushes and discards of whole blocks within it.

use std::time::Instant;

use moat_service_proto::{class, op, status, Request, Response};

use super::inflight::{check_header, exact_len};
use super::{
    ClassOp, ClientError, Contract, ContractLimits, Geometry, InfoProblem, Requests, Violation,
    INFO_LEN,
};

/// What a block contract remembers of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockOp {
    /// [`op::READ`], [`op::WRITE`], [`op::FLUSH`] or [`op::DISCARD`].
    pub op: u8,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl ClassOp for BlockOp {
    const CLASS: u8 = class::BLOCK;

    fn request(&self, id: u64) -> Request {
        Request {
            op: self.op,
            class: class::BLOCK,
            id,
            offset: self.offset,
            len: self.len,
            buf: 0,
        }
    }
}

/// An accepted answer to a block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The request's id.
    pub id: u64,
    /// The request's operation.
    pub op: u8,
    /// The request's offset.
    pub offset: u64,
    /// The request's length.
    pub len: u32,
    /// The driver's status ([`status::OK`] to [`status::MAX`]).
    pub status: u8,
    /// Payload bytes that follow the answer's header (`len` for a
    /// successful read, otherwise 0).
    pub payload: u32,
}

/// Where a block contract is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockPhase {
    /// No INFO sent yet.
    Idle,
    /// INFO sent to a (new) driver, answer awaited.
    Handshake,
    /// Geometry known; requests flow.
    Ready,
}

/// The contract of a block device: an INFO handshake that fixes the
/// geometry, then reads, writes, flushes and discards of whole blocks
/// within the device.
#[derive(Debug, Clone)]
pub struct BlockContract {
    phase: BlockPhase,
    /// The geometry every driver of this service must report.
    expected: Option<Geometry>,
    /// The geometry the current driver reported (set in `Ready`).
    current: Option<Geometry>,
    requests: Requests<BlockOp>,
}

impl BlockContract {
    /// A contract in its idle phase (see [`ContractLimits::effective`] for how the
    /// limits are applied).
    pub fn new(limits: ContractLimits) -> BlockContract {
        BlockContract {
            phase: BlockPhase::Idle,
            expected: None,
            current: None,
            requests: Requests::new(limits),
        }
    }

    /// Where the contract is in its life.
    pub fn phase(&self) -> BlockPhase {
        self.phase
    }

    /// Whether requests may be issued.
    pub fn is_ready(&self) -> bool {
        self.phase == BlockPhase::Ready
    }

    /// The device's geometry: the one the current driver reported, or
    /// else the one a driver is expected to report.
    pub fn geometry(&self) -> Option<Geometry> {
        self.current.or(self.expected)
    }

    /// Requires every later INFO answer to report `g` (for a service whose
    /// geometry is known from an earlier contract). The first accepted
    /// INFO answer sets this by itself.
    pub fn expect_geometry(&mut self, g: Geometry) {
        self.expected = Some(g);
    }

    /// Starts the handshake with a new driver (the first one, or one that
    /// replaced a crashed or lying one): returns the INFO request (id 0) to
    /// send. Until [`BlockContract::check_info`] accepts the answer, clients
    /// get [`ClientError::NotReady`] and any other answer is
    /// [`Violation::Unsolicited`]. The caller waits for the one INFO answer
    /// itself (within `limits().deadline`); meanwhile
    /// [`Contract::expired`] reports nothing, since the deadlines of the
    /// requests in flight were the old driver's (see
    /// [`Contract::reissue`]).
    pub fn info_request(&mut self) -> Request {
        self.phase = BlockPhase::Handshake;
        self.current = None;
        Self::INFO
    }

    /// The INFO request (id 0), as [`BlockContract::info_request`] sends
    /// it: for a driver whose handshake is checked later (a standby).
    pub const INFO: Request = Request {
        op: op::INFO,
        class: class::BLOCK,
        id: 0,
        offset: 0,
        len: 0,
        buf: 0,
    };

    /// Checks the driver's answer to INFO and the `payload` bytes that
    /// followed its header. On success the contract is ready; after a
    /// restart, send [`Contract::reissue`]'s requests next.
    pub fn check_info(&mut self, resp: &Response, payload: &[u8]) -> Result<Geometry, Violation> {
        let id = resp.id;
        if self.phase != BlockPhase::Handshake || id != 0 {
            return Err(Violation::Unsolicited { id });
        }
        let st = check_header(resp, class::BLOCK)?;
        if st != status::OK {
            return Err(Violation::BadInfo(InfoProblem::Failed(st)));
        }
        exact_len(id, INFO_LEN, resp.len)?;
        let bytes: &[u8; INFO_LEN as usize] = payload
            .try_into()
            .map_err(|_| Violation::BadInfo(InfoProblem::Payload { got: payload.len() }))?;
        let got = Geometry::parse(bytes).map_err(Violation::BadInfo)?;
        if let Some(expected) = self.expected {
            if expected != got {
                return Err(Violation::GeometryChanged { expected, got });
            }
        }
        self.expected = Some(got);
        self.current = Some(got);
        self.phase = BlockPhase::Ready;
        Ok(got)
    }

    /// Checks a client's request without issuing it: the contract must be
    /// ready; reads, writes and discards cover 1 to `max_io` bytes, whole
    /// blocks, within the device; a flush has offset 0 and length 0.
    pub fn check_client(&self, op: u8, offset: u64, len: u32) -> Result<(), ClientError> {
        let g = match (self.phase, self.current) {
            (BlockPhase::Ready, Some(g)) => g,
            _ => return Err(ClientError::NotReady),
        };
        match op {
            op::FLUSH => {
                if offset == 0 && len == 0 {
                    Ok(())
                } else {
                    Err(ClientError::BadFlush { offset, len })
                }
            }
            op::READ | op::WRITE | op::DISCARD => {
                if len == 0 {
                    return Err(ClientError::ZeroLength);
                }
                self.requests.check_max_io(len)?;
                let bs = u64::from(g.block_size).max(1);
                if !offset.is_multiple_of(bs) || !u64::from(len).is_multiple_of(bs) {
                    return Err(ClientError::Misaligned {
                        offset,
                        len,
                        block_size: g.block_size,
                    });
                }
                match offset.checked_add(u64::from(len)) {
                    Some(end) if end <= g.capacity => Ok(()),
                    _ => Err(ClientError::OutOfRange {
                        offset,
                        len,
                        capacity: g.capacity,
                    }),
                }
            }
            _ => Err(ClientError::UnsupportedOp { op }),
        }
    }

    /// Checks a client's request and issues it at `now`: returns the
    /// request to send (with a fresh id), now in flight with a deadline of
    /// `now + limits.deadline`.
    pub fn issue(
        &mut self,
        op: u8,
        offset: u64,
        len: u32,
        now: Instant,
    ) -> Result<Request, ClientError> {
        self.check_client(op, offset, len)?;
        self.requests.issue(BlockOp { op, offset, len }, now)
    }
}

impl Contract for BlockContract {
    type Op = BlockOp;
    type Completion = Completion;

    fn requests(&self) -> &Requests<BlockOp> {
        &self.requests
    }

    fn requests_mut(&mut self) -> &mut Requests<BlockOp> {
        &mut self.requests
    }

    /// Checks a driver's answer that arrived at `now`: the contract is
    /// ready, the answer's id is in flight (and not 0), its class is block,
    /// its status is known, the deadline has not passed, and it carries
    /// exactly the request's length for a successful read and nothing
    /// otherwise. On success the request is completed; on a violation
    /// nothing changes.
    fn check_response(&mut self, resp: &Response, now: Instant) -> Result<Completion, Violation> {
        if !self.is_ready() {
            return Err(Violation::Unsolicited { id: resp.id });
        }
        self.requests.answer(resp, now, |p, st| {
            let b = p.request;
            let expected = if st == status::OK && b.op == op::READ {
                b.len
            } else {
                0
            };
            exact_len(p.id, expected, resp.len)?;
            Ok(Completion {
                id: p.id,
                op: b.op,
                offset: b.offset,
                len: b.len,
                status: st,
                payload: resp.len,
            })
        })
    }

    /// The id of a request whose deadline passed before `now`, to be
    /// treated as [`Violation::Deadline`] (nothing outside the ready phase:
    /// during a handshake the deadlines are the old driver's).
    fn expired(&self, now: Instant) -> Option<u64> {
        if self.is_ready() {
            self.requests.expired(now)
        } else {
            None
        }
    }

    /// The earliest deadline of a request in flight (nothing outside the
    /// ready phase).
    fn next_deadline(&self) -> Option<Instant> {
        if self.is_ready() {
            self.requests.next_deadline()
        } else {
            None
        }
    }
}
