//! The KVM PAL: the ABI for a picoprocess in a micro-VM.
//!
//! Guest RAM sits at the same address in the VMM as in the guest, so a
//! guest pointer, once the region map has checked it, is a VMM pointer:
//! everything that is not about the guest's address space or its threads
//! is the same code as host-linux's ([`LinuxPal`]: handles, sync objects,
//! waits, streams brokered by the monitor, child processes, time, random).
//! Here: memory (placed inside guest RAM), threads (vCPUs), and devices
//! (`dev:` streams). Exits and raised exceptions need the vCPU and are
//! handled by its loop (see [`crate::pico`]).
//!
//! The PAL knows the VM only as data (where guest RAM ends, its devices)
//! and as a [`SpawnThread`], which the VM implements: it does not depend
//! on the VM's code, the VM's vCPU loop depends on it.
use crate::devices::DeviceSet;
use crate::guest_thread::{thread_object, thread_param};
use crate::layout::RAM_START;
use moat_host_common::objects::Object;
use moat_host_common::pal::LinuxPal;
use moat_host_common::sys;
use moat_pal::uri::Uri;
use moat_pal::{prot, Error, ImageInfo, Pal, StreamAttributes};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What the PAL needs of the VM it serves: starting guest threads.
pub trait SpawnThread: Send + Sync {
    /// Start a guest thread: a vCPU at `entry` with `arg` as its first
    /// argument and `param` as its DkThreadGetParameter, run by a new VMM
    /// thread whose ABI calls go to `pal`. `done` is signalled when it
    /// ends.
    fn spawn_thread(
        self: Arc<Self>,
        pal: Arc<KvmPal>,
        entry: u64,
        arg: u64,
        param: u64,
        done: Option<Arc<Object>>,
    ) -> Result<(), Error>;
}

#[derive(Clone)]
pub struct KvmPal {
    pub lin: &'static LinuxPal,
    /// Where guest RAM ends (the VMM's task-state area starts there).
    pub ram_end: u64,
    pub devices: Arc<DeviceSet>,
    /// The VM, to start threads on.
    pub vm: Arc<dyn SpawnThread>,
}

macro_rules! forward {
    ($($name:ident($($a:ident: $t:ty),*);)*) => {$(
        fn $name(&self, $($a: $t),*) -> i64 {
            self.lin.$name($($a),*)
        }
    )*};
}

impl KvmPal {
    /// Where a new region of `size` bytes goes when the guest leaves the
    /// address to the host: the lowest free range of guest RAM.
    fn place(&self, size: u64) -> Option<u64> {
        self.lin
            .regions
            .read()
            .unwrap()
            .find_free(size, RAM_START, self.ram_end)
    }

    /// Run `f` at a host-chosen address inside guest RAM; a racing thread
    /// may take the range first, so try a few times.
    fn placed(&self, size: u64, f: impl Fn(u64) -> i64) -> i64 {
        if size == 0 || !size.is_multiple_of(0x1000) {
            return f(0);
        }
        for _ in 0..8 {
            let Some(at) = self.place(size) else {
                return Error::NoMemory.code();
            };
            let r = f(at);
            if r != Error::AlreadyExists.code() {
                return r;
            }
        }
        Error::NoMemory.code()
    }
}

impl Pal for KvmPal {
    fn dk_virtual_memory_alloc(&self, addr: u64, size: u64, p: u32) -> i64 {
        if addr != 0 {
            return self.lin.dk_virtual_memory_alloc(addr, size, p);
        }
        if size > self.lin.mem_limit {
            return Error::NoMemory.code();
        }
        self.placed(size, |at| self.lin.dk_virtual_memory_alloc(at, size, p))
    }

    fn dk_stream_map(&self, stream: u64, addr: u64, p: u32, offset: u64, size: u64) -> i64 {
        if let Some(r) = self
            .devices
            .stream_map(self.lin, stream, addr, p, offset, size)
        {
            return r;
        }
        if addr != 0 {
            return self.lin.dk_stream_map(stream, addr, p, offset, size);
        }
        if size > self.lin.mem_limit {
            return Error::NoMemory.code();
        }
        self.placed(size, |at| {
            self.lin.dk_stream_map(stream, at, p, offset, size)
        })
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
        // Devices are the VMM's; every other scheme is brokered as on linux.
        match self.lin.uri_in(uri as u64, uri_len) {
            Ok(Uri::Dev(name)) => {
                self.devices
                    .open(self.lin, &name, access, create, options, stream as u64)
            }
            _ => self
                .lin
                .dk_stream_open(uri, uri_len, access, create, options, stream),
        }
    }

    fn dk_stream_attributes_query_by_handle(
        &self,
        stream: u64,
        attrs: *mut StreamAttributes,
    ) -> i64 {
        if let Some(r) = self.devices.attributes(self.lin, stream, attrs as u64) {
            return r;
        }
        self.lin.dk_stream_attributes_query_by_handle(stream, attrs)
    }

    fn dk_stream_attributes_query(
        &self,
        uri: *const u8,
        uri_len: u64,
        attrs: *mut StreamAttributes,
    ) -> i64 {
        match self.lin.uri_in(uri as u64, uri_len) {
            Ok(Uri::Dev(name)) => self
                .devices
                .attributes_by_name(self.lin, &name, attrs as u64),
            _ => self.lin.dk_stream_attributes_query(uri, uri_len, attrs),
        }
    }

    fn dk_stream_get_event(&self, stream: u64, event: *mut u64) -> i64 {
        if let Some(r) = self.devices.event(self.lin, stream, event as u64) {
            return r;
        }
        self.lin.dk_stream_get_event(stream, event)
    }

    fn dk_stream_read(&self, stream: u64, offset: u64, buf: *mut u8, len: u64) -> i64 {
        if self.devices.is_device(self.lin, stream) {
            return Error::NotSupported.code();
        }
        self.lin.dk_stream_read(stream, offset, buf, len)
    }

    fn dk_stream_write(&self, stream: u64, offset: u64, buf: *const u8, len: u64) -> i64 {
        if self.devices.is_device(self.lin, stream) {
            return Error::NotSupported.code();
        }
        self.lin.dk_stream_write(stream, offset, buf, len)
    }

    fn dk_stream_unmap(&self, addr: u64, size: u64) -> i64 {
        if let Some(r) = self.devices.unmap(addr, size) {
            return r;
        }
        self.lin.dk_stream_unmap(addr, size)
    }

    fn dk_thread_create(&self, entry: u64, param: u64, thread: *mut u64) -> i64 {
        let out = thread as u64;
        if self.lin.check_w(out, 8).is_err() {
            return Error::BadAddress.code();
        }
        let exec = self
            .lin
            .regions
            .read()
            .unwrap()
            .check(entry, 1, prot::EXEC)
            .is_ok();
        if !exec {
            return Error::BadAddress.code();
        }
        let live = self.lin.threads_live.fetch_add(1, Ordering::AcqRel);
        let undo = |e: Error| {
            self.lin.threads_live.fetch_sub(1, Ordering::AcqRel);
            e.code()
        };
        if live >= self.lin.max_threads {
            return undo(Error::LimitExceeded);
        }
        let done = match thread_object() {
            Ok(o) => o,
            Err(e) => return undo(e),
        };
        let h = match self.lin.insert_arc(done.clone()) {
            Ok(h) => h,
            Err(e) => return undo(e),
        };
        if let Err(e) =
            self.vm
                .clone()
                .spawn_thread(Arc::new(self.clone()), entry, param, param, Some(done))
        {
            let _ = self.lin.dk_object_close(h);
            return undo(e);
        }
        sys::put(out, h);
        0
    }

    fn dk_thread_get_parameter(&self) -> i64 {
        moat_pal::encode(Ok(thread_param()))
    }

    fn dk_thread_exit(&self, _code: i32) -> ! {
        unreachable!("the vCPU loop ends threads before dispatching")
    }

    fn dk_process_exit(&self, _code: i32) -> ! {
        unreachable!("the vCPU loop ends the picoprocess before dispatching")
    }

    fn dk_thread_raise_exception(&self, _code: u32, _arg: u64) -> i64 {
        // Handled by the vCPU loop, which owns the vCPU the upcall runs on.
        Error::NotSupported.code()
    }

    forward! {
        dk_virtual_memory_free(addr: u64, size: u64);
        dk_virtual_memory_protect(addr: u64, size: u64, prot: u32);
        dk_thread_delay_execution(micros: u64);
        dk_thread_yield_execution();
        dk_notification_event_create(initial: u32, event: *mut u64);
        dk_synchronization_event_create(initial: u32, event: *mut u64);
        dk_semaphore_create(initial: u32, max: u32, semaphore: *mut u64);
        dk_semaphore_release(semaphore: u64, count: u32);
        dk_semaphore_peek(semaphore: u64);
        dk_event_set(event: u64);
        dk_event_clear(event: u64);
        dk_event_peek(event: u64);
        dk_objects_wait_any(count: u32, handles: *const u64, timeout_micros: i64);
        dk_abort_event_register(event: u64);
        dk_process_create(uri: *const u8, uri_len: u64, args: *const u8, args_len: u64, process: *mut u64);
        dk_process_get_exit_code(process: u64, code: *mut i32);
        dk_stream_map_pe_binary(stream: u64, info: *mut ImageInfo);
        dk_stream_set_length(stream: u64, length: u64);
        dk_stream_flush(stream: u64);
        dk_stream_delete(stream: u64, which: u32);
        dk_stream_rename(stream: u64, new_uri: *const u8, new_uri_len: u64);
        dk_stream_enumerate_children(stream: u64, buf: *mut u8, len: u64, cursor: *mut u64);
        dk_system_time_query();
        dk_random_bits_read(buf: *mut u8, len: u64);
        dk_instruction_cache_flush(addr: u64, size: u64);
        dk_object_reference(object: u64);
        dk_object_close(object: u64);
        dk_input_event_read(buf: *mut u8, len: u64);
        dk_frame_buffer_export(addr: u64, width: u32, height: u32);
        dk_frame_buffer_notify_update(x: u32, y: u32, width: u32, height: u32);
        dk_debug_string_print(msg: *const u8, len: u64);
    }
}
