//! Tests of the char contract: client and driver sides, re-issue and
//! giving up.

use super::*;

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
            buf: 0
        }
    );
    let r = c.issue(op::CHAR_READ, 4096, t).unwrap();
    assert_eq!((r.id, r.len, r.op), (2, 4096, op::CHAR_READ));
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
        char_err(&mut c, &char_ok(w.id, 0), t + DEADLINE + ms(1)),
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
    // Reads return one byte up to their length; nothing is no answer (a
    // driver answering every read at once with nothing would keep the
    // mediator busy).
    assert_eq!(
        c.check_response(&char_ok(r.id, 37), t).map(|x| x.payload),
        Ok(37)
    );
    let r0 = c.issue(op::CHAR_READ, 100, t).unwrap();
    assert_eq!(
        char_err(&mut c, &char_ok(r0.id, 0), t),
        Violation::WrongLength {
            id: r0.id,
            expected: 1,
            got: 0
        }
    );
    for got in [1, 100] {
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
    c.check_response(&char_ok(b.id, 1), t).unwrap();
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

#[test]
fn char_reads_have_no_deadline() {
    let t = Instant::now();
    let mut c = CharContract::new(limits());
    let r = c.issue(op::CHAR_READ, 10, t).unwrap();
    assert_eq!(c.next_deadline(), None, "a lent read is not awaited");
    let late = t + DEADLINE * 1000;
    assert_eq!(c.expired(late), None);
    let w = c.issue(op::CHAR_WRITE, 1, t).unwrap();
    assert_eq!(c.next_deadline(), Some(t + DEADLINE));
    assert_eq!(c.expired(late), Some(w.id));
    // A read answered long after it was lent is no fault.
    assert_eq!(
        c.check_response(&char_ok(r.id, 3), late).map(|x| x.payload),
        Ok(3)
    );
    // Re-issued, a read stays untimed and a write gets a new deadline.
    let r2 = c.issue(op::CHAR_READ, 10, t).unwrap();
    assert_eq!(c.reissue(late), vec![w, r2]);
    assert_eq!(c.next_deadline(), Some(late + DEADLINE));
}

#[test]
fn char_handshake() {
    let t = Instant::now();
    let mut c = CharContract::with_handshake(limits());
    assert!(!c.is_ready());
    assert_eq!(
        c.issue(op::CHAR_WRITE, 1, t),
        Err(ClientError::NotReady),
        "nothing is issued before a driver is up"
    );
    // An INFO answer nobody asked for.
    assert_eq!(
        c.check_info(&char_ok(0, 0)),
        Err(Violation::Unsolicited { id: 0 })
    );
    let info = c.info_request();
    assert_eq!((info.op, info.class, info.id), (op::INFO, class::CHAR, 0));
    // Wrong answers: another id, another class, a failure, bytes.
    assert_eq!(
        c.check_info(&char_ok(3, 0)),
        Err(Violation::Unsolicited { id: 3 })
    );
    assert!(matches!(
        c.check_info(&resp(0, status::OK, class::BLOCK, 0)),
        Err(Violation::WrongClass { .. })
    ));
    assert_eq!(
        c.check_info(&resp(0, status::IO_ERROR, class::CHAR, 0)),
        Err(Violation::BadInfo(InfoProblem::Failed(status::IO_ERROR)))
    );
    assert_eq!(
        c.check_info(&char_ok(0, 4)),
        Err(Violation::WrongLength {
            id: 0,
            expected: 0,
            got: 4
        })
    );
    assert!(!c.is_ready(), "a rejected answer changes nothing");
    c.check_info(&char_ok(0, 0)).unwrap();
    assert!(c.is_ready());
    let w = c.issue(op::CHAR_WRITE, 5, t).unwrap();
    let r = c.issue(op::CHAR_READ, 5, t).unwrap();
    // A restart: during the new handshake nothing is answered or late.
    c.info_request();
    assert_eq!(
        char_err(&mut c, &char_ok(w.id, 0), t),
        Violation::Unsolicited { id: w.id }
    );
    assert_eq!(c.expired(t + DEADLINE * 10), None);
    assert_eq!(c.next_deadline(), None);
    assert_eq!(c.issue(op::CHAR_WRITE, 1, t), Err(ClientError::NotReady));
    c.check_info(&char_ok(0, 0)).unwrap();
    // Then what was in flight goes again, same ids, in issue order.
    assert_eq!(c.reissue(t + ms(5)), vec![w, r]);
    assert_eq!(
        c.check_response(&char_ok(r.id, 5), t + ms(6))
            .map(|x| x.payload),
        Ok(5)
    );
    // A second INFO answer is unsolicited.
    assert_eq!(
        c.check_info(&char_ok(0, 0)),
        Err(Violation::Unsolicited { id: 0 })
    );
}
