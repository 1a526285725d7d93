//! The ABI calls as libos uses them.
//!
//! [`calls`] is generated from `abi-spec/abi.toml`: one `unsafe fn` per call
//! that calls the host's function table with the spec's argument types and
//! returns the raw `i64`. The functions here wrap those: slices for buffers,
//! `Result` (by [`moat_pal::decode`]) for the outcome, values for
//! out-pointers. Handles stay plain `u64`s here; the owning types live in
//! [`crate::stream`], [`crate::sync`], [`crate::thread`], [`crate::process`].
//!
//! Lengths longer than the ABI allows are passed through as they are, so the
//! host refuses them (this module does not split I/O; [`crate::stream`] does).
use moat_pal::{decode, ImageInfo, StreamAttributes};

use crate::Result;

pub mod calls;

fn zeroed_attrs() -> StreamAttributes {
    // SAFETY: StreamAttributes is a repr(C) struct of integers; all zeroes is valid.
    unsafe { core::mem::zeroed() }
}

// ------------------------------------------------------------------ memory

/// DkVirtualMemoryAlloc: returns the address.
pub fn virtual_memory_alloc(addr: u64, size: u64, prot: u32) -> Result<u64> {
    // SAFETY: value arguments only; the host refuses an `addr` whose range is in use.
    decode(unsafe { calls::dk_virtual_memory_alloc(addr, size, prot) })
}

/// DkVirtualMemoryFree.
///
/// # Safety
/// Nothing may use the memory afterwards.
pub unsafe fn virtual_memory_free(addr: u64, size: u64) -> Result<u64> {
    // SAFETY: this function's contract (# Safety above).
    decode(unsafe { calls::dk_virtual_memory_free(addr, size) })
}

/// DkVirtualMemoryProtect.
///
/// # Safety
/// Nothing may access the memory in a way the new protection forbids.
pub unsafe fn virtual_memory_protect(addr: u64, size: u64, prot: u32) -> Result<u64> {
    // SAFETY: this function's contract (# Safety above).
    decode(unsafe { calls::dk_virtual_memory_protect(addr, size, prot) })
}

// ------------------------------------------------------------------ threads

/// DkThreadCreate: returns the thread handle.
///
/// # Safety
/// `entry` must be the address of an `extern "C" fn(u64) -> !` that knows
/// what to do with `param`.
pub unsafe fn thread_create(entry: u64, param: u64) -> Result<u64> {
    let mut h = 0u64;
    // SAFETY: `h` is a writable local; `entry` and `param` are this function's contract.
    decode(unsafe { calls::dk_thread_create(entry, param, &mut h) })?;
    Ok(h)
}

/// DkThreadDelayExecution.
pub fn thread_delay_execution(micros: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_thread_delay_execution(micros) })
}

/// DkThreadYieldExecution.
pub fn thread_yield_execution() -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_thread_yield_execution() })
}

/// DkThreadExit.
pub fn thread_exit(code: i32) -> ! {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    unsafe { calls::dk_thread_exit(code) }
}

/// DkThreadGetParameter.
pub fn thread_get_parameter() -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_thread_get_parameter() })
}

/// DkThreadRaiseException: returns the handler's disposition.
pub fn thread_raise_exception(code: u32, arg: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_thread_raise_exception(code, arg) })
}

// ------------------------------------------------------------------ sync

/// DkNotificationEventCreate: returns the event handle.
pub fn notification_event_create(initial: bool) -> Result<u64> {
    let mut h = 0u64;
    // SAFETY: the out-pointer is a writable local of its type.
    decode(unsafe { calls::dk_notification_event_create(initial as u32, &mut h) })?;
    Ok(h)
}

/// DkSynchronizationEventCreate: returns the event handle.
pub fn synchronization_event_create(initial: bool) -> Result<u64> {
    let mut h = 0u64;
    // SAFETY: the out-pointer is a writable local of its type.
    decode(unsafe { calls::dk_synchronization_event_create(initial as u32, &mut h) })?;
    Ok(h)
}

/// DkSemaphoreCreate: returns the semaphore handle.
pub fn semaphore_create(initial: u32, max: u32) -> Result<u64> {
    let mut h = 0u64;
    // SAFETY: the out-pointer is a writable local of its type.
    decode(unsafe { calls::dk_semaphore_create(initial, max, &mut h) })?;
    Ok(h)
}

/// DkSemaphoreRelease: returns the count before the release.
pub fn semaphore_release(sem: u64, count: u32) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_semaphore_release(sem, count) })
}

/// DkSemaphorePeek: returns the count.
pub fn semaphore_peek(sem: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_semaphore_peek(sem) })
}

/// DkEventSet.
pub fn event_set(ev: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_event_set(ev) })
}

/// DkEventClear.
pub fn event_clear(ev: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_event_clear(ev) })
}

/// DkEventPeek: whether the event is set.
pub fn event_peek(ev: u64) -> Result<bool> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    Ok(decode(unsafe { calls::dk_event_peek(ev) })? != 0)
}

/// DkObjectsWaitAny: returns the index of the signalled object.
pub fn objects_wait_any(handles: &[u64], timeout_micros: i64) -> Result<usize> {
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    let n = decode(unsafe {
        calls::dk_objects_wait_any(handles.len() as u32, handles.as_ptr(), timeout_micros)
    })?;
    Ok(n as usize)
}

/// DkAbortEventRegister (0 unregisters).
pub fn abort_event_register(ev: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_abort_event_register(ev) })
}

// ------------------------------------------------------------------ process

/// DkProcessCreate: `args` are the NUL-terminated arguments after the image
/// name. Returns the process handle.
pub fn process_create(uri: &str, args: &[u8]) -> Result<u64> {
    let mut h = 0u64;
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    decode(unsafe {
        calls::dk_process_create(
            uri.as_ptr(),
            uri.len() as u64,
            args.as_ptr(),
            args.len() as u64,
            &mut h,
        )
    })?;
    Ok(h)
}

/// DkProcessGetExitCode.
pub fn process_get_exit_code(process: u64) -> Result<i32> {
    let mut code = 0i32;
    // SAFETY: the out-pointer is a writable local of its type.
    decode(unsafe { calls::dk_process_get_exit_code(process, &mut code) })?;
    Ok(code)
}

/// DkProcessExit (without flushing stdout; see [`crate::process::exit`]).
pub fn process_exit(code: i32) -> ! {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    unsafe { calls::dk_process_exit(code) }
}

// ------------------------------------------------------------------ streams

/// DkStreamOpen: returns the stream handle.
pub fn stream_open(uri: &str, access: u32, create: u32, options: u32) -> Result<u64> {
    let mut h = 0u64;
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    decode(unsafe {
        calls::dk_stream_open(
            uri.as_ptr(),
            uri.len() as u64,
            access,
            create,
            options,
            &mut h,
        )
    })?;
    Ok(h)
}

/// DkStreamRead: returns the bytes read (0 at end of stream).
pub fn stream_read(stream: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    Ok(
        decode(unsafe {
            calls::dk_stream_read(stream, offset, buf.as_mut_ptr(), buf.len() as u64)
        })? as usize,
    )
}

/// DkStreamWrite: returns the bytes written.
pub fn stream_write(stream: u64, offset: u64, buf: &[u8]) -> Result<usize> {
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    Ok(
        decode(unsafe { calls::dk_stream_write(stream, offset, buf.as_ptr(), buf.len() as u64) })?
            as usize,
    )
}

/// DkStreamMap: returns the address of the mapping.
pub fn stream_map(stream: u64, addr: u64, prot: u32, offset: u64, size: u64) -> Result<u64> {
    // SAFETY: value arguments only; the host refuses an `addr` whose range is in use.
    decode(unsafe { calls::dk_stream_map(stream, addr, prot, offset, size) })
}

/// DkStreamMapPeBinary.
pub fn stream_map_pe_binary(stream: u64) -> Result<ImageInfo> {
    // SAFETY: ImageInfo is a repr(C) struct of integers.
    let mut info: ImageInfo = unsafe { core::mem::zeroed() };
    // SAFETY: the out-pointer is a writable local of its type.
    decode(unsafe { calls::dk_stream_map_pe_binary(stream, &mut info) })?;
    Ok(info)
}

/// DkStreamUnmap.
///
/// # Safety
/// Nothing may use the mapping afterwards.
pub unsafe fn stream_unmap(addr: u64, size: u64) -> Result<u64> {
    // SAFETY: this function's contract (# Safety above).
    decode(unsafe { calls::dk_stream_unmap(addr, size) })
}

/// DkStreamSetLength.
pub fn stream_set_length(stream: u64, length: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_stream_set_length(stream, length) })
}

/// DkStreamFlush.
pub fn stream_flush(stream: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_stream_flush(stream) })
}

/// DkStreamDelete (`which`: a `moat_pal::delete` value).
pub fn stream_delete(stream: u64, which: u32) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_stream_delete(stream, which) })
}

/// DkStreamGetEvent: returns the event handle.
pub fn stream_get_event(stream: u64) -> Result<u64> {
    let mut h = 0u64;
    // SAFETY: the out-pointer is a writable local of its type.
    decode(unsafe { calls::dk_stream_get_event(stream, &mut h) })?;
    Ok(h)
}

/// DkStreamRename.
pub fn stream_rename(stream: u64, new_uri: &str) -> Result<u64> {
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    decode(unsafe { calls::dk_stream_rename(stream, new_uri.as_ptr(), new_uri.len() as u64) })
}

/// DkStreamEnumerateChildren: fills `buf`, advances `cursor`, returns the
/// bytes written (0 at the end).
pub fn stream_enumerate_children(stream: u64, buf: &mut [u8], cursor: &mut u64) -> Result<usize> {
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    Ok(decode(unsafe {
        calls::dk_stream_enumerate_children(stream, buf.as_mut_ptr(), buf.len() as u64, cursor)
    })? as usize)
}

/// DkStreamAttributesQuery.
pub fn stream_attributes_query(uri: &str) -> Result<StreamAttributes> {
    let mut a = zeroed_attrs();
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    decode(unsafe { calls::dk_stream_attributes_query(uri.as_ptr(), uri.len() as u64, &mut a) })?;
    Ok(a)
}

/// DkStreamAttributesQueryByHandle.
pub fn stream_attributes_query_by_handle(stream: u64) -> Result<StreamAttributes> {
    let mut a = zeroed_attrs();
    // SAFETY: the out-pointer is a writable local of its type.
    decode(unsafe { calls::dk_stream_attributes_query_by_handle(stream, &mut a) })?;
    Ok(a)
}

// ------------------------------------------------------------------ other

/// DkSystemTimeQuery: microseconds since the Unix epoch.
pub fn system_time_query() -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_system_time_query() })
}

/// DkRandomBitsRead: fills `buf`.
pub fn random_bits_read(buf: &mut [u8]) -> Result<usize> {
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    Ok(decode(unsafe { calls::dk_random_bits_read(buf.as_mut_ptr(), buf.len() as u64) })? as usize)
}

/// DkInstructionCacheFlush.
pub fn instruction_cache_flush(addr: u64, size: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_instruction_cache_flush(addr, size) })
}

/// DkObjectReference.
pub fn object_reference(object: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_object_reference(object) })
}

/// DkObjectClose.
pub fn object_close(object: u64) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_object_close(object) })
}

/// DkInputEventRead: returns the bytes read.
pub fn input_event_read(buf: &mut [u8]) -> Result<usize> {
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    Ok(decode(unsafe { calls::dk_input_event_read(buf.as_mut_ptr(), buf.len() as u64) })? as usize)
}

/// DkFrameBufferExport.
pub fn frame_buffer_export(addr: u64, width: u32, height: u32) -> Result<u64> {
    // SAFETY: value arguments only; the host only reads the memory at `addr` (checked).
    decode(unsafe { calls::dk_frame_buffer_export(addr, width, height) })
}

/// DkFrameBufferNotifyUpdate.
pub fn frame_buffer_notify_update(x: u32, y: u32, width: u32, height: u32) -> Result<u64> {
    // SAFETY: value arguments only, and the call changes no memory the guest uses.
    decode(unsafe { calls::dk_frame_buffer_notify_update(x, y, width, height) })
}

/// DkDebugStringPrint.
pub fn debug_string_print(msg: &[u8]) -> Result<u64> {
    // SAFETY: pointers and lengths come from live slices (out-values from `&mut`s).
    decode(unsafe { calls::dk_debug_string_print(msg.as_ptr(), msg.len() as u64) })
}
