//! Tests of the block contract once ready: client requests and their
//! refusals, the driver's answers and their violations, deadlines,
//! re-issue and giving up.

use super::*;

#[test]
fn block_requests_are_encoded_with_fresh_ids() {
    let t = Instant::now();
    let mut c = ready();
    let r = c.issue(op::READ, 1024, 2048, t).unwrap();
    assert_eq!(
        r,
        Request {
            op: op::READ,
            class: class::BLOCK,
            id: 1,
            offset: 1024,
            len: 2048,
            buf: 0
        }
    );
    let w = c.issue(op::WRITE, 0, 512, t).unwrap();
    assert_eq!((w.id, w.op, w.len), (2, op::WRITE, 512));
    let d = c.issue(op::DISCARD, 512, 4096, t).unwrap();
    assert_eq!((d.id, d.op), (3, op::DISCARD));
    let f = c.issue(op::FLUSH, 0, 0, t).unwrap();
    assert_eq!((f.id, f.offset, f.len), (4, 0, 0));
    let ids: Vec<u64> = c.in_flight().iter().map(|p| p.id).collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    let p = c.in_flight()[0];
    assert_eq!(
        p.request,
        BlockOp {
            op: op::READ,
            offset: 1024,
            len: 2048
        }
    );
    assert_eq!(p.issued, t);
    assert_eq!(p.deadline, Some(t + DEADLINE));
}

#[test]
fn block_client_errors() {
    let t = Instant::now();
    let mut c = ready();
    let cap = geo().capacity;
    let cases: &[(u8, u64, u32, ClientError)] = &[
        (op::INFO, 0, 0, ClientError::UnsupportedOp { op: op::INFO }),
        (
            op::CHAR_READ,
            0,
            512,
            ClientError::UnsupportedOp { op: op::CHAR_READ },
        ),
        (
            op::CALL,
            0,
            512,
            ClientError::UnsupportedOp { op: op::CALL },
        ),
        (200, 0, 512, ClientError::UnsupportedOp { op: 200 }),
        (op::READ, 0, 0, ClientError::ZeroLength),
        (op::WRITE, 512, 0, ClientError::ZeroLength),
        (op::DISCARD, 0, 0, ClientError::ZeroLength),
        (
            op::READ,
            0,
            8192,
            ClientError::TooLong {
                len: 8192,
                max: 4096,
            },
        ),
        (
            op::WRITE,
            0,
            u32::MAX,
            ClientError::TooLong {
                len: u32::MAX,
                max: 4096,
            },
        ),
        (
            op::DISCARD,
            0,
            4608,
            ClientError::TooLong {
                len: 4608,
                max: 4096,
            },
        ),
        (
            op::READ,
            1,
            512,
            ClientError::Misaligned {
                offset: 1,
                len: 512,
                block_size: 512,
            },
        ),
        (
            op::WRITE,
            0,
            100,
            ClientError::Misaligned {
                offset: 0,
                len: 100,
                block_size: 512,
            },
        ),
        (
            op::DISCARD,
            256,
            512,
            ClientError::Misaligned {
                offset: 256,
                len: 512,
                block_size: 512,
            },
        ),
        (
            op::READ,
            cap,
            512,
            ClientError::OutOfRange {
                offset: cap,
                len: 512,
                capacity: cap,
            },
        ),
        (
            op::WRITE,
            cap - 512,
            1024,
            ClientError::OutOfRange {
                offset: cap - 512,
                len: 1024,
                capacity: cap,
            },
        ),
        (
            op::READ,
            u64::MAX - 511,
            1024,
            ClientError::OutOfRange {
                offset: u64::MAX - 511,
                len: 1024,
                capacity: cap,
            },
        ),
        (
            op::FLUSH,
            512,
            0,
            ClientError::BadFlush {
                offset: 512,
                len: 0,
            },
        ),
        (
            op::FLUSH,
            0,
            512,
            ClientError::BadFlush {
                offset: 0,
                len: 512,
            },
        ),
    ];
    for &(o, off, len, e) in cases {
        assert_eq!(
            c.check_client(o, off, len),
            Err(e),
            "op {o} offset {off} len {len}"
        );
        assert_eq!(c.issue(o, off, len, t), Err(e));
        assert_eq!(c.in_flight_len(), 0, "a refused request is not in flight");
        assert!(!e.to_string().is_empty());
        assert!(!e.kind().is_empty());
    }
    // The last block is fine.
    assert_eq!(c.check_client(op::READ, cap - 512, 512), Ok(()));
}

#[test]
fn block_busy_and_not_ready() {
    let t = Instant::now();
    let mut c = ready();
    for i in 0..4 {
        c.issue(op::READ, i * 512, 512, t).unwrap();
    }
    assert_eq!(c.issue(op::READ, 0, 512, t), Err(ClientError::Busy));
    assert_eq!(c.in_flight_len(), 4);
    // Completing one frees a slot; the next id follows on.
    c.check_response(&block_ok(2, 512), t).unwrap();
    assert_eq!(c.issue(op::READ, 0, 512, t).map(|r| r.id), Ok(5));
    // A restart makes the service not ready until the handshake.
    c.info_request();
    assert_eq!(c.issue(op::FLUSH, 0, 0, t), Err(ClientError::NotReady));
}

#[test]
fn ids_exhausted() {
    let t = Instant::now();
    let mut c = ready();
    c.requests_mut().flight.next_id = u64::MAX - 1;
    assert_eq!(c.issue(op::FLUSH, 0, 0, t).map(|r| r.id), Ok(u64::MAX - 1));
    assert_eq!(c.issue(op::FLUSH, 0, 0, t), Err(ClientError::IdsExhausted));
    assert_eq!(c.in_flight_len(), 1);
    // Answers to ids never issued, at the top of the range.
    assert_eq!(
        block_err(&mut c, &block_ok(u64::MAX, 0), t),
        Violation::UnknownId { id: u64::MAX }
    );
    c.check_response(&block_ok(u64::MAX - 1, 0), t).unwrap();
    assert_eq!(
        c.check_response(&block_ok(u64::MAX - 1, 0), t),
        Err(Violation::Duplicate { id: u64::MAX - 1 })
    );
}

#[test]
fn block_completions() {
    let t = Instant::now();
    let mut c = ready();
    let r = c.issue(op::READ, 512, 1024, t).unwrap();
    let w = c.issue(op::WRITE, 0, 512, t).unwrap();
    let f = c.issue(op::FLUSH, 0, 0, t).unwrap();
    let d = c.issue(op::DISCARD, 0, 512, t).unwrap();
    // Any order.
    assert_eq!(
        c.check_response(&block_ok(w.id, 0), t + ms(1)),
        Ok(Completion {
            id: w.id,
            op: op::WRITE,
            offset: 0,
            len: 512,
            status: status::OK,
            payload: 0
        })
    );
    assert_eq!(
        c.check_response(&block_ok(r.id, 1024), t + ms(2)),
        Ok(Completion {
            id: r.id,
            op: op::READ,
            offset: 512,
            len: 1024,
            status: status::OK,
            payload: 1024
        })
    );
    let e = c
        .check_response(&resp(d.id, status::UNSUPPORTED, class::BLOCK, 0), t)
        .unwrap();
    assert_eq!(e.status, status::UNSUPPORTED);
    let e = c
        .check_response(&resp(f.id, status::IO_ERROR, class::BLOCK, 0), t)
        .unwrap();
    assert_eq!((e.op, e.status), (op::FLUSH, status::IO_ERROR));
    assert_eq!(c.in_flight_len(), 0);
    // At the deadline exactly is still in time.
    let r = c.issue(op::READ, 0, 512, t).unwrap();
    assert!(c.check_response(&block_ok(r.id, 512), t + DEADLINE).is_ok());
}

#[test]
fn block_violations() {
    let t = Instant::now();
    let mut c = ready();
    // Nothing in flight at all.
    assert_eq!(
        block_err(&mut c, &block_ok(1, 0), t),
        Violation::Unsolicited { id: 1 }
    );
    assert_eq!(
        block_err(&mut c, &block_ok(0, 0), t),
        Violation::Unsolicited { id: 0 }
    );

    let r = c.issue(op::READ, 0, 1024, t).unwrap();
    let w = c.issue(op::WRITE, 0, 512, t).unwrap();
    // Id 0 is the handshake's only.
    assert_eq!(
        block_err(&mut c, &block_ok(0, 0), t),
        Violation::Unsolicited { id: 0 }
    );
    // Never issued.
    assert_eq!(
        block_err(&mut c, &block_ok(99, 0), t),
        Violation::UnknownId { id: 99 }
    );
    assert_eq!(
        block_err(&mut c, &block_ok(u64::MAX, 0), t),
        Violation::UnknownId { id: u64::MAX }
    );
    // Wrong class.
    assert_eq!(
        block_err(&mut c, &resp(w.id, status::OK, class::GENERIC, 0), t),
        Violation::WrongClass {
            id: w.id,
            expected: class::BLOCK,
            got: class::GENERIC
        }
    );
    assert_eq!(
        block_err(&mut c, &resp(w.id, status::OK, 0, 0), t),
        Violation::WrongClass {
            id: w.id,
            expected: class::BLOCK,
            got: 0
        }
    );
    // Status out of range.
    assert_eq!(
        block_err(&mut c, &resp(w.id, status::MAX + 1, class::BLOCK, 0), t),
        Violation::BadStatus {
            id: w.id,
            status: status::MAX + 1
        }
    );
    // Lengths: a read returns exactly its length...
    for got in [0, 512, 1023, 1025, MAX_PAYLOAD] {
        assert_eq!(
            block_err(&mut c, &block_ok(r.id, got), t),
            Violation::WrongLength {
                id: r.id,
                expected: 1024,
                got
            }
        );
    }
    // ... a failed read nothing ...
    assert_eq!(
        block_err(&mut c, &resp(r.id, status::IO_ERROR, class::BLOCK, 1024), t),
        Violation::WrongLength {
            id: r.id,
            expected: 0,
            got: 1024
        }
    );
    // ... and a write nothing.
    assert_eq!(
        block_err(&mut c, &block_ok(w.id, 512), t),
        Violation::WrongLength {
            id: w.id,
            expected: 0,
            got: 512
        }
    );
    // Late.
    assert_eq!(
        block_err(&mut c, &block_ok(w.id, 0), t + DEADLINE + ms(1)),
        Violation::Deadline
    );
    // Duplicate, also once nothing is in flight any more.
    c.check_response(&block_ok(w.id, 0), t).unwrap();
    assert_eq!(
        block_err(&mut c, &block_ok(w.id, 0), t),
        Violation::Duplicate { id: w.id }
    );
    c.check_response(&block_ok(r.id, 1024), t).unwrap();
    assert_eq!(
        block_err(&mut c, &block_ok(r.id, 1024), t),
        Violation::Duplicate { id: r.id }
    );
    assert_eq!(
        block_err(&mut c, &block_ok(w.id, 0), t),
        Violation::Duplicate { id: w.id }
    );
}

#[test]
fn expired_returns_the_earliest_late_request() {
    let t = Instant::now();
    let mut c = ready();
    let a = c.issue(op::READ, 0, 512, t).unwrap();
    let b = c.issue(op::READ, 0, 512, t + ms(10)).unwrap();
    let d = c.issue(op::READ, 0, 512, t + ms(20)).unwrap();
    assert_eq!(c.next_deadline(), Some(t + DEADLINE));
    assert_eq!(c.expired(t + DEADLINE), None);
    assert_eq!(c.expired(t + DEADLINE + ms(15)), Some(a.id));
    c.check_response(&block_ok(a.id, 512), t + ms(50)).unwrap();
    assert_eq!(c.next_deadline(), Some(t + ms(10) + DEADLINE));
    assert_eq!(c.expired(t + DEADLINE + ms(15)), Some(b.id));
    c.check_response(&block_ok(b.id, 512), t + ms(50)).unwrap();
    assert_eq!(c.expired(t + DEADLINE + ms(15)), None);
    assert_eq!(c.expired(t + DEADLINE + ms(21)), Some(d.id));
    // Deadline violations name the request.
    assert_eq!(Violation::Deadline.kind(), "deadline");
}

#[test]
fn unrepresentable_deadline_never_expires() {
    let t = Instant::now();
    let mut c = BlockContract::new(ContractLimits {
        deadline: Duration::MAX,
        ..limits()
    });
    c.info_request();
    assert_eq!(c.next_deadline(), None);
    c.check_info(&info_resp(), &geo().encode()).unwrap();
    let r = c.issue(op::READ, 0, 512, t).unwrap();
    assert_eq!(c.in_flight()[0].deadline, None);
    assert_eq!(c.expired(t + Duration::from_secs(1 << 30)), None);
    assert!(c
        .check_response(&block_ok(r.id, 512), t + Duration::from_secs(1 << 30))
        .is_ok());
}

#[test]
fn reissue_keeps_ids_and_order() {
    let t = Instant::now();
    let mut c = ready();
    let reqs: Vec<Request> = [
        (op::READ, 0, 512),
        (op::WRITE, 512, 1024),
        (op::FLUSH, 0, 0),
        (op::DISCARD, 0, 4096),
    ]
    .iter()
    .map(|&(o, off, len)| c.issue(o, off, len, t).unwrap())
    .collect();
    c.check_response(&block_ok(reqs[1].id, 0), t).unwrap();
    // The driver crashes; a new one is started.
    let t1 = t + ms(500);
    c.info_request();
    c.check_info(&info_resp(), &geo().encode()).unwrap();
    let again = c.reissue(t1);
    assert_eq!(again, vec![reqs[0], reqs[2], reqs[3]]);
    for p in c.in_flight() {
        assert_eq!(p.deadline, Some(t1 + DEADLINE));
        assert_eq!(p.issued, t);
    }
    // The new driver answers in its own order.
    c.check_response(&block_ok(reqs[3].id, 0), t1).unwrap();
    c.check_response(&block_ok(reqs[0].id, 512), t1).unwrap();
    c.check_response(&block_ok(reqs[2].id, 0), t1).unwrap();
    // Ids are never reused.
    assert_eq!(c.issue(op::FLUSH, 0, 0, t1).map(|r| r.id), Ok(5));
    assert_eq!(c.reissue(t1).len(), 1);
}

#[test]
fn fail_all_empties_and_later_answers_are_duplicates() {
    let t = Instant::now();
    let mut c = ready();
    for _ in 0..3 {
        c.issue(op::FLUSH, 0, 0, t).unwrap();
    }
    assert_eq!(c.fail_all(), vec![1, 2, 3]);
    assert_eq!(c.in_flight_len(), 0);
    assert_eq!(c.expired(t + ms(10_000)), None);
    assert_eq!(c.fail_all(), Vec::<u64>::new());
    assert_eq!(
        block_err(&mut c, &block_ok(2, 0), t),
        Violation::Duplicate { id: 2 }
    );
    assert_eq!(c.issue(op::FLUSH, 0, 0, t).map(|r| r.id), Ok(4));
}
