//! Tests of the in-flight bookkeeping on its own.

use super::*;

#[test]
fn in_flight_bookkeeping() {
    let t = Instant::now();
    let mut f: InFlight<u8> = InFlight::new(0, DEADLINE);
    assert_eq!(f.max_in_flight(), 1);
    assert!(f.is_empty());
    assert_eq!(f.lookup(1), Err(Violation::Unsolicited { id: 1 }));
    assert_eq!(f.issue(7, t), Ok(1));
    assert!(f.is_full());
    assert_eq!(f.issue(8, t), Err(ClientError::Busy));
    assert_eq!(f.lookup(1).map(|p| p.request), Ok(7));
    assert_eq!(f.lookup(2), Err(Violation::UnknownId { id: 2 }));
    assert_eq!(f.lookup(0), Err(Violation::Unsolicited { id: 0 }));
    assert_eq!(f.complete(1).map(|p| p.id), Some(1));
    assert_eq!(f.complete(1), None);
    assert_eq!(f.lookup(1), Err(Violation::Duplicate { id: 1 }));
    assert_eq!(f.lookup(2), Err(Violation::Unsolicited { id: 2 }));
    assert_eq!(f.next_id(), 2);
    assert_eq!(f.len(), 0);
}
