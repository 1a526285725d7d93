//! Property tests of the net contract: a random client and a hostile
//! driver (any answer, to any id, with any class, status and length;
//! restarts at any time), checking what the contract promises: nothing
//! panics, a rejected answer changes nothing, each request completes at
//! most once, a received frame is a header to the buffer's length, a
//! receive buffer never expires, and a restart drops exactly the sends in
//! flight and lends exactly the receive buffers again, same ids.

use super::*;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

const MAX_IN_FLIGHT: usize = 6;

#[derive(Debug, Clone)]
enum Step {
    Send(u32),
    Lend,
    Answer {
        pick: usize,
        raw: Option<u64>,
        status: u8,
        class: u8,
        len: u32,
    },
    Advance(u64),
    Restart {
        same_info: bool,
    },
    FailAll,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => prop_oneof![4 => 0u32..1600, 1 => any::<u32>()].prop_map(Step::Send),
        3 => Just(Step::Lend),
        6 => (
            any::<usize>(),
            proptest::option::of(prop_oneof![0u64..20, any::<u64>()]),
            prop_oneof![4 => 0..=status::MAX, 1 => any::<u8>()],
            prop_oneof![6 => Just(class::NET), 1 => any::<u8>()],
            prop_oneof![3 => Just(0u32), 3 => 0u32..1600, 1 => any::<u32>()],
        )
            .prop_map(|(pick, raw, status, class, len)| Step::Answer { pick, raw, status, class, len }),
        1 => (0u64..300).prop_map(Step::Advance),
        1 => any::<bool>().prop_map(|same_info| Step::Restart { same_info }),
        1 => Just(Step::FailAll),
    ]
}

fn mac() -> NetInfo {
    NetInfo {
        mac: [2, 0, 0, 0, 0, 7],
        mtu: 1500,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn net_survives_any_driver(steps in proptest::collection::vec(step(), 1..100)) {
        let mut c = NetContract::new(ContractLimits {
            max_io: 65536,
            deadline: DEADLINE,
            max_in_flight: MAX_IN_FLIGHT,
        });
        c.info_request();
        let info_resp = resp(0, status::OK, class::NET, NET_INFO_LEN);
        c.check_info(&info_resp, &mac().encode()).unwrap();
        let mut now = Instant::now();
        let mut issued: HashMap<u64, Request> = HashMap::new();
        let mut completed: HashSet<u64> = HashSet::new();
        for s in &steps {
            let ids = |c: &NetContract| c.in_flight().iter().map(|p| p.id).collect::<Vec<_>>();
            match s {
                Step::Send(_) | Step::Lend => {
                    let before = ids(&c);
                    let r = match s {
                        Step::Send(len) => c.transmit(*len, now),
                        _ => c.lend_receive(now),
                    };
                    match r {
                        Ok(r) => {
                            prop_assert_eq!(r.class, class::NET);
                            if r.op == op::NET_TX {
                                prop_assert!((ETH_HEADER..=mac().max_frame()).contains(&r.len));
                                if let Step::Send(len) = s {
                                    prop_assert_eq!(r.len, *len);
                                }
                            } else {
                                prop_assert_eq!(r.len, mac().max_frame());
                            }
                            prop_assert!(issued.insert(r.id, r).is_none());
                        }
                        Err(_) => prop_assert_eq!(ids(&c), before),
                    }
                }
                Step::Answer { pick, raw, status: st, class: cls, len } => {
                    let flight = ids(&c);
                    let id = match (raw, flight.is_empty()) {
                        (Some(id), _) => *id,
                        (None, false) => flight[pick % flight.len()],
                        (None, true) => *pick as u64,
                    };
                    let r = Response { status: *st, class: *cls, buf: 0, id, len: *len };
                    match c.check_response(&r, now) {
                        Ok(done) => {
                            prop_assert!(completed.insert(id), "completed twice");
                            let req = issued[&id];
                            prop_assert_eq!(done.op, req.op);
                            prop_assert_eq!(*cls, class::NET);
                            if req.op == op::NET_RX && *st == status::OK {
                                prop_assert!((ETH_HEADER..=req.len).contains(len));
                                prop_assert_eq!(done.frame, *len);
                            } else {
                                prop_assert_eq!(*len, 0);
                            }
                            prop_assert!(!ids(&c).contains(&id));
                        }
                        Err(v) => {
                            prop_assert_eq!(ids(&c), flight, "{}: rejected answers change nothing", v);
                            prop_assert!(Violation::KINDS.contains(&v.kind()));
                        }
                    }
                }
                Step::Advance(ms) => {
                    now += Duration::from_millis(*ms);
                    if let Some(id) = c.expired(now) {
                        prop_assert_eq!(issued[&id].op, op::NET_TX, "receive buffers never expire");
                    }
                }
                Step::Restart { same_info } => {
                    let before: Vec<Request> = c.in_flight().iter().map(|p| issued[&p.id]).collect();
                    c.info_request();
                    let info = if *same_info { mac() } else { NetInfo { mtu: 9000, ..mac() } };
                    match c.check_info(&info_resp, &info.encode()) {
                        Ok(_) => {
                            let r = c.restart(now);
                            let tx: Vec<u64> = before.iter().filter(|q| q.op == op::NET_TX).map(|q| q.id).collect();
                            let rx: Vec<Request> = before.iter().filter(|q| q.op == op::NET_RX).copied().collect();
                            prop_assert_eq!(&r.dropped, &tx);
                            prop_assert_eq!(&r.relent, &rx);
                            for id in tx {
                                completed.insert(id);
                            }
                        }
                        Err(v) => {
                            prop_assert!(!*same_info);
                            let changed = matches!(v, Violation::NetInfoChanged { .. });
                            prop_assert!(changed);
                            // Still a handshake: the right driver comes next.
                            c.check_info(&info_resp, &mac().encode()).unwrap();
                            c.restart(now);
                            for q in before.iter().filter(|q| q.op == op::NET_TX) {
                                completed.insert(q.id);
                            }
                        }
                    }
                }
                Step::FailAll => {
                    for id in c.fail_all() {
                        prop_assert!(completed.insert(id));
                    }
                }
            }
            prop_assert!(c.in_flight_len() <= MAX_IN_FLIGHT);
            for p in c.in_flight() {
                if issued[&p.id].op == op::NET_RX {
                    prop_assert!(p.deadline.is_none(), "a receive buffer has no deadline");
                }
            }
            // Sends always find a slot unless sends fill it.
            let rx = c.in_flight().iter().filter(|p| issued[&p.id].op == op::NET_RX).count();
            prop_assert!(rx < MAX_IN_FLIGHT);
            prop_assert!(ids(&c).iter().all(|id| !completed.contains(id)));
        }
    }
}
