//! DkProcessCreate / DkProcessGetExitCode with the exit-code image.
use moat_libos::moat_pal::{limits, Error};
use moat_libos::Pal;

use super::{ensure, err, err_any, ok, p, skip, Case, Ctx, H, R};

pub const CASES: &[Case] = &[
    ("process_create_exit_code", process_create_exit_code),
    ("process_create_errors", process_create_errors),
];

fn process_create_exit_code(ctx: &Ctx) -> R {
    let Some(image) = ctx.exit_image.as_deref() else {
        skip!("no exit-code image given");
    };
    let args = b"7\0";
    let mut h = 0u64;
    ok(
        p().dk_process_create(
            image.as_ptr(),
            image.len() as u64,
            args.as_ptr(),
            args.len() as u64,
            &mut h,
        ),
        "DkProcessCreate(exit-code 7)",
    )?;
    let child = H(h);
    let hs = [child.0];
    ok(
        p().dk_objects_wait_any(1, hs.as_ptr(), 20_000_000),
        "wait for the child (20 s)",
    )?;
    let mut code = -1i32;
    ok(
        p().dk_process_get_exit_code(child.0, &mut code),
        "DkProcessGetExitCode",
    )?;
    ensure!(code == 7, "exit code {} (expected 7)", code);
    err(
        p().dk_process_get_exit_code(child.0, core::ptr::null_mut()),
        Error::BadAddress,
        "DkProcessGetExitCode into null",
    )?;
    // No arguments at all: the image's default (3).
    let mut h = 0u64;
    ok(
        p().dk_process_create(
            image.as_ptr(),
            image.len() as u64,
            core::ptr::null(),
            0,
            &mut h,
        ),
        "DkProcessCreate(no args)",
    )?;
    let child = H(h);
    let mut libos_child = moat_libos::process::spawn(image, &["42"])
        .map_err(|e| super::Fail::Fail(alloc::format!("process::spawn: {}", e.name())))?;
    let hs = [child.0];
    ok(
        p().dk_objects_wait_any(1, hs.as_ptr(), 20_000_000),
        "wait for the child (20 s)",
    )?;
    ok(
        p().dk_process_get_exit_code(child.0, &mut code),
        "DkProcessGetExitCode",
    )?;
    ensure!(
        code == 3,
        "exit code {} without arguments (expected 3)",
        code
    );
    match libos_child.wait_timeout(20_000_000) {
        Ok(c) => ensure!(c == 42, "process::spawn child exited {} (expected 42)", c),
        Err(e) => super::fail!("process::spawn child wait: {}", e.name()),
    }
    libos_child = match moat_libos::process::spawn(image, &["0"]) {
        Ok(c) => c,
        Err(e) => super::fail!("process::spawn: {}", e.name()),
    };
    match libos_child.wait() {
        Ok(c) => ensure!(c == 0, "exit code {} (expected 0)", c),
        Err(e) => super::fail!("wait: {}", e.name()),
    }
    Ok(())
}

fn process_create_errors(ctx: &Ctx) -> R {
    let mut h = 0u64;
    let bogus = "bogus:image";
    err(
        p().dk_process_create(
            bogus.as_ptr(),
            bogus.len() as u64,
            core::ptr::null(),
            0,
            &mut h,
        ),
        Error::InvalidUri,
        "unknown scheme",
    )?;
    let dots = "file:/tmp/../bin/sh";
    err(
        p().dk_process_create(
            dots.as_ptr(),
            dots.len() as u64,
            core::ptr::null(),
            0,
            &mut h,
        ),
        Error::InvalidUri,
        "`..` in the URI",
    )?;
    let denied = "file:/moat-conformance-not-granted/image";
    err(
        p().dk_process_create(
            denied.as_ptr(),
            denied.len() as u64,
            core::ptr::null(),
            0,
            &mut h,
        ),
        Error::PermissionDenied,
        "image outside the grant",
    )?;
    if let Ok(missing) = ctx.scratch_path("no-such-image") {
        err(
            p().dk_process_create(
                missing.as_ptr(),
                missing.len() as u64,
                core::ptr::null(),
                0,
                &mut h,
            ),
            Error::NotFound,
            "missing image",
        )?;
    }
    let Some(image) = ctx.exit_image.as_deref() else {
        return Ok(());
    };
    let big = alloc::vec![b'a'; limits::MAX_ARGS_LEN as usize + 2];
    err_any(
        p().dk_process_create(
            image.as_ptr(),
            image.len() as u64,
            big.as_ptr(),
            big.len() as u64,
            &mut h,
        ),
        &[Error::InvalidArgument, Error::LimitExceeded],
        "args_len > MAX_ARGS_LEN",
    )?;
    err(
        p().dk_process_create(
            image.as_ptr(),
            image.len() as u64,
            core::ptr::dangling::<u8>(),
            4,
            &mut h,
        ),
        Error::BadAddress,
        "args at 0x1",
    )?;
    err(
        p().dk_process_create(
            image.as_ptr(),
            image.len() as u64,
            core::ptr::null(),
            0,
            core::ptr::null_mut(),
        ),
        Error::BadAddress,
        "null handle_out",
    )
}
