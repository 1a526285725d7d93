//! Handle validation, reference counting, bad pointers and length limits,
//! across calls of every group.
use alloc::format;
use alloc::vec;

use moat_libos::moat_pal::{access, create, limits, Error, StreamAttributes};
use moat_libos::Pal;

use super::{bad_ptrs, err, err_any, freed_page, notif, ok, open, p, Case, Ctx, H, R};

pub const CASES: &[Case] = &[
    ("handle_zero", handle_zero),
    ("handle_random", handle_random),
    ("handle_closed", handle_closed),
    ("handle_wrong_kind", handle_wrong_kind),
    ("object_reference_close", object_reference_close),
    ("bad_pointers", bad_pointers),
    ("io_len_limits", io_len_limits),
    ("uri_len_limits", uri_len_limits),
];

/// Every call that takes a handle, given `h`, with otherwise valid arguments.
fn handle_calls(h: u64, what: &str) -> R {
    let mut buf = [0u8; 512];
    let mut out = 0u64;
    let mut code = 0i32;
    let mut attrs = StreamAttributes::default();
    let mut cursor = 0u64;
    let mut img = moat_libos::ImageInfo::default();
    let b = buf.as_mut_ptr();
    let uri = "file:/moat-conformance-nothing";
    let checks: [(&str, i64); 21] = [
        ("DkSemaphoreRelease", p().dk_semaphore_release(h, 1)),
        ("DkSemaphorePeek", p().dk_semaphore_peek(h)),
        ("DkEventSet", p().dk_event_set(h)),
        ("DkEventClear", p().dk_event_clear(h)),
        ("DkEventPeek", p().dk_event_peek(h)),
        ("DkObjectsWaitAny", p().dk_objects_wait_any(1, &h, 0)),
        // (DkAbortEventRegister(0) unregisters: checked for h != 0 below.)
        (
            "DkAbortEventRegister",
            if h == 0 {
                Error::BadHandle.code()
            } else {
                p().dk_abort_event_register(h)
            },
        ),
        (
            "DkProcessGetExitCode",
            p().dk_process_get_exit_code(h, &mut code),
        ),
        ("DkStreamRead", p().dk_stream_read(h, 0, b, 16)),
        ("DkStreamWrite", p().dk_stream_write(h, 0, b, 16)),
        ("DkStreamMap", p().dk_stream_map(h, 0, 1, 0, 4096)),
        (
            "DkStreamMapPeBinary",
            p().dk_stream_map_pe_binary(h, &mut img),
        ),
        ("DkStreamSetLength", p().dk_stream_set_length(h, 0)),
        ("DkStreamFlush", p().dk_stream_flush(h)),
        ("DkStreamDelete", p().dk_stream_delete(h, 0)),
        ("DkStreamGetEvent", p().dk_stream_get_event(h, &mut out)),
        (
            "DkStreamRename",
            p().dk_stream_rename(h, uri.as_ptr(), uri.len() as u64),
        ),
        (
            "DkStreamEnumerateChildren",
            p().dk_stream_enumerate_children(h, b, 512, &mut cursor),
        ),
        (
            "DkStreamAttributesQueryByHandle",
            p().dk_stream_attributes_query_by_handle(h, &mut attrs),
        ),
        ("DkObjectReference", p().dk_object_reference(h)),
        ("DkObjectClose", p().dk_object_close(h)),
    ];
    for (name, r) in checks {
        err(r, Error::BadHandle, &format!("{} with {}", name, what))?;
    }
    Ok(())
}

fn handle_zero(_: &Ctx) -> R {
    handle_calls(0, "handle 0")
}

fn handle_random(_: &Ctx) -> R {
    handle_calls(0x1234_5678_9abc_def0, "a never-issued handle")?;
    handle_calls(u64::MAX, "handle u64::MAX")
}

fn handle_closed(_: &Ctx) -> R {
    let e = notif(false)?;
    let h = e.0;
    core::mem::forget(e);
    ok(p().dk_object_close(h), "close")?;
    handle_calls(h, "a closed event handle")?;
    // A new object must not bring the old handle back to life.
    let _e2 = notif(false)?;
    err(
        p().dk_event_peek(h),
        Error::BadHandle,
        "DkEventPeek on the closed handle after a new create",
    )
}

fn handle_wrong_kind(_: &Ctx) -> R {
    let ev = notif(false)?;
    let sem = {
        let mut s = 0u64;
        ok(p().dk_semaphore_create(0, 1, &mut s), "DkSemaphoreCreate")?;
        H(s)
    };
    let null = open(
        "null:",
        access::READ | access::WRITE,
        create::OPEN_EXISTING,
        0,
    )?;
    let mut buf = [0u8; 16];
    let mut code = 0i32;
    let mut attrs = StreamAttributes::default();
    let mut out = 0u64;
    let w = Error::WrongHandleKind;
    err(
        p().dk_stream_read(ev.0, 0, buf.as_mut_ptr(), 16),
        w,
        "DkStreamRead on an event",
    )?;
    err(
        p().dk_stream_write(ev.0, 0, buf.as_ptr(), 16),
        w,
        "DkStreamWrite on an event",
    )?;
    err(
        p().dk_stream_flush(sem.0),
        w,
        "DkStreamFlush on a semaphore",
    )?;
    err(
        p().dk_stream_attributes_query_by_handle(ev.0, &mut attrs),
        w,
        "DkStreamAttributesQueryByHandle on an event",
    )?;
    err(
        p().dk_stream_get_event(sem.0, &mut out),
        w,
        "DkStreamGetEvent on a semaphore",
    )?;
    err(p().dk_event_set(sem.0), w, "DkEventSet on a semaphore")?;
    err(p().dk_event_clear(null.0), w, "DkEventClear on a stream")?;
    err(p().dk_event_peek(sem.0), w, "DkEventPeek on a semaphore")?;
    err(
        p().dk_semaphore_release(ev.0, 1),
        w,
        "DkSemaphoreRelease on an event",
    )?;
    err(
        p().dk_semaphore_peek(null.0),
        w,
        "DkSemaphorePeek on a stream",
    )?;
    err(
        p().dk_process_get_exit_code(ev.0, &mut code),
        w,
        "DkProcessGetExitCode on an event",
    )?;
    err(
        p().dk_abort_event_register(null.0),
        w,
        "DkAbortEventRegister on a stream",
    )?;
    err(
        p().dk_abort_event_register(sem.0),
        w,
        "DkAbortEventRegister on a semaphore",
    )?;
    Ok(())
}

fn object_reference_close(_: &Ctx) -> R {
    let e = notif(true)?;
    let h = e.0;
    core::mem::forget(e);
    ok(p().dk_object_reference(h), "DkObjectReference")?;
    ok(p().dk_object_close(h), "first DkObjectClose")?;
    let v = ok(
        p().dk_event_peek(h),
        "DkEventPeek after one close of two references",
    )?;
    if v != 1 {
        super::fail!("event lost its state: peek {}", v);
    }
    ok(p().dk_object_close(h), "second DkObjectClose")?;
    err(
        p().dk_event_peek(h),
        Error::BadHandle,
        "DkEventPeek after the last close",
    )?;
    err(
        p().dk_object_close(h),
        Error::BadHandle,
        "third DkObjectClose",
    )
}

fn bad_pointers(_: &Ctx) -> R {
    let freed = freed_page()?;
    let null = open(
        "null:",
        access::READ | access::WRITE,
        create::OPEN_EXISTING,
        0,
    )?;
    let ev = notif(false)?;
    let uri = "null:";
    let mut out = 0u64;
    let ba = Error::BadAddress;
    for bp in bad_ptrs(Some(freed)) {
        let at = format!("pointer {:#x}", bp);
        err(
            p().dk_debug_string_print(bp as *const u8, 8),
            ba,
            &format!("DkDebugStringPrint {}", at),
        )?;
        err(
            p().dk_random_bits_read(bp as *mut u8, 8),
            ba,
            &format!("DkRandomBitsRead {}", at),
        )?;
        err(
            p().dk_notification_event_create(0, bp as *mut u64),
            ba,
            &format!("DkNotificationEventCreate {}", at),
        )?;
        err(
            p().dk_synchronization_event_create(0, bp as *mut u64),
            ba,
            &format!("DkSynchronizationEventCreate {}", at),
        )?;
        err(
            p().dk_semaphore_create(0, 1, bp as *mut u64),
            ba,
            &format!("DkSemaphoreCreate {}", at),
        )?;
        err(
            p().dk_stream_open(
                bp as *const u8,
                5,
                access::READ,
                create::OPEN_EXISTING,
                0,
                &mut out,
            ),
            ba,
            &format!("DkStreamOpen uri {}", at),
        )?;
        err(
            p().dk_stream_open(
                uri.as_ptr(),
                uri.len() as u64,
                access::READ,
                create::OPEN_EXISTING,
                0,
                bp as *mut u64,
            ),
            ba,
            &format!("DkStreamOpen handle_out {}", at),
        )?;
        err(
            p().dk_stream_write(null.0, 0, bp as *const u8, 8),
            ba,
            &format!("DkStreamWrite {}", at),
        )?;
        err(
            p().dk_stream_read(null.0, 0, bp as *mut u8, 8),
            ba,
            &format!("DkStreamRead {}", at),
        )?;
        err(
            p().dk_stream_attributes_query_by_handle(null.0, bp as *mut StreamAttributes),
            ba,
            &format!("DkStreamAttributesQueryByHandle {}", at),
        )?;
        err(
            p().dk_stream_attributes_query(
                uri.as_ptr(),
                uri.len() as u64,
                bp as *mut StreamAttributes,
            ),
            ba,
            &format!("DkStreamAttributesQuery attrs {}", at),
        )?;
        err(
            p().dk_objects_wait_any(1, bp as *const u64, 0),
            ba,
            &format!("DkObjectsWaitAny {}", at),
        )?;
        err(
            p().dk_stream_get_event(null.0, bp as *mut u64),
            ba,
            &format!("DkStreamGetEvent {}", at),
        )?;
        err(
            p().dk_instruction_cache_flush(bp, 4096),
            ba,
            &format!("DkInstructionCacheFlush {}", at),
        )?;
    }
    // A range that starts in mapped memory and runs into freed memory.
    let a = ok(p().dk_virtual_memory_alloc(0, 8192, 3), "alloc 2 pages")?;
    ok(
        p().dk_virtual_memory_free(a + 4096, 4096),
        "free the second page",
    )?;
    let r = p().dk_random_bits_read((a + 4000) as *mut u8, 200);
    ok(p().dk_virtual_memory_free(a, 4096), "free the first page")?;
    err(r, ba, "DkRandomBitsRead straddling into freed memory")?;
    // Read-only memory is not a valid output buffer.
    let ro = ok(p().dk_virtual_memory_alloc(0, 4096, 1), "alloc R")?;
    let r = p().dk_random_bits_read(ro as *mut u8, 8);
    ok(p().dk_virtual_memory_free(ro, 4096), "free")?;
    err(r, ba, "DkRandomBitsRead into read-only memory")?;
    drop(ev);
    Ok(())
}

fn io_len_limits(_: &Ctx) -> R {
    let null = open(
        "null:",
        access::READ | access::WRITE,
        create::OPEN_EXISTING,
        0,
    )?;
    let mut buf = [0u8; 64];
    let huge = limits::MAX_IO_LEN + 1;
    let ia = Error::InvalidArgument;
    err(
        p().dk_stream_write(null.0, 0, buf.as_ptr(), huge),
        ia,
        "DkStreamWrite len > MAX_IO_LEN",
    )?;
    err(
        p().dk_stream_read(null.0, 0, buf.as_mut_ptr(), huge),
        ia,
        "DkStreamRead len > MAX_IO_LEN",
    )?;
    err(
        p().dk_random_bits_read(buf.as_mut_ptr(), huge),
        ia,
        "DkRandomBitsRead len > MAX_IO_LEN",
    )?;
    err(
        p().dk_debug_string_print(buf.as_ptr(), limits::MAX_DEBUG_STRING_LEN + 1),
        ia,
        "DkDebugStringPrint len > MAX_DEBUG_STRING_LEN",
    )?;
    err(
        p().dk_stream_write(null.0, 0, buf.as_ptr(), u64::MAX),
        ia,
        "DkStreamWrite len u64::MAX",
    )?;
    // Zero lengths are fine.
    let r = ok(
        p().dk_stream_write(null.0, 0, buf.as_ptr(), 0),
        "DkStreamWrite len 0",
    )?;
    if r != 0 {
        super::fail!("DkStreamWrite len 0 returned {}", r);
    }
    ok(
        p().dk_debug_string_print(buf.as_ptr(), 0),
        "DkDebugStringPrint len 0",
    )?;
    Ok(())
}

fn uri_len_limits(_: &Ctx) -> R {
    let long = vec![b'a'; limits::MAX_URI_LEN as usize + 8];
    let uri = b"null:";
    let mut h = 0u64;
    let mut attrs = StreamAttributes::default();
    let ia = Error::InvalidArgument;
    err(
        p().dk_stream_open(
            uri.as_ptr(),
            0,
            access::READ,
            create::OPEN_EXISTING,
            0,
            &mut h,
        ),
        ia,
        "DkStreamOpen uri_len 0",
    )?;
    err(
        p().dk_stream_open(
            long.as_ptr(),
            limits::MAX_URI_LEN + 1,
            access::READ,
            create::OPEN_EXISTING,
            0,
            &mut h,
        ),
        ia,
        "DkStreamOpen uri_len > MAX_URI_LEN",
    )?;
    // DkStreamAttributesQuery and DkStreamRename do not list
    // InvalidArgument; a malformed URI is InvalidUri there.
    err_any(
        p().dk_stream_attributes_query(uri.as_ptr(), 0, &mut attrs),
        &[Error::InvalidArgument, Error::InvalidUri],
        "DkStreamAttributesQuery uri_len 0",
    )?;
    err_any(
        p().dk_stream_attributes_query(long.as_ptr(), limits::MAX_URI_LEN + 1, &mut attrs),
        &[Error::InvalidArgument, Error::InvalidUri],
        "DkStreamAttributesQuery uri_len > MAX_URI_LEN",
    )?;
    err(
        p().dk_process_create(uri.as_ptr(), 0, core::ptr::null(), 0, &mut h),
        ia,
        "DkProcessCreate uri_len 0",
    )?;
    err(
        p().dk_process_create(
            long.as_ptr(),
            limits::MAX_URI_LEN + 1,
            core::ptr::null(),
            0,
            &mut h,
        ),
        ia,
        "DkProcessCreate uri_len > MAX_URI_LEN",
    )?;
    // Bad access / create values.
    err(
        p().dk_stream_open(uri.as_ptr(), 5, 0, create::OPEN_EXISTING, 0, &mut h),
        ia,
        "DkStreamOpen access 0",
    )?;
    err(
        p().dk_stream_open(
            uri.as_ptr(),
            5,
            access::APPEND,
            create::OPEN_EXISTING,
            0,
            &mut h,
        ),
        ia,
        "DkStreamOpen access APPEND alone",
    )?;
    err(
        p().dk_stream_open(uri.as_ptr(), 5, access::READ, 9, 0, &mut h),
        ia,
        "DkStreamOpen create 9",
    )?;
    Ok(())
}
