//! Tests of the contracts, one file per concern; [`props`] drives every
//! class with random clients and hostile drivers. The helpers here are
//! shared by the unit tests.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use moat_service_proto::{class, op, status, DecodeError, Request, Response, MAX_PAYLOAD};

use super::*;

mod block;
mod block_handshake;
mod char;
mod generic;
mod inflight;
mod limits;
mod net;
mod net_props;
mod props;
mod violation;

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
        buf: 0,
        id: 0,
        len: INFO_LEN,
    }
}

fn resp(id: u64, st: u8, cls: u8, len: u32) -> Response {
    Response {
        status: st,
        class: cls,
        buf: 0,
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
