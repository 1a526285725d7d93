//! DkThreadCreate / GetParameter / Exit / DelayExecution / YieldExecution,
//! and the libos thread and lock types on top of them.
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use moat_libos::moat_pal::Error;
use moat_libos::sync::{Condvar, Mutex};
use moat_libos::{thread, Pal};

use super::{ensure, err_any, ok, p, Case, Ctx, H, R};

pub const CASES: &[Case] = &[
    ("thread_create_param_exit", thread_create_param_exit),
    ("thread_main_parameter", thread_main_parameter),
    ("thread_create_bad_entry", thread_create_bad_entry),
    ("thread_delay", thread_delay),
    ("thread_delay_limits", thread_delay_limits),
    ("thread_yield", thread_yield),
    ("libos_spawn_join", libos_spawn_join),
    ("libos_mutex_condvar", libos_mutex_condvar),
];

static SEEN_PARAM: AtomicU64 = AtomicU64::new(0);

extern "C" fn param_entry(param: u64) -> ! {
    let got = p().dk_thread_get_parameter();
    // Record what DkThreadGetParameter said, tagged so 0 is visible.
    SEEN_PARAM.store(
        if got >= 0 {
            got as u64 ^ param
        } else {
            u64::MAX
        },
        Ordering::SeqCst,
    );
    p().dk_thread_exit(5)
}

fn thread_create_param_exit(_: &Ctx) -> R {
    SEEN_PARAM.store(1, Ordering::SeqCst);
    let param = 0x1234_5678_u64;
    let mut h = 0u64;
    let entry = param_entry as extern "C" fn(u64) -> ! as usize as u64;
    ok(p().dk_thread_create(entry, param, &mut h), "DkThreadCreate")?;
    let th = H(h);
    ensure!(th.0 != 0, "thread handle 0");
    let hs = [th.0];
    ok(
        p().dk_objects_wait_any(1, hs.as_ptr(), 5_000_000),
        "wait for the thread to exit (5 s)",
    )?;
    let seen = SEEN_PARAM.load(Ordering::SeqCst);
    ensure!(
        seen != u64::MAX,
        "DkThreadGetParameter failed in the thread"
    );
    ensure!(
        seen == 0,
        "DkThreadGetParameter returned {:#x}, expected {:#x}",
        seen ^ param,
        param
    );
    // An exited thread stays signalled.
    ok(
        p().dk_objects_wait_any(1, hs.as_ptr(), 0),
        "second wait on the exited thread",
    )?;
    Ok(())
}

fn thread_main_parameter(_: &Ctx) -> R {
    let v = ok(p().dk_thread_get_parameter(), "DkThreadGetParameter")?;
    ensure!(v == 0, "first thread's parameter {} (expected 0)", v);
    Ok(())
}

fn thread_create_bad_entry(_: &Ctx) -> R {
    let mut h = 0u64;
    err_any(
        p().dk_thread_create(0, 0, &mut h),
        &[Error::InvalidArgument, Error::BadAddress],
        "DkThreadCreate entry 0",
    )?;
    err_any(
        p().dk_thread_create(0xffff_8000_0000_0000, 0, &mut h),
        &[Error::InvalidArgument, Error::BadAddress],
        "DkThreadCreate kernel entry",
    )?;
    // Non-executable memory as entry.
    let page = ok(p().dk_virtual_memory_alloc(0, 4096, 3), "alloc")?;
    let r = p().dk_thread_create(page, 0, &mut h);
    ok(p().dk_virtual_memory_free(page, 4096), "free")?;
    err_any(
        r,
        &[Error::InvalidArgument, Error::BadAddress],
        "DkThreadCreate entry in RW memory",
    )?;
    let entry = param_entry as extern "C" fn(u64) -> ! as usize as u64;
    err_any(
        p().dk_thread_create(entry, 0, core::ptr::null_mut()),
        &[Error::BadAddress],
        "DkThreadCreate null handle_out",
    )
}

fn thread_delay(_: &Ctx) -> R {
    let t0 = ok(p().dk_system_time_query(), "time")?;
    ok(p().dk_thread_delay_execution(15_000), "delay 15 ms")?;
    let t1 = ok(p().dk_system_time_query(), "time")?;
    ensure!(
        t1 >= t0 + 15_000,
        "15 ms delay took {} us",
        t1.saturating_sub(t0)
    );
    ensure!(t1 < t0 + 5_000_000, "15 ms delay took {} us", t1 - t0);
    ok(p().dk_thread_delay_execution(0), "delay 0")?;
    Ok(())
}

fn thread_delay_limits(_: &Ctx) -> R {
    super::err(
        p().dk_thread_delay_execution((1 << 40) + 1),
        Error::InvalidArgument,
        "delay 2^40 + 1",
    )?;
    super::err(
        p().dk_thread_delay_execution(u64::MAX),
        Error::InvalidArgument,
        "delay u64::MAX",
    )
}

fn thread_yield(_: &Ctx) -> R {
    for _ in 0..10 {
        let r = ok(p().dk_thread_yield_execution(), "yield")?;
        ensure!(r == 0, "yield returned {}", r);
    }
    Ok(())
}

fn libos_spawn_join(_: &Ctx) -> R {
    let hs: Vec<_> = (0..4u64)
        .map(|i| thread::try_spawn(move || i * 10 + 1))
        .collect();
    for (i, h) in hs.into_iter().enumerate() {
        let h = match h {
            Ok(h) => h,
            Err(e) => super::fail!("spawn {}: {}", i, e.name()),
        };
        match h.join() {
            Ok(v) => ensure!(v == i as u64 * 10 + 1, "thread {} returned {}", i, v),
            Err(e) => super::fail!("join {}: {}", i, e.name()),
        }
    }
    Ok(())
}

fn libos_mutex_condvar(_: &Ctx) -> R {
    struct Shared {
        count: Mutex<u64>,
        done: Mutex<u32>,
        cv: Condvar,
    }
    let sh = Arc::new(Shared {
        count: Mutex::new(0),
        done: Mutex::new(0),
        cv: Condvar::new(),
    });
    let n = 4;
    let per = 2000u64;
    let mut hs = Vec::new();
    for _ in 0..n {
        let sh = sh.clone();
        let h = thread::try_spawn(move || {
            for _ in 0..per {
                *sh.count.lock() += 1;
            }
            *sh.done.lock() += 1;
            sh.cv.notify_all();
        });
        match h {
            Ok(h) => hs.push(h),
            Err(e) => super::fail!("spawn: {}", e.name()),
        }
    }
    let t0 = moat_libos::time::now_micros();
    let mut done = sh.done.lock();
    while *done < n {
        let (g, _) = sh.cv.wait_timeout(done, 100_000);
        done = g;
        ensure!(
            moat_libos::time::now_micros() < t0 + 10_000_000,
            "threads not done after 10 s"
        );
    }
    drop(done);
    for h in hs {
        if let Err(e) = h.join() {
            super::fail!("join: {}", e.name());
        }
    }
    let c = *sh.count.lock();
    ensure!(
        c == n as u64 * per,
        "counter {} (expected {})",
        c,
        n as u64 * per
    );
    Ok(())
}
