//! The KVM PAL: the ABI for a picoprocess in a micro-VM.
//!
//! Guest RAM sits at the same address in the VMM as in the guest, so a
//! guest pointer, once the region map has checked it, is a VMM pointer:
//! everything that is not about the guest's address space or its threads
//! is the same code as host-linux's (host-common's [`LinuxPal`]: handles, sync objects,
//! waits, streams brokered by the monitor, child processes, time, random).
//! Here: memory (placed inside guest RAM), threads (vCPUs), and devices
//! (`dev:` streams). Exits and raised exceptions need the vCPU and are
//! handled by its loop (see [`crate::pico`]).
//!
//! Stream calls are dispatched by the handle's kind: a `dev:` stream
//! carries its device's index (see [`DeviceSet::of_stream`]); every other
//! stream is host-common's `LinuxPal`'s.
//!
//! A shared section (`shm:`, ABI 1.1) is such a stream: DkStreamMap of one
//! takes the same path as a file's, placed in a free range of guest RAM
//! (which the VMM maps only piecewise, as the guest gets memory) where
//! host-common maps the section's memfd shared with `MAP_FIXED_NOREPLACE`,
//! then the page tables follow. Since guest RAM is identity-mapped, the
//! guest, the VMM, the host and the other picoprocesses then share the
//! same pages; the region map keeps the mapping non-executable, and so do
//! its page-table entries.
//!
//! Every call that changes the region map (memory alloc, free and
//! protect, stream map and unmap, image map) changes the VM's page tables
//! with it, in the order [`crate::paging`] gives: an access taken away
//! leaves the entries before the host mapping changes, an access given
//! enters them after. So inside the VM a page allows exactly what the
//! region map says, on every vCPU, by the time the call returns.
//!
//! The PAL knows the VM only as data (where guest RAM ends, its page
//! tables, its devices) and as a [`SpawnThread`], which the VM implements:
//! it does not depend on the VM's code, the VM's vCPU loop depends on it.
use crate::devices::Dev;
use crate::devices::DeviceSet;
use crate::guest_thread::{thread_object, thread_param};
use crate::layout::RAM_START;
use crate::paging::PageTables;
use moat_host_common::objects::Object;
use moat_host_common::pal::LinuxPal;
use moat_pal::host::{GuestIn, GuestMemory, GuestOut};
use moat_pal::host_calls::{
    MemoryCalls, OtherCalls, ProcessCalls, StreamCalls, SyncCalls, ThreadCalls,
};
use moat_pal::memory::{RegionKind, RegionMap};
use moat_pal::uri::Uri;
use moat_pal::validate;
use moat_pal::{prot, Error, ImageInfo, PalResult, StreamAttributes};
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
        handle: Option<u64>,
        done: Option<Arc<Object>>,
    ) -> Result<(), Error>;
}

#[derive(Clone)]
pub struct KvmPal {
    pub lin: &'static LinuxPal,
    /// Where guest RAM ends (the VMM's task-state area starts there).
    pub ram_end: u64,
    /// The VM's page-table entries for guest RAM.
    pub pt: Arc<PageTables>,
    pub devices: Arc<DeviceSet>,
    /// The VM, to start threads on.
    pub vm: Arc<dyn SpawnThread>,
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
    fn placed(&self, size: u64, f: impl Fn(u64) -> PalResult<u64>) -> PalResult<u64> {
        if size == 0 || !size.is_multiple_of(0x1000) {
            return f(0);
        }
        if size > self.lin.mem_limit {
            return Err(Error::NoMemory);
        }
        for _ in 0..8 {
            let at = self.place(size).ok_or(Error::NoMemory)?;
            match f(at) {
                Err(Error::AlreadyExists) => continue,
                r => return r,
            }
        }
        Err(Error::NoMemory)
    }

    /// Step 1 of a change (see [`crate::paging`]): if the call about to
    /// run would find [addr, addr+size) a range it may change (`ok`), its
    /// pages allow at most `p` from now on. A call that then fails has its
    /// entries put back by [`KvmPal::synced`].
    fn restrict(&self, addr: u64, size: u64, p: u32, ok: impl Fn(&RegionMap) -> bool) {
        if validate::check_page_range(addr, size).is_err() {
            return;
        }
        let map = self.lin.regions.read().unwrap();
        if ok(&map) {
            self.pt.restrict(addr, size, p);
        }
    }

    /// Step 3: the entries of [addr, addr+size) as the region map now says
    /// (nothing outside guest RAM; a range that failed validation is empty).
    fn synced<T>(&self, addr: u64, size: u64, r: PalResult<T>) -> PalResult<T> {
        if validate::check_page_range(addr, size).is_ok() {
            self.pt.sync(&self.lin.regions.read().unwrap(), addr, size);
        }
        r
    }

    /// The device behind `stream`, if it is a device stream.
    fn device(&self, stream: u64) -> Option<&Dev> {
        self.devices.of_stream(self.lin, stream)
    }
}

impl GuestMemory for KvmPal {
    fn check_guest(&self, addr: u64, len: u64, prot: u32) -> PalResult<()> {
        self.lin.check_guest(addr, len, prot)
    }

    fn read_value<T: Copy>(&self, addr: u64) -> T {
        self.lin.read_value(addr)
    }

    fn write_value<T: Copy>(&self, addr: u64, value: T) {
        self.lin.write_value(addr, value)
    }
}

impl MemoryCalls for KvmPal {
    fn virtual_memory_alloc(&self, addr: u64, size: u64, p: u32) -> PalResult<u64> {
        let _pt = self.pt.lock();
        let r = if addr != 0 {
            self.lin.virtual_memory_alloc(addr, size, p)
        } else {
            self.placed(size, |at| self.lin.virtual_memory_alloc(at, size, p))
        };
        match r {
            Ok(at) => self.synced(at, size, r),
            Err(_) => r,
        }
    }

    fn virtual_memory_free(&self, addr: u64, size: u64) -> PalResult<()> {
        let _pt = self.pt.lock();
        self.restrict(addr, size, 0, |m| {
            m.covered_by(addr, size, RegionKind::Alloc)
        });
        let r = self.lin.virtual_memory_free(addr, size);
        self.synced(addr, size, r)
    }

    fn virtual_memory_protect(&self, addr: u64, size: u64, p: u32) -> PalResult<()> {
        let _pt = self.pt.lock();
        if validate::check_prot(p).is_ok() {
            self.restrict(addr, size, p, |m| {
                m.covered_by(addr, size, RegionKind::Alloc)
            });
        }
        let r = self.lin.virtual_memory_protect(addr, size, p);
        self.synced(addr, size, r)
    }
}

impl ThreadCalls for KvmPal {
    fn thread_create(&self, entry: u64, param: u64) -> PalResult<u64> {
        let exec = self
            .lin
            .regions
            .read()
            .unwrap()
            .check(entry, 1, prot::EXEC)
            .is_ok();
        if !exec {
            return Err(Error::BadAddress);
        }
        let live = self.lin.threads_live.fetch_add(1, Ordering::AcqRel);
        let undo = |e: Error| {
            self.lin.threads_live.fetch_sub(1, Ordering::AcqRel);
            Err(e)
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
        if let Err(e) = self.vm.clone().spawn_thread(
            Arc::new(self.clone()),
            entry,
            param,
            param,
            Some(h),
            Some(done),
        ) {
            let _ = self.lin.object_close(h);
            return undo(e);
        }
        Ok(h)
    }

    fn thread_delay_execution(&self, micros: u64) -> PalResult<()> {
        self.lin.thread_delay_execution(micros)
    }

    fn thread_yield_execution(&self) -> PalResult<()> {
        self.lin.thread_yield_execution()
    }

    fn thread_exit(&self, _code: i32) -> ! {
        unreachable!("the vCPU loop ends threads before dispatching")
    }

    fn thread_get_parameter(&self) -> PalResult<u64> {
        Ok(thread_param())
    }

    fn thread_raise_exception(&self, _code: u32, _arg: u64) -> PalResult<u64> {
        // Handled by the vCPU loop, which owns the vCPU the upcall runs on.
        Err(Error::NotSupported)
    }
}

impl SyncCalls for KvmPal {
    fn notification_event_create(&self, initial: u32) -> PalResult<u64> {
        self.lin.notification_event_create(initial)
    }

    fn synchronization_event_create(&self, initial: u32) -> PalResult<u64> {
        self.lin.synchronization_event_create(initial)
    }

    fn semaphore_create(&self, initial: u32, max: u32) -> PalResult<u64> {
        self.lin.semaphore_create(initial, max)
    }

    fn semaphore_release(&self, semaphore: u64, count: u32) -> PalResult<u64> {
        self.lin.semaphore_release(semaphore, count)
    }

    fn semaphore_peek(&self, semaphore: u64) -> PalResult<u64> {
        self.lin.semaphore_peek(semaphore)
    }

    fn event_set(&self, event: u64) -> PalResult<()> {
        self.lin.event_set(event)
    }

    fn event_clear(&self, event: u64) -> PalResult<()> {
        self.lin.event_clear(event)
    }

    fn event_peek(&self, event: u64) -> PalResult<u64> {
        self.lin.event_peek(event)
    }

    fn objects_wait_any(&self, handles: &[u64], timeout_micros: i64) -> PalResult<u64> {
        self.lin.objects_wait_any(handles, timeout_micros)
    }

    fn abort_event_register(&self, event: u64) -> PalResult<()> {
        self.lin.abort_event_register(event)
    }
}

impl ProcessCalls for KvmPal {
    fn process_create(&self, uri: GuestIn, args: GuestIn) -> PalResult<u64> {
        self.lin.process_create(uri, args)
    }

    fn process_get_exit_code(&self, process: u64) -> PalResult<i32> {
        self.lin.process_get_exit_code(process)
    }

    fn process_exit(&self, _code: i32) -> ! {
        unreachable!("the vCPU loop ends the picoprocess before dispatching")
    }
}

impl StreamCalls for KvmPal {
    fn stream_open(&self, uri: GuestIn, access: u32, create: u32, options: u32) -> PalResult<u64> {
        // Devices are the VMM's; every other scheme is brokered as on linux.
        match self.lin.uri_in(uri)? {
            Uri::Dev(name) => self.devices.open(self.lin, &name, access),
            u => self.lin.open_uri(u, access, create, options),
        }
    }

    fn stream_read(&self, stream: u64, offset: u64, buf: GuestOut) -> PalResult<u64> {
        if self.device(stream).is_some() {
            return Err(Error::NotSupported);
        }
        self.lin.stream_read(stream, offset, buf)
    }

    fn stream_write(&self, stream: u64, offset: u64, buf: GuestIn) -> PalResult<u64> {
        if self.device(stream).is_some() {
            return Err(Error::NotSupported);
        }
        self.lin.stream_write(stream, offset, buf)
    }

    fn stream_map(&self, stream: u64, addr: u64, p: u32, offset: u64, size: u64) -> PalResult<u64> {
        if let Some(d) = self.device(stream) {
            return DeviceSet::stream_map(d, addr, p, offset, size);
        }
        let _pt = self.pt.lock();
        let r = if addr != 0 {
            self.lin.stream_map(stream, addr, p, offset, size)
        } else {
            self.placed(size, |at| self.lin.stream_map(stream, at, p, offset, size))
        };
        match r {
            Ok(at) => self.synced(at, size, r),
            Err(_) => r,
        }
    }

    fn stream_map_pe_binary(&self, stream: u64) -> PalResult<ImageInfo> {
        let _pt = self.pt.lock();
        let r = self.lin.stream_map_pe_binary(stream);
        match r {
            Ok(i) => {
                let lo = i.base & !0xfff;
                let hi = i.base.saturating_add(i.size).next_multiple_of(0x1000);
                self.synced(lo, hi - lo, r)
            }
            Err(_) => r,
        }
    }

    fn stream_unmap(&self, addr: u64, size: u64) -> PalResult<()> {
        if let Some(r) = self.devices.unmap(addr, size) {
            return r;
        }
        let _pt = self.pt.lock();
        self.restrict(addr, size, 0, |m| {
            m.covered_by(addr, size, RegionKind::Mapped)
                || m.covered_by(addr, size, RegionKind::Section)
                || m.covered_by(addr, size, RegionKind::Image)
        });
        let r = self.lin.stream_unmap(addr, size);
        self.synced(addr, size, r)
    }

    fn stream_set_length(&self, stream: u64, length: u64) -> PalResult<()> {
        self.lin.stream_set_length(stream, length)
    }

    fn stream_flush(&self, stream: u64) -> PalResult<()> {
        self.lin.stream_flush(stream)
    }

    fn stream_delete(&self, stream: u64, which: u32) -> PalResult<()> {
        self.lin.stream_delete(stream, which)
    }

    fn stream_get_event(&self, stream: u64) -> PalResult<u64> {
        if let Some(d) = self.device(stream) {
            return DeviceSet::event(self.lin, d);
        }
        self.lin.stream_get_event(stream)
    }

    fn stream_rename(&self, stream: u64, new_uri: GuestIn) -> PalResult<()> {
        self.lin.stream_rename(stream, new_uri)
    }

    fn stream_enumerate_children(
        &self,
        stream: u64,
        buf: GuestOut,
        cursor: u64,
    ) -> PalResult<(u64, u64)> {
        self.lin.stream_enumerate_children(stream, buf, cursor)
    }

    fn stream_attributes_query(&self, uri: GuestIn) -> PalResult<StreamAttributes> {
        match self.lin.uri_in(uri)? {
            Uri::Dev(name) => self.devices.attributes_by_name(&name),
            u => self.lin.attributes_of_uri(u),
        }
    }

    fn stream_attributes_query_by_handle(&self, stream: u64) -> PalResult<StreamAttributes> {
        if let Some(d) = self.device(stream) {
            return Ok(DeviceSet::attributes(d));
        }
        self.lin.stream_attributes_query_by_handle(stream)
    }
}

impl OtherCalls for KvmPal {
    fn system_time_query(&self) -> PalResult<u64> {
        self.lin.system_time_query()
    }

    fn random_bits_read(&self, buf: GuestOut) -> PalResult<u64> {
        self.lin.random_bits_read(buf)
    }

    fn instruction_cache_flush(&self, addr: u64, size: u64) -> PalResult<()> {
        self.lin.instruction_cache_flush(addr, size)
    }

    fn object_reference(&self, object: u64) -> PalResult<()> {
        self.lin.object_reference(object)
    }

    fn object_close(&self, object: u64) -> PalResult<()> {
        self.lin.object_close(object)
    }

    fn input_event_read(&self, buf: GuestOut) -> PalResult<u64> {
        self.lin.input_event_read(buf)
    }

    fn frame_buffer_export(&self, addr: u64, width: u32, height: u32) -> PalResult<()> {
        self.lin.frame_buffer_export(addr, width, height)
    }

    fn frame_buffer_notify_update(&self, x: u32, y: u32, width: u32, height: u32) -> PalResult<()> {
        self.lin.frame_buffer_notify_update(x, y, width, height)
    }

    fn debug_string_print(&self, msg: GuestIn) -> PalResult<()> {
        self.lin.debug_string_print(msg)
    }
}
