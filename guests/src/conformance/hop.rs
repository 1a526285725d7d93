//! The hop (argument 5 `hop`, for `tests/tests/checkpoint.rs`): state of
//! every kind that a checkpoint carries is made, `hop` is printed, and the
//! guest waits (a few milliseconds at a time) until the file `hop-done`
//! appears in the scratch directory. Meanwhile the test checkpoints it
//! and restores it, maybe on the other host, then makes the file. The
//! state is then checked, as a case of its own, and the suite goes on
//! (on the new host: the host kind is read again).
use super::{ensure, fail, ok, p, Ctx, R};
use alloc::format;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use moat_libos::moat_pal::{access, create, Pal};
use moat_libos::thread;

static WOKEN: AtomicU64 = AtomicU64::new(0);

/// Make the state, wait for the hop, check the state.
pub fn hop(ctx: &Ctx) -> R {
    let pal = p();
    // Memory: a pattern on the heap.
    let pattern: Vec<u64> = (0..4096u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    // Events and a semaphore, in states that are not their initial ones.
    let mut note = 0u64;
    let mut sync = 0u64;
    let mut sem = 0u64;
    ok(
        pal.dk_notification_event_create(0, &mut note),
        "notification event",
    )?;
    ok(pal.dk_event_set(note), "set")?;
    ok(
        pal.dk_synchronization_event_create(0, &mut sync),
        "sync event",
    )?;
    ok(pal.dk_semaphore_create(1, 5, &mut sem), "semaphore")?;
    ok(pal.dk_semaphore_release(sem, 2), "release")?;
    // A file kept open, with its contents.
    let uri = ctx.scratch_path("hop-file")?;
    let mut f = 0u64;
    ok(
        pal.dk_stream_open(
            uri.as_ptr(),
            uri.len() as u64,
            access::READ | access::WRITE,
            create::CREATE_ALWAYS,
            0,
            &mut f,
        ),
        "open the file",
    )?;
    let text = b"written before the hop";
    ok(
        pal.dk_stream_write(f, 0, text.as_ptr(), text.len() as u64),
        "write",
    )?;
    // A thread blocked on the synchronization event through the hop.
    let waiter = thread::spawn(move || {
        let hs = [sync];
        let r = p().dk_objects_wait_any(1, hs.as_ptr(), -1);
        WOKEN.store(if r == 0 { 7 } else { 1 }, Ordering::SeqCst);
    });
    // The hop.
    moat_libos::println!("hop");
    moat_libos::io::try_flush_stdout();
    let done = format!("{}/hop-done", ctx.scratch()?.trim_end_matches('/'));
    let mut waited = 0;
    while moat_libos::fs::attributes(&done).is_err() {
        thread::sleep_micros(5_000);
        waited += 1;
        if waited > 6_000 {
            fail!("the hop did not come in 30 s");
        }
    }
    // The state, as it was.
    for (i, v) in pattern.iter().enumerate() {
        ensure!(
            *v == (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            "memory at {} changed",
            i
        );
    }
    ensure!(
        pal.dk_event_peek(note) == 1,
        "the notification event is no longer set"
    );
    ensure!(
        pal.dk_event_peek(sync) == 0,
        "the synchronization event became set"
    );
    ensure!(
        pal.dk_semaphore_peek(sem) == 3,
        "the semaphore's count is {}",
        pal.dk_semaphore_peek(sem)
    );
    let mut buf = [0u8; 64];
    let n = ok(
        pal.dk_stream_read(f, 0, buf.as_mut_ptr(), 64),
        "read the file",
    )?;
    ensure!(
        &buf[..n as usize] == text,
        "the file reads {:?}",
        &buf[..n as usize]
    );
    ensure!(
        WOKEN.load(Ordering::SeqCst) == 0,
        "the waiting thread woke without its event"
    );
    ok(pal.dk_event_set(sync), "wake the waiter")?;
    if waiter.join().is_err() {
        fail!("the waiting thread did not end");
    }
    ensure!(
        WOKEN.load(Ordering::SeqCst) == 7,
        "the waiting thread's wait returned {}",
        WOKEN.load(Ordering::SeqCst)
    );
    for h in [note, sync, sem, f] {
        ok(pal.dk_object_close(h), "close")?;
    }
    Ok(())
}
