//! Service contracts as explicit state machines, one per service class.
//!
//! A contract sits between the clients of a service and the driver
//! picoprocess that implements it. It checks both directions:
//!
//! - what a *client* asks (`check_client`, `issue`): a request the service
//!   cannot carry out is refused with a [`ClientError`] before it reaches
//!   the driver; the driver is not at fault;
//! - what the *driver* answers (`check_response`, `expired`, and for block
//!   devices the INFO handshake, `check_info`): every answer must complete a request that
//!   is in flight, exactly once, with the right class, a known status and
//!   the right payload length, before the request's deadline. Anything else
//!   is a [`Violation`], after which the mediator restarts the driver and
//!   re-issues what was in flight ([`BlockContract::reissue`]).
//!
//! A check that fails changes nothing: the contract is in the same state as
//! before the refused request or the rejected answer. A request leaves the
//! in-flight set only through an accepted answer or [`BlockContract::fail_all`].
//!
//! Request ids are allocated by the contract: never 0 (0 is the block INFO
//! handshake), strictly increasing, never reused during the contract's life,
//! across driver restarts included. Because they increase, an id below the
//! next one to be issued that is not in flight has been completed already:
//! that is all the contract needs to recognise a duplicate answer, so its
//! memory is bounded by the number of requests in flight (a client-chosen
//! limit), whatever the driver sends.
//!
//! The bookkeeping shared by every class (ids, deadlines, the in-flight set)
//! is [`InFlight`]; [`BlockContract`], [`CharContract`] and
//! [`GenericContract`] add what is particular to their class, and all three
//! implement [`Contract`], the part the restart logic needs.
//!
//! The block contract's life:
//!
//! ```text
//!          info_request()            check_info() accepted
//!   Idle ─────────────────▶ Handshake ───────────────────────▶ Ready
//!                              ▲                                 │
//!                              └──────── info_request() ─────────┘
//!                                        (the driver was restarted;
//!                                         then reissue())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use moat_service_proto::{class, op, status, DecodeError, Request, Response, MAX_PAYLOAD};

/// Payload bytes of the answer to a block INFO request: the capacity in
/// bytes, then the block size, both `u64` little-endian.
pub const INFO_LEN: u32 = 16;
/// The smallest block size a block driver may report.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The largest block size a block driver may report.
pub const MAX_BLOCK_SIZE: u32 = 65536;
/// The largest capacity a block driver may report (256 TiB).
pub const MAX_CAPACITY: u64 = 1 << 48;

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// What a contract allows, chosen by whoever sets the service up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContractLimits {
    /// The most bytes one request may move (a block read or write, the
    /// bytes of a char read or write, a generic call's request). At most
    /// [`MAX_PAYLOAD`]; a larger value is lowered to it.
    pub max_io: u32,
    /// How long the driver has to answer a request (the caller of
    /// [`BlockContract::info_request`] gives the INFO answer as long).
    pub deadline: Duration,
    /// The most requests in flight at once; a further request is refused
    /// with [`ClientError::Busy`]. At least 1; 0 is raised to 1.
    pub max_in_flight: usize,
}

impl ContractLimits {
    /// These limits as a contract applies them: `max_io` at most
    /// [`MAX_PAYLOAD`] and `max_in_flight` at least 1.
    pub fn effective(self) -> ContractLimits {
        ContractLimits {
            max_io: self.max_io.min(MAX_PAYLOAD),
            deadline: self.deadline,
            max_in_flight: self.max_in_flight.max(1),
        }
    }
}

impl Default for ContractLimits {
    /// 128 KiB per request, 5 seconds to answer, 32 requests in flight.
    fn default() -> ContractLimits {
        ContractLimits {
            max_io: 128 << 10,
            deadline: Duration::from_secs(5),
            max_in_flight: 32,
        }
    }
}

// ---------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------

/// The size of a block device, as its driver reports it in the INFO
/// handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Bytes: a non-zero multiple of `block_size`, at most [`MAX_CAPACITY`].
    pub capacity: u64,
    /// Bytes per block: a power of two from [`MIN_BLOCK_SIZE`] to
    /// [`MAX_BLOCK_SIZE`].
    pub block_size: u32,
}

impl Geometry {
    /// Checks a capacity and block size against the contract.
    pub fn new(capacity: u64, block_size: u64) -> Result<Geometry, InfoProblem> {
        let bs = match u32::try_from(block_size) {
            Ok(bs) if bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) => bs,
            _ => return Err(InfoProblem::BlockSize(block_size)),
        };
        if capacity == 0 || capacity > MAX_CAPACITY || !capacity.is_multiple_of(block_size) {
            return Err(InfoProblem::Capacity {
                capacity,
                block_size,
            });
        }
        Ok(Geometry {
            capacity,
            block_size: bs,
        })
    }

    /// Parses and checks the 16 payload bytes of an INFO answer.
    pub fn parse(payload: &[u8; INFO_LEN as usize]) -> Result<Geometry, InfoProblem> {
        let mut capacity = [0u8; 8];
        let mut block_size = [0u8; 8];
        capacity.copy_from_slice(&payload[..8]);
        block_size.copy_from_slice(&payload[8..]);
        Geometry::new(u64::from_le_bytes(capacity), u64::from_le_bytes(block_size))
    }

    /// The 16 payload bytes of an INFO answer reporting this geometry (what
    /// a driver sends).
    pub fn encode(&self) -> [u8; INFO_LEN as usize] {
        let mut b = [0u8; INFO_LEN as usize];
        b[..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..].copy_from_slice(&u64::from(self.block_size).to_le_bytes());
        b
    }

    /// The number of blocks.
    pub fn blocks(&self) -> u64 {
        // block_size is never 0 in a checked geometry; checked_div keeps
        // a hand-built one from panicking.
        self.capacity
            .checked_div(u64::from(self.block_size))
            .unwrap_or(0)
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes in blocks of {} bytes",
            self.capacity, self.block_size
        )
    }
}

// ---------------------------------------------------------------------------
// Violations (driver faults) and client errors
// ---------------------------------------------------------------------------

/// What is wrong with a block driver's answer to INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InfoProblem {
    /// The driver answered INFO with a failure status.
    #[error("the driver reports failure (status {0}) instead of the device's geometry")]
    Failed(u8),
    /// The payload handed over does not have the 16 bytes the header
    /// announced (the driver's stream ended early).
    #[error("the answer carries {got} payload bytes where its header announced 16")]
    Payload {
        /// Bytes handed over.
        got: usize,
    },
    /// The block size is not a power of two from 512 to 65536.
    #[error("block size {0} is not a power of two from 512 to 65536")]
    BlockSize(u64),
    /// The capacity is 0, over 2^48, or not a multiple of the block size.
    #[error(
        "capacity {capacity} is not a non-zero multiple of the block size {block_size} \
         of at most 2^48 bytes"
    )]
    Capacity {
        /// Reported capacity in bytes.
        capacity: u64,
        /// Reported block size in bytes.
        block_size: u64,
    },
}

/// A driver broke its service contract. After any of these the mediator
/// stops trusting the driver: it restarts it and re-issues what was in
/// flight. The contract's state is unchanged by the rejected answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A header that does not decode (the caller decodes; the error is
    /// here so that every driver fault is one type).
    #[error("the driver sent a malformed header: {}", ShowDecode(.0))]
    BadHeader(DecodeError),
    /// An answer to an id that was never issued.
    #[error("the driver answered request {id}, which was never issued")]
    UnknownId {
        /// The id in the answer.
        id: u64,
    },
    /// A second answer to a request that was already completed.
    #[error("the driver answered request {id} again, after it was completed")]
    Duplicate {
        /// The id in the answer.
        id: u64,
    },
    /// An answer whose class is not the service's.
    #[error(
        "the driver answered request {id} with service class {got}, but the service is \
         class {expected}"
    )]
    WrongClass {
        /// The id in the answer.
        id: u64,
        /// The service's class.
        expected: u8,
        /// The class in the answer.
        got: u8,
    },
    /// A status above [`status::MAX`].
    #[error(
        "the driver answered request {id} with status {status}, which does not exist \
         (the highest is {max})",
        max = status::MAX
    )]
    BadStatus {
        /// The id in the answer.
        id: u64,
        /// The status in the answer.
        status: u8,
    },
    /// A payload whose length must be exactly `expected` and is not.
    #[error(
        "the driver answered request {id} with {got} payload bytes where the contract \
         requires exactly {expected}"
    )]
    WrongLength {
        /// The id in the answer (0 for INFO).
        id: u64,
        /// The required length.
        expected: u32,
        /// The length in the answer.
        got: u32,
    },
    /// A payload longer than allowed (a char read, a generic call's answer).
    #[error(
        "the driver answered request {id} with {got} payload bytes, more than the {max} \
         the contract allows"
    )]
    TooLong {
        /// The id in the answer.
        id: u64,
        /// The most bytes allowed.
        max: u32,
        /// The length in the answer.
        got: u32,
    },
    /// An answer when nothing is in flight, an answer with id 0 outside the
    /// handshake, or any answer but INFO's during the handshake.
    #[error("the driver sent an answer (id {id}) that nothing asked for")]
    Unsolicited {
        /// The id in the answer.
        id: u64,
    },
    /// No answer before the deadline: [`BlockContract::expired`] (and its
    /// likes) name the late request, or the answer came too late.
    #[error("the driver did not answer a request before its deadline")]
    Deadline,
    /// An INFO answer that is not a valid geometry.
    #[error("the driver's answer to INFO is invalid: {0}")]
    BadInfo(InfoProblem),
    /// A restarted driver reports another geometry than the first one did.
    #[error(
        "the restarted driver reports {got}, but the device had {expected}; a restart \
         must not change the geometry"
    )]
    GeometryChanged {
        /// The geometry the service has had since its first handshake.
        expected: Geometry,
        /// The geometry the restarted driver reported.
        got: Geometry,
    },
}

impl Violation {
    /// Every [`Violation::kind`], in a fixed order (the order of
    /// [`ViolationCounters::iter`]).
    pub const KINDS: [&'static str; 11] = [
        "bad_header",
        "unknown_id",
        "duplicate",
        "wrong_class",
        "bad_status",
        "wrong_length",
        "too_long",
        "unsolicited",
        "deadline",
        "bad_info",
        "geometry_changed",
    ];

    fn index(&self) -> usize {
        match self {
            Violation::BadHeader(_) => 0,
            Violation::UnknownId { .. } => 1,
            Violation::Duplicate { .. } => 2,
            Violation::WrongClass { .. } => 3,
            Violation::BadStatus { .. } => 4,
            Violation::WrongLength { .. } => 5,
            Violation::TooLong { .. } => 6,
            Violation::Unsolicited { .. } => 7,
            Violation::Deadline => 8,
            Violation::BadInfo(_) => 9,
            Violation::GeometryChanged { .. } => 10,
        }
    }

    /// A stable name for this kind of violation (for counters and logs):
    /// one of [`Violation::KINDS`].
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.index()]
    }
}

impl From<DecodeError> for Violation {
    fn from(e: DecodeError) -> Violation {
        Violation::BadHeader(e)
    }
}

/// Formats a [`DecodeError`], which has no `Display` of its own.
struct ShowDecode<'a>(&'a DecodeError);

impl fmt::Display for ShowDecode<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            DecodeError::BadMagic(m) => write!(
                f,
                "magic {:02x} {:02x} {:02x} {:02x} is not \"MSRS\"",
                m[0], m[1], m[2], m[3]
            ),
            DecodeError::TooLong(n) => write!(
                f,
                "a payload of {n} bytes is over the limit of {MAX_PAYLOAD}"
            ),
            DecodeError::Reserved => f.write_str("reserved header bytes are not zero"),
        }
    }
}

/// A count of violations per kind, for a service's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViolationCounters {
    counts: [u64; Violation::KINDS.len()],
}

impl ViolationCounters {
    /// All counts at zero.
    pub fn new() -> ViolationCounters {
        ViolationCounters::default()
    }

    /// Counts one violation.
    pub fn record(&mut self, v: &Violation) {
        let c = &mut self.counts[v.index()];
        *c = c.saturating_add(1);
    }

    /// The count of one kind (0 for a name that is not a kind).
    pub fn get(&self, kind: &str) -> u64 {
        Violation::KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.counts[i])
    }

    /// The count of all kinds together.
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }

    /// Every kind with its count, zeros included, in the order of
    /// [`Violation::KINDS`].
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Violation::KINDS
            .iter()
            .copied()
            .zip(self.counts.iter().copied())
    }
}

/// A client asked for something the service cannot do. The request is not
/// sent; the driver is not at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The block driver has not (yet, or again after a restart) completed
    /// its INFO handshake.
    #[error("the service is not ready: its driver has not completed the INFO handshake yet")]
    NotReady,
    /// An operation that is not part of this class's contract.
    #[error("operation {op} is not part of this service's contract")]
    UnsupportedOp {
        /// The operation asked for.
        op: u8,
    },
    /// A request of 0 bytes where at least one is needed.
    #[error("the request covers no bytes; it must cover at least one")]
    ZeroLength,
    /// More bytes than the service's `max_io`.
    #[error("a request of {len} bytes is over this service's limit of {max}; split it")]
    TooLong {
        /// The length asked for.
        len: u32,
        /// The service's limit.
        max: u32,
    },
    /// A block offset or length that is not a multiple of the block size.
    #[error(
        "offset {offset} and length {len} must both be multiples of the block size {block_size}"
    )]
    Misaligned {
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u32,
        /// The device's block size.
        block_size: u32,
    },
    /// A block range that ends past the device's capacity.
    #[error("{len} bytes at offset {offset} go past the end of the device ({capacity} bytes)")]
    OutOfRange {
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u32,
        /// The device's capacity.
        capacity: u64,
    },
    /// A block flush with an offset or a length.
    #[error("a flush takes offset 0 and length 0, not offset {offset} and length {len}")]
    BadFlush {
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u32,
    },
    /// `max_in_flight` requests are already in flight.
    #[error("the most requests allowed in flight are in flight; wait for one to complete")]
    Busy,
    /// Every request id has been used (after 2^64 - 2 requests).
    #[error("this contract has used every request id; set the service up anew")]
    IdsExhausted,
}

impl ClientError {
    /// A stable name for this kind of error (for counters and logs).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::NotReady => "not_ready",
            ClientError::UnsupportedOp { .. } => "unsupported_op",
            ClientError::ZeroLength => "zero_length",
            ClientError::TooLong { .. } => "too_long",
            ClientError::Misaligned { .. } => "misaligned",
            ClientError::OutOfRange { .. } => "out_of_range",
            ClientError::BadFlush { .. } => "bad_flush",
            ClientError::Busy => "busy",
            ClientError::IdsExhausted => "ids_exhausted",
        }
    }
}

// ---------------------------------------------------------------------------
// In-flight bookkeeping shared by every class
// ---------------------------------------------------------------------------

/// A request in flight, as [`InFlight`] remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending<T> {
    /// Its id.
    pub id: u64,
    /// What the class remembers of it ([`BlockOp`], [`CharOp`], [`CallOp`]).
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
    next_id: u64,
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
fn check_common<T: Copy>(
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

fn exact_len(id: u64, expected: u32, got: u32) -> Result<(), Violation> {
    if got == expected {
        Ok(())
    } else {
        Err(Violation::WrongLength { id, expected, got })
    }
}

fn at_most_len(id: u64, max: u32, got: u32) -> Result<(), Violation> {
    if got <= max {
        Ok(())
    } else {
        Err(Violation::TooLong { id, max, got })
    }
}

/// What the restart logic needs of a contract, whatever its class.
pub trait Contract {
    /// What an accepted answer yields.
    type Completion;

    /// The service class ([`class::BLOCK`], [`class::CHAR`], [`class::GENERIC`]).
    fn class(&self) -> u8;

    /// Checks a driver's answer at `now` (its arrival); on success the
    /// request is no longer in flight.
    fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<Self::Completion, Violation>;

    /// A request whose deadline has passed at `now` ([`Violation::Deadline`]).
    fn expired(&self, now: Instant) -> Option<u64>;

    /// The earliest deadline, if anything is awaited.
    fn next_deadline(&self) -> Option<Instant>;

    /// How many requests are in flight.
    fn in_flight_len(&self) -> usize;

    /// Re-arms every in-flight request's deadline from `now` and returns
    /// the requests to send to a new driver, in issue order.
    fn reissue(&mut self, now: Instant) -> Vec<Request>;

    /// Gives up on every request in flight; returns their ids in issue order.
    fn fail_all(&mut self) -> Vec<u64>;
}

// ---------------------------------------------------------------------------
// Block
// ---------------------------------------------------------------------------

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

impl BlockOp {
    fn request(&self, id: u64) -> Request {
        Request {
            op: self.op,
            class: class::BLOCK,
            id,
            offset: self.offset,
            len: self.len,
            payload: if self.op == op::WRITE { self.len } else { 0 },
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
    limits: ContractLimits,
    phase: BlockPhase,
    /// The geometry every driver of this service must report.
    expected: Option<Geometry>,
    /// The geometry the current driver reported (set in `Ready`).
    current: Option<Geometry>,
    flight: InFlight<BlockOp>,
}

impl BlockContract {
    /// A contract in its idle phase (see [`ContractLimits::effective`] for how the
    /// limits are applied).
    pub fn new(limits: ContractLimits) -> BlockContract {
        let limits = limits.effective();
        BlockContract {
            limits,
            phase: BlockPhase::Idle,
            expected: None,
            current: None,
            flight: InFlight::new(limits.max_in_flight, limits.deadline),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> ContractLimits {
        self.limits
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
    /// [`BlockContract::expired`] reports nothing, since the deadlines of
    /// the requests in flight were the old driver's (see
    /// [`BlockContract::reissue`]).
    pub fn info_request(&mut self) -> Request {
        self.phase = BlockPhase::Handshake;
        self.current = None;
        Request {
            op: op::INFO,
            class: class::BLOCK,
            id: 0,
            offset: 0,
            len: 0,
            payload: 0,
        }
    }

    /// Checks the driver's answer to INFO and the `payload` bytes that
    /// followed its header. On success the contract is ready; after a
    /// restart, send [`BlockContract::reissue`]'s requests next.
    pub fn check_info(&mut self, resp: &Response, payload: &[u8]) -> Result<Geometry, Violation> {
        let id = resp.id;
        if self.phase != BlockPhase::Handshake || id != 0 {
            return Err(Violation::Unsolicited { id });
        }
        if resp.class != class::BLOCK {
            return Err(Violation::WrongClass {
                id,
                expected: class::BLOCK,
                got: resp.class,
            });
        }
        if resp.status > status::MAX {
            return Err(Violation::BadStatus {
                id,
                status: resp.status,
            });
        }
        if resp.status != status::OK {
            return Err(Violation::BadInfo(InfoProblem::Failed(resp.status)));
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
                if len > self.limits.max_io {
                    return Err(ClientError::TooLong {
                        len,
                        max: self.limits.max_io,
                    });
                }
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
        let b = BlockOp { op, offset, len };
        let id = self.flight.issue(b, now)?;
        Ok(b.request(id))
    }

    /// Checks a driver's answer that arrived at `now`: its id is in flight
    /// (and not 0), its class is block, its status is known, the deadline
    /// has not passed, and it carries exactly the request's length for a
    /// successful read and nothing otherwise. On success the request is
    /// completed; on a violation nothing changes.
    pub fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<Completion, Violation> {
        if !self.is_ready() {
            return Err(Violation::Unsolicited { id: resp.id });
        }
        let (p, st) = check_common(&self.flight, resp, class::BLOCK, now)?;
        let b = p.request;
        let expected = if st == status::OK && b.op == op::READ {
            b.len
        } else {
            0
        };
        exact_len(p.id, expected, resp.len)?;
        self.flight.complete(p.id);
        Ok(Completion {
            id: p.id,
            op: b.op,
            offset: b.offset,
            len: b.len,
            status: st,
            payload: resp.len,
        })
    }

    /// The id of a request whose deadline passed before `now`, to be
    /// treated as [`Violation::Deadline`] (nothing outside the ready phase).
    pub fn expired(&self, now: Instant) -> Option<u64> {
        if self.is_ready() {
            self.flight.expired(now)
        } else {
            None
        }
    }

    /// The earliest deadline of a request in flight (nothing outside the
    /// ready phase).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.is_ready() {
            self.flight.next_deadline()
        } else {
            None
        }
    }

    /// The requests in flight, in issue order.
    pub fn in_flight(&self) -> Vec<Pending<BlockOp>> {
        self.flight.pending()
    }

    /// How many requests are in flight.
    pub fn in_flight_len(&self) -> usize {
        self.flight.len()
    }

    /// After a restart and an accepted handshake: re-arms the deadline of
    /// every request in flight from `now` and returns them, same ids, in
    /// issue order, to send to the new driver.
    pub fn reissue(&mut self, now: Instant) -> Vec<Request> {
        self.flight.rearm(now);
        self.flight
            .pending()
            .iter()
            .map(|p| p.request.request(p.id))
            .collect()
    }

    /// Gives up on every request in flight (the circuit breaker opened);
    /// returns their ids in issue order so their clients can be failed.
    pub fn fail_all(&mut self) -> Vec<u64> {
        self.flight.fail_all()
    }
}

impl Contract for BlockContract {
    type Completion = Completion;

    fn class(&self) -> u8 {
        class::BLOCK
    }

    fn check_response(&mut self, resp: &Response, now: Instant) -> Result<Completion, Violation> {
        BlockContract::check_response(self, resp, now)
    }

    fn expired(&self, now: Instant) -> Option<u64> {
        BlockContract::expired(self, now)
    }

    fn next_deadline(&self) -> Option<Instant> {
        BlockContract::next_deadline(self)
    }

    fn in_flight_len(&self) -> usize {
        BlockContract::in_flight_len(self)
    }

    fn reissue(&mut self, now: Instant) -> Vec<Request> {
        BlockContract::reissue(self, now)
    }

    fn fail_all(&mut self) -> Vec<u64> {
        BlockContract::fail_all(self)
    }
}

// ---------------------------------------------------------------------------
// Char
// ---------------------------------------------------------------------------

/// What a char contract remembers of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CharOp {
    /// [`op::CHAR_WRITE`] or [`op::CHAR_READ`].
    pub op: u8,
    /// Bytes written, or the most bytes the read may return.
    pub len: u32,
}

impl CharOp {
    fn request(&self, id: u64) -> Request {
        Request {
            op: self.op,
            class: class::CHAR,
            id,
            offset: 0,
            len: self.len,
            payload: if self.op == op::CHAR_WRITE {
                self.len
            } else {
                0
            },
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
    limits: ContractLimits,
    flight: InFlight<CharOp>,
}

impl CharContract {
    /// A contract (see [`ContractLimits::effective`] for how the limits are applied).
    pub fn new(limits: ContractLimits) -> CharContract {
        let limits = limits.effective();
        CharContract {
            limits,
            flight: InFlight::new(limits.max_in_flight, limits.deadline),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> ContractLimits {
        self.limits
    }

    /// Checks a client's request without issuing it: a write or read of 1
    /// to `max_io` bytes.
    pub fn check_client(&self, op: u8, len: u32) -> Result<(), ClientError> {
        match op {
            op::CHAR_WRITE | op::CHAR_READ => {
                if len == 0 {
                    Err(ClientError::ZeroLength)
                } else if len > self.limits.max_io {
                    Err(ClientError::TooLong {
                        len,
                        max: self.limits.max_io,
                    })
                } else {
                    Ok(())
                }
            }
            _ => Err(ClientError::UnsupportedOp { op }),
        }
    }

    /// Checks a client's request and issues it at `now`; returns the
    /// request to send (a write's `len` bytes follow it).
    pub fn issue(&mut self, op: u8, len: u32, now: Instant) -> Result<Request, ClientError> {
        self.check_client(op, len)?;
        let c = CharOp { op, len };
        let id = self.flight.issue(c, now)?;
        Ok(c.request(id))
    }

    /// Checks a driver's answer that arrived at `now`: same id, class,
    /// status and deadline rules as every class; a successful read carries
    /// at most the request's length, anything else carries nothing.
    pub fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<CharCompletion, Violation> {
        let (p, st) = check_common(&self.flight, resp, class::CHAR, now)?;
        let c = p.request;
        if st == status::OK && c.op == op::CHAR_READ {
            at_most_len(p.id, c.len, resp.len)?;
        } else {
            exact_len(p.id, 0, resp.len)?;
        }
        self.flight.complete(p.id);
        Ok(CharCompletion {
            id: p.id,
            op: c.op,
            len: c.len,
            status: st,
            payload: resp.len,
        })
    }

    /// The id of a request whose deadline passed before `now`.
    pub fn expired(&self, now: Instant) -> Option<u64> {
        self.flight.expired(now)
    }

    /// The earliest deadline of a request in flight.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.flight.next_deadline()
    }

    /// The requests in flight, in issue order.
    pub fn in_flight(&self) -> Vec<Pending<CharOp>> {
        self.flight.pending()
    }

    /// How many requests are in flight.
    pub fn in_flight_len(&self) -> usize {
        self.flight.len()
    }

    /// After a restart: re-arms every in-flight deadline from `now` and
    /// returns the requests, same ids, in issue order.
    pub fn reissue(&mut self, now: Instant) -> Vec<Request> {
        self.flight.rearm(now);
        self.flight
            .pending()
            .iter()
            .map(|p| p.request.request(p.id))
            .collect()
    }

    /// Gives up on every request in flight; returns their ids in issue order.
    pub fn fail_all(&mut self) -> Vec<u64> {
        self.flight.fail_all()
    }
}

impl Contract for CharContract {
    type Completion = CharCompletion;

    fn class(&self) -> u8 {
        class::CHAR
    }

    fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<CharCompletion, Violation> {
        CharContract::check_response(self, resp, now)
    }

    fn expired(&self, now: Instant) -> Option<u64> {
        CharContract::expired(self, now)
    }

    fn next_deadline(&self) -> Option<Instant> {
        CharContract::next_deadline(self)
    }

    fn in_flight_len(&self) -> usize {
        CharContract::in_flight_len(self)
    }

    fn reissue(&mut self, now: Instant) -> Vec<Request> {
        CharContract::reissue(self, now)
    }

    fn fail_all(&mut self) -> Vec<u64> {
        CharContract::fail_all(self)
    }
}

// ---------------------------------------------------------------------------
// Generic
// ---------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const DEADLINE: Duration = Duration::from_millis(100);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limits() -> ContractLimits {
        ContractLimits {
            max_io: 4096,
            deadline: DEADLINE,
            max_in_flight: 4,
        }
    }

    /// 64 blocks of 512 bytes.
    fn geo() -> Geometry {
        Geometry {
            capacity: 64 * 512,
            block_size: 512,
        }
    }

    fn info_resp() -> Response {
        Response {
            status: status::OK,
            class: class::BLOCK,
            id: 0,
            len: INFO_LEN,
        }
    }

    fn resp(id: u64, st: u8, cls: u8, len: u32) -> Response {
        Response {
            status: st,
            class: cls,
            id,
            len,
        }
    }

    fn block_ok(id: u64, len: u32) -> Response {
        resp(id, status::OK, class::BLOCK, len)
    }

    fn ready() -> BlockContract {
        let mut c = BlockContract::new(limits());
        c.info_request();
        assert_eq!(c.check_info(&info_resp(), &geo().encode()), Ok(geo()));
        c
    }

    fn info_err(c: &mut BlockContract, r: &Response, payload: &[u8]) -> Violation {
        let before = c.phase();
        let e = c.check_info(r, payload).unwrap_err();
        assert_eq!(c.phase(), before, "a rejected INFO answer changes nothing");
        e
    }

    /// Checks a block answer that must be rejected, and that the contract
    /// did not change.
    fn block_err(c: &mut BlockContract, r: &Response, now: Instant) -> Violation {
        let before = c.in_flight();
        let e = c.check_response(r, now).unwrap_err();
        assert_eq!(c.in_flight(), before, "a rejected answer changes nothing");
        e
    }

    // --- Limits, geometry ------------------------------------------

    #[test]
    fn limits_are_clamped() {
        let l = ContractLimits {
            max_io: u32::MAX,
            deadline: ms(1),
            max_in_flight: 0,
        };
        let c = BlockContract::new(l);
        assert_eq!(c.limits().max_io, MAX_PAYLOAD);
        assert_eq!(c.limits().max_in_flight, 1);
        assert_eq!(
            ContractLimits::default().effective(),
            ContractLimits::default()
        );
        let g = GenericContract::new(limits(), u32::MAX);
        assert_eq!(g.max_response(), MAX_PAYLOAD);
    }

    #[test]
    fn geometry_rules() {
        assert_eq!(
            Geometry::new(512, 512),
            Ok(Geometry {
                capacity: 512,
                block_size: 512
            })
        );
        assert!(Geometry::new(65536, 65536).is_ok());
        assert!(Geometry::new(MAX_CAPACITY, 4096).is_ok());
        for bs in [0, 1, 256, 511, 513, 1000, 131072, 1 << 40, u64::MAX] {
            assert_eq!(
                Geometry::new(1 << 20, bs),
                Err(InfoProblem::BlockSize(bs)),
                "block size {bs}"
            );
        }
        for cap in [0, 511, 513, 4096 + 512, MAX_CAPACITY + 4096, u64::MAX] {
            assert_eq!(
                Geometry::new(cap, 4096),
                Err(InfoProblem::Capacity {
                    capacity: cap,
                    block_size: 4096
                }),
                "capacity {cap}"
            );
        }
        let g = geo();
        assert_eq!(Geometry::parse(&g.encode()), Ok(g));
        assert_eq!(g.blocks(), 64);
        assert_eq!(
            Geometry {
                capacity: 5,
                block_size: 0
            }
            .blocks(),
            0
        );
        assert_eq!(g.to_string(), "32768 bytes in blocks of 512 bytes");
    }

    // --- Block handshake ----------------------------------------------------

    #[test]
    fn handshake_makes_the_contract_ready() {
        let t = Instant::now();
        let mut c = BlockContract::new(limits());
        assert_eq!(c.phase(), BlockPhase::Idle);
        assert_eq!(c.geometry(), None);
        assert_eq!(c.check_client(op::READ, 0, 512), Err(ClientError::NotReady));
        let r = c.info_request();
        assert_eq!(
            r,
            Request {
                op: op::INFO,
                class: class::BLOCK,
                id: 0,
                offset: 0,
                len: 0,
                payload: 0
            }
        );
        assert_eq!(c.phase(), BlockPhase::Handshake);
        assert_eq!(c.issue(op::READ, 0, 512, t), Err(ClientError::NotReady));
        assert_eq!(c.check_info(&info_resp(), &geo().encode()), Ok(geo()));
        assert_eq!(c.phase(), BlockPhase::Ready);
        assert!(c.is_ready());
        assert_eq!(c.geometry(), Some(geo()));
        assert!(c.issue(op::READ, 0, 512, t).is_ok());
    }

    #[test]
    fn info_answer_outside_the_handshake_is_unsolicited() {
        let mut c = BlockContract::new(limits());
        assert_eq!(
            info_err(&mut c, &info_resp(), &geo().encode()),
            Violation::Unsolicited { id: 0 }
        );
        let mut c = ready();
        assert_eq!(
            info_err(&mut c, &info_resp(), &geo().encode()),
            Violation::Unsolicited { id: 0 }
        );
    }

    #[test]
    fn info_answer_violations() {
        let mut c = BlockContract::new(limits());
        c.info_request();
        let p = geo().encode();

        let mut r = info_resp();
        r.id = 3;
        assert_eq!(info_err(&mut c, &r, &p), Violation::Unsolicited { id: 3 });

        let mut r = info_resp();
        r.class = class::CHAR;
        assert_eq!(
            info_err(&mut c, &r, &p),
            Violation::WrongClass {
                id: 0,
                expected: class::BLOCK,
                got: class::CHAR
            }
        );

        let mut r = info_resp();
        r.status = 200;
        assert_eq!(
            info_err(&mut c, &r, &p),
            Violation::BadStatus { id: 0, status: 200 }
        );

        let mut r = info_resp();
        r.status = status::IO_ERROR;
        r.len = 0;
        assert_eq!(
            info_err(&mut c, &r, &[]),
            Violation::BadInfo(InfoProblem::Failed(status::IO_ERROR))
        );

        for len in [0, 8, 15, 17, 4096] {
            let mut r = info_resp();
            r.len = len;
            assert_eq!(
                info_err(&mut c, &r, &p),
                Violation::WrongLength {
                    id: 0,
                    expected: 16,
                    got: len
                }
            );
        }

        assert_eq!(
            info_err(&mut c, &info_resp(), &p[..10]),
            Violation::BadInfo(InfoProblem::Payload { got: 10 })
        );
        assert_eq!(
            info_err(&mut c, &info_resp(), &[0; 20]),
            Violation::BadInfo(InfoProblem::Payload { got: 20 })
        );

        let bad_bs = Geometry {
            capacity: 1 << 20,
            block_size: 1000,
        }
        .encode();
        assert_eq!(
            info_err(&mut c, &info_resp(), &bad_bs),
            Violation::BadInfo(InfoProblem::BlockSize(1000))
        );
        let zero_cap = Geometry {
            capacity: 0,
            block_size: 512,
        }
        .encode();
        assert_eq!(
            info_err(&mut c, &info_resp(), &zero_cap),
            Violation::BadInfo(InfoProblem::Capacity {
                capacity: 0,
                block_size: 512
            })
        );
        let huge = Geometry {
            capacity: MAX_CAPACITY * 2,
            block_size: 512,
        }
        .encode();
        assert!(matches!(
            info_err(&mut c, &info_resp(), &huge),
            Violation::BadInfo(InfoProblem::Capacity { .. })
        ));
        let ragged = Geometry {
            capacity: 4096 + 100,
            block_size: 4096,
        }
        .encode();
        assert!(matches!(
            info_err(&mut c, &info_resp(), &ragged),
            Violation::BadInfo(InfoProblem::Capacity { .. })
        ));

        // Still in the handshake: a correct answer is accepted after all that.
        assert_eq!(c.check_info(&info_resp(), &p), Ok(geo()));
    }

    #[test]
    fn restart_must_keep_the_geometry() {
        let mut c = ready();
        c.info_request();
        assert_eq!(c.phase(), BlockPhase::Handshake);
        let other = Geometry {
            capacity: 128 * 512,
            block_size: 512,
        };
        assert_eq!(
            info_err(&mut c, &info_resp(), &other.encode()),
            Violation::GeometryChanged {
                expected: geo(),
                got: other
            }
        );
        assert_eq!(c.check_client(op::READ, 0, 512), Err(ClientError::NotReady));
        // Another restart with the same geometry is accepted.
        c.info_request();
        assert_eq!(c.check_info(&info_resp(), &geo().encode()), Ok(geo()));
        assert!(c.is_ready());
    }

    #[test]
    fn expected_geometry_from_an_earlier_contract() {
        let mut c = BlockContract::new(limits());
        c.expect_geometry(geo());
        assert_eq!(c.geometry(), Some(geo()));
        c.info_request();
        let other = Geometry {
            capacity: 64 * 4096,
            block_size: 4096,
        };
        assert_eq!(
            info_err(&mut c, &info_resp(), &other.encode()),
            Violation::GeometryChanged {
                expected: geo(),
                got: other
            }
        );
        assert_eq!(c.check_info(&info_resp(), &geo().encode()), Ok(geo()));
    }

    #[test]
    fn deadlines_are_suspended_during_a_handshake() {
        let t = Instant::now();
        let mut c = BlockContract::new(limits());
        assert_eq!(c.expired(t + ms(1000)), None);
        assert_eq!(c.next_deadline(), None);
        c.info_request();
        c.check_info(&info_resp(), &geo().encode()).unwrap();
        assert_eq!(c.next_deadline(), None);
        let r = c.issue(op::READ, 0, 512, t).unwrap();
        assert_eq!(c.next_deadline(), Some(t + DEADLINE));
        // The driver dies; a new one is being started.
        let t1 = t + ms(150);
        c.info_request();
        assert_eq!(
            c.expired(t1),
            None,
            "the old driver's deadline is not the new one's"
        );
        assert_eq!(c.next_deadline(), None);
        c.check_info(&info_resp(), &geo().encode()).unwrap();
        let again = c.reissue(t1 + ms(10));
        assert_eq!(again, vec![r]);
        assert_eq!(c.next_deadline(), Some(t1 + ms(10) + DEADLINE));
        assert_eq!(c.expired(t1 + ms(10) + DEADLINE), None);
        assert_eq!(c.expired(t1 + ms(11) + DEADLINE), Some(r.id));
    }

    #[test]
    fn answers_during_the_handshake_are_unsolicited() {
        let t = Instant::now();
        let mut c = ready();
        let r = c.issue(op::FLUSH, 0, 0, t).unwrap();
        c.info_request();
        assert_eq!(
            block_err(&mut c, &block_ok(r.id, 0), t),
            Violation::Unsolicited { id: r.id }
        );
        let mut idle = BlockContract::new(limits());
        assert_eq!(
            idle.check_response(&block_ok(1, 0), t),
            Err(Violation::Unsolicited { id: 1 })
        );
    }

    // --- Block client side --------------------------------------------------

    #[test]
    fn block_requests_are_encoded_with_fresh_ids() {
        let t = Instant::now();
        let mut c = ready();
        let r = c.issue(op::READ, 1024, 2048, t).unwrap();
        assert_eq!(
            r,
            Request {
                op: op::READ,
                class: class::BLOCK,
                id: 1,
                offset: 1024,
                len: 2048,
                payload: 0
            }
        );
        let w = c.issue(op::WRITE, 0, 512, t).unwrap();
        assert_eq!((w.id, w.payload, w.len), (2, 512, 512));
        let d = c.issue(op::DISCARD, 512, 4096, t).unwrap();
        assert_eq!((d.id, d.op, d.payload), (3, op::DISCARD, 0));
        let f = c.issue(op::FLUSH, 0, 0, t).unwrap();
        assert_eq!((f.id, f.offset, f.len, f.payload), (4, 0, 0, 0));
        let ids: Vec<u64> = c.in_flight().iter().map(|p| p.id).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        let p = c.in_flight()[0];
        assert_eq!(
            p.request,
            BlockOp {
                op: op::READ,
                offset: 1024,
                len: 2048
            }
        );
        assert_eq!(p.issued, t);
        assert_eq!(p.deadline, Some(t + DEADLINE));
    }

    #[test]
    fn block_client_errors() {
        let t = Instant::now();
        let mut c = ready();
        let cap = geo().capacity;
        let cases: &[(u8, u64, u32, ClientError)] = &[
            (op::INFO, 0, 0, ClientError::UnsupportedOp { op: op::INFO }),
            (
                op::CHAR_READ,
                0,
                512,
                ClientError::UnsupportedOp { op: op::CHAR_READ },
            ),
            (
                op::CALL,
                0,
                512,
                ClientError::UnsupportedOp { op: op::CALL },
            ),
            (200, 0, 512, ClientError::UnsupportedOp { op: 200 }),
            (op::READ, 0, 0, ClientError::ZeroLength),
            (op::WRITE, 512, 0, ClientError::ZeroLength),
            (op::DISCARD, 0, 0, ClientError::ZeroLength),
            (
                op::READ,
                0,
                8192,
                ClientError::TooLong {
                    len: 8192,
                    max: 4096,
                },
            ),
            (
                op::WRITE,
                0,
                u32::MAX,
                ClientError::TooLong {
                    len: u32::MAX,
                    max: 4096,
                },
            ),
            (
                op::DISCARD,
                0,
                4608,
                ClientError::TooLong {
                    len: 4608,
                    max: 4096,
                },
            ),
            (
                op::READ,
                1,
                512,
                ClientError::Misaligned {
                    offset: 1,
                    len: 512,
                    block_size: 512,
                },
            ),
            (
                op::WRITE,
                0,
                100,
                ClientError::Misaligned {
                    offset: 0,
                    len: 100,
                    block_size: 512,
                },
            ),
            (
                op::DISCARD,
                256,
                512,
                ClientError::Misaligned {
                    offset: 256,
                    len: 512,
                    block_size: 512,
                },
            ),
            (
                op::READ,
                cap,
                512,
                ClientError::OutOfRange {
                    offset: cap,
                    len: 512,
                    capacity: cap,
                },
            ),
            (
                op::WRITE,
                cap - 512,
                1024,
                ClientError::OutOfRange {
                    offset: cap - 512,
                    len: 1024,
                    capacity: cap,
                },
            ),
            (
                op::READ,
                u64::MAX - 511,
                1024,
                ClientError::OutOfRange {
                    offset: u64::MAX - 511,
                    len: 1024,
                    capacity: cap,
                },
            ),
            (
                op::FLUSH,
                512,
                0,
                ClientError::BadFlush {
                    offset: 512,
                    len: 0,
                },
            ),
            (
                op::FLUSH,
                0,
                512,
                ClientError::BadFlush {
                    offset: 0,
                    len: 512,
                },
            ),
        ];
        for &(o, off, len, e) in cases {
            assert_eq!(
                c.check_client(o, off, len),
                Err(e),
                "op {o} offset {off} len {len}"
            );
            assert_eq!(c.issue(o, off, len, t), Err(e));
            assert_eq!(c.in_flight_len(), 0, "a refused request is not in flight");
            assert!(!e.to_string().is_empty());
            assert!(!e.kind().is_empty());
        }
        // The last block is fine.
        assert_eq!(c.check_client(op::READ, cap - 512, 512), Ok(()));
    }

    #[test]
    fn block_busy_and_not_ready() {
        let t = Instant::now();
        let mut c = ready();
        for i in 0..4 {
            c.issue(op::READ, i * 512, 512, t).unwrap();
        }
        assert_eq!(c.issue(op::READ, 0, 512, t), Err(ClientError::Busy));
        assert_eq!(c.in_flight_len(), 4);
        // Completing one frees a slot; the next id follows on.
        c.check_response(&block_ok(2, 512), t).unwrap();
        assert_eq!(c.issue(op::READ, 0, 512, t).map(|r| r.id), Ok(5));
        // A restart makes the service not ready until the handshake.
        c.info_request();
        assert_eq!(c.issue(op::FLUSH, 0, 0, t), Err(ClientError::NotReady));
    }

    #[test]
    fn ids_exhausted() {
        let t = Instant::now();
        let mut c = ready();
        c.flight.next_id = u64::MAX - 1;
        assert_eq!(c.issue(op::FLUSH, 0, 0, t).map(|r| r.id), Ok(u64::MAX - 1));
        assert_eq!(c.issue(op::FLUSH, 0, 0, t), Err(ClientError::IdsExhausted));
        assert_eq!(c.in_flight_len(), 1);
        // Answers to ids never issued, at the top of the range.
        assert_eq!(
            block_err(&mut c, &block_ok(u64::MAX, 0), t),
            Violation::UnknownId { id: u64::MAX }
        );
        c.check_response(&block_ok(u64::MAX - 1, 0), t).unwrap();
        assert_eq!(
            c.check_response(&block_ok(u64::MAX - 1, 0), t),
            Err(Violation::Duplicate { id: u64::MAX - 1 })
        );
    }

    // --- Block driver side --------------------------------------------------

    #[test]
    fn block_completions() {
        let t = Instant::now();
        let mut c = ready();
        let r = c.issue(op::READ, 512, 1024, t).unwrap();
        let w = c.issue(op::WRITE, 0, 512, t).unwrap();
        let f = c.issue(op::FLUSH, 0, 0, t).unwrap();
        let d = c.issue(op::DISCARD, 0, 512, t).unwrap();
        // Any order.
        assert_eq!(
            c.check_response(&block_ok(w.id, 0), t + ms(1)),
            Ok(Completion {
                id: w.id,
                op: op::WRITE,
                offset: 0,
                len: 512,
                status: status::OK,
                payload: 0
            })
        );
        assert_eq!(
            c.check_response(&block_ok(r.id, 1024), t + ms(2)),
            Ok(Completion {
                id: r.id,
                op: op::READ,
                offset: 512,
                len: 1024,
                status: status::OK,
                payload: 1024
            })
        );
        let e = c
            .check_response(&resp(d.id, status::UNSUPPORTED, class::BLOCK, 0), t)
            .unwrap();
        assert_eq!(e.status, status::UNSUPPORTED);
        let e = c
            .check_response(&resp(f.id, status::IO_ERROR, class::BLOCK, 0), t)
            .unwrap();
        assert_eq!((e.op, e.status), (op::FLUSH, status::IO_ERROR));
        assert_eq!(c.in_flight_len(), 0);
        // At the deadline exactly is still in time.
        let r = c.issue(op::READ, 0, 512, t).unwrap();
        assert!(c.check_response(&block_ok(r.id, 512), t + DEADLINE).is_ok());
    }

    #[test]
    fn block_violations() {
        let t = Instant::now();
        let mut c = ready();
        // Nothing in flight at all.
        assert_eq!(
            block_err(&mut c, &block_ok(1, 0), t),
            Violation::Unsolicited { id: 1 }
        );
        assert_eq!(
            block_err(&mut c, &block_ok(0, 0), t),
            Violation::Unsolicited { id: 0 }
        );

        let r = c.issue(op::READ, 0, 1024, t).unwrap();
        let w = c.issue(op::WRITE, 0, 512, t).unwrap();
        // Id 0 is the handshake's only.
        assert_eq!(
            block_err(&mut c, &block_ok(0, 0), t),
            Violation::Unsolicited { id: 0 }
        );
        // Never issued.
        assert_eq!(
            block_err(&mut c, &block_ok(99, 0), t),
            Violation::UnknownId { id: 99 }
        );
        assert_eq!(
            block_err(&mut c, &block_ok(u64::MAX, 0), t),
            Violation::UnknownId { id: u64::MAX }
        );
        // Wrong class.
        assert_eq!(
            block_err(&mut c, &resp(w.id, status::OK, class::GENERIC, 0), t),
            Violation::WrongClass {
                id: w.id,
                expected: class::BLOCK,
                got: class::GENERIC
            }
        );
        assert_eq!(
            block_err(&mut c, &resp(w.id, status::OK, 0, 0), t),
            Violation::WrongClass {
                id: w.id,
                expected: class::BLOCK,
                got: 0
            }
        );
        // Status out of range.
        assert_eq!(
            block_err(&mut c, &resp(w.id, status::MAX + 1, class::BLOCK, 0), t),
            Violation::BadStatus {
                id: w.id,
                status: status::MAX + 1
            }
        );
        // Lengths: a read returns exactly its length...
        for got in [0, 512, 1023, 1025, MAX_PAYLOAD] {
            assert_eq!(
                block_err(&mut c, &block_ok(r.id, got), t),
                Violation::WrongLength {
                    id: r.id,
                    expected: 1024,
                    got
                }
            );
        }
        // ... a failed read nothing ...
        assert_eq!(
            block_err(&mut c, &resp(r.id, status::IO_ERROR, class::BLOCK, 1024), t),
            Violation::WrongLength {
                id: r.id,
                expected: 0,
                got: 1024
            }
        );
        // ... and a write nothing.
        assert_eq!(
            block_err(&mut c, &block_ok(w.id, 512), t),
            Violation::WrongLength {
                id: w.id,
                expected: 0,
                got: 512
            }
        );
        // Late.
        assert_eq!(
            block_err(&mut c, &block_ok(w.id, 0), t + DEADLINE + ms(1)),
            Violation::Deadline
        );
        // Duplicate, also once nothing is in flight any more.
        c.check_response(&block_ok(w.id, 0), t).unwrap();
        assert_eq!(
            block_err(&mut c, &block_ok(w.id, 0), t),
            Violation::Duplicate { id: w.id }
        );
        c.check_response(&block_ok(r.id, 1024), t).unwrap();
        assert_eq!(
            block_err(&mut c, &block_ok(r.id, 1024), t),
            Violation::Duplicate { id: r.id }
        );
        assert_eq!(
            block_err(&mut c, &block_ok(w.id, 0), t),
            Violation::Duplicate { id: w.id }
        );
    }

    #[test]
    fn expired_returns_the_earliest_late_request() {
        let t = Instant::now();
        let mut c = ready();
        let a = c.issue(op::READ, 0, 512, t).unwrap();
        let b = c.issue(op::READ, 0, 512, t + ms(10)).unwrap();
        let d = c.issue(op::READ, 0, 512, t + ms(20)).unwrap();
        assert_eq!(c.next_deadline(), Some(t + DEADLINE));
        assert_eq!(c.expired(t + DEADLINE), None);
        assert_eq!(c.expired(t + DEADLINE + ms(15)), Some(a.id));
        c.check_response(&block_ok(a.id, 512), t + ms(50)).unwrap();
        assert_eq!(c.next_deadline(), Some(t + ms(10) + DEADLINE));
        assert_eq!(c.expired(t + DEADLINE + ms(15)), Some(b.id));
        c.check_response(&block_ok(b.id, 512), t + ms(50)).unwrap();
        assert_eq!(c.expired(t + DEADLINE + ms(15)), None);
        assert_eq!(c.expired(t + DEADLINE + ms(21)), Some(d.id));
        // Deadline violations name the request.
        assert_eq!(Violation::Deadline.kind(), "deadline");
    }

    #[test]
    fn unrepresentable_deadline_never_expires() {
        let t = Instant::now();
        let mut c = BlockContract::new(ContractLimits {
            deadline: Duration::MAX,
            ..limits()
        });
        c.info_request();
        assert_eq!(c.next_deadline(), None);
        c.check_info(&info_resp(), &geo().encode()).unwrap();
        let r = c.issue(op::READ, 0, 512, t).unwrap();
        assert_eq!(c.in_flight()[0].deadline, None);
        assert_eq!(c.expired(t + Duration::from_secs(1 << 30)), None);
        assert!(c
            .check_response(&block_ok(r.id, 512), t + Duration::from_secs(1 << 30))
            .is_ok());
    }

    #[test]
    fn reissue_keeps_ids_and_order() {
        let t = Instant::now();
        let mut c = ready();
        let reqs: Vec<Request> = [
            (op::READ, 0, 512),
            (op::WRITE, 512, 1024),
            (op::FLUSH, 0, 0),
            (op::DISCARD, 0, 4096),
        ]
        .iter()
        .map(|&(o, off, len)| c.issue(o, off, len, t).unwrap())
        .collect();
        c.check_response(&block_ok(reqs[1].id, 0), t).unwrap();
        // The driver crashes; a new one is started.
        let t1 = t + ms(500);
        c.info_request();
        c.check_info(&info_resp(), &geo().encode()).unwrap();
        let again = c.reissue(t1);
        assert_eq!(again, vec![reqs[0], reqs[2], reqs[3]]);
        for p in c.in_flight() {
            assert_eq!(p.deadline, Some(t1 + DEADLINE));
            assert_eq!(p.issued, t);
        }
        // The new driver answers in its own order.
        c.check_response(&block_ok(reqs[3].id, 0), t1).unwrap();
        c.check_response(&block_ok(reqs[0].id, 512), t1).unwrap();
        c.check_response(&block_ok(reqs[2].id, 0), t1).unwrap();
        // Ids are never reused.
        assert_eq!(c.issue(op::FLUSH, 0, 0, t1).map(|r| r.id), Ok(5));
        assert_eq!(c.reissue(t1).len(), 1);
    }

    #[test]
    fn fail_all_empties_and_later_answers_are_duplicates() {
        let t = Instant::now();
        let mut c = ready();
        for _ in 0..3 {
            c.issue(op::FLUSH, 0, 0, t).unwrap();
        }
        assert_eq!(c.fail_all(), vec![1, 2, 3]);
        assert_eq!(c.in_flight_len(), 0);
        assert_eq!(c.expired(t + ms(10_000)), None);
        assert_eq!(c.fail_all(), Vec::<u64>::new());
        assert_eq!(
            block_err(&mut c, &block_ok(2, 0), t),
            Violation::Duplicate { id: 2 }
        );
        assert_eq!(c.issue(op::FLUSH, 0, 0, t).map(|r| r.id), Ok(4));
    }

    // --- Violations, counters ------------------------------------------------

    fn one_of_each() -> Vec<Violation> {
        vec![
            Violation::BadHeader(DecodeError::BadMagic(*b"XXXX")),
            Violation::UnknownId { id: 9 },
            Violation::Duplicate { id: 9 },
            Violation::WrongClass {
                id: 9,
                expected: 1,
                got: 2,
            },
            Violation::BadStatus { id: 9, status: 77 },
            Violation::WrongLength {
                id: 9,
                expected: 512,
                got: 3,
            },
            Violation::TooLong {
                id: 9,
                max: 8,
                got: 9,
            },
            Violation::Unsolicited { id: 9 },
            Violation::Deadline,
            Violation::BadInfo(InfoProblem::BlockSize(3)),
            Violation::GeometryChanged {
                expected: geo(),
                got: Geometry {
                    capacity: 512,
                    block_size: 512,
                },
            },
        ]
    }

    #[test]
    fn violation_kinds_and_messages() {
        let all = one_of_each();
        let kinds: Vec<&str> = all.iter().map(Violation::kind).collect();
        assert_eq!(kinds, Violation::KINDS);
        let unique: HashSet<&str> = kinds.iter().copied().collect();
        assert_eq!(unique.len(), kinds.len());
        for v in &all {
            let s = v.to_string();
            assert!(s.starts_with("the "), "{s}");
        }
        assert!(all[1].to_string().contains("request 9"));
        assert!(all[5].to_string().contains("512"));
        assert!(all[10].to_string().contains("32768 bytes"));
        assert_eq!(
            Violation::from(DecodeError::Reserved).to_string(),
            "the driver sent a malformed header: reserved header bytes are not zero"
        );
        assert!(Violation::BadHeader(DecodeError::TooLong(5 << 20))
            .to_string()
            .contains("5242880"));
        assert!(all[0].to_string().contains("58 58 58 58"));
        for p in [
            InfoProblem::Failed(1),
            InfoProblem::Payload { got: 3 },
            InfoProblem::BlockSize(3),
            InfoProblem::Capacity {
                capacity: 1,
                block_size: 512,
            },
        ] {
            assert!(Violation::BadInfo(p).to_string().contains("INFO"));
        }
    }

    #[test]
    fn counters() {
        let mut n = ViolationCounters::new();
        assert_eq!(n.total(), 0);
        for (i, v) in one_of_each().iter().enumerate() {
            for _ in 0..=i {
                n.record(v);
            }
        }
        let counted: Vec<(&str, u64)> = n.iter().collect();
        assert_eq!(counted.len(), Violation::KINDS.len());
        for (i, (k, c)) in counted.iter().enumerate() {
            assert_eq!(*k, Violation::KINDS[i]);
            assert_eq!(*c, i as u64 + 1);
            assert_eq!(n.get(k), *c);
        }
        assert_eq!(n.get("no_such_kind"), 0);
        assert_eq!(n.total(), (1..=11).sum::<u64>());
        n.counts[0] = u64::MAX;
        n.record(&Violation::BadHeader(DecodeError::Reserved));
        assert_eq!(n.get("bad_header"), u64::MAX);
        assert_eq!(n.total(), u64::MAX);
    }

    #[test]
    fn client_error_kinds_are_distinct() {
        let all = [
            ClientError::NotReady,
            ClientError::UnsupportedOp { op: 1 },
            ClientError::ZeroLength,
            ClientError::TooLong { len: 1, max: 0 },
            ClientError::Misaligned {
                offset: 1,
                len: 1,
                block_size: 512,
            },
            ClientError::OutOfRange {
                offset: 1,
                len: 1,
                capacity: 1,
            },
            ClientError::BadFlush { offset: 1, len: 1 },
            ClientError::Busy,
            ClientError::IdsExhausted,
        ];
        let kinds: HashSet<&str> = all.iter().map(ClientError::kind).collect();
        assert_eq!(kinds.len(), all.len());
        for e in all {
            assert!(!e.to_string().is_empty());
        }
    }

    // --- InFlight -------------------------------------------------------------

    #[test]
    fn in_flight_bookkeeping() {
        let t = Instant::now();
        let mut f: InFlight<u8> = InFlight::new(0, DEADLINE);
        assert_eq!(f.max_in_flight(), 1);
        assert!(f.is_empty());
        assert_eq!(f.lookup(1), Err(Violation::Unsolicited { id: 1 }));
        assert_eq!(f.issue(7, t), Ok(1));
        assert!(f.is_full());
        assert_eq!(f.issue(8, t), Err(ClientError::Busy));
        assert_eq!(f.lookup(1).map(|p| p.request), Ok(7));
        assert_eq!(f.lookup(2), Err(Violation::UnknownId { id: 2 }));
        assert_eq!(f.lookup(0), Err(Violation::Unsolicited { id: 0 }));
        assert_eq!(f.complete(1).map(|p| p.id), Some(1));
        assert_eq!(f.complete(1), None);
        assert_eq!(f.lookup(1), Err(Violation::Duplicate { id: 1 }));
        assert_eq!(f.lookup(2), Err(Violation::Unsolicited { id: 2 }));
        assert_eq!(f.next_id(), 2);
        assert_eq!(f.len(), 0);
    }

    // --- Char -------------------------------------------------------------------

    fn char_ok(id: u64, len: u32) -> Response {
        resp(id, status::OK, class::CHAR, len)
    }

    fn char_err(c: &mut CharContract, r: &Response, now: Instant) -> Violation {
        let before = c.in_flight();
        let e = c.check_response(r, now).unwrap_err();
        assert_eq!(c.in_flight(), before, "a rejected answer changes nothing");
        e
    }

    #[test]
    fn char_client_side() {
        let t = Instant::now();
        let mut c = CharContract::new(limits());
        assert_eq!(
            c.check_client(op::CHAR_WRITE, 0),
            Err(ClientError::ZeroLength)
        );
        assert_eq!(
            c.check_client(op::CHAR_READ, 0),
            Err(ClientError::ZeroLength)
        );
        assert_eq!(
            c.check_client(op::CHAR_WRITE, 4097),
            Err(ClientError::TooLong {
                len: 4097,
                max: 4096
            })
        );
        assert_eq!(
            c.check_client(op::CHAR_READ, u32::MAX),
            Err(ClientError::TooLong {
                len: u32::MAX,
                max: 4096
            })
        );
        for o in [op::INFO, op::READ, op::WRITE, op::CALL, 99] {
            assert_eq!(c.issue(o, 1, t), Err(ClientError::UnsupportedOp { op: o }));
        }
        let w = c.issue(op::CHAR_WRITE, 10, t).unwrap();
        assert_eq!(
            w,
            Request {
                op: op::CHAR_WRITE,
                class: class::CHAR,
                id: 1,
                offset: 0,
                len: 10,
                payload: 10
            }
        );
        let r = c.issue(op::CHAR_READ, 4096, t).unwrap();
        assert_eq!((r.id, r.len, r.payload), (2, 4096, 0));
        for _ in 0..2 {
            c.issue(op::CHAR_READ, 1, t).unwrap();
        }
        assert_eq!(c.issue(op::CHAR_READ, 1, t), Err(ClientError::Busy));
        assert_eq!(c.in_flight_len(), 4);
        assert_eq!(Contract::class(&c), class::CHAR);
    }

    #[test]
    fn char_driver_side() {
        let t = Instant::now();
        let mut c = CharContract::new(limits());
        assert_eq!(
            char_err(&mut c, &char_ok(1, 0), t),
            Violation::Unsolicited { id: 1 }
        );
        let w = c.issue(op::CHAR_WRITE, 10, t).unwrap();
        let r = c.issue(op::CHAR_READ, 100, t).unwrap();
        assert_eq!(
            char_err(&mut c, &char_ok(0, 0), t),
            Violation::Unsolicited { id: 0 }
        );
        assert_eq!(
            char_err(&mut c, &char_ok(50, 0), t),
            Violation::UnknownId { id: 50 }
        );
        assert_eq!(
            char_err(&mut c, &resp(w.id, status::OK, class::BLOCK, 0), t),
            Violation::WrongClass {
                id: w.id,
                expected: class::CHAR,
                got: class::BLOCK
            }
        );
        assert_eq!(
            char_err(&mut c, &resp(w.id, 4, class::CHAR, 0), t),
            Violation::BadStatus {
                id: w.id,
                status: 4
            }
        );
        assert_eq!(
            char_err(&mut c, &char_ok(w.id, 10), t),
            Violation::WrongLength {
                id: w.id,
                expected: 0,
                got: 10
            }
        );
        assert_eq!(
            char_err(&mut c, &char_ok(r.id, 101), t),
            Violation::TooLong {
                id: r.id,
                max: 100,
                got: 101
            }
        );
        assert_eq!(
            char_err(&mut c, &resp(r.id, status::IO_ERROR, class::CHAR, 5), t),
            Violation::WrongLength {
                id: r.id,
                expected: 0,
                got: 5
            }
        );
        assert_eq!(
            char_err(&mut c, &char_ok(r.id, 5), t + DEADLINE + ms(1)),
            Violation::Deadline
        );
        assert_eq!(c.expired(t + DEADLINE + ms(1)), Some(w.id));
        assert_eq!(
            c.check_response(&char_ok(w.id, 0), t),
            Ok(CharCompletion {
                id: w.id,
                op: op::CHAR_WRITE,
                len: 10,
                status: status::OK,
                payload: 0
            })
        );
        assert_eq!(
            char_err(&mut c, &char_ok(w.id, 0), t),
            Violation::Duplicate { id: w.id }
        );
        // Reads return anything from nothing up to their length.
        assert_eq!(
            c.check_response(&char_ok(r.id, 37), t).map(|x| x.payload),
            Ok(37)
        );
        for got in [0, 1, 100] {
            let r = c.issue(op::CHAR_READ, 100, t).unwrap();
            assert_eq!(
                c.check_response(&char_ok(r.id, got), t).map(|x| x.payload),
                Ok(got)
            );
        }
        let r = c.issue(op::CHAR_READ, 100, t).unwrap();
        let e = c
            .check_response(&resp(r.id, status::INVALID, class::CHAR, 0), t)
            .unwrap();
        assert_eq!((e.status, e.payload), (status::INVALID, 0));
    }

    #[test]
    fn char_reissue_and_fail_all() {
        let t = Instant::now();
        let mut c = CharContract::new(limits());
        let a = c.issue(op::CHAR_WRITE, 3, t).unwrap();
        let b = c.issue(op::CHAR_READ, 3, t).unwrap();
        let d = c.issue(op::CHAR_WRITE, 4, t).unwrap();
        c.check_response(&char_ok(b.id, 0), t).unwrap();
        assert_eq!(c.reissue(t + ms(300)), vec![a, d]);
        assert_eq!(c.next_deadline(), Some(t + ms(300) + DEADLINE));
        assert_eq!(
            c.in_flight()
                .iter()
                .map(|p| p.request.len)
                .collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(c.fail_all(), vec![a.id, d.id]);
        assert_eq!(
            char_err(&mut c, &char_ok(a.id, 0), t),
            Violation::Duplicate { id: a.id }
        );
    }

    // --- Generic ------------------------------------------------------------------

    fn call_ok(id: u64, len: u32) -> Response {
        resp(id, status::OK, class::GENERIC, len)
    }

    fn call_err(c: &mut GenericContract, r: &Response, now: Instant) -> Violation {
        let before = c.in_flight();
        let e = c.check_response(r, now).unwrap_err();
        assert_eq!(c.in_flight(), before, "a rejected answer changes nothing");
        e
    }

    #[test]
    fn generic_contract() {
        let t = Instant::now();
        let mut c = GenericContract::new(limits(), 64);
        assert_eq!(
            c.check_client(4097),
            Err(ClientError::TooLong {
                len: 4097,
                max: 4096
            })
        );
        let empty = c.issue(0, t).unwrap();
        assert_eq!(
            empty,
            Request {
                op: op::CALL,
                class: class::GENERIC,
                id: 1,
                offset: 0,
                len: 0,
                payload: 0
            }
        );
        let big = c.issue(4096, t).unwrap();
        assert_eq!((big.id, big.len, big.payload), (2, 4096, 4096));
        assert_eq!(
            call_err(&mut c, &call_ok(0, 0), t),
            Violation::Unsolicited { id: 0 }
        );
        assert_eq!(
            call_err(&mut c, &call_ok(3, 0), t),
            Violation::UnknownId { id: 3 }
        );
        assert_eq!(
            call_err(&mut c, &resp(1, status::OK, class::CHAR, 0), t),
            Violation::WrongClass {
                id: 1,
                expected: class::GENERIC,
                got: class::CHAR
            }
        );
        assert_eq!(
            call_err(&mut c, &resp(1, 9, class::GENERIC, 0), t),
            Violation::BadStatus { id: 1, status: 9 }
        );
        assert_eq!(
            call_err(&mut c, &call_ok(1, 65), t),
            Violation::TooLong {
                id: 1,
                max: 64,
                got: 65
            }
        );
        assert_eq!(
            call_err(&mut c, &resp(1, status::UNSUPPORTED, class::GENERIC, 1), t),
            Violation::WrongLength {
                id: 1,
                expected: 0,
                got: 1
            }
        );
        assert_eq!(
            call_err(&mut c, &call_ok(1, 0), t + DEADLINE + ms(1)),
            Violation::Deadline
        );
        assert_eq!(
            c.check_response(&call_ok(2, 64), t),
            Ok(CallCompletion {
                id: 2,
                len: 4096,
                status: status::OK,
                payload: 64
            })
        );
        assert_eq!(
            call_err(&mut c, &call_ok(2, 0), t),
            Violation::Duplicate { id: 2 }
        );
        for _ in 0..3 {
            c.issue(1, t).unwrap();
        }
        assert_eq!(c.issue(1, t), Err(ClientError::Busy));
        assert_eq!(c.expired(t + DEADLINE + ms(1)), Some(1));
        let again = c.reissue(t + ms(200));
        assert_eq!(again.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 3, 4, 5]);
        assert_eq!(c.expired(t + DEADLINE + ms(1)), None);
        assert_eq!(c.fail_all(), vec![1, 3, 4, 5]);
        assert_eq!(
            call_err(&mut c, &call_ok(4, 0), t),
            Violation::Duplicate { id: 4 }
        );
        assert_eq!(
            call_err(&mut c, &call_ok(6, 0), t),
            Violation::Unsolicited { id: 6 }
        );
    }

    /// The restart logic, written once over [`Contract`].
    fn restart_all<C: Contract>(c: &mut C, now: Instant) -> Vec<u64> {
        c.reissue(now).iter().map(|r| r.id).collect()
    }

    #[test]
    fn contract_trait_covers_every_class() {
        let t = Instant::now();
        let mut b = ready();
        b.issue(op::FLUSH, 0, 0, t).unwrap();
        let mut ch = CharContract::new(limits());
        ch.issue(op::CHAR_READ, 1, t).unwrap();
        let mut g = GenericContract::new(limits(), 1);
        g.issue(1, t).unwrap();
        assert_eq!(restart_all(&mut b, t), [1]);
        assert_eq!(restart_all(&mut ch, t), [1]);
        assert_eq!(restart_all(&mut g, t), [1]);
        assert_eq!(
            [
                Contract::class(&b),
                Contract::class(&ch),
                Contract::class(&g)
            ],
            [class::BLOCK, class::CHAR, class::GENERIC]
        );
        assert_eq!(Contract::expired(&b, t + DEADLINE + ms(1)), Some(1));
        assert_eq!(Contract::next_deadline(&g), Some(t + DEADLINE));
        assert_eq!(Contract::in_flight_len(&ch), 1);
        assert!(Contract::check_response(&mut g, &call_ok(1, 1), t).is_ok());
        assert_eq!(Contract::fail_all(&mut ch), [1]);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    const DEADLINE: Duration = Duration::from_millis(100);
    const MAX_IN_FLIGHT: usize = 4;
    const BS: u32 = 512;
    const BLOCKS: u64 = 64;

    fn limits() -> ContractLimits {
        ContractLimits {
            max_io: 8 * BS,
            deadline: DEADLINE,
            max_in_flight: MAX_IN_FLIGHT,
        }
    }

    fn geo() -> Geometry {
        Geometry {
            capacity: BLOCKS * u64::from(BS),
            block_size: BS,
        }
    }

    fn info_resp() -> Response {
        Response {
            status: status::OK,
            class: class::BLOCK,
            id: 0,
            len: INFO_LEN,
        }
    }

    /// Which request an answer names.
    #[derive(Debug, Clone)]
    enum Target {
        /// The n-th request in flight (modulo their number), or a raw id if
        /// none is.
        InFlight(usize),
        /// Any id.
        Raw(u64),
    }

    /// One step of a hostile driver and a random client.
    #[derive(Debug, Clone)]
    enum Step {
        Issue {
            op: u8,
            offset: u64,
            len: u32,
        },
        Answer {
            target: Target,
            status: u8,
            class: u8,
            len: Option<u32>,
        },
        Advance(u64),
        Expire,
        Restart {
            geometry_ok: bool,
        },
        FailAll,
    }

    fn target() -> impl Strategy<Value = Target> {
        prop_oneof![
            4 => any::<usize>().prop_map(Target::InFlight),
            1 => (0u64..16).prop_map(Target::Raw),
            1 => any::<u64>().prop_map(Target::Raw),
        ]
    }

    fn step(ops: &'static [u8]) -> impl Strategy<Value = Step> {
        let op = prop_oneof![
            8 => proptest::sample::select(ops),
            1 => any::<u8>(),
        ];
        let offset = prop_oneof![
            4 => (0..BLOCKS + 2).prop_map(|b| b * u64::from(BS)),
            1 => any::<u64>(),
        ];
        let len = prop_oneof![
            4 => (0u32..10).prop_map(|b| b * BS),
            1 => any::<u32>(),
        ];
        // len None: the right length for the request as a correct driver
        // would send it; Some: any length.
        let answer_len = prop_oneof![
            3 => Just(None),
            1 => (0u32..5000).prop_map(Some),
            1 => any::<u32>().prop_map(Some),
        ];
        prop_oneof![
            4 => (op, offset, len).prop_map(|(op, offset, len)| Step::Issue { op, offset, len }),
            6 => (
                target(),
                prop_oneof![4 => 0..=status::MAX, 1 => any::<u8>()],
                prop_oneof![6 => 1u8..=3, 1 => any::<u8>()],
                answer_len,
            )
                .prop_map(|(target, status, class, len)| Step::Answer { target, status, class, len }),
            1 => (0u64..150).prop_map(Step::Advance),
            1 => Just(Step::Expire),
            1 => any::<bool>().prop_map(|geometry_ok| Step::Restart { geometry_ok }),
            1 => Just(Step::FailAll),
        ]
    }

    /// What a correct driver would answer to `req` with `status`: the
    /// payload length.
    fn right_len(req: &Request, st: u8, max_response: u32) -> u32 {
        let ok = st == status::OK;
        match req.op {
            op::READ if ok => req.len,
            op::CHAR_READ if ok => req.len / 2,
            op::CALL if ok => max_response,
            _ => 0,
        }
    }

    /// The invariants a run must keep, whatever the driver does.
    #[derive(Default)]
    struct Tracker {
        issued: HashMap<u64, Request>,
        completed: HashSet<u64>,
        last_id: u64,
    }

    impl Tracker {
        fn issued(&mut self, r: &Request) {
            assert!(
                r.id > self.last_id,
                "ids increase and are never 0: {} after {}",
                r.id,
                self.last_id
            );
            self.last_id = r.id;
            self.issued.insert(r.id, *r);
        }

        fn completed(&mut self, id: u64) -> Request {
            assert!(self.completed.insert(id), "request {id} completed twice");
            *self.issued.get(&id).expect("only issued ids complete")
        }
    }

    /// Drives a contract of any class through random steps and checks the
    /// shared invariants; `issue` and `info` adapt to the class.
    fn run<C: Contract>(
        c: &mut C,
        steps: &[Step],
        mut issue: impl FnMut(&mut C, u8, u64, u32, Instant) -> Result<Request, ClientError>,
        mut restart: impl FnMut(&mut C, bool, Instant) -> bool,
        completion: impl Fn(&C::Completion) -> (u64, u8, u32),
        in_flight: impl Fn(&C) -> Vec<u64>,
        max_response: u32,
    ) {
        let mut now = Instant::now();
        let mut tr = Tracker::default();
        for s in steps {
            match s {
                Step::Issue { op, offset, len } => {
                    let before = in_flight(c);
                    match issue(c, *op, *offset, *len, now) {
                        Ok(r) => {
                            tr.issued(&r);
                            assert_eq!(in_flight(c).len(), before.len() + 1);
                        }
                        Err(_) => assert_eq!(in_flight(c), before),
                    }
                }
                Step::Answer {
                    target,
                    status: st,
                    class: cls,
                    len,
                } => {
                    let flight = in_flight(c);
                    let id = match target {
                        Target::InFlight(i) if !flight.is_empty() => flight[i % flight.len()],
                        Target::InFlight(i) => *i as u64,
                        Target::Raw(id) => *id,
                    };
                    let len = len.unwrap_or_else(|| {
                        tr.issued
                            .get(&id)
                            .map_or(0, |r| right_len(r, *st, max_response))
                    });
                    let r = Response {
                        status: *st,
                        class: *cls,
                        id,
                        len,
                    };
                    match c.check_response(&r, now) {
                        Ok(done) => {
                            let (cid, cst, payload) = completion(&done);
                            assert_eq!(cid, id);
                            assert_eq!(cst, *st);
                            assert_eq!(payload, len);
                            assert!(st <= &status::MAX);
                            assert_eq!(*cls, c.class());
                            let req = tr.completed(id);
                            assert!(flight.contains(&id));
                            assert!(!in_flight(c).contains(&id));
                            if *st != status::OK {
                                assert_eq!(len, 0, "failed requests carry nothing");
                            }
                            assert!(len <= MAX_PAYLOAD.max(req.len));
                        }
                        Err(v) => {
                            assert_eq!(
                                in_flight(c),
                                flight,
                                "{v}: rejected answers change nothing"
                            );
                            assert!(Violation::KINDS.contains(&v.kind()));
                            if tr.completed.contains(&id) {
                                assert_eq!(v, Violation::Duplicate { id });
                            }
                        }
                    }
                }
                Step::Advance(n) => now += Duration::from_millis(*n),
                Step::Expire => {
                    if let Some(id) = c.expired(now) {
                        assert!(id == 0 || in_flight(c).contains(&id));
                        let d = c.next_deadline().expect("something late has a deadline");
                        assert!(d < now);
                    }
                }
                Step::Restart { geometry_ok } => {
                    let before = in_flight(c);
                    if restart(c, *geometry_ok, now) {
                        let again: Vec<u64> = c.reissue(now).iter().map(|r| r.id).collect();
                        assert_eq!(again, before, "re-issued in issue order, same ids");
                        for r in c.reissue(now) {
                            assert_eq!(Some(&r), tr.issued.get(&r.id));
                        }
                    }
                    assert_eq!(in_flight(c), before);
                }
                Step::FailAll => {
                    let before = in_flight(c);
                    assert_eq!(c.fail_all(), before);
                    for id in before {
                        tr.completed(id);
                    }
                    assert_eq!(c.in_flight_len(), 0);
                }
            }
            assert!(c.in_flight_len() <= MAX_IN_FLIGHT);
            assert_eq!(c.in_flight_len(), in_flight(c).len());
            let ids = in_flight(c);
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "in issue order");
            assert!(ids.iter().all(|id| !tr.completed.contains(id)));
        }
    }

    fn block_restart(c: &mut BlockContract, geometry_ok: bool, _now: Instant) -> bool {
        c.info_request();
        let g = if geometry_ok {
            geo()
        } else {
            Geometry {
                capacity: geo().capacity * 2,
                block_size: BS,
            }
        };
        match c.check_info(&info_resp(), &g.encode()) {
            Ok(got) => {
                assert!(geometry_ok);
                assert_eq!(got, geo());
                true
            }
            Err(v) => {
                assert!(!geometry_ok);
                assert_eq!(v.kind(), "geometry_changed");
                assert_eq!(c.phase(), BlockPhase::Handshake);
                // Another driver, this time a good one.
                c.info_request();
                c.check_info(&info_resp(), &geo().encode()).is_ok()
            }
        }
    }

    fn ready_block() -> BlockContract {
        let mut c = BlockContract::new(limits());
        c.info_request();
        c.check_info(&info_resp(), &geo().encode()).unwrap();
        c
    }

    const BLOCK_OPS: &[u8] = &[op::READ, op::WRITE, op::FLUSH, op::DISCARD, op::INFO];
    const CHAR_OPS: &[u8] = &[op::CHAR_READ, op::CHAR_WRITE];
    const CALL_OPS: &[u8] = &[op::CALL];

    /// A correct client's block request, from three random numbers.
    fn valid_block_request(o: u8, a: u64, b: u32) -> (u8, u64, u32) {
        let op = [op::READ, op::WRITE, op::FLUSH, op::DISCARD][usize::from(o % 4)];
        if op == op::FLUSH {
            return (op, 0, 0);
        }
        let blocks = 1 + b % 8;
        let first = a % (BLOCKS - u64::from(blocks) + 1);
        (op, first * u64::from(BS), blocks * BS)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// A hostile driver and a random client: no panic, no id completed
        /// twice, never more than max_in_flight, rejections change nothing.
        #[test]
        fn block_survives_any_driver(steps in proptest::collection::vec(step(BLOCK_OPS), 1..80)) {
            let mut c = ready_block();
            run(
                &mut c,
                &steps,
                |c, op, offset, len, now| c.issue(op, offset, len, now),
                block_restart,
                |d| (d.id, d.status, d.payload),
                |c| c.in_flight().iter().map(|p| p.id).collect(),
                0,
            );
        }

        #[test]
        fn char_survives_any_driver(steps in proptest::collection::vec(step(CHAR_OPS), 1..80)) {
            let mut c = CharContract::new(limits());
            run(
                &mut c,
                &steps,
                |c, op, _, len, now| c.issue(op, len, now),
                |_, _, _| true,
                |d| (d.id, d.status, d.payload),
                |c| c.in_flight().iter().map(|p| p.id).collect(),
                0,
            );
        }

        #[test]
        fn generic_survives_any_driver(steps in proptest::collection::vec(step(CALL_OPS), 1..80)) {
            let mut c = GenericContract::new(limits(), 300);
            run(
                &mut c,
                &steps,
                |c, _, _, len, now| c.issue(len, now),
                |_, _, _| true,
                |d| (d.id, d.status, d.payload),
                |c| c.in_flight().iter().map(|p| p.id).collect(),
                300,
            );
        }

        /// Any INFO answer: no panic, and accepted only when it is a valid
        /// geometry.
        #[test]
        fn any_info_answer(st in any::<u8>(), cls in any::<u8>(), id in prop_oneof![Just(0u64), any::<u64>()],
                           len in prop_oneof![Just(16u32), any::<u32>()],
                           payload in proptest::collection::vec(any::<u8>(), 0..24),
                           cap in any::<u64>(), bs_log in 0u32..20) {
            let mut c = BlockContract::new(limits());
            c.info_request();
            let r = Response { status: st, class: cls, id, len };
            if let Ok(g) = c.check_info(&r, &payload) {
                prop_assert_eq!(Geometry::new(g.capacity, u64::from(g.block_size)), Ok(g));
                prop_assert!(c.is_ready());
            }
            let mut c = BlockContract::new(limits());
            c.info_request();
            let bs = 1u64 << bs_log;
            let cap = cap % (MAX_CAPACITY * 2);
            let g = Geometry { capacity: cap, block_size: bs as u32 };
            let accepted = c.check_info(&info_resp(), &g.encode()).is_ok();
            let valid = (512..=65536).contains(&bs) && cap != 0 && cap.is_multiple_of(bs) && cap <= MAX_CAPACITY;
            prop_assert_eq!(accepted, valid);
        }

        /// A well-behaved driver, answering every request correctly in any
        /// order and in time, never triggers a violation, and every request
        /// completes exactly once.
        #[test]
        fn block_well_behaved_driver(
            reqs in proptest::collection::vec((any::<u8>(), any::<u64>(), any::<u32>()), 1..60),
            picks in proptest::collection::vec((any::<usize>(), 0..=status::MAX, 0u64..20), 60),
            restart_at in proptest::option::of(0usize..60),
        ) {
            let mut c = ready_block();
            let mut now = Instant::now();
            let mut sent: HashMap<u64, Request> = HashMap::new();
            let mut done = HashSet::new();
            let mut queue = reqs.iter().map(|&(o, a, b)| valid_block_request(o, a, b));
            let mut step = 0;
            loop {
                while c.in_flight_len() < MAX_IN_FLIGHT {
                    let Some((op, offset, len)) = queue.next() else { break };
                    let r = c.issue(op, offset, len, now).expect("a valid request is issued");
                    prop_assert_eq!(r.payload, if op == op::WRITE { len } else { 0 });
                    sent.insert(r.id, r);
                }
                let flight = c.in_flight();
                if flight.is_empty() {
                    break;
                }
                if restart_at == Some(step) {
                    c.info_request();
                    c.check_info(&info_resp(), &geo().encode()).expect("same geometry");
                    let again = c.reissue(now);
                    let expected: Vec<Request> = flight.iter().map(|p| sent[&p.id]).collect();
                    prop_assert_eq!(again, expected);
                }
                let (pick, st, dt) = picks[step % picks.len()];
                step += 1;
                // In time: never past the oldest deadline.
                let oldest = c.next_deadline().expect("requests in flight have deadlines");
                now = (now + Duration::from_millis(dt)).min(oldest);
                let p = flight[pick % flight.len()];
                let req = sent[&p.id];
                let len = right_len(&req, st, 0);
                let r = Response { status: st, class: class::BLOCK, id: p.id, len };
                let got = c.check_response(&r, now);
                prop_assert!(got.is_ok(), "{:?} -> {:?}", r, got);
                prop_assert!(done.insert(p.id));
                prop_assert_eq!(c.expired(now), None);
            }
            prop_assert_eq!(done.len(), reqs.len());
            prop_assert_eq!(c.in_flight_len(), 0);
        }

        #[test]
        fn char_and_generic_well_behaved_driver(
            reqs in proptest::collection::vec((any::<bool>(), 1u32..=4096), 1..60),
            picks in proptest::collection::vec((any::<usize>(), 0..=status::MAX, any::<u32>()), 60),
        ) {
            let t = Instant::now();
            let mut ch = CharContract::new(limits());
            let mut g = GenericContract::new(limits(), 1000);
            let mut queue = reqs.iter();
            let mut step = 0;
            let mut done = 0;
            loop {
                while ch.in_flight_len() < MAX_IN_FLIGHT {
                    let Some(&(write, len)) = queue.next() else { break };
                    let op = if write { op::CHAR_WRITE } else { op::CHAR_READ };
                    let a = ch.issue(op, len, t).expect("valid char request");
                    let b = g.issue(len, t).expect("valid call");
                    prop_assert_eq!(a.id, b.id);
                }
                let flight = ch.in_flight();
                if flight.is_empty() {
                    break;
                }
                let (pick, st, n) = picks[step % picks.len()];
                step += 1;
                let p = flight[pick % flight.len()];
                let ok = st == status::OK;
                let char_len = if ok && p.request.op == op::CHAR_READ { n % (p.request.len + 1) } else { 0 };
                let call_len = if ok { n % 1001 } else { 0 };
                let a = ch.check_response(&Response { status: st, class: class::CHAR, id: p.id, len: char_len }, t);
                let b = g.check_response(&Response { status: st, class: class::GENERIC, id: p.id, len: call_len }, t);
                prop_assert!(a.is_ok() && b.is_ok(), "{:?} {:?}", a, b);
                done += 1;
            }
            prop_assert_eq!(done, reqs.len());
            prop_assert_eq!(g.in_flight_len(), 0);
        }
    }
}
