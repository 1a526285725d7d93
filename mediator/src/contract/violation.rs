//! What goes wrong, and whose fault it is: a [`Violation`] is a driver
//! breaking its contract (the mediator restarts it), a [`ClientError`] is a
//! client asking for something the service cannot do (the request is
//! refused before it reaches the driver); [`ViolationCounters`] counts the
//! former per kind.

use std::fmt;

use moat_service_proto::{status, DecodeError, MAX_PAYLOAD};

use super::{Geometry, InfoProblem, NetInfo, NetInfoProblem};

/// A driver broke its service contract. After any of these the mediator
/// stops trusting the driver: it restarts it and re-issues what was in
/// flight. The contract's state is unchanged by the rejected answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A descriptor that does not decode (the caller decodes; the error is
    /// here so that every driver fault is one type).
    #[error("the driver sent a malformed answer descriptor: {}", ShowDecode(.0))]
    BadHeader(DecodeError),
    /// The completion ring's producer index moved further than the ring
    /// holds, or back (the caller reads the ring).
    #[error(
        "the driver moved its completion index {ahead} slots past the mediator's, in a ring \
         of {depth}"
    )]
    BadIndex {
        /// The driver's index minus the mediator's, wrapping.
        ahead: u32,
        /// The ring's depth.
        depth: u32,
    },
    /// An answer naming a buffer the pool does not have.
    #[error(
        "the driver answered request {id} in buffer {buf}, outside the pool of {buffers} buffers"
    )]
    OutsidePool {
        /// The id in the answer.
        id: u64,
        /// The buffer in the answer.
        buf: u32,
        /// Buffers in the pool.
        buffers: u32,
    },
    /// An answer naming another buffer than its request's.
    #[error(
        "the driver answered request {id} in buffer {buf}, but the request owns buffer {expected}"
    )]
    WrongBuffer {
        /// The id in the answer.
        id: u64,
        /// The buffer in the answer.
        buf: u32,
        /// The request's buffer.
        expected: u32,
    },
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
    /// No answer before the deadline: [`Contract::expired`] names the late
    /// request, or the answer came too late.
    ///
    /// [`Contract::expired`]: super::Contract::expired
    #[error("the driver did not answer a request before its deadline")]
    Deadline,
    /// An INFO answer that is not valid (block: a geometry; char:
    /// success without bytes).
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
    /// A net INFO answer that is not a valid interface description.
    #[error("the driver's answer to net INFO is invalid: {0}")]
    BadNetInfo(NetInfoProblem),
    /// A restarted net driver reports another MAC address or MTU than the
    /// first one did.
    #[error(
        "the restarted driver reports {got}, but the interface had {expected}; a restart \
         must not change the interface"
    )]
    NetInfoChanged {
        /// What the interface has had since its first handshake.
        expected: NetInfo,
        /// What the restarted driver reported.
        got: NetInfo,
    },
    /// A received frame shorter than an Ethernet header.
    #[error(
        "the driver answered receive buffer {id} with a frame of {got} bytes, shorter than \
         the {min} of an Ethernet header"
    )]
    ShortFrame {
        /// The id in the answer.
        id: u64,
        /// The least bytes a frame has.
        min: u32,
        /// The length in the answer.
        got: u32,
    },
}

impl Violation {
    /// Every [`Violation::kind`], in a fixed order (the order of
    /// [`ViolationCounters::iter`]).
    pub const KINDS: [&'static str; 17] = [
        "bad_header",
        "bad_index",
        "outside_pool",
        "wrong_buffer",
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
        "bad_net_info",
        "net_info_changed",
        "short_frame",
    ];

    fn index(&self) -> usize {
        match self {
            Violation::BadHeader(_) => 0,
            Violation::BadIndex { .. } => 1,
            Violation::OutsidePool { .. } => 2,
            Violation::WrongBuffer { .. } => 3,
            Violation::UnknownId { .. } => 4,
            Violation::Duplicate { .. } => 5,
            Violation::WrongClass { .. } => 6,
            Violation::BadStatus { .. } => 7,
            Violation::WrongLength { .. } => 8,
            Violation::TooLong { .. } => 9,
            Violation::Unsolicited { .. } => 10,
            Violation::Deadline => 11,
            Violation::BadInfo(_) => 12,
            Violation::GeometryChanged { .. } => 13,
            Violation::BadNetInfo(_) => 14,
            Violation::NetInfoChanged { .. } => 15,
            Violation::ShortFrame { .. } => 16,
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
            DecodeError::TooLong(n) => write!(
                f,
                "a payload of {n} bytes is over the limit of {MAX_PAYLOAD}"
            ),
            DecodeError::Reserved => f.write_str("reserved descriptor bytes are not zero"),
        }
    }
}

/// A count of violations per kind, for a service's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViolationCounters {
    pub(super) counts: [u64; Violation::KINDS.len()],
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
    /// A frame to send that is shorter than an Ethernet header or longer
    /// than the interface's MTU allows.
    #[error("a frame of {len} bytes cannot be sent: frames are {min} to {max} bytes")]
    BadFrame {
        /// The frame's length.
        len: u32,
        /// An Ethernet header's length.
        min: u32,
        /// The MTU plus the Ethernet header and a VLAN tag.
        max: u32,
    },
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
            ClientError::BadFrame { .. } => "bad_frame",
        }
    }
}
