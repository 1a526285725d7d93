//! The generated `pal/src/abi.rs` on its own: layouts, errors, and the
//! adapters table <-> trait forward every call with its arguments intact.
//!
//! The methods below follow the 1.0 call list; a new call needs a method here.

#![allow(
    clippy::too_many_arguments,
    clippy::not_unsafe_ptr_arg_deref,
    clippy::unnecessary_cast,
    clippy::manual_dangling_ptr,
    clippy::identity_op,
    clippy::precedence
)]

#[path = "../../pal/src/abi.rs"]
#[allow(dead_code)]
mod abi;
#[path = "../../pal/src/table.rs"]
#[allow(dead_code)]
mod table;

use abi::*;
use core::mem::{offset_of, size_of};
use table::TablePal;

/// Anything that can be summed to check that arguments arrive unchanged.
trait Arg {
    fn val(self) -> i64;
}
macro_rules! int_arg {
    ($($t:ty),*) => { $(impl Arg for $t { fn val(self) -> i64 { self as i64 } })* };
}
int_arg!(u32, i32, u64, i64);
impl<T> Arg for *const T {
    fn val(self) -> i64 {
        self as usize as i64
    }
}
impl<T> Arg for *mut T {
    fn val(self) -> i64 {
        self as usize as i64
    }
}
fn v(a: impl Arg) -> i64 {
    a.val()
}

/// Returns `number << 32` plus the sum of its arguments.
struct Echo;

impl Pal for Echo {
    fn dk_virtual_memory_alloc(&self, addr: u64, size: u64, prot: u32) -> i64 {
        ((nr::DK_VIRTUAL_MEMORY_ALLOC as i64) << 32) + v(addr) + v(size) + v(prot)
    }

    fn dk_virtual_memory_free(&self, addr: u64, size: u64) -> i64 {
        ((nr::DK_VIRTUAL_MEMORY_FREE as i64) << 32) + v(addr) + v(size)
    }

    fn dk_virtual_memory_protect(&self, addr: u64, size: u64, prot: u32) -> i64 {
        ((nr::DK_VIRTUAL_MEMORY_PROTECT as i64) << 32) + v(addr) + v(size) + v(prot)
    }

    fn dk_thread_create(&self, entry: u64, param: u64, thread: *mut u64) -> i64 {
        ((nr::DK_THREAD_CREATE as i64) << 32) + v(entry) + v(param) + v(thread)
    }

    fn dk_thread_delay_execution(&self, micros: u64) -> i64 {
        ((nr::DK_THREAD_DELAY_EXECUTION as i64) << 32) + v(micros)
    }

    fn dk_thread_yield_execution(&self) -> i64 {
        (nr::DK_THREAD_YIELD_EXECUTION as i64) << 32
    }

    fn dk_thread_exit(&self, code: i32) -> ! {
        let _ = (code,);
        panic!("DkThreadExit is not called by this test")
    }

    fn dk_thread_get_parameter(&self) -> i64 {
        (nr::DK_THREAD_GET_PARAMETER as i64) << 32
    }

    fn dk_thread_raise_exception(&self, code: u32, arg: u64) -> i64 {
        ((nr::DK_THREAD_RAISE_EXCEPTION as i64) << 32) + v(code) + v(arg)
    }

    fn dk_notification_event_create(&self, initial: u32, event: *mut u64) -> i64 {
        ((nr::DK_NOTIFICATION_EVENT_CREATE as i64) << 32) + v(initial) + v(event)
    }

    fn dk_synchronization_event_create(&self, initial: u32, event: *mut u64) -> i64 {
        ((nr::DK_SYNCHRONIZATION_EVENT_CREATE as i64) << 32) + v(initial) + v(event)
    }

    fn dk_semaphore_create(&self, initial: u32, max: u32, semaphore: *mut u64) -> i64 {
        ((nr::DK_SEMAPHORE_CREATE as i64) << 32) + v(initial) + v(max) + v(semaphore)
    }

    fn dk_semaphore_release(&self, semaphore: u64, count: u32) -> i64 {
        ((nr::DK_SEMAPHORE_RELEASE as i64) << 32) + v(semaphore) + v(count)
    }

    fn dk_semaphore_peek(&self, semaphore: u64) -> i64 {
        ((nr::DK_SEMAPHORE_PEEK as i64) << 32) + v(semaphore)
    }

    fn dk_event_set(&self, event: u64) -> i64 {
        ((nr::DK_EVENT_SET as i64) << 32) + v(event)
    }

    fn dk_event_clear(&self, event: u64) -> i64 {
        ((nr::DK_EVENT_CLEAR as i64) << 32) + v(event)
    }

    fn dk_event_peek(&self, event: u64) -> i64 {
        ((nr::DK_EVENT_PEEK as i64) << 32) + v(event)
    }

    fn dk_objects_wait_any(&self, count: u32, handles: *const u64, timeout_micros: i64) -> i64 {
        ((nr::DK_OBJECTS_WAIT_ANY as i64) << 32) + v(count) + v(handles) + v(timeout_micros)
    }

    fn dk_abort_event_register(&self, event: u64) -> i64 {
        ((nr::DK_ABORT_EVENT_REGISTER as i64) << 32) + v(event)
    }

    fn dk_process_create(
        &self,
        uri: *const u8,
        uri_len: u64,
        args: *const u8,
        args_len: u64,
        process: *mut u64,
    ) -> i64 {
        ((nr::DK_PROCESS_CREATE as i64) << 32)
            + v(uri)
            + v(uri_len)
            + v(args)
            + v(args_len)
            + v(process)
    }

    fn dk_process_get_exit_code(&self, process: u64, code: *mut i32) -> i64 {
        ((nr::DK_PROCESS_GET_EXIT_CODE as i64) << 32) + v(process) + v(code)
    }

    fn dk_process_exit(&self, code: i32) -> ! {
        let _ = (code,);
        panic!("DkProcessExit is not called by this test")
    }

    fn dk_stream_open(
        &self,
        uri: *const u8,
        uri_len: u64,
        access: u32,
        create: u32,
        options: u32,
        stream: *mut u64,
    ) -> i64 {
        ((nr::DK_STREAM_OPEN as i64) << 32)
            + v(uri)
            + v(uri_len)
            + v(access)
            + v(create)
            + v(options)
            + v(stream)
    }

    fn dk_stream_read(&self, stream: u64, offset: u64, buf: *mut u8, len: u64) -> i64 {
        ((nr::DK_STREAM_READ as i64) << 32) + v(stream) + v(offset) + v(buf) + v(len)
    }

    fn dk_stream_write(&self, stream: u64, offset: u64, buf: *const u8, len: u64) -> i64 {
        ((nr::DK_STREAM_WRITE as i64) << 32) + v(stream) + v(offset) + v(buf) + v(len)
    }

    fn dk_stream_map(&self, stream: u64, addr: u64, prot: u32, offset: u64, size: u64) -> i64 {
        ((nr::DK_STREAM_MAP as i64) << 32) + v(stream) + v(addr) + v(prot) + v(offset) + v(size)
    }

    fn dk_stream_map_pe_binary(&self, stream: u64, info: *mut ImageInfo) -> i64 {
        ((nr::DK_STREAM_MAP_PE_BINARY as i64) << 32) + v(stream) + v(info)
    }

    fn dk_stream_unmap(&self, addr: u64, size: u64) -> i64 {
        ((nr::DK_STREAM_UNMAP as i64) << 32) + v(addr) + v(size)
    }

    fn dk_stream_set_length(&self, stream: u64, length: u64) -> i64 {
        ((nr::DK_STREAM_SET_LENGTH as i64) << 32) + v(stream) + v(length)
    }

    fn dk_stream_flush(&self, stream: u64) -> i64 {
        ((nr::DK_STREAM_FLUSH as i64) << 32) + v(stream)
    }

    fn dk_stream_delete(&self, stream: u64, which: u32) -> i64 {
        ((nr::DK_STREAM_DELETE as i64) << 32) + v(stream) + v(which)
    }

    fn dk_stream_get_event(&self, stream: u64, event: *mut u64) -> i64 {
        ((nr::DK_STREAM_GET_EVENT as i64) << 32) + v(stream) + v(event)
    }

    fn dk_stream_rename(&self, stream: u64, new_uri: *const u8, new_uri_len: u64) -> i64 {
        ((nr::DK_STREAM_RENAME as i64) << 32) + v(stream) + v(new_uri) + v(new_uri_len)
    }

    fn dk_stream_enumerate_children(
        &self,
        stream: u64,
        buf: *mut u8,
        len: u64,
        cursor: *mut u64,
    ) -> i64 {
        ((nr::DK_STREAM_ENUMERATE_CHILDREN as i64) << 32) + v(stream) + v(buf) + v(len) + v(cursor)
    }

    fn dk_stream_attributes_query(
        &self,
        uri: *const u8,
        uri_len: u64,
        attrs: *mut StreamAttributes,
    ) -> i64 {
        ((nr::DK_STREAM_ATTRIBUTES_QUERY as i64) << 32) + v(uri) + v(uri_len) + v(attrs)
    }

    fn dk_stream_attributes_query_by_handle(
        &self,
        stream: u64,
        attrs: *mut StreamAttributes,
    ) -> i64 {
        ((nr::DK_STREAM_ATTRIBUTES_QUERY_BY_HANDLE as i64) << 32) + v(stream) + v(attrs)
    }

    fn dk_system_time_query(&self) -> i64 {
        (nr::DK_SYSTEM_TIME_QUERY as i64) << 32
    }

    fn dk_random_bits_read(&self, buf: *mut u8, len: u64) -> i64 {
        ((nr::DK_RANDOM_BITS_READ as i64) << 32) + v(buf) + v(len)
    }

    fn dk_instruction_cache_flush(&self, addr: u64, size: u64) -> i64 {
        ((nr::DK_INSTRUCTION_CACHE_FLUSH as i64) << 32) + v(addr) + v(size)
    }

    fn dk_object_reference(&self, object: u64) -> i64 {
        ((nr::DK_OBJECT_REFERENCE as i64) << 32) + v(object)
    }

    fn dk_object_close(&self, object: u64) -> i64 {
        ((nr::DK_OBJECT_CLOSE as i64) << 32) + v(object)
    }

    fn dk_input_event_read(&self, buf: *mut u8, len: u64) -> i64 {
        ((nr::DK_INPUT_EVENT_READ as i64) << 32) + v(buf) + v(len)
    }

    fn dk_frame_buffer_export(&self, addr: u64, width: u32, height: u32) -> i64 {
        ((nr::DK_FRAME_BUFFER_EXPORT as i64) << 32) + v(addr) + v(width) + v(height)
    }

    fn dk_frame_buffer_notify_update(&self, x: u32, y: u32, width: u32, height: u32) -> i64 {
        ((nr::DK_FRAME_BUFFER_NOTIFY_UPDATE as i64) << 32) + v(x) + v(y) + v(width) + v(height)
    }

    fn dk_debug_string_print(&self, msg: *const u8, len: u64) -> i64 {
        ((nr::DK_DEBUG_STRING_PRINT as i64) << 32) + v(msg) + v(len)
    }
}

static ECHO: Echo = Echo;

#[test]
fn table_from_and_table_pal_forward_every_call() {
    let table: &'static PalTable = Box::leak(Box::new(table_from(&ECHO)));
    assert_eq!(table.abi_version, ABI_VERSION);
    assert_eq!(table.num_calls, NUM_CALLS);
    // SAFETY: the table is leaked, so it outlives `p`.
    let p = unsafe { TablePal::new(table) };
    assert_eq!(p.table(), table as *const PalTable);
    assert_eq!(
        p.dk_virtual_memory_alloc(1 as u64, 2 as u64, 3 as u32),
        (1 << 32) + 6
    );
    assert_eq!(p.dk_virtual_memory_free(1 as u64, 2 as u64), (2 << 32) + 3);
    assert_eq!(
        p.dk_virtual_memory_protect(1 as u64, 2 as u64, 3 as u32),
        (3 << 32) + 6
    );
    assert_eq!(
        p.dk_thread_create(1 as u64, 2 as u64, 3 as *mut u64),
        (4 << 32) + 6
    );
    assert_eq!(p.dk_thread_delay_execution(1 as u64), (5 << 32) + 1);
    assert_eq!(p.dk_thread_yield_execution(), (6 << 32) + 0);
    assert_eq!(p.dk_thread_get_parameter(), (8 << 32) + 0);
    assert_eq!(
        p.dk_thread_raise_exception(1 as u32, 2 as u64),
        (9 << 32) + 3
    );
    assert_eq!(
        p.dk_notification_event_create(1 as u32, 2 as *mut u64),
        (10 << 32) + 3
    );
    assert_eq!(
        p.dk_synchronization_event_create(1 as u32, 2 as *mut u64),
        (11 << 32) + 3
    );
    assert_eq!(
        p.dk_semaphore_create(1 as u32, 2 as u32, 3 as *mut u64),
        (12 << 32) + 6
    );
    assert_eq!(p.dk_semaphore_release(1 as u64, 2 as u32), (13 << 32) + 3);
    assert_eq!(p.dk_semaphore_peek(1 as u64), (14 << 32) + 1);
    assert_eq!(p.dk_event_set(1 as u64), (15 << 32) + 1);
    assert_eq!(p.dk_event_clear(1 as u64), (16 << 32) + 1);
    assert_eq!(p.dk_event_peek(1 as u64), (17 << 32) + 1);
    assert_eq!(
        p.dk_objects_wait_any(1 as u32, 2 as *const u64, 3 as i64),
        (18 << 32) + 6
    );
    assert_eq!(p.dk_abort_event_register(1 as u64), (19 << 32) + 1);
    assert_eq!(
        p.dk_process_create(
            1 as *const u8,
            2 as u64,
            3 as *const u8,
            4 as u64,
            5 as *mut u64
        ),
        (20 << 32) + 15
    );
    assert_eq!(
        p.dk_process_get_exit_code(1 as u64, 2 as *mut i32),
        (21 << 32) + 3
    );
    assert_eq!(
        p.dk_stream_open(
            1 as *const u8,
            2 as u64,
            3 as u32,
            4 as u32,
            5 as u32,
            6 as *mut u64
        ),
        (23 << 32) + 21
    );
    assert_eq!(
        p.dk_stream_read(1 as u64, 2 as u64, 3 as *mut u8, 4 as u64),
        (24 << 32) + 10
    );
    assert_eq!(
        p.dk_stream_write(1 as u64, 2 as u64, 3 as *const u8, 4 as u64),
        (25 << 32) + 10
    );
    assert_eq!(
        p.dk_stream_map(1 as u64, 2 as u64, 3 as u32, 4 as u64, 5 as u64),
        (26 << 32) + 15
    );
    assert_eq!(
        p.dk_stream_map_pe_binary(1 as u64, 2 as *mut ImageInfo),
        (27 << 32) + 3
    );
    assert_eq!(p.dk_stream_unmap(1 as u64, 2 as u64), (28 << 32) + 3);
    assert_eq!(p.dk_stream_set_length(1 as u64, 2 as u64), (29 << 32) + 3);
    assert_eq!(p.dk_stream_flush(1 as u64), (30 << 32) + 1);
    assert_eq!(p.dk_stream_delete(1 as u64, 2 as u32), (31 << 32) + 3);
    assert_eq!(
        p.dk_stream_get_event(1 as u64, 2 as *mut u64),
        (32 << 32) + 3
    );
    assert_eq!(
        p.dk_stream_rename(1 as u64, 2 as *const u8, 3 as u64),
        (33 << 32) + 6
    );
    assert_eq!(
        p.dk_stream_enumerate_children(1 as u64, 2 as *mut u8, 3 as u64, 4 as *mut u64),
        (34 << 32) + 10
    );
    assert_eq!(
        p.dk_stream_attributes_query(1 as *const u8, 2 as u64, 3 as *mut StreamAttributes),
        (35 << 32) + 6
    );
    assert_eq!(
        p.dk_stream_attributes_query_by_handle(1 as u64, 2 as *mut StreamAttributes),
        (36 << 32) + 3
    );
    assert_eq!(p.dk_system_time_query(), (37 << 32) + 0);
    assert_eq!(
        p.dk_random_bits_read(1 as *mut u8, 2 as u64),
        (38 << 32) + 3
    );
    assert_eq!(
        p.dk_instruction_cache_flush(1 as u64, 2 as u64),
        (39 << 32) + 3
    );
    assert_eq!(p.dk_object_reference(1 as u64), (40 << 32) + 1);
    assert_eq!(p.dk_object_close(1 as u64), (41 << 32) + 1);
    assert_eq!(
        p.dk_input_event_read(1 as *mut u8, 2 as u64),
        (42 << 32) + 3
    );
    assert_eq!(
        p.dk_frame_buffer_export(1 as u64, 2 as u32, 3 as u32),
        (43 << 32) + 6
    );
    assert_eq!(
        p.dk_frame_buffer_notify_update(1 as u32, 2 as u32, 3 as u32, 4 as u32),
        (44 << 32) + 10
    );
    assert_eq!(
        p.dk_debug_string_print(1 as *const u8, 2 as u64),
        (45 << 32) + 3
    );
}

#[test]
fn layouts() {
    assert_eq!(size_of::<PalTable>(), 8 + 8 + NUM_CALLS as usize * 8);
    assert_eq!(offset_of!(PalTable, ctx), 8);
    assert_eq!(offset_of!(PalTable, dk_virtual_memory_alloc), 16);
    assert_eq!(offset_of!(PalTable, dk_debug_string_print), 16 + 44 * 8);
    assert_eq!(size_of::<StreamAttributes>(), 48);
    assert_eq!(offset_of!(StreamAttributes, size), 16);
    assert_eq!(offset_of!(StreamAttributes, dev_io_base), 32);
    assert_eq!(size_of::<ImageInfo>(), 24);
    assert_eq!(size_of::<ExceptionInfo>(), 40);
    assert_eq!(offset_of!(ExceptionInfo, fault_addr), 8);
    assert_eq!(size_of::<StartupBlock>(), 64);
    assert_eq!(offset_of!(StartupBlock, table), 16);
    assert_eq!(offset_of!(StartupBlock, exception_upcall), 48);
}

#[test]
fn errors_and_names() {
    assert_eq!(
        ABI_VERSION,
        (u32::from(ABI_VERSION_MAJOR) << 16) | u32::from(ABI_VERSION_MINOR)
    );
    let spec = moat_abi_spec::spec();
    assert_eq!(CALL_NAMES.len(), spec.calls.len());
    for (name, c) in CALL_NAMES.iter().zip(&spec.calls) {
        assert_eq!(*name, c.name);
    }
    assert_eq!(Error::ALL.len(), spec.errors.len());
    for (e, d) in Error::ALL.iter().zip(&spec.errors) {
        assert_eq!(e.name(), d.name);
        assert_eq!(e.description(), d.doc);
        assert_eq!(e.code(), -i64::from(d.code));
        assert_eq!(Error::from_code(e.code()), Some(*e));
        assert_eq!(format!("{e}"), format!("{}: {}", d.name, d.doc));
    }
    assert_eq!(Error::from_code(0), None);
    assert_eq!(Error::from_code(1), None);
    assert_eq!(Error::InvalidArgument.code(), -1);
    assert_eq!(prot::READ | prot::WRITE | prot::EXEC, 7);
    assert_eq!(timeout::INFINITE, -1i64);
    assert_eq!(limits::MAX_URI_LEN, 4096);
    assert_eq!(nr::DK_DEBUG_STRING_PRINT, NUM_CALLS);
    assert_eq!(STARTUP_MAGIC, u64::from(u32::from_le_bytes(*b"MOAT")));
}
