//! Events, semaphores, DkObjectsWaitAny, DkAbortEventRegister.
use alloc::vec::Vec;

use moat_libos::moat_pal::{limits, Error};
use moat_libos::Pal;

use super::{ensure, err, err_any, notif, ok, p, Case, Ctx, H, R};

pub const CASES: &[Case] = &[
    ("semaphore_create_limits", semaphore_create_limits),
    ("semaphore_release_peek", semaphore_release_peek),
    ("semaphore_wait_decrements", semaphore_wait_decrements),
    ("event_notification", event_notification),
    ("event_synchronization", event_synchronization),
    ("event_initial_set", event_initial_set),
    ("wait_any_poll_timeout", wait_any_poll_timeout),
    ("wait_any_20ms_timeout", wait_any_20ms_timeout),
    ("wait_any_index", wait_any_index),
    ("wait_any_count_limits", wait_any_count_limits),
    ("abort_event_register", abort_event_register),
];

fn sem(initial: u32, max: u32) -> Result<H, super::Fail> {
    let mut h = 0u64;
    ok(
        p().dk_semaphore_create(initial, max, &mut h),
        "DkSemaphoreCreate",
    )?;
    Ok(H(h))
}

fn sync_event(initial: bool) -> Result<H, super::Fail> {
    let mut h = 0u64;
    ok(
        p().dk_synchronization_event_create(initial as u32, &mut h),
        "DkSynchronizationEventCreate",
    )?;
    Ok(H(h))
}

fn semaphore_create_limits(_: &Ctx) -> R {
    let mut h = 0u64;
    err(
        p().dk_semaphore_create(4, 3, &mut h),
        Error::InvalidArgument,
        "initial 4 > max 3",
    )?;
    err(
        p().dk_semaphore_create(0, 0, &mut h),
        Error::InvalidArgument,
        "max 0",
    )?;
    let s = sem(3, 3)?;
    ensure!(
        ok(p().dk_semaphore_peek(s.0), "peek")? == 3,
        "initial == max: count not 3"
    );
    Ok(())
}

fn semaphore_release_peek(_: &Ctx) -> R {
    let s = sem(1, 3)?;
    ensure!(
        ok(p().dk_semaphore_peek(s.0), "peek")? == 1,
        "initial count not 1"
    );
    let before = ok(p().dk_semaphore_release(s.0, 1), "release 1")?;
    ensure!(
        before == 1,
        "release returned {} (the count before), expected 1",
        before
    );
    ensure!(
        ok(p().dk_semaphore_peek(s.0), "peek")? == 2,
        "count after release not 2"
    );
    err(
        p().dk_semaphore_release(s.0, 2),
        Error::LimitExceeded,
        "release 2 past max",
    )?;
    ensure!(
        ok(p().dk_semaphore_peek(s.0), "peek")? == 2,
        "count changed by a refused release"
    );
    let before = ok(p().dk_semaphore_release(s.0, 1), "release up to max")?;
    ensure!(before == 2, "release returned {}, expected 2", before);
    ensure!(
        ok(p().dk_semaphore_peek(s.0), "peek")? == 3,
        "count not at max 3"
    );
    err(
        p().dk_semaphore_release(s.0, 1),
        Error::LimitExceeded,
        "release 1 at max",
    )?;
    ensure!(
        ok(p().dk_semaphore_peek(s.0), "peek")? == 3,
        "count changed by a refused release at max"
    );
    err(
        p().dk_semaphore_release(s.0, 0),
        Error::InvalidArgument,
        "release 0",
    )?;
    err_any(
        p().dk_semaphore_release(s.0, u32::MAX),
        &[Error::LimitExceeded, Error::InvalidArgument],
        "release u32::MAX",
    )?;
    ensure!(
        ok(p().dk_semaphore_peek(s.0), "peek")? == 3,
        "count changed by release u32::MAX"
    );
    Ok(())
}

fn semaphore_wait_decrements(_: &Ctx) -> R {
    let s = sem(2, 5)?;
    let h = [s.0];
    ensure!(
        ok(p().dk_objects_wait_any(1, h.as_ptr(), 0), "first wait")? == 0,
        "index not 0"
    );
    ensure!(
        ok(p().dk_semaphore_peek(s.0), "peek")? == 1,
        "wait did not decrement to 1"
    );
    ok(p().dk_objects_wait_any(1, h.as_ptr(), 0), "second wait")?;
    ensure!(
        ok(p().dk_semaphore_peek(s.0), "peek")? == 0,
        "wait did not decrement to 0"
    );
    err(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        Error::TimedOut,
        "wait on count 0",
    )?;
    Ok(())
}

fn event_notification(_: &Ctx) -> R {
    let e = notif(false)?;
    let h = [e.0];
    ensure!(ok(p().dk_event_peek(e.0), "peek")? == 0, "new event is set");
    err(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        Error::TimedOut,
        "poll of an unset event",
    )?;
    ok(p().dk_event_set(e.0), "set")?;
    ensure!(
        ok(p().dk_event_peek(e.0), "peek")? == 1,
        "set event peeks 0"
    );
    ok(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        "first wait on the set event",
    )?;
    ok(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        "second wait: a notification event stays set",
    )?;
    ensure!(
        ok(p().dk_event_peek(e.0), "peek")? == 1,
        "notification event cleared by a wait"
    );
    ok(p().dk_event_set(e.0), "set again (already set)")?;
    ok(p().dk_event_clear(e.0), "clear")?;
    ensure!(
        ok(p().dk_event_peek(e.0), "peek")? == 0,
        "cleared event peeks 1"
    );
    err(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        Error::TimedOut,
        "poll after clear",
    )?;
    ok(p().dk_event_clear(e.0), "clear again (already clear)")?;
    Ok(())
}

fn event_synchronization(_: &Ctx) -> R {
    let e = sync_event(false)?;
    let h = [e.0];
    err(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        Error::TimedOut,
        "poll of an unset event",
    )?;
    ok(p().dk_event_set(e.0), "set")?;
    ensure!(
        ok(p().dk_event_peek(e.0), "peek")? == 1,
        "set event peeks 0 (peek must not consume)"
    );
    ensure!(
        ok(p().dk_event_peek(e.0), "peek")? == 1,
        "second peek consumed the event"
    );
    ok(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        "wait on the set event",
    )?;
    ensure!(
        ok(p().dk_event_peek(e.0), "peek")? == 0,
        "synchronization event still set after a wait"
    );
    err(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        Error::TimedOut,
        "second wait: auto-reset",
    )?;
    ok(p().dk_event_set(e.0), "set")?;
    ok(p().dk_event_clear(e.0), "clear")?;
    err(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        Error::TimedOut,
        "wait after set+clear",
    )?;
    Ok(())
}

fn event_initial_set(_: &Ctx) -> R {
    let n = notif(true)?;
    ensure!(
        ok(p().dk_event_peek(n.0), "peek")? == 1,
        "notification created set peeks 0"
    );
    let s = sync_event(true)?;
    ensure!(
        ok(p().dk_event_peek(s.0), "peek")? == 1,
        "synchronization created set peeks 0"
    );
    let h = [s.0];
    ok(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        "wait on the initially set event",
    )?;
    err(
        p().dk_objects_wait_any(1, h.as_ptr(), 0),
        Error::TimedOut,
        "second wait",
    )
}

fn wait_any_poll_timeout(_: &Ctx) -> R {
    let a = notif(false)?;
    let b = sync_event(false)?;
    let c = sem(0, 1)?;
    let h = [a.0, b.0, c.0];
    err(
        p().dk_objects_wait_any(3, h.as_ptr(), 0),
        Error::TimedOut,
        "poll of three unsignalled objects",
    )
}

fn wait_any_20ms_timeout(_: &Ctx) -> R {
    let a = notif(false)?;
    let h = [a.0];
    let t0 = ok(p().dk_system_time_query(), "time")?;
    err(
        p().dk_objects_wait_any(1, h.as_ptr(), 20_000),
        Error::TimedOut,
        "20 ms wait",
    )?;
    let t1 = ok(p().dk_system_time_query(), "time")?;
    ensure!(
        t1 >= t0 + 20_000,
        "20 ms wait returned after {} us",
        t1.saturating_sub(t0)
    );
    ensure!(t1 < t0 + 5_000_000, "20 ms wait took {} us", t1 - t0);
    Ok(())
}

fn wait_any_index(_: &Ctx) -> R {
    let a = notif(false)?;
    let b = notif(false)?;
    let c = sem(1, 1)?;
    let h = [a.0, b.0, c.0];
    let i = ok(
        p().dk_objects_wait_any(3, h.as_ptr(), 1_000_000),
        "wait with the semaphore ready",
    )?;
    ensure!(i == 2, "index {} (expected 2: the semaphore)", i);
    ok(p().dk_event_set(b.0), "set b")?;
    let i = ok(
        p().dk_objects_wait_any(3, h.as_ptr(), timeout_infinite()),
        "infinite wait with b set",
    )?;
    ensure!(i == 1, "index {} (expected 1)", i);
    Ok(())
}

fn timeout_infinite() -> i64 {
    moat_libos::moat_pal::timeout::INFINITE
}

fn wait_any_count_limits(_: &Ctx) -> R {
    let a = notif(true)?;
    let n = limits::MAX_WAIT_HANDLES as usize;
    let many: Vec<u64> = (0..n + 1).map(|_| a.0).collect();
    err(
        p().dk_objects_wait_any(0, many.as_ptr(), 0),
        Error::InvalidArgument,
        "count 0",
    )?;
    err(
        p().dk_objects_wait_any(n as u32 + 1, many.as_ptr(), 0),
        Error::InvalidArgument,
        "count MAX_WAIT_HANDLES + 1",
    )?;
    err(
        p().dk_objects_wait_any(u32::MAX, many.as_ptr(), 0),
        Error::InvalidArgument,
        "count u32::MAX",
    )?;
    // Exactly the maximum is fine (one object repeated; the first is set).
    let i = ok(
        p().dk_objects_wait_any(n as u32, many.as_ptr(), 0),
        "count MAX_WAIT_HANDLES",
    )?;
    ensure!(i < n as u64, "index {} out of range", i);
    Ok(())
}

fn abort_event_register(_: &Ctx) -> R {
    let e = notif(false)?;
    ok(p().dk_abort_event_register(e.0), "register")?;
    ensure!(
        ok(p().dk_event_peek(e.0), "peek")? == 0,
        "abort event set without a stop request"
    );
    ok(p().dk_abort_event_register(0), "unregister with 0")?;
    err(
        p().dk_abort_event_register(0x4242_4242_4242),
        Error::BadHandle,
        "register a bad handle",
    )
}
