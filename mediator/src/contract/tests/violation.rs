//! Tests of violation kinds, their messages and counters, and of client
//! error kinds.

use super::*;

fn one_of_each() -> Vec<Violation> {
    vec![
        Violation::BadHeader(DecodeError::Reserved),
        Violation::BadIndex { ahead: 9, depth: 8 },
        Violation::OutsidePool {
            id: 9,
            buf: 70,
            buffers: 64,
        },
        Violation::WrongBuffer {
            id: 9,
            buf: 3,
            expected: 4,
        },
        Violation::UnknownId { id: 9 },
        Violation::Duplicate { id: 9 },
        Violation::WrongClass {
            id: 9,
            expected: 1,
            got: 2,
        },
        Violation::BadStatus { id: 9, status: 77 },
        Violation::WrongLength {
            id: 9,
            expected: 512,
            got: 3,
        },
        Violation::TooLong {
            id: 9,
            max: 8,
            got: 9,
        },
        Violation::Unsolicited { id: 9 },
        Violation::Deadline,
        Violation::BadInfo(InfoProblem::BlockSize(3)),
        Violation::GeometryChanged {
            expected: geo(),
            got: Geometry {
                capacity: 512,
                block_size: 512,
            },
        },
        Violation::BadNetInfo(NetInfoProblem::Mtu(9)),
        Violation::NetInfoChanged {
            expected: NetInfo {
                mac: [2, 0, 0, 0, 0, 1],
                mtu: 1500,
            },
            got: NetInfo {
                mac: [2, 0, 0, 0, 0, 2],
                mtu: 1500,
            },
        },
        Violation::ShortFrame {
            id: 9,
            min: 14,
            got: 3,
        },
    ]
}

#[test]
fn violation_kinds_and_messages() {
    let all = one_of_each();
    let kinds: Vec<&str> = all.iter().map(Violation::kind).collect();
    assert_eq!(kinds, Violation::KINDS);
    let unique: HashSet<&str> = kinds.iter().copied().collect();
    assert_eq!(unique.len(), kinds.len());
    for v in &all {
        let s = v.to_string();
        assert!(s.starts_with("the "), "{s}");
    }
    assert!(all[1].to_string().contains("9 slots past"));
    assert!(all[2]
        .to_string()
        .contains("buffer 70, outside the pool of 64"));
    assert!(all[3].to_string().contains("request owns buffer 4"));
    assert!(all[4].to_string().contains("request 9"));
    assert!(all[8].to_string().contains("512"));
    assert!(all[13].to_string().contains("32768 bytes"));
    assert!(all[14].to_string().contains("MTU 9 is not"));
    assert!(all[15]
        .to_string()
        .contains("MAC 02:00:00:00:00:02, MTU 1500, but the interface had MAC 02:00:00:00:00:01"));
    assert!(all[16].to_string().contains("frame of 3 bytes"));
    assert_eq!(
        Violation::from(DecodeError::Reserved).to_string(),
        "the driver sent a malformed answer descriptor: reserved descriptor bytes are not zero"
    );
    assert!(Violation::BadHeader(DecodeError::TooLong(5 << 20))
        .to_string()
        .contains("5242880"));
    for p in [
        InfoProblem::Failed(1),
        InfoProblem::Payload { got: 3 },
        InfoProblem::BlockSize(3),
        InfoProblem::Capacity {
            capacity: 1,
            block_size: 512,
        },
    ] {
        assert!(Violation::BadInfo(p).to_string().contains("INFO"));
    }
}

#[test]
fn counters() {
    let mut n = ViolationCounters::new();
    assert_eq!(n.total(), 0);
    for (i, v) in one_of_each().iter().enumerate() {
        for _ in 0..=i {
            n.record(v);
        }
    }
    let counted: Vec<(&str, u64)> = n.iter().collect();
    assert_eq!(counted.len(), Violation::KINDS.len());
    for (i, (k, c)) in counted.iter().enumerate() {
        assert_eq!(*k, Violation::KINDS[i]);
        assert_eq!(*c, i as u64 + 1);
        assert_eq!(n.get(k), *c);
    }
    assert_eq!(n.get("no_such_kind"), 0);
    assert_eq!(n.total(), (1..=Violation::KINDS.len() as u64).sum::<u64>());
    n.counts[0] = u64::MAX;
    n.record(&Violation::BadHeader(DecodeError::Reserved));
    assert_eq!(n.get("bad_header"), u64::MAX);
    assert_eq!(n.total(), u64::MAX);
}

#[test]
fn client_error_kinds_are_distinct() {
    let all = [
        ClientError::NotReady,
        ClientError::UnsupportedOp { op: 1 },
        ClientError::ZeroLength,
        ClientError::TooLong { len: 1, max: 0 },
        ClientError::Misaligned {
            offset: 1,
            len: 1,
            block_size: 512,
        },
        ClientError::OutOfRange {
            offset: 1,
            len: 1,
            capacity: 1,
        },
        ClientError::BadFlush { offset: 1, len: 1 },
        ClientError::Busy,
        ClientError::IdsExhausted,
        ClientError::BadFrame {
            len: 1,
            min: 14,
            max: 1518,
        },
    ];
    let kinds: HashSet<&str> = all.iter().map(ClientError::kind).collect();
    assert_eq!(kinds.len(), all.len());
    for e in all {
        assert!(!e.to_string().is_empty());
    }
}
