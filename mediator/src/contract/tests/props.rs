//! Property tests: every class driven through random steps of a random
//! client and a hostile driver, checking the invariants every contract
//! keeps; and well-behaved drivers that must never be found at fault.

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
        buf: 0,
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
        op::CHAR_READ if ok => (req.len / 2).max(1),
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
                    buf: 0,
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
                        assert_eq!(in_flight(c), flight, "{v}: rejected answers change nothing");
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
        let r = Response { status: st, class: cls, buf: 0, id, len };
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
                prop_assert_eq!((r.op, r.len, r.buf), (op, len, 0));
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
            let r = Response { status: st, class: class::BLOCK, buf: 0, id: p.id, len };
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
            let char_len = if ok && p.request.op == op::CHAR_READ { 1 + n % p.request.len } else { 0 };
            let call_len = if ok { n % 1001 } else { 0 };
            let a = ch.check_response(&Response { status: st, class: class::CHAR, buf: 0, id: p.id, len: char_len }, t);
            let b = g.check_response(&Response { status: st, class: class::GENERIC, buf: 0, id: p.id, len: call_len }, t);
            prop_assert!(a.is_ok() && b.is_ok(), "{:?} {:?}", a, b);
            done += 1;
        }
        prop_assert_eq!(done, reqs.len());
        prop_assert_eq!(g.in_flight_len(), 0);
    }
}
