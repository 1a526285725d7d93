//! Tests of the generic contract, and of the [`Contract`] trait over every
//! class.

use super::*;

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
            buf: 0
        }
    );
    let big = c.issue(4096, t).unwrap();
    assert_eq!((big.id, big.len, big.op), (2, 4096, op::CALL));
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
