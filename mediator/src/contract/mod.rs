//! Service contracts as explicit state machines, one per service class.
//!
//! A contract sits between the clients of a service and the driver
//! picoprocess that implements it. It checks both directions:
//!
//! - what a *client* asks (`check_client`, `issue`): a request the service
//!   cannot carry out is refused with a [`ClientError`] before it reaches
//!   the driver; the driver is not at fault;
//! - what the *driver* answers (`check_response`, `expired`, and for block
//!   devices the INFO handshake, `check_info`): every answer must complete
//!   a request that is in flight, exactly once, with the right class, a
//!   known status and the right payload length, before the request's
//!   deadline. Anything else is a [`Violation`], after which the mediator
//!   restarts the driver and re-issues what was in flight
//!   ([`Contract::reissue`]).
//!
//! A check that fails changes nothing: the contract is in the same state as
//! before the refused request or the rejected answer. A request leaves the
//! in-flight set only through an accepted answer or [`Contract::fail_all`].
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
//! is [`InFlight`]. Each contract embeds it in a [`Requests`], which does
//! what every class does with it the same way: issue and encode a request,
//! check an answer's id, class, status and deadline, complete it, re-issue
//! or give up on everything. [`BlockContract`], [`CharContract`] and
//! [`GenericContract`] keep only what is particular to their class (what a
//! client may ask, what length an answer must have, the block handshake),
//! and all three implement [`Contract`], the part the restart logic needs,
//! whose provided methods are the shared part, written once.
//!
//! The files of this module, one concern each (every public item is
//! re-exported here, as `contract::X`):
//!
//! - `limits.rs`: [`ContractLimits`], the block [`Geometry`] and what can be
//!   wrong with it ([`InfoProblem`]);
//! - `violation.rs`: driver faults ([`Violation`], [`ViolationCounters`])
//!   and refused client requests ([`ClientError`]);
//! - `inflight.rs`: [`InFlight`], [`Requests`] and the checks every class
//!   makes of an answer;
//! - `block.rs`, `char.rs`, `generic.rs`, `net.rs`: one contract per
//!   class (net: frames both ways, receive buffers without deadlines,
//!   sends dropped rather than re-issued across a restart);
//! - `tests/`: their tests, one file per concern, and property tests.
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

mod block;
mod char;
mod generic;
mod inflight;
mod limits;
mod net;
mod violation;

#[cfg(test)]
mod tests;

use std::time::Instant;

use moat_service_proto::{Request, Response};

pub use self::block::{BlockContract, BlockOp, BlockPhase, Completion};
pub use self::char::{CharCompletion, CharContract, CharOp};
pub use self::generic::{CallCompletion, CallOp, GenericContract};
pub use self::inflight::{ClassOp, InFlight, Pending, Requests};
pub use self::limits::{
    ContractLimits, Geometry, InfoProblem, INFO_LEN, MAX_BLOCK_SIZE, MAX_CAPACITY, MIN_BLOCK_SIZE,
};
pub use self::net::{
    NetCompletion, NetContract, NetInfo, NetInfoProblem, NetOp, NetRestart, ETH_HEADER,
    FRAME_OVERHEAD, MAX_MTU, MIN_MTU, NET_INFO_LEN,
};
pub use self::violation::{ClientError, Violation, ViolationCounters};

/// What the restart logic needs of a contract, whatever its class.
///
/// A contract supplies what is particular to its class,
/// [`Contract::check_response`], and the bookkeeping it embeds
/// ([`Contract::requests`]); everything else is provided here, once, over
/// that bookkeeping. The block contract overrides [`Contract::expired`] and
/// [`Contract::next_deadline`], which report nothing outside its ready
/// phase.
pub trait Contract {
    /// What the contract remembers of a request ([`BlockOp`], [`CharOp`],
    /// [`CallOp`]).
    type Op: ClassOp;

    /// What an accepted answer yields.
    type Completion;

    /// The requests in flight under this contract (only this module can
    /// look inside).
    fn requests(&self) -> &Requests<Self::Op>;

    /// The same, for the provided methods that change it
    /// ([`Contract::reissue`], [`Contract::fail_all`]).
    fn requests_mut(&mut self) -> &mut Requests<Self::Op>;

    /// Checks a driver's answer at `now` (its arrival); on success the
    /// request is no longer in flight, on a violation nothing changes.
    fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<Self::Completion, Violation>;

    /// The service class ([`class::BLOCK`], [`class::CHAR`],
    /// [`class::GENERIC`]): [`ClassOp::CLASS`] of [`Contract::Op`].
    ///
    /// [`class::BLOCK`]: moat_service_proto::class::BLOCK
    /// [`class::CHAR`]: moat_service_proto::class::CHAR
    /// [`class::GENERIC`]: moat_service_proto::class::GENERIC
    fn class(&self) -> u8 {
        Self::Op::CLASS
    }

    /// The limits in force (see [`ContractLimits::effective`] for how they
    /// are applied).
    fn limits(&self) -> ContractLimits {
        self.requests().limits()
    }

    /// The id of a request whose deadline passed before `now`, to be
    /// treated as [`Violation::Deadline`]; ties go to the lowest id.
    fn expired(&self, now: Instant) -> Option<u64> {
        self.requests().expired(now)
    }

    /// The earliest deadline of a request in flight, if anything is
    /// awaited.
    fn next_deadline(&self) -> Option<Instant> {
        self.requests().next_deadline()
    }

    /// The requests in flight, in issue order.
    fn in_flight(&self) -> Vec<Pending<Self::Op>> {
        self.requests().pending()
    }

    /// How many requests are in flight.
    fn in_flight_len(&self) -> usize {
        self.requests().len()
    }

    /// After a restart (for a block device, after the new driver's
    /// handshake was accepted): re-arms the deadline of every request in
    /// flight from `now` and returns them, same ids, in issue order, to
    /// send to the new driver.
    fn reissue(&mut self, now: Instant) -> Vec<Request> {
        self.requests_mut().reissue(now)
    }

    /// Gives up on every request in flight (the circuit breaker opened);
    /// returns their ids in issue order so their clients can be failed. A
    /// later answer to one of them is a [`Violation::Duplicate`].
    fn fail_all(&mut self) -> Vec<u64> {
        self.requests_mut().fail_all()
    }
}
