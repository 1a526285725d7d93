//! Shared sections (`shm:NAME`, ABI 1.1): create, size once, map, the
//! calls a section refuses, doorbells within one picoprocess, and a child
//! picoprocess (the `shm-peer` image) that opens the same section, checks
//! a pattern, answers, and rings back and forth in lockstep.
use alloc::format;
use alloc::string::String;
use core::sync::atomic::Ordering;

use moat_libos::moat_pal::{access, create, delete, prot, stream_kind, Error, StreamAttributes};
use moat_libos::{thread, Pal};

use super::{ensure, err, fail, ok, open, p, skip, Case, Ctx, Fail, H, R};

pub const CASES: &[Case] = &[
    ("shm_create_size_map", shm_create_size_map),
    ("shm_open_rules", shm_open_rules),
    ("shm_doorbells", shm_doorbells),
    ("shm_child_peer", shm_child_peer),
];

const RW: u32 = access::READ | access::WRITE;
const PAGE: u64 = 4096;
/// The section the child test shares (the layout `shm-peer` expects).
const SIZE: u64 = 4 * PAGE;

fn name() -> String {
    format!("conf-{:08x}", super::rand32())
}

fn attrs(h: &H) -> Result<StreamAttributes, Fail> {
    let mut a = StreamAttributes::default();
    ok(
        p().dk_stream_attributes_query_by_handle(h.0, &mut a),
        "DkStreamAttributesQueryByHandle",
    )?;
    Ok(a)
}

fn attrs_of(uri: &str) -> Result<StreamAttributes, Fail> {
    let mut a = StreamAttributes::default();
    ok(
        p().dk_stream_attributes_query(uri.as_ptr(), uri.len() as u64, &mut a),
        "DkStreamAttributesQuery",
    )?;
    Ok(a)
}

/// A mapping unmapped on drop.
struct Map(u64, u64);

impl Drop for Map {
    fn drop(&mut self) {
        let _ = p().dk_stream_unmap(self.0, self.1);
    }
}

fn map(h: &H, pr: u32, offset: u64, size: u64) -> Result<Map, Fail> {
    let a = ok(p().dk_stream_map(h.0, 0, pr, offset, size), "DkStreamMap")?;
    Ok(Map(a, size))
}

fn byte(m: &Map, i: u64) -> &core::sync::atomic::AtomicU8 {
    // SAFETY: callers pass i < the mapping's size; the mapping lives as
    // long as the borrow of `m`; AtomicU8 has u8's layout.
    unsafe { &*core::ptr::with_exposed_provenance((m.0 + i) as usize) }
}

fn shm_create_size_map(_: &Ctx) -> R {
    let uri = format!("shm:{}", name());
    let s = open(&uri, RW, create::CREATE_NEW, 0)?;
    let a = attrs(&s)?;
    ensure!(a.kind == stream_kind::SHM, "kind {} (expected SHM)", a.kind);
    ensure!(a.size == 0, "size {} before sizing", a.size);
    ensure!(
        a.readable == 1 && a.writable == 1,
        "access {:?}",
        (a.readable, a.writable)
    );
    ensure!(a.executable == 0, "a section reports executable");
    err(
        p().dk_stream_map(s.0, 0, prot::READ, 0, PAGE),
        Error::InvalidArgument,
        "map before sizing",
    )?;
    let mut buf = [0u8; 8];
    err(
        p().dk_stream_read(s.0, 0, buf.as_mut_ptr(), 8),
        Error::NotSupported,
        "DkStreamRead of a section",
    )?;
    err(
        p().dk_stream_write(s.0, 0, buf.as_ptr(), 8),
        Error::NotSupported,
        "DkStreamWrite of a section",
    )?;
    err(
        p().dk_stream_set_length(s.0, 0),
        Error::InvalidArgument,
        "size 0",
    )?;
    err(
        p().dk_stream_set_length(s.0, PAGE + 1),
        Error::InvalidArgument,
        "size not a page multiple",
    )?;
    ok(p().dk_stream_set_length(s.0, SIZE), "DkStreamSetLength")?;
    for (len, what) in [(SIZE, "same size"), (2 * SIZE, "grow"), (PAGE, "shrink")] {
        err(
            p().dk_stream_set_length(s.0, len),
            Error::PermissionDenied,
            &format!("size again ({what})"),
        )?;
    }
    ensure!(
        attrs(&s)?.size == SIZE,
        "size {} after sizing",
        attrs(&s)?.size
    );
    let by_uri = attrs_of(&uri)?;
    ensure!(
        by_uri.kind == stream_kind::SHM && by_uri.size == SIZE,
        "by URI: kind {} size {}",
        by_uri.kind,
        by_uri.size
    );
    let m = map(&s, prot::READ | prot::WRITE, 0, SIZE)?;
    for i in 0..SIZE {
        byte(&m, i).store((i * 13) as u8, Ordering::Relaxed);
    }
    // A second mapping of the last page sees the same bytes.
    let tail = map(&s, prot::READ, SIZE - PAGE, PAGE)?;
    for i in 0..PAGE {
        let want = ((SIZE - PAGE + i) * 13) as u8;
        let got = byte(&tail, i).load(Ordering::Relaxed);
        ensure!(got == want, "tail byte {i}: {got} (expected {want})");
    }
    err(
        p().dk_stream_map(s.0, 0, prot::READ, SIZE - PAGE, 2 * PAGE),
        Error::InvalidArgument,
        "map past the end",
    )?;
    err(
        p().dk_stream_map(s.0, 0, prot::READ, SIZE, PAGE),
        Error::InvalidArgument,
        "map at the end",
    )?;
    err(
        p().dk_stream_map(s.0, 0, prot::READ | prot::EXEC, 0, PAGE),
        Error::PermissionDenied,
        "map executable",
    )?;
    err(
        p().dk_stream_map(s.0, 0, prot::READ | prot::WRITE | prot::EXEC, 0, PAGE),
        Error::InvalidArgument,
        "map writable and executable",
    )?;
    err(
        p().dk_stream_delete(s.0, delete::ALL),
        Error::WrongHandleKind,
        "DkStreamDelete of a section",
    )?;
    // Closing the stream keeps the mapping and the section.
    drop(s);
    ensure!(
        byte(&m, 5).load(Ordering::Relaxed) == 65,
        "mapping changed after close"
    );
    let again = open(&uri, access::READ, create::OPEN_EXISTING, 0)?;
    let ro = map(&again, prot::READ, 0, PAGE)?;
    ensure!(
        byte(&ro, 7).load(Ordering::Relaxed) == 91,
        "a later open sees other bytes"
    );
    err(
        p().dk_stream_map(again.0, 0, prot::READ | prot::WRITE, 0, PAGE),
        Error::PermissionDenied,
        "map writable through a read-only handle",
    )?;
    err(
        p().dk_stream_set_length(again.0, SIZE),
        Error::PermissionDenied,
        "size through a read-only handle",
    )?;
    Ok(())
}

fn open_code(uri: &str, acc: u32, cr: u32) -> i64 {
    let mut h = 0u64;
    let r = p().dk_stream_open(uri.as_ptr(), uri.len() as u64, acc, cr, 0, &mut h);
    if r >= 0 {
        let _ = p().dk_object_close(h);
    }
    r
}

fn shm_open_rules(_: &Ctx) -> R {
    let uri = format!("shm:{}", name());
    err(
        open_code(&uri, RW, create::OPEN_EXISTING),
        Error::NotFound,
        "open a section nobody made",
    )?;
    let mut a = StreamAttributes::default();
    err(
        p().dk_stream_attributes_query(uri.as_ptr(), uri.len() as u64, &mut a),
        Error::NotFound,
        "attributes of a section nobody made",
    )?;
    err(
        open_code(&uri, RW, create::CREATE_ALWAYS),
        Error::InvalidArgument,
        "CREATE_ALWAYS",
    )?;
    err(
        open_code(&uri, access::READ | access::APPEND, create::OPEN_ALWAYS),
        Error::InvalidArgument,
        "APPEND",
    )?;
    let first = open(&uri, RW, create::OPEN_ALWAYS, 0)?;
    err(
        open_code(&uri, RW, create::CREATE_NEW),
        Error::AlreadyExists,
        "CREATE_NEW of an existing section",
    )?;
    let second = open(&uri, RW, create::OPEN_ALWAYS, 0)?;
    drop((first, second));
    let long = format!("shm:{}", "x".repeat(65));
    for bad in ["shm:", "shm:a/b", "shm:a b", long.as_str()] {
        err(
            open_code(bad, RW, create::OPEN_ALWAYS),
            Error::InvalidUri,
            &format!("DkStreamOpen({bad})"),
        )?;
    }
    Ok(())
}

fn wait(h: u64, timeout: i64) -> i64 {
    let hs = [h];
    p().dk_objects_wait_any(1, hs.as_ptr(), timeout)
}

fn event(s: &H) -> Result<H, Fail> {
    let mut e = 0u64;
    ok(p().dk_stream_get_event(s.0, &mut e), "DkStreamGetEvent")?;
    Ok(H(e))
}

fn shm_doorbells(_: &Ctx) -> R {
    let uri = format!("shm:{}", name());
    let creator = open(&uri, RW, create::CREATE_NEW, 0)?;
    let other = open(&uri, RW, create::OPEN_EXISTING, 0)?;
    let (ce, oe) = (event(&creator)?, event(&other)?);
    err(
        wait(ce.0, 0),
        Error::TimedOut,
        "creator's doorbell before a ring",
    )?;
    // The other side rings the creator's doorbell, twice: one wake.
    ok(p().dk_stream_flush(other.0), "ring the creator side")?;
    ok(p().dk_stream_flush(other.0), "ring it again")?;
    err(wait(oe.0, 0), Error::TimedOut, "the ringer's own doorbell")?;
    ensure!(
        ok(p().dk_event_peek(ce.0), "DkEventPeek")? == 1,
        "a rung doorbell peeks unset"
    );
    // A wait on the stream sees the ring without consuming it.
    ok(wait(creator.0, 0), "wait on the rung section stream")?;
    ok(wait(ce.0, 0), "wait on the rung doorbell")?;
    err(
        wait(ce.0, 0),
        Error::TimedOut,
        "the doorbell after a wait consumed it",
    )?;
    err(
        wait(creator.0, 0),
        Error::TimedOut,
        "the section stream after that",
    )?;
    // Every handle of one side is the same doorbell.
    let ce2 = event(&creator)?;
    ok(p().dk_stream_flush(other.0), "ring")?;
    ok(wait(ce2.0, 0), "second handle of the doorbell")?;
    err(
        wait(ce.0, 0),
        Error::TimedOut,
        "first handle after the second consumed it",
    )?;
    // Event calls on a doorbell.
    ok(p().dk_event_set(oe.0), "DkEventSet on a doorbell")?;
    ok(p().dk_event_clear(oe.0), "DkEventClear on a doorbell")?;
    err(wait(oe.0, 0), Error::TimedOut, "a cleared doorbell")?;
    err(
        p().dk_abort_event_register(oe.0),
        Error::WrongHandleKind,
        "a doorbell as the abort event",
    )?;
    // No lost wakeup: a thread waits for ever; each ring wakes it once.
    let ring = other.0;
    let waiter_ev = ce.0;
    let t = thread::try_spawn(move || {
        let mut n = 0i32;
        for _ in 0..50 {
            if wait(waiter_ev, 10_000_000) != 0 {
                return -1;
            }
            n += 1;
        }
        n
    })
    .map_err(|e| Fail::Fail(format!("thread: {}", e.name())))?;
    for _ in 0..50 {
        // Ring only once the waiter has taken the previous ring.
        let t0 = moat_libos::time::now_micros();
        while ok(p().dk_event_peek(waiter_ev), "peek")? == 1 {
            if moat_libos::time::now_micros() > t0 + 10_000_000 {
                fail!("the waiter did not take a ring within 10 s");
            }
            thread::sleep_micros(100);
        }
        ok(p().dk_stream_flush(ring), "ring")?;
    }
    let n = t
        .join()
        .map_err(|e| Fail::Fail(format!("join: {}", e.name())))?;
    ensure!(n == 50, "the waiter woke {} times of 50", n);
    Ok(())
}

fn shm_child_peer(ctx: &Ctx) -> R {
    let Some(peer) = ctx.shm_peer.as_deref() else {
        skip!("no shm-peer image given");
    };
    let name = name();
    let uri = format!("shm:{name}");
    let s = open(&uri, RW, create::CREATE_NEW, 0)?;
    ok(p().dk_stream_set_length(s.0, SIZE), "DkStreamSetLength")?;
    let m = map(&s, prot::READ | prot::WRITE, 0, SIZE)?;
    let seed = super::rand32() as u8;
    for i in 0..256u64 {
        byte(&m, i).store(
            (i as u8).wrapping_mul(7).wrapping_add(seed),
            Ordering::Relaxed,
        );
    }
    let bell = event(&s)?;
    let args = format!("{name}\0{seed}\0");
    let mut h = 0u64;
    ok(
        p().dk_process_create(
            peer.as_ptr(),
            peer.len() as u64,
            args.as_ptr(),
            args.len() as u64,
            &mut h,
        ),
        "DkProcessCreate(shm-peer)",
    )?;
    let child = H(h);
    let child_failed = |what: &str| -> Fail {
        let mut code = -1;
        let hs = [child.0];
        let _ = p().dk_objects_wait_any(1, hs.as_ptr(), 5_000_000);
        let _ = p().dk_process_get_exit_code(child.0, &mut code);
        Fail::Fail(format!("{what} (the child exited {code})"))
    };
    // The child's answer: the pattern inverted, in the second page.
    if wait(bell.0, 20_000_000) != 0 {
        return Err(child_failed("no ring from the child within 20 s"));
    }
    for i in 0..256u64 {
        let want = !((i as u8).wrapping_mul(7).wrapping_add(seed));
        let got = byte(&m, PAGE + i).load(Ordering::Relaxed);
        ensure!(got == want, "answer byte {i}: {got} (expected {want})");
    }
    // Lockstep: each ring is one round, both ways.
    let counter = |off: u64| -> &core::sync::atomic::AtomicU64 {
        // SAFETY: an 8-aligned offset inside the mapping, which outlives
        // the borrow; AtomicU64 has u64's layout.
        unsafe { &*core::ptr::with_exposed_provenance((m.0 + off) as usize) }
    };
    for r in 1..=100u64 {
        counter(2 * PAGE).store(r, Ordering::Release);
        ok(p().dk_stream_flush(s.0), "ring the child")?;
        loop {
            if wait(bell.0, 20_000_000) != 0 {
                return Err(child_failed(&format!("round {r}: no answer within 20 s")));
            }
            if counter(2 * PAGE + 8).load(Ordering::Acquire) == r {
                break;
            }
        }
    }
    counter(2 * PAGE).store(u64::MAX, Ordering::Release);
    ok(p().dk_stream_flush(s.0), "tell the child to end")?;
    ok(wait(child.0, 20_000_000), "wait for the child (20 s)")?;
    let mut code = -1;
    ok(
        p().dk_process_get_exit_code(child.0, &mut code),
        "DkProcessGetExitCode",
    )?;
    ensure!(code == 0, "shm-peer exited {} (expected 0)", code);
    Ok(())
}
