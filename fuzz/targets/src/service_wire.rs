//! The service wire between the mediator and a driver, and the block
//! contract that judges what a driver sends: client requests
//! ([`BlockContract::check_client`], [`BlockContract::issue`]), driver
//! answers as descriptor bytes ([`Response::decode`]) and payload
//! ([`BlockContract::check_info`], [`Contract::check_response`]),
//! restarts, re-issues, the circuit breaker ([`Contract::fail_all`]) and
//! deadlines, in any order, under arbitrary limits.
//!
//! A model kept beside the contract (what is in flight, what was
//! completed or given up, the phase, the geometry) checks the contract's
//! invariants after every step: ids are fresh, non-zero and increasing;
//! nothing is completed that is not in flight, and nothing twice; an
//! answer is accepted exactly when the contract's rules say so, and a
//! rejected one changes nothing; a descriptor that decodes encodes back to the
//! same bytes.
use crate::input::Input;
use moat_mediator::contract::{
    BlockContract, BlockOp, BlockPhase, ClientError, Contract, ContractLimits, Geometry, Violation,
    INFO_LEN,
};
use moat_service_proto::{class, op, status, Request, Response, DESCRIPTOR, MAX_PAYLOAD};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Most steps of one input.
const MAX_STEPS: usize = 256;

/// What the model remembers of a request in flight.
#[derive(Debug, Clone, Copy)]
struct Flight {
    op: BlockOp,
    deadline: Option<Instant>,
}

/// The model of a block contract.
struct Model {
    limits: ContractLimits,
    phase: BlockPhase,
    expected: Option<Geometry>,
    current: Option<Geometry>,
    flight: BTreeMap<u64, Flight>,
    /// Completed or given up: any later answer is a duplicate.
    done: BTreeSet<u64>,
    /// The highest id issued so far.
    last_id: u64,
}

impl Model {
    /// Whether a client's request is one the contract must accept.
    fn client_ok(&self, o: u8, offset: u64, len: u32) -> bool {
        let Some(g) = self.current.filter(|_| self.phase == BlockPhase::Ready) else {
            return false;
        };
        match o {
            op::FLUSH => offset == 0 && len == 0,
            op::READ | op::WRITE | op::DISCARD => {
                let bs = u64::from(g.block_size);
                len != 0
                    && len <= self.limits.max_io
                    && offset.is_multiple_of(bs)
                    && u64::from(len) % bs == 0
                    && offset
                        .checked_add(u64::from(len))
                        .is_some_and(|e| e <= g.capacity)
            }
            _ => false,
        }
    }

    /// Whether the contract must accept a driver's answer (not INFO).
    fn answer_ok(&self, r: &Response, now: Instant) -> bool {
        if self.phase != BlockPhase::Ready {
            return false;
        }
        let Some(f) = self.flight.get(&r.id) else {
            return false;
        };
        let want_len = if r.status == status::OK && f.op.op == op::READ {
            f.op.len
        } else {
            0
        };
        r.class == class::BLOCK
            && r.status <= status::MAX
            && f.deadline.is_none_or(|d| now <= d)
            && r.len == want_len
    }

    /// Whether the contract must accept an INFO answer, and the geometry.
    fn info_ok(&self, r: &Response, payload: &[u8]) -> Option<Geometry> {
        if self.phase != BlockPhase::Handshake
            || r.id != 0
            || r.class != class::BLOCK
            || r.status != status::OK
            || r.len != INFO_LEN
            || payload.len() != INFO_LEN as usize
        {
            return None;
        }
        let cap = u64::from_le_bytes(payload[..8].try_into().unwrap());
        let bs = u64::from_le_bytes(payload[8..].try_into().unwrap());
        let bs_ok = bs.is_power_of_two() && (512..=65536).contains(&bs);
        if !bs_ok || cap == 0 || cap > 1 << 48 || cap % bs != 0 {
            return None;
        }
        let g = Geometry::new(cap, bs).expect("a geometry the contract's rules allow");
        self.expected.is_none_or(|e| e == g).then_some(g)
    }
}

/// The contract and the model agree.
fn agree(c: &BlockContract, m: &Model, now: Instant) {
    assert_eq!(c.phase(), m.phase, "phase");
    assert_eq!(c.geometry(), m.current.or(m.expected), "geometry");
    let got: Vec<(u64, BlockOp, Option<Instant>)> = c
        .in_flight()
        .iter()
        .map(|p| (p.id, p.request, p.deadline))
        .collect();
    let want: Vec<(u64, BlockOp, Option<Instant>)> = m
        .flight
        .iter()
        .map(|(id, f)| (*id, f.op, f.deadline))
        .collect();
    assert_eq!(got, want, "the requests in flight");
    assert_eq!(c.in_flight_len(), m.flight.len());
    assert!(
        m.flight.len() <= m.limits.max_in_flight,
        "over max_in_flight"
    );
    let ready = m.phase == BlockPhase::Ready;
    let expired = m
        .flight
        .iter()
        .filter_map(|(id, f)| f.deadline.filter(|d| now > *d).map(|d| (d, *id)))
        .min()
        .map(|(_, id)| id)
        .filter(|_| ready);
    assert_eq!(c.expired(now), expired, "expired");
    let next = m
        .flight
        .values()
        .filter_map(|f| f.deadline)
        .min()
        .filter(|_| ready);
    assert_eq!(c.next_deadline(), next, "next deadline");
}

/// A header from the input: raw bytes, or an answer built to be nearly
/// right (an id in flight, the expected length), perhaps with one byte
/// changed.
fn header(inp: &mut Input, m: &Model) -> [u8; DESCRIPTOR] {
    let sel = inp.u8();
    if sel.is_multiple_of(8) {
        let mut h = [0u8; DESCRIPTOR];
        let b = inp.bytes(DESCRIPTOR);
        h[..b.len()].copy_from_slice(b);
        return h;
    }
    let ids: Vec<u64> = m.flight.keys().copied().collect();
    let done: Vec<u64> = m.done.iter().copied().collect();
    let pick = usize::from(inp.u8());
    let id = match sel / 8 % 4 {
        0 | 1 if !ids.is_empty() => ids[pick % ids.len()],
        2 if !done.is_empty() => done[pick % done.len()],
        3 => inp.u64(),
        _ => 0,
    };
    let o = m.flight.get(&id).map(|f| f.op);
    let st = inp.u8() % 6;
    let len = match inp.u8() % 4 {
        0 if id == 0 => INFO_LEN,
        0 | 1 => o
            .filter(|o| o.op == op::READ && st == 0)
            .map_or(0, |o| o.len),
        2 => 0,
        _ => inp.u32() % (MAX_PAYLOAD + 2),
    };
    let r = Response {
        status: if st == 5 {
            inp.u8()
        } else {
            st.min(status::MAX)
        },
        class: if inp.u8().is_multiple_of(8) {
            inp.u8()
        } else {
            class::BLOCK
        },
        buf: if inp.bool() { 0 } else { inp.u32() },
        id,
        len,
    };
    let mut h = r.encode();
    if sel & 0x80 != 0 {
        let i = usize::from(inp.u8()) % DESCRIPTOR;
        h[i] ^= inp.u8() | 1;
    }
    h
}

/// The INFO payload: a geometry a driver might report, or raw bytes.
fn info_payload(inp: &mut Input, len: usize) -> Vec<u8> {
    if inp.bool() {
        let bs = 512u64 << (inp.u8() % 9);
        let blocks = u64::from(inp.u16()) + u64::from(inp.bool());
        let mut p = Vec::with_capacity(16);
        p.extend_from_slice(&(blocks * bs).to_le_bytes());
        p.extend_from_slice(&bs.to_le_bytes());
        p.truncate(len);
        p
    } else {
        inp.bytes(len).to_vec()
    }
}

fn limits(inp: &mut Input) -> ContractLimits {
    let max_io = match inp.u8() % 6 {
        0 => 0,
        1 => 512,
        2 => 4096,
        3 => 128 << 10,
        4 => MAX_PAYLOAD + 1,
        _ => inp.u32(),
    };
    let deadline = match inp.u8() % 4 {
        0 => Duration::MAX,
        1 => Duration::ZERO,
        _ => Duration::from_millis(u64::from(inp.u16())),
    };
    ContractLimits {
        max_io,
        deadline,
        max_in_flight: usize::from(inp.u8() % 40),
    }
}

/// Run one input: limits, then up to 256 steps.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let limits = limits(&mut inp);
    let mut c = BlockContract::new(limits);
    let eff = limits.effective();
    assert_eq!(c.limits(), eff);
    let mut m = Model {
        limits: eff,
        phase: BlockPhase::Idle,
        expected: None,
        current: None,
        flight: BTreeMap::new(),
        done: BTreeSet::new(),
        last_id: 0,
    };
    let mut now = Instant::now();
    for _ in 0..MAX_STEPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 10 {
            0 | 1 => {
                let o = [op::READ, op::WRITE, op::FLUSH, op::DISCARD, op::INFO, 9]
                    [usize::from(inp.u8() % 6)];
                let (offset, len) = if inp.bool() {
                    (u64::from(inp.u16()) * 512, u32::from(inp.u8()) * 512)
                } else {
                    (inp.u64(), inp.u32())
                };
                let ok = m.client_ok(o, offset, len);
                assert_eq!(
                    c.check_client(o, offset, len).is_ok(),
                    ok,
                    "check_client({o}, {offset}, {len})"
                );
                match c.issue(o, offset, len, now) {
                    Ok(req) => {
                        assert!(ok, "issued a request the rules refuse");
                        assert!(m.flight.len() < eff.max_in_flight);
                        assert!(
                            req.id > m.last_id && req.id != 0,
                            "id {} is not fresh",
                            req.id
                        );
                        let want = Request {
                            op: o,
                            class: class::BLOCK,
                            id: req.id,
                            offset,
                            len,
                            // The contract names no buffer: the ring
                            // assigns one when it publishes the request.
                            buf: 0,
                        };
                        assert_eq!(req, want);
                        assert_eq!(Request::decode(&req.encode()), Ok(req));
                        m.last_id = req.id;
                        m.flight.insert(
                            req.id,
                            Flight {
                                op: BlockOp { op: o, offset, len },
                                deadline: now.checked_add(eff.deadline),
                            },
                        );
                    }
                    Err(ClientError::Busy) => {
                        assert!(
                            ok && m.flight.len() >= eff.max_in_flight,
                            "busy when not full"
                        )
                    }
                    Err(e) => assert!(!ok, "refused a request the rules allow: {e}"),
                }
            }
            2..=4 => {
                let h = header(&mut inp, &m);
                let r = match Response::decode(&h) {
                    Ok(r) => r,
                    Err(_) => {
                        let reserved = h[2] != 0
                            || h[3] != 0
                            || h[16..24].iter().any(|&b| b != 0)
                            || h[28..32].iter().any(|&b| b != 0);
                        let len = u32::from_le_bytes(h[24..28].try_into().unwrap());
                        assert!(reserved || len > MAX_PAYLOAD, "a good descriptor refused");
                        continue;
                    }
                };
                assert_eq!(
                    r.encode(),
                    h,
                    "a descriptor that decodes encodes back differently"
                );
                // The mediator reads the payload from the pool; a short
                // input is a stream that ended early.
                if m.phase == BlockPhase::Handshake && r.id == 0 {
                    let payload = info_payload(&mut inp, r.len.min(64) as usize);
                    let want = m.info_ok(&r, &payload);
                    match c.check_info(&r, &payload) {
                        Ok(g) => {
                            assert_eq!(Some(g), want, "accepted a bad INFO answer");
                            m.phase = BlockPhase::Ready;
                            m.expected = Some(g);
                            m.current = Some(g);
                        }
                        Err(v) => assert!(want.is_none(), "refused a good INFO answer: {v}"),
                    }
                } else {
                    let ok = m.answer_ok(&r, now);
                    let dup = m.done.contains(&r.id);
                    match c.check_response(&r, now) {
                        Ok(done) => {
                            assert!(ok, "accepted an answer the rules refuse: {r:?}");
                            let f = m
                                .flight
                                .remove(&done.id)
                                .expect("completed a request not in flight");
                            assert!(m.done.insert(done.id), "completed {} twice", done.id);
                            assert_eq!(done.id, r.id);
                            assert_eq!(
                                (done.op, done.offset, done.len),
                                (f.op.op, f.op.offset, f.op.len)
                            );
                            assert_eq!((done.status, done.payload), (r.status, r.len));
                        }
                        Err(v) => {
                            assert!(!ok, "refused an answer the rules allow: {r:?}: {v}");
                            if dup && m.phase == BlockPhase::Ready {
                                assert_eq!(v, Violation::Duplicate { id: r.id }, "a second answer");
                            }
                        }
                    }
                }
            }
            5 => {
                let req = c.info_request();
                assert_eq!(
                    (req.op, req.class, req.id, req.len, req.buf),
                    (op::INFO, class::BLOCK, 0, 0, 0)
                );
                m.phase = BlockPhase::Handshake;
                m.current = None;
            }
            6 => {
                let again = c.reissue(now);
                let deadline = now.checked_add(eff.deadline);
                let want: Vec<Request> = m
                    .flight
                    .iter_mut()
                    .map(|(id, f)| {
                        f.deadline = deadline;
                        Request {
                            op: f.op.op,
                            class: class::BLOCK,
                            id: *id,
                            offset: f.op.offset,
                            len: f.op.len,
                            buf: 0,
                        }
                    })
                    .collect();
                assert_eq!(again, want, "re-issued requests");
            }
            7 => {
                let ids = c.fail_all();
                let want: Vec<u64> = m.flight.keys().copied().collect();
                assert_eq!(ids, want, "given up requests");
                m.done.extend(std::mem::take(&mut m.flight).into_keys());
            }
            8 => {
                let step = match inp.u8() % 4 {
                    0 => Duration::from_millis(u64::from(inp.u8())),
                    1 => Duration::from_millis(u64::from(inp.u16())),
                    2 => Duration::from_nanos(1),
                    _ => Duration::from_secs(u64::from(inp.u32())),
                };
                if let Some(t) = now.checked_add(step) {
                    now = t;
                }
            }
            _ => {
                if let Ok(g) = Geometry::new(u64::from(inp.u16()) * 4096, 4096) {
                    if inp.bool() && m.expected.is_none() {
                        c.expect_geometry(g);
                        m.expected = Some(g);
                    }
                }
            }
        }
        agree(&c, &m, now);
    }
}
