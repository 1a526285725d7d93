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
//! The files of this module, one concern each (every public item is
//! re-exported here, as `contract::X`):
//!
//! - `limits.rs`: [`ContractLimits`], the block [`Geometry`] and what can be
//!   wrong with it ([`InfoProblem`]);
//! - `violation.rs`: driver faults ([`Violation`], [`ViolationCounters`])
//!   and refused client requests ([`ClientError`]);
//! - `inflight.rs`: [`InFlight`] and the checks every class makes of an
//!   answer;
//! - `block.rs`, `char.rs`, `generic.rs`: one contract per class;
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
mod violation;

#[cfg(test)]
mod tests;

use std::time::Instant;

use moat_service_proto::{Request, Response};

pub use self::block::{BlockContract, BlockOp, BlockPhase, Completion};
pub use self::char::{CharCompletion, CharContract, CharOp};
pub use self::generic::{CallCompletion, CallOp, GenericContract};
pub use self::inflight::{InFlight, Pending};
pub use self::limits::{
    ContractLimits, Geometry, InfoProblem, INFO_LEN, MAX_BLOCK_SIZE, MAX_CAPACITY, MIN_BLOCK_SIZE,
};
pub use self::violation::{ClientError, Violation, ViolationCounters};

/// What the restart logic needs of a contract, whatever its class.
pub trait Contract {
    /// What an accepted answer yields.
    type Completion;

    /// The service class ([`class::BLOCK`], [`class::CHAR`],
    /// [`class::GENERIC`]).
    ///
    /// [`class::BLOCK`]: moat_service_proto::class::BLOCK
    /// [`class::CHAR`]: moat_service_proto::class::CHAR
    /// [`class::GENERIC`]: moat_service_proto::class::GENERIC
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
