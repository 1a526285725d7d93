//! Tests of the block contract's INFO handshake: its answer's checks,
//! restarts that must keep the geometry, and what is suspended meanwhile.

use super::*;

#[test]
fn handshake_makes_the_contract_ready() {
    let t = Instant::now();
    let mut c = BlockContract::new(limits());
    assert_eq!(c.phase(), BlockPhase::Idle);
    assert_eq!(c.geometry(), None);
    assert_eq!(c.check_client(op::READ, 0, 512), Err(ClientError::NotReady));
    let r = c.info_request();
    assert_eq!(
        r,
        Request {
            op: op::INFO,
            class: class::BLOCK,
            id: 0,
            offset: 0,
            len: 0,
            buf: 0
        }
    );
    assert_eq!(c.phase(), BlockPhase::Handshake);
    assert_eq!(c.issue(op::READ, 0, 512, t), Err(ClientError::NotReady));
    assert_eq!(c.check_info(&info_resp(), &geo().encode()), Ok(geo()));
    assert_eq!(c.phase(), BlockPhase::Ready);
    assert!(c.is_ready());
    assert_eq!(c.geometry(), Some(geo()));
    assert!(c.issue(op::READ, 0, 512, t).is_ok());
}

#[test]
fn info_answer_outside_the_handshake_is_unsolicited() {
    let mut c = BlockContract::new(limits());
    assert_eq!(
        info_err(&mut c, &info_resp(), &geo().encode()),
        Violation::Unsolicited { id: 0 }
    );
    let mut c = ready();
    assert_eq!(
        info_err(&mut c, &info_resp(), &geo().encode()),
        Violation::Unsolicited { id: 0 }
    );
}

#[test]
fn info_answer_violations() {
    let mut c = BlockContract::new(limits());
    c.info_request();
    let p = geo().encode();

    let mut r = info_resp();
    r.id = 3;
    assert_eq!(info_err(&mut c, &r, &p), Violation::Unsolicited { id: 3 });

    let mut r = info_resp();
    r.class = class::CHAR;
    assert_eq!(
        info_err(&mut c, &r, &p),
        Violation::WrongClass {
            id: 0,
            expected: class::BLOCK,
            got: class::CHAR
        }
    );

    let mut r = info_resp();
    r.status = 200;
    assert_eq!(
        info_err(&mut c, &r, &p),
        Violation::BadStatus { id: 0, status: 200 }
    );

    let mut r = info_resp();
    r.status = status::IO_ERROR;
    r.len = 0;
    assert_eq!(
        info_err(&mut c, &r, &[]),
        Violation::BadInfo(InfoProblem::Failed(status::IO_ERROR))
    );

    for len in [0, 8, 15, 17, 4096] {
        let mut r = info_resp();
        r.len = len;
        assert_eq!(
            info_err(&mut c, &r, &p),
            Violation::WrongLength {
                id: 0,
                expected: 16,
                got: len
            }
        );
    }

    assert_eq!(
        info_err(&mut c, &info_resp(), &p[..10]),
        Violation::BadInfo(InfoProblem::Payload { got: 10 })
    );
    assert_eq!(
        info_err(&mut c, &info_resp(), &[0; 20]),
        Violation::BadInfo(InfoProblem::Payload { got: 20 })
    );

    let bad_bs = Geometry {
        capacity: 1 << 20,
        block_size: 1000,
    }
    .encode();
    assert_eq!(
        info_err(&mut c, &info_resp(), &bad_bs),
        Violation::BadInfo(InfoProblem::BlockSize(1000))
    );
    let zero_cap = Geometry {
        capacity: 0,
        block_size: 512,
    }
    .encode();
    assert_eq!(
        info_err(&mut c, &info_resp(), &zero_cap),
        Violation::BadInfo(InfoProblem::Capacity {
            capacity: 0,
            block_size: 512
        })
    );
    let huge = Geometry {
        capacity: MAX_CAPACITY * 2,
        block_size: 512,
    }
    .encode();
    assert!(matches!(
        info_err(&mut c, &info_resp(), &huge),
        Violation::BadInfo(InfoProblem::Capacity { .. })
    ));
    let ragged = Geometry {
        capacity: 4096 + 100,
        block_size: 4096,
    }
    .encode();
    assert!(matches!(
        info_err(&mut c, &info_resp(), &ragged),
        Violation::BadInfo(InfoProblem::Capacity { .. })
    ));

    // Still in the handshake: a correct answer is accepted after all that.
    assert_eq!(c.check_info(&info_resp(), &p), Ok(geo()));
}

#[test]
fn restart_must_keep_the_geometry() {
    let mut c = ready();
    c.info_request();
    assert_eq!(c.phase(), BlockPhase::Handshake);
    let other = Geometry {
        capacity: 128 * 512,
        block_size: 512,
    };
    assert_eq!(
        info_err(&mut c, &info_resp(), &other.encode()),
        Violation::GeometryChanged {
            expected: geo(),
            got: other
        }
    );
    assert_eq!(c.check_client(op::READ, 0, 512), Err(ClientError::NotReady));
    // Another restart with the same geometry is accepted.
    c.info_request();
    assert_eq!(c.check_info(&info_resp(), &geo().encode()), Ok(geo()));
    assert!(c.is_ready());
}

#[test]
fn expected_geometry_from_an_earlier_contract() {
    let mut c = BlockContract::new(limits());
    c.expect_geometry(geo());
    assert_eq!(c.geometry(), Some(geo()));
    c.info_request();
    let other = Geometry {
        capacity: 64 * 4096,
        block_size: 4096,
    };
    assert_eq!(
        info_err(&mut c, &info_resp(), &other.encode()),
        Violation::GeometryChanged {
            expected: geo(),
            got: other
        }
    );
    assert_eq!(c.check_info(&info_resp(), &geo().encode()), Ok(geo()));
}

#[test]
fn deadlines_are_suspended_during_a_handshake() {
    let t = Instant::now();
    let mut c = BlockContract::new(limits());
    assert_eq!(c.expired(t + ms(1000)), None);
    assert_eq!(c.next_deadline(), None);
    c.info_request();
    c.check_info(&info_resp(), &geo().encode()).unwrap();
    assert_eq!(c.next_deadline(), None);
    let r = c.issue(op::READ, 0, 512, t).unwrap();
    assert_eq!(c.next_deadline(), Some(t + DEADLINE));
    // The driver dies; a new one is being started.
    let t1 = t + ms(150);
    c.info_request();
    assert_eq!(
        c.expired(t1),
        None,
        "the old driver's deadline is not the new one's"
    );
    assert_eq!(c.next_deadline(), None);
    c.check_info(&info_resp(), &geo().encode()).unwrap();
    let again = c.reissue(t1 + ms(10));
    assert_eq!(again, vec![r]);
    assert_eq!(c.next_deadline(), Some(t1 + ms(10) + DEADLINE));
    assert_eq!(c.expired(t1 + ms(10) + DEADLINE), None);
    assert_eq!(c.expired(t1 + ms(11) + DEADLINE), Some(r.id));
}

#[test]
fn answers_during_the_handshake_are_unsolicited() {
    let t = Instant::now();
    let mut c = ready();
    let r = c.issue(op::FLUSH, 0, 0, t).unwrap();
    c.info_request();
    assert_eq!(
        block_err(&mut c, &block_ok(r.id, 0), t),
        Violation::Unsolicited { id: r.id }
    );
    let mut idle = BlockContract::new(limits());
    assert_eq!(
        idle.check_response(&block_ok(1, 0), t),
        Err(Violation::Unsolicited { id: 1 })
    );
}
