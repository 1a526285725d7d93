//! The rings on ordinary memory: layout checks, a round trip over many
//! laps, the idle protocol, a driver thread at full depth, and a peer that
//! scribbles on every byte while the mediator reads.

use super::*;
use crate::{class, op, status};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::vec;
use std::vec::Vec;

/// Page-aligned memory standing in for a mapped section.
struct Mem {
    ptr: core::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: plain heap memory; the tests share it between threads only
// through `Section`, whose accesses are atomic or copies.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    fn new(len: usize) -> Arc<Mem> {
        let layout = std::alloc::Layout::from_size_align(len, PAGE).unwrap();
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        Arc::new(Mem {
            ptr: core::ptr::NonNull::new(p).unwrap(),
            layout,
        })
    }

    fn section(&self) -> Section {
        // SAFETY: the allocation is page-aligned, `len` bytes long, and
        // lives as long as the `Arc<Mem>` every test keeps beside its
        // sections.
        unsafe { Section::new(self.ptr, self.layout.size()) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn pair(depth: u32) -> (Arc<Mem>, Submitter, Server) {
    let l = Layout::new(depth, 4096, 1000).unwrap();
    let m = Mem::new(l.size());
    let sub = Submitter::create(m.section(), l).unwrap();
    let srv = Server::attach(m.section()).unwrap();
    (m, sub, srv)
}

fn read(id: u64, buf: u32) -> Request {
    Request {
        op: op::READ,
        class: class::BLOCK,
        buf,
        id,
        offset: id * 512,
        len: 512,
    }
}

#[test]
fn layouts_are_checked() {
    assert_eq!(Layout::new(3, 4096, 0), Err(LayoutError::BadDepth(3)));
    assert_eq!(Layout::new(0, 4096, 0), Err(LayoutError::BadDepth(0)));
    assert_eq!(Layout::new(2048, 4096, 0), Err(LayoutError::BadDepth(2048)));
    assert_eq!(Layout::new(8, 100, 0), Err(LayoutError::BadBufSize(100)));
    assert_eq!(Layout::new(8, 0, 0), Err(LayoutError::BadBufSize(0)));
    assert_eq!(
        Layout::new(8, 2 << 20, 0),
        Err(LayoutError::BadBufSize(2 << 20))
    );
    assert_eq!(
        Layout::new(8, 4096, MAX_SPIN_NS + 1),
        Err(LayoutError::BadSpin(MAX_SPIN_NS + 1))
    );
    let l = Layout::new(128, 64 << 10, 0).unwrap();
    assert_eq!(l.pool() % PAGE, 0);
    assert_eq!(l.size(), l.pool() + 128 * (64 << 10));
    // A section too small for the layout, at creation and at attach.
    let m = Mem::new(l.size() - PAGE);
    assert!(matches!(
        Submitter::create(m.section(), l),
        Err(LayoutError::TooSmall { .. })
    ));
    // A header that lies about the depth, the magic, the version.
    let (m, _sub, _) = pair(8);
    let s = m.section();
    s.store(H_DEPTH, 1 << 20, Ordering::Relaxed);
    assert_eq!(
        Server::attach(m.section()).unwrap_err(),
        LayoutError::BadDepth(1 << 20)
    );
    s.store(H_DEPTH, 1024, Ordering::Relaxed);
    assert!(matches!(
        Server::attach(m.section()),
        Err(LayoutError::TooSmall { .. })
    ));
    s.store(H_VERSION, 9, Ordering::Relaxed);
    assert_eq!(
        Server::attach(m.section()).unwrap_err(),
        LayoutError::BadVersion(9)
    );
    s.store64(H_MAGIC, 1);
    assert_eq!(
        Server::attach(m.section()).unwrap_err(),
        LayoutError::BadMagic(1)
    );
}

#[test]
fn requests_and_answers_round_trip_over_many_laps() {
    let (_m, mut sub, mut srv) = pair(4);
    let mut id = 1;
    for _lap in 0..10 {
        for b in 0..4 {
            sub.push(&read(id + b as u64, b));
        }
        assert!(!sub.publish(), "the driver is not idle");
        assert_eq!(srv.pending(), Ok(4));
        for b in 0..4u32 {
            let r = srv.next_request().unwrap().unwrap().unwrap();
            assert_eq!(r, read(id + b as u64, b));
            srv.buf_mut(r.buf, r.len).unwrap().fill(r.id as u8);
            srv.complete(&Response {
                status: status::OK,
                class: class::BLOCK,
                buf: r.buf,
                id: r.id,
                len: r.len,
            });
        }
        assert!(srv.next_request().unwrap().is_none());
        assert!(!srv.publish());
        let mut got = Vec::new();
        assert_eq!(
            sub.take(u32::MAX, |a| {
                got.push(a.unwrap());
                true
            }),
            Ok(4)
        );
        for (b, a) in got.iter().enumerate() {
            assert_eq!((a.id, a.buf, a.len), (id + b as u64, b as u32, 512));
            let mut out = [0u8; 512];
            sub.read_buf(a.buf, &mut out);
            assert!(out.iter().all(|&x| x == a.id as u8));
        }
        id += 4;
    }
}

#[test]
fn an_index_past_the_ring_is_refused_on_both_ends() {
    let (m, mut sub, mut srv) = pair(8);
    srv.set_answer_index(9);
    srv.publish();
    assert_eq!(sub.ready(), Err(RingError::BadIndex { ahead: 9, depth: 8 }));
    assert!(sub.take(1, |_| true).is_err());
    // Behind the consumer is as bad as far ahead.
    srv.set_answer_index(u32::MAX);
    srv.publish();
    assert!(sub.ready().is_err());
    // The driver refuses a submission index that lies.
    m.section().store(M_SQ_TAIL, 100, Ordering::Relaxed);
    assert_eq!(
        srv.next_request(),
        Err(RingError::BadIndex {
            ahead: 100,
            depth: 8
        })
    );
}

#[test]
fn only_a_sleeping_peer_is_rung() {
    let (_m, mut sub, mut srv) = pair(8);
    // The driver goes to sleep on an empty ring: the next publication
    // says to ring it.
    assert!(srv.prepare_sleep());
    sub.push(&read(1, 0));
    assert!(sub.publish());
    // Work waiting: the driver may not sleep.
    assert!(!srv.prepare_sleep());
    srv.awake();
    let r = srv.next_request().unwrap().unwrap().unwrap();
    // The mediator polls: answering it rings nothing.
    srv.complete(&Response {
        status: status::OK,
        class: class::BLOCK,
        buf: r.buf,
        id: r.id,
        len: 0,
    });
    assert!(!srv.publish());
    // The mediator may not sleep with an answer waiting ...
    assert!(!sub.prepare_sleep());
    assert_eq!(sub.take(8, |_| true), Ok(1));
    // ... and may on an empty ring, after which the driver rings.
    assert!(sub.prepare_sleep());
    srv.complete(&Response {
        status: status::OK,
        class: class::BLOCK,
        buf: 0,
        id: 2,
        len: 0,
    });
    assert!(srv.publish());
    sub.awake();
    assert!(!srv.publish());
}

#[test]
fn a_driver_thread_answers_everything_once_at_full_depth() {
    const N: u64 = 200_000;
    let depth = 64;
    // `_m` outlives both ends (the thread is joined before it drops).
    let (_m, mut sub, mut srv) = pair(depth);
    let t = std::thread::spawn(move || {
        let mut served = 0u64;
        while served < N {
            match srv.next_request().unwrap() {
                Some(r) => {
                    let r = r.unwrap();
                    let id = r.id.to_le_bytes();
                    srv.buf_mut(r.buf, 8).unwrap().copy_from_slice(&id);
                    srv.complete(&Response {
                        status: status::OK,
                        class: class::BLOCK,
                        buf: r.buf,
                        id: r.id,
                        len: 8,
                    });
                    served += 1;
                    if srv.pending() == Ok(0) {
                        srv.publish();
                    }
                }
                None => core::hint::spin_loop(),
            }
        }
        srv.publish();
    });
    let mut free: Vec<u32> = (0..depth).collect();
    let mut seen = vec![false; N as usize + 1];
    let (mut next, mut done) = (1u64, 0u64);
    while done < N {
        while next <= N && !free.is_empty() {
            sub.push(&read(next, free.pop().unwrap()));
            next += 1;
        }
        sub.publish();
        let mut answers = Vec::new();
        sub.take(u32::MAX, |a| {
            answers.push(a.unwrap());
            true
        })
        .unwrap();
        for a in answers {
            let mut b = [0u8; 8];
            sub.read_buf(a.buf, &mut b);
            assert_eq!(u64::from_le_bytes(b), a.id);
            assert!(!seen[a.id as usize], "answered twice: {}", a.id);
            seen[a.id as usize] = true;
            free.push(a.buf);
            done += 1;
        }
    }
    t.join().unwrap();
    assert!(seen[1..].iter().all(|&s| s));
}

#[test]
fn a_peer_scribbling_everywhere_never_makes_the_mediator_misstep() {
    let (m, mut sub, _srv) = pair(16);
    let stop = Arc::new(AtomicBool::new(false));
    let (m2, stop2) = (m.clone(), stop.clone());
    let t = std::thread::spawn(move || {
        let s = m2.section();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let words = s.len() / 8;
        while !stop2.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly the driver's indices (often a tail that looks
            // plausible) and the completion ring, where it hurts;
            // sometimes anywhere.
            if x.is_multiple_of(8) {
                let head = s.load(M_CQ_HEAD, Ordering::Relaxed);
                let ahead = (x >> 8) as u32 % 20;
                s.store(D_CQ_TAIL, head.wrapping_add(ahead), Ordering::Release);
                continue;
            }
            let off = match x % 4 {
                0 => D_SQ_HEAD + (x as usize >> 8) % 16 * 4,
                1 | 2 => PAGE + 16 * DESCRIPTOR + (x as usize >> 8) % (16 * DESCRIPTOR / 8) * 8,
                // Anywhere but the mediator's own line, which it never
                // reads (the plausible tails above are computed from it).
                _ => match (x as usize >> 8) % words * 8 {
                    o if (M_SQ_TAIL..D_SQ_HEAD).contains(&o) => continue,
                    o => o,
                },
            };
            s.store64(off & !7, x.rotate_left(17));
        }
    });
    let (mut errors, mut answers) = (0u64, 0u64);
    for i in 0..200_000u64 {
        sub.push(&read(i + 1, (i % 16) as u32));
        sub.publish();
        match sub.take(16, |a| {
            if let Ok(a) = a {
                // What the contract would check; here only that reading
                // a named buffer stays in bounds when the name is valid.
                if a.buf < 16 && a.len <= 4096 {
                    let mut out = vec![0u8; a.len as usize];
                    sub_read(&a, &mut out);
                }
            }
            answers += 1;
            true
        }) {
            Ok(_) => {}
            Err(RingError::BadIndex { ahead, depth }) => {
                assert!(ahead > depth);
                errors += 1;
            }
        }
        let _ = sub.prepare_sleep();
        sub.awake();
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    // The scribbler moved the index both ways: some answers were taken,
    // some indices refused, and nothing else happened.
    assert!(
        errors > 0 && answers > 0,
        "errors {errors} answers {answers}"
    );

    fn sub_read(_a: &Response, out: &mut [u8]) {
        out.fill(0);
    }
}
