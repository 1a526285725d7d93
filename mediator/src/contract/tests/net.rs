//! Tests of the net contract: the handshake that fixes the interface,
//! frames both ways with their bounds, receive buffers without deadlines,
//! and restarts that drop sends and lend the receive buffers again.

use super::*;

const MAC: [u8; 6] = [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x01];

fn info() -> NetInfo {
    NetInfo {
        mac: MAC,
        mtu: 1500,
    }
}

fn net_limits() -> ContractLimits {
    ContractLimits {
        max_io: 65536,
        deadline: DEADLINE,
        max_in_flight: 8,
    }
}

fn net_info_resp() -> Response {
    resp(0, status::OK, class::NET, NET_INFO_LEN)
}

fn net_ready() -> NetContract {
    let mut c = NetContract::new(net_limits());
    let r = c.info_request();
    assert_eq!((r.op, r.class, r.id), (op::INFO, class::NET, 0));
    assert_eq!(c.check_info(&net_info_resp(), &info().encode()), Ok(info()));
    c
}

fn net_ok(id: u64, len: u32) -> Response {
    resp(id, status::OK, class::NET, len)
}

/// A rejected answer leaves the requests in flight as they were.
fn net_err(c: &mut NetContract, r: &Response, now: Instant) -> Violation {
    let before = c.in_flight();
    let e = c.check_response(r, now).unwrap_err();
    assert_eq!(c.in_flight(), before, "a rejected answer changes nothing");
    e
}

#[test]
fn the_handshake_fixes_the_interface() {
    let mut c = NetContract::new(net_limits());
    let t = Instant::now();
    assert_eq!(c.transmit(60, t), Err(ClientError::NotReady));
    assert_eq!(c.lend_receive(t), Err(ClientError::NotReady));
    // INFO before it was asked for.
    assert_eq!(
        c.check_info(&net_info_resp(), &info().encode()),
        Err(Violation::Unsolicited { id: 0 })
    );
    c.info_request();
    let bad = |m: [u8; 6], mtu: u16| NetInfo { mac: m, mtu }.encode();
    for (payload, want) in [
        (bad([0; 6], 1500), NetInfoProblem::Mac([0; 6])),
        (
            bad([1, 0, 0, 0, 0, 1], 1500),
            NetInfoProblem::Mac([1, 0, 0, 0, 0, 1]),
        ),
        (bad(MAC, 67), NetInfoProblem::Mtu(67)),
        (bad(MAC, 9001), NetInfoProblem::Mtu(9001)),
    ] {
        assert_eq!(
            c.check_info(&net_info_resp(), &payload),
            Err(Violation::BadNetInfo(want))
        );
    }
    assert_eq!(
        c.check_info(&net_info_resp(), &[0u8; 7]),
        Err(Violation::BadNetInfo(NetInfoProblem::Payload { got: 7 }))
    );
    assert_eq!(
        c.check_info(&resp(0, status::OK, class::NET, 16), &info().encode()),
        Err(Violation::WrongLength {
            id: 0,
            expected: 8,
            got: 16
        })
    );
    assert_eq!(
        c.check_info(&resp(0, status::IO_ERROR, class::NET, 0), &[]),
        Err(Violation::BadNetInfo(NetInfoProblem::Failed(
            status::IO_ERROR
        )))
    );
    assert!(matches!(
        c.check_info(&resp(0, status::OK, class::BLOCK, 8), &info().encode()),
        Err(Violation::WrongClass { .. })
    ));
    assert!(!c.is_ready(), "nothing rejected made it ready");
    assert_eq!(c.check_info(&net_info_resp(), &info().encode()), Ok(info()));
    assert!(c.is_ready());
    assert_eq!(c.info(), Some(info()));
    // A restarted driver must report the same interface.
    c.info_request();
    assert!(!c.is_ready());
    let other = NetInfo {
        mac: MAC,
        mtu: 9000,
    };
    assert_eq!(
        c.check_info(&net_info_resp(), &other.encode()),
        Err(Violation::NetInfoChanged {
            expected: info(),
            got: other
        })
    );
    assert_eq!(c.check_info(&net_info_resp(), &info().encode()), Ok(info()));
}

#[test]
fn frames_to_send_are_bounded_by_the_mtu() {
    let mut c = net_ready();
    let t = Instant::now();
    let max = 1500 + FRAME_OVERHEAD;
    for len in [0, 13, max + 1, u32::MAX] {
        assert_eq!(
            c.transmit(len, t),
            Err(ClientError::BadFrame { len, min: 14, max })
        );
    }
    let r = c.transmit(ETH_HEADER, t).unwrap();
    assert_eq!((r.op, r.class, r.len), (op::NET_TX, class::NET, 14));
    let r2 = c.transmit(max, t).unwrap();
    assert!(r2.id > r.id);
    // A send's answer carries nothing.
    assert_eq!(
        net_err(&mut c, &net_ok(r.id, 14), t),
        Violation::WrongLength {
            id: r.id,
            expected: 0,
            got: 14
        }
    );
    let done = c.check_response(&net_ok(r.id, 0), t).unwrap();
    assert_eq!(
        (done.op, done.status, done.frame),
        (op::NET_TX, status::OK, 0)
    );
    // A failed send (the driver dropped the frame) is an answer too.
    let done = c
        .check_response(&resp(r2.id, status::IO_ERROR, class::NET, 0), t)
        .unwrap();
    assert_eq!(done.status, status::IO_ERROR);
    // Answered once only.
    assert_eq!(
        net_err(&mut c, &net_ok(r.id, 0), t),
        Violation::Duplicate { id: r.id }
    );
}

#[test]
fn received_frames_fit_their_buffer_and_a_header() {
    let mut c = net_ready();
    let t = Instant::now();
    let rx = c.lend_receive(t).unwrap();
    assert_eq!((rx.op, rx.len), (op::NET_RX, 1500 + FRAME_OVERHEAD));
    assert_eq!(
        net_err(&mut c, &net_ok(rx.id, 13), t),
        Violation::ShortFrame {
            id: rx.id,
            min: 14,
            got: 13
        }
    );
    assert_eq!(
        net_err(&mut c, &net_ok(rx.id, rx.len + 1), t),
        Violation::TooLong {
            id: rx.id,
            max: rx.len,
            got: rx.len + 1
        }
    );
    // A failed receive carries nothing.
    assert!(matches!(
        net_err(&mut c, &resp(rx.id, status::IO_ERROR, class::NET, 60), t),
        Violation::WrongLength { .. }
    ));
    let done = c.check_response(&net_ok(rx.id, 60), t).unwrap();
    assert_eq!((done.op, done.frame), (op::NET_RX, 60));
    // A buffer completed already, or one the driver was not lent.
    assert_eq!(
        net_err(&mut c, &net_ok(rx.id, 60), t),
        Violation::Duplicate { id: rx.id }
    );
    let rx2 = c.lend_receive(t).unwrap();
    assert_eq!(
        net_err(&mut c, &net_ok(rx.id, 60), t),
        Violation::Duplicate { id: rx.id }
    );
    assert_eq!(
        net_err(&mut c, &net_ok(rx2.id + 5, 60), t),
        Violation::UnknownId { id: rx2.id + 5 }
    );
}

#[test]
fn receive_buffers_have_no_deadline_and_sends_do() {
    let mut c = net_ready();
    let t = Instant::now();
    let rx = c.lend_receive(t).unwrap();
    let late = t + ms(10_000);
    assert_eq!(c.expired(late), None, "a quiet network is not a fault");
    assert_eq!(c.next_deadline(), None);
    // And a frame may come in much later.
    assert!(c.check_response(&net_ok(rx.id, 64), late).is_ok());
    let tx = c.transmit(64, t).unwrap();
    assert_eq!(c.next_deadline(), Some(t + DEADLINE));
    assert_eq!(c.expired(t + DEADLINE + ms(1)), Some(tx.id));
    assert_eq!(
        net_err(&mut c, &net_ok(tx.id, 0), t + DEADLINE + ms(1)),
        Violation::Deadline
    );
}

#[test]
fn a_restart_drops_sends_and_lends_the_receive_buffers_again() {
    let mut c = net_ready();
    let t = Instant::now();
    let rx1 = c.lend_receive(t).unwrap();
    let tx1 = c.transmit(100, t).unwrap();
    let rx2 = c.lend_receive(t).unwrap();
    let tx2 = c.transmit(200, t).unwrap();
    // The driver is replaced: nothing is accepted until its handshake.
    c.info_request();
    assert_eq!(c.transmit(60, t), Err(ClientError::NotReady));
    assert_eq!(
        net_err(&mut c, &net_ok(rx1.id, 60), t),
        Violation::Unsolicited { id: rx1.id }
    );
    assert_eq!(c.check_info(&net_info_resp(), &info().encode()), Ok(info()));
    let later = t + ms(50);
    let r = c.restart(later);
    assert_eq!(r.dropped, vec![tx1.id, tx2.id]);
    assert_eq!(r.relent, vec![rx1, rx2], "same ids, same buffers' lengths");
    assert_eq!(c.in_flight_len(), 2);
    assert_eq!(c.next_deadline(), None, "lent again without a deadline");
    // A dropped send's answer (from the old driver, say) is a duplicate:
    // the frame is not counted twice.
    assert_eq!(
        net_err(&mut c, &net_ok(tx1.id, 0), later),
        Violation::Duplicate { id: tx1.id }
    );
    assert!(c.check_response(&net_ok(rx2.id, 60), later).is_ok());
    assert!(c.check_response(&net_ok(rx1.id, 60), later).is_ok());
    // Contract::reissue does the same, for the restart logic that only
    // wants what to send.
    let tx3 = c.transmit(60, later).unwrap();
    let rx3 = c.lend_receive(later).unwrap();
    c.info_request();
    c.check_info(&net_info_resp(), &info().encode()).unwrap();
    assert_eq!(c.reissue(later), vec![rx3]);
    assert_eq!(
        net_err(&mut c, &net_ok(tx3.id, 0), later),
        Violation::Duplicate { id: tx3.id }
    );
}

#[test]
fn lent_buffers_count_against_the_limit_and_leave_room_to_send() {
    let mut c = net_ready();
    let t = Instant::now();
    for _ in 0..7 {
        c.lend_receive(t).unwrap();
    }
    assert_eq!(
        c.lend_receive(t),
        Err(ClientError::Busy),
        "the last slot is for sends"
    );
    let tx = c.transmit(60, t).unwrap();
    assert_eq!(c.transmit(60, t), Err(ClientError::Busy));
    c.check_response(&net_ok(tx.id, 0), t).unwrap();
    assert!(c.transmit(60, t).is_ok());
    // An interface whose frames are larger than the service's buffers is
    // refused at the handshake.
    let mut small = NetContract::new(ContractLimits {
        max_io: 1024,
        ..net_limits()
    });
    small.info_request();
    assert_eq!(
        small.check_info(&net_info_resp(), &info().encode()),
        Err(Violation::BadNetInfo(NetInfoProblem::Mtu(1500)))
    );
    assert!(!small.is_ready());
}

#[test]
fn nothing_is_late_during_a_handshake() {
    let mut c = net_ready();
    let t = Instant::now();
    let tx = c.transmit(60, t).unwrap();
    c.info_request();
    let late = t + DEADLINE + ms(10);
    assert_eq!(c.expired(late), None, "the old driver's deadline");
    assert_eq!(c.next_deadline(), None);
    c.check_info(&net_info_resp(), &info().encode()).unwrap();
    // Accepting the handshake dropped the old send at once: a send made
    // before `restart` is the new driver's, and is not dropped.
    let tx2 = c.transmit(60, late).unwrap();
    let r = c.restart(late);
    assert_eq!(r.dropped, vec![tx.id]);
    assert!(c.in_flight().iter().any(|p| p.id == tx2.id));
    assert_eq!(
        c.restart(late).dropped,
        Vec::<u64>::new(),
        "handed over once"
    );
}
