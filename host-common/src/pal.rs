//! The in-process PAL of host-linux: every ABI call, as the `Pal` trait.
//!
//! Calls that need no policy run here on the fast path (memory, threads,
//! synchronisation, I/O on descriptors already held, time, random). Calls
//! that need policy (opening streams, attributes by URI, rename, delete,
//! child processes) go to the monitor, which answers with descriptors.
//!
//! Every guest pointer is checked against the guest region map before the
//! PAL touches it, and strings are copied in once before they are parsed,
//! so a guest racing with its own call cannot change what was validated.
use crate::objects::{Object, ProcessObj, StreamObj, SyncKind, SyncObj, ThreadObj};
use crate::protocol::{self, Request, Response};
use crate::{signals, sys};
use moat_pal::handles::HandleTable;
use moat_pal::memory::{RegionKind, RegionMap};
use moat_pal::uri::Uri;
use moat_pal::validate::{self, PAGE};
use moat_pal::{
    access, delete, limits, open_option, prot, stream_kind, Error, ImageInfo, Pal, PalResult,
    StreamAttributes,
};
use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How many times a picoprocess may call DkAbortEventRegister with an event.
pub const MAX_ABORT_REGISTRATIONS: usize = 64;

/// Guest thread stacks (plus one guard page below).
pub const STACK_SIZE: u64 = 1 << 20;
/// Signal stacks, where exception upcalls run.
pub const ALTSTACK_SIZE: u64 = 64 << 10;

pub struct LinuxPal {
    pub regions: RwLock<RegionMap>,
    handles: Mutex<HandleTable<Object>>,
    monitor: Mutex<OwnedFd>,
    pub monitor_fd: RawFd,
    servers: Mutex<HashMap<String, Arc<OwnedFd>>>,
    pub threads_live: AtomicU64,
    pub max_threads: u64,
    pub mem_limit: u64,
    /// Address of the StartupBlock (guest-writable memory).
    pub startup: AtomicU64,
    /// Every event ever registered with DkAbortEventRegister (see there).
    pub abort_event: Mutex<Vec<Arc<Object>>>,
}

thread_local! {
    static PARAM: Cell<u64> = const { Cell::new(0) };
    static EXIT_SLOT: Cell<*mut u64> = const { Cell::new(std::ptr::null_mut()) };
    static EXIT_CODE: Cell<i32> = const { Cell::new(0) };
}

use crate::errno::to_pal as map_errno;

fn ok(v: u64) -> i64 {
    moat_pal::encode(Ok(v))
}

fn err(e: Error) -> i64 {
    e.code()
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return err(e),
        }
    };
}

impl LinuxPal {
    pub fn new(monitor: OwnedFd, max_threads: u64, max_handles: u64, mem_limit: u64) -> LinuxPal {
        let monitor_fd = monitor.as_raw_fd();
        LinuxPal {
            regions: RwLock::new(RegionMap::new()),
            handles: Mutex::new(HandleTable::new(max_handles as usize)),
            monitor: Mutex::new(monitor),
            monitor_fd,
            servers: Mutex::new(HashMap::new()),
            threads_live: AtomicU64::new(0),
            max_threads,
            mem_limit,
            startup: AtomicU64::new(0),
            abort_event: Mutex::new(Vec::new()),
        }
    }

    // ------------------------------------------------------------ helpers

    pub fn check_r(&self, addr: u64, len: u64) -> PalResult<()> {
        self.regions.read().unwrap().check_read(addr, len)
    }

    pub fn check_w(&self, addr: u64, len: u64) -> PalResult<()> {
        self.regions.read().unwrap().check_write(addr, len)
    }

    /// Copy a guest URI in and parse it.
    pub fn uri_in(&self, addr: u64, len: u64) -> PalResult<Uri> {
        let n = validate::check_uri_len(len)?;
        self.check_r(addr, len)?;
        let bytes = sys::copy_in(addr, n);
        Uri::parse_bytes(&bytes)
    }

    pub fn obj(&self, h: u64) -> PalResult<Arc<Object>> {
        self.handles.lock().unwrap().get(h)
    }

    /// Insert an object shared with the host (a thread's completion, a
    /// device's interrupt event).
    pub fn insert_arc(&self, o: Arc<Object>) -> PalResult<u64> {
        self.handles.lock().unwrap().insert(o)
    }

    pub fn insert(&self, o: Object) -> PalResult<u64> {
        self.handles.lock().unwrap().insert(Arc::new(o))
    }

    /// Insert and write the handle to `out`; on a bad `out` the object is
    /// dropped again.
    pub fn insert_out(&self, o: Object, out: u64) -> i64 {
        tri!(self.check_w(out, 8));
        let h = tri!(self.insert(o));
        sys::put(out, h);
        0
    }

    pub fn stream(&self, h: u64) -> PalResult<Arc<Object>> {
        let o = self.obj(h)?;
        match &*o {
            Object::Stream(_) => Ok(o),
            _ => Err(Error::WrongHandleKind),
        }
    }

    fn sync(&self, h: u64, kinds: &[SyncKind]) -> PalResult<Arc<Object>> {
        let o = self.obj(h)?;
        match &*o {
            Object::Sync(s) if kinds.contains(&s.kind) => Ok(o),
            _ => Err(Error::WrongHandleKind),
        }
    }

    /// One request to the monitor. A broken monitor connection ends the
    /// picoprocess: without its monitor it has no authority left.
    pub fn ask(&self, req: &Request) -> PalResult<(Response, Vec<OwnedFd>)> {
        let g = self.monitor.lock().unwrap();
        let fd = sys::borrow(&g);
        if protocol::send(fd, req, &[]).is_err() {
            sys::exit_process(crate::protocol::EXIT_HOST_FAILURE);
        }
        match protocol::recv::<Response>(fd) {
            Ok((Response::Err { code }, _)) => {
                Err(Error::from_code(-(code as i64)).unwrap_or(Error::Io))
            }
            Ok(r) => Ok(r),
            Err(_) => sys::exit_process(crate::protocol::EXIT_HOST_FAILURE),
        }
    }

    /// Send without an answer (debug strings).
    pub fn tell(&self, req: &Request) {
        let g = self.monitor.lock().unwrap();
        let _ = protocol::send(sys::borrow(&g), req, &[]);
    }

    pub fn ask_fd(&self, req: &Request) -> PalResult<(OwnedFd, u32)> {
        match self.ask(req)? {
            (Response::Fd { kind }, mut fds) if fds.len() == 1 => Ok((fds.pop().unwrap(), kind)),
            _ => Err(Error::Io),
        }
    }

    // ------------------------------------------------------------ threads

    /// Allocate a guest stack (with a guard page) and a signal stack.
    fn alloc_stacks(&self) -> PalResult<((u64, u64), (u64, u64))> {
        let total = STACK_SIZE + PAGE;
        let base =
            sys::mmap_anon(0, total, prot::READ | prot::WRITE).map_err(|_| Error::NoMemory)?;
        let _ = sys::mprotect(base, PAGE, 0);
        let alt = match sys::mmap_anon(0, ALTSTACK_SIZE, prot::READ | prot::WRITE) {
            Ok(a) => a,
            Err(_) => {
                let _ = sys::munmap(base, total);
                return Err(Error::NoMemory);
            }
        };
        let mut r = self.regions.write().unwrap();
        let rw = prot::READ | prot::WRITE;
        r.insert(base + PAGE, STACK_SIZE, rw, RegionKind::Stack)?;
        r.insert(alt, ALTSTACK_SIZE, rw, RegionKind::Stack)?;
        Ok(((base, total), (alt, ALTSTACK_SIZE)))
    }

    fn free_stacks(&self, stack: (u64, u64), alt: (u64, u64)) {
        let mut r = self.regions.write().unwrap();
        r.remove(stack.0 + PAGE, STACK_SIZE);
        r.remove(alt.0, alt.1);
        drop(r);
        let _ = sys::munmap(stack.0, stack.1);
        let _ = sys::munmap(alt.0, alt.1);
    }

    /// Run a guest thread on the calling OS thread until it calls
    /// DkThreadExit; then clean up, and end the process if it was the last.
    pub fn run_guest_thread(&self, entry: u64, arg: u64, param: u64, done: Option<Arc<Object>>) {
        let (stack, alt) = match self.alloc_stacks() {
            Ok(s) => s,
            Err(_) => {
                self.thread_ended(done, 134);
                return;
            }
        };
        signals::set_altstack(alt.0, alt.1);
        PARAM.with(|p| p.set(param));
        let mut saved: u64 = 0;
        EXIT_SLOT.with(|s| s.set(&mut saved));
        let top = stack.0 + stack.1 - 64;
        // SAFETY: entry was checked to lie in executable guest memory; top
        // is 16-byte aligned inside the stack we just mapped; `saved`
        // outlives the call, which returns only through leave_guest.
        unsafe { sys::run_on_stack(entry, arg, top, &mut saved) };
        EXIT_SLOT.with(|s| s.set(std::ptr::null_mut()));
        signals::disable_altstack();
        self.free_stacks(stack, alt);
        let code = EXIT_CODE.with(|c| c.get());
        self.thread_ended(done, code);
    }

    fn thread_ended(&self, done: Option<Arc<Object>>, code: i32) {
        if let Some(o) = done {
            if let Object::Thread(t) = &*o {
                sys::eventfd_signal(t.done.as_raw_fd());
            }
        }
        if self.threads_live.fetch_sub(1, Ordering::AcqRel) == 1 {
            sys::exit_process(code);
        }
    }

    pub fn start_main_thread(&self, entry: u64, startup: u64) -> ! {
        self.threads_live.fetch_add(1, Ordering::AcqRel);
        // The first thread's entry gets the start-up block; its parameter is 0.
        self.run_guest_thread(entry, startup, 0, None);
        // Other threads still run; the last one to end exits the process.
        loop {
            std::thread::park();
        }
    }

    fn stream_attrs(&self, s: &StreamObj) -> PalResult<StreamAttributes> {
        let st = sys::fstat(s.fd.as_raw_fd()).map_err(map_errno)?;
        let mut a = StreamAttributes {
            kind: s.kind,
            readable: s.readable as u32,
            writable: s.writable as u32,
            ..Default::default()
        };
        if s.kind == stream_kind::FILE {
            a.size = st.st_size as u64;
            a.executable = (st.st_mode & 0o111 != 0) as u32;
        }
        Ok(a)
    }

    fn open_server(&self, uri: &Uri, nonblock: bool) -> PalResult<(OwnedFd, u32)> {
        let key = uri.canonical();
        let listener = {
            let found = self.servers.lock().unwrap().get(&key).cloned();
            match found {
                Some(l) => l,
                None => {
                    let (fd, _) = self.ask_fd(&Request::Listen { uri: key.clone() })?;
                    let l = Arc::new(fd);
                    self.servers.lock().unwrap().entry(key).or_insert(l).clone()
                }
            }
        };
        let kind = if matches!(uri, Uri::TcpServer(_)) {
            stream_kind::TCP
        } else {
            stream_kind::PIPE
        };
        let fd = sys::accept(listener.as_raw_fd(), nonblock).map_err(map_errno)?;
        Ok((fd, kind))
    }
}

fn exec_region(pal: &LinuxPal, addr: u64) -> bool {
    pal.regions
        .read()
        .unwrap()
        .check(addr, 1, prot::EXEC)
        .is_ok()
}

impl Pal for LinuxPal {
    // ------------------------------------------------------------ memory

    fn dk_virtual_memory_alloc(&self, addr: u64, size: u64, p: u32) -> i64 {
        tri!(validate::check_prot(p));
        if size == 0 || !size.is_multiple_of(PAGE) || !addr.is_multiple_of(PAGE) {
            return err(Error::InvalidArgument);
        }
        if size > self.mem_limit {
            return err(Error::NoMemory);
        }
        if addr != 0 {
            tri!(validate::check_page_range(addr, size));
        }
        // Reserve the accounting first, so concurrent allocations cannot
        // both pass the limit.
        let mut r = self.regions.write().unwrap();
        if r.total() + size > self.mem_limit {
            return err(Error::NoMemory);
        }
        if addr != 0 && r.overlaps(addr, addr + size) {
            return err(Error::AlreadyExists);
        }
        let got = match sys::mmap_anon(addr, size, p) {
            Ok(a) => a,
            Err(libc::EEXIST) => return err(Error::AlreadyExists),
            Err(_) => return err(Error::NoMemory),
        };
        if let Err(e) = r.insert(got, size, p, RegionKind::Alloc) {
            let _ = sys::munmap(got, size);
            return err(e);
        }
        ok(got)
    }

    fn dk_virtual_memory_free(&self, addr: u64, size: u64) -> i64 {
        tri!(validate::check_page_range(addr, size));
        let mut r = self.regions.write().unwrap();
        if !r.covered_by(addr, size, RegionKind::Alloc) {
            return err(Error::BadAddress);
        }
        if sys::munmap(addr, size).is_err() {
            return err(Error::InvalidArgument);
        }
        r.remove(addr, size);
        0
    }

    fn dk_virtual_memory_protect(&self, addr: u64, size: u64, p: u32) -> i64 {
        tri!(validate::check_prot(p));
        tri!(validate::check_page_range(addr, size));
        let mut r = self.regions.write().unwrap();
        if !r.covered_by(addr, size, RegionKind::Alloc) {
            return err(Error::BadAddress);
        }
        if sys::mprotect(addr, size, p).is_err() {
            return err(Error::InvalidArgument);
        }
        r.protect(addr, size, p);
        0
    }

    // ------------------------------------------------------------ threads

    fn dk_thread_create(&self, entry: u64, param: u64, thread: *mut u64) -> i64 {
        let out = thread as u64;
        tri!(self.check_w(out, 8));
        if !exec_region(self, entry) {
            return err(Error::BadAddress);
        }
        // Count the thread before it exists, so the limit holds under races.
        let live = self.threads_live.fetch_add(1, Ordering::AcqRel);
        if live >= self.max_threads {
            self.threads_live.fetch_sub(1, Ordering::AcqRel);
            return err(Error::LimitExceeded);
        }
        let undo = |e: Error| {
            self.threads_live.fetch_sub(1, Ordering::AcqRel);
            err(e)
        };
        let done = match sys::eventfd() {
            Ok(fd) => Arc::new(Object::Thread(ThreadObj { done: fd })),
            Err(_) => return undo(Error::LimitExceeded),
        };
        let h = match self.handles.lock().unwrap().insert(done.clone()) {
            Ok(h) => h,
            Err(e) => return undo(e),
        };
        let me: &'static LinuxPal = crate::pal::global();
        let spawned = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || me.run_guest_thread(entry, param, param, Some(done)));
        if spawned.is_err() {
            let _ = self.handles.lock().unwrap().close(h);
            return undo(Error::NoMemory);
        }
        sys::put(out, h);
        0
    }

    fn dk_thread_delay_execution(&self, micros: u64) -> i64 {
        if micros > 1 << 40 {
            return err(Error::InvalidArgument);
        }
        std::thread::sleep(Duration::from_micros(micros));
        0
    }

    fn dk_thread_yield_execution(&self) -> i64 {
        std::thread::yield_now();
        0
    }

    fn dk_thread_exit(&self, code: i32) -> ! {
        let slot = EXIT_SLOT.with(|s| s.get());
        if slot.is_null() {
            sys::exit_process(code);
        }
        EXIT_CODE.with(|c| c.set(code));
        // SAFETY: slot points at the `saved` local of run_guest_thread on
        // this thread, written by run_on_stack; nothing in the frames we
        // abandon (this call and guest code) owns resources.
        unsafe { sys::leave_guest(*slot) }
    }

    fn dk_thread_get_parameter(&self) -> i64 {
        ok(PARAM.with(|p| p.get()))
    }

    fn dk_thread_raise_exception(&self, code: u32, arg: u64) -> i64 {
        let mut info = moat_pal::ExceptionInfo {
            kind: moat_pal::exception_kind::RAISED,
            code,
            fault_addr: 0,
            arg,
            rip: 0,
            rsp: 0,
        };
        match signals::call_upcall(&mut info) {
            Some(d) => ok(d as u64),
            None => signals::die(
                crate::protocol::ReportKind::Exception,
                format_args!("unhandled raised exception (code {code}, argument {arg:#x}): no exception handler is registered"),
                134,
            ),
        }
    }

    fn dk_notification_event_create(&self, initial: u32, event: *mut u64) -> i64 {
        if initial > 1 {
            return err(Error::InvalidArgument);
        }
        let o = tri!(SyncObj::new(SyncKind::Notification, initial, 1));
        self.insert_out(Object::Sync(o), event as u64)
    }

    fn dk_synchronization_event_create(&self, initial: u32, event: *mut u64) -> i64 {
        if initial > 1 {
            return err(Error::InvalidArgument);
        }
        let o = tri!(SyncObj::new(SyncKind::Synchronization, initial, 1));
        self.insert_out(Object::Sync(o), event as u64)
    }

    fn dk_semaphore_create(&self, initial: u32, max: u32, semaphore: *mut u64) -> i64 {
        if max == 0 || initial > max {
            return err(Error::InvalidArgument);
        }
        let o = tri!(SyncObj::new(SyncKind::Semaphore, initial, max));
        self.insert_out(Object::Sync(o), semaphore as u64)
    }

    fn dk_semaphore_release(&self, semaphore: u64, count: u32) -> i64 {
        let o = tri!(self.sync(semaphore, &[SyncKind::Semaphore]));
        if count == 0 {
            return err(Error::InvalidArgument);
        }
        let Object::Sync(s) = &*o else { unreachable!() };
        ok(tri!(s.release(count)) as u64)
    }

    fn dk_semaphore_peek(&self, semaphore: u64) -> i64 {
        let o = tri!(self.sync(semaphore, &[SyncKind::Semaphore]));
        let Object::Sync(s) = &*o else { unreachable!() };
        ok(s.count() as u64)
    }

    fn dk_event_set(&self, event: u64) -> i64 {
        let o = tri!(self.sync(event, &[SyncKind::Notification, SyncKind::Synchronization]));
        let Object::Sync(s) = &*o else { unreachable!() };
        s.set();
        0
    }

    fn dk_event_clear(&self, event: u64) -> i64 {
        let o = tri!(self.sync(event, &[SyncKind::Notification, SyncKind::Synchronization]));
        let Object::Sync(s) = &*o else { unreachable!() };
        s.clear();
        0
    }

    fn dk_event_peek(&self, event: u64) -> i64 {
        let o = tri!(self.sync(event, &[SyncKind::Notification, SyncKind::Synchronization]));
        let Object::Sync(s) = &*o else { unreachable!() };
        ok((s.count() > 0) as u64)
    }

    fn dk_objects_wait_any(&self, count: u32, handles: *const u64, timeout_micros: i64) -> i64 {
        if count == 0 || count as u64 > limits::MAX_WAIT_HANDLES {
            return err(Error::InvalidArgument);
        }
        if timeout_micros < -1 {
            return err(Error::InvalidArgument);
        }
        let addr = handles as u64;
        tri!(self.check_r(addr, count as u64 * 8));
        let raw = sys::copy_in(addr, count as usize * 8);
        let mut objs = Vec::with_capacity(count as usize);
        for c in raw.chunks_exact(8) {
            let h = u64::from_le_bytes(c.try_into().unwrap());
            let o = tri!(self.obj(h));
            objs.push(o);
        }
        let deadline = (timeout_micros >= 0)
            .then(|| Instant::now() + Duration::from_micros(timeout_micros as u64));
        let fds: Vec<(RawFd, i16)> = objs.iter().map(|o| (o.wait_fd(), libc::POLLIN)).collect();
        loop {
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so a short timeout does not spin.
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };
            let rev = match sys::poll(&fds, ms) {
                Ok(r) => r,
                Err(libc::EINTR) => continue,
                Err(e) => return err(map_errno(e)),
            };
            for (i, r) in rev.iter().enumerate() {
                if *r == 0 {
                    continue;
                }
                let taken = match &*objs[i] {
                    Object::Sync(s) => s.try_acquire(),
                    _ => true,
                };
                if taken {
                    return ok(i as u64);
                }
            }
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    return err(Error::TimedOut);
                }
            }
        }
    }

    fn dk_abort_event_register(&self, event: u64) -> i64 {
        use std::sync::atomic::Ordering::Release;
        let mut kept = self.abort_event.lock().unwrap();
        if event == 0 {
            signals::ABORT_EVENT.store(std::ptr::null_mut(), Release);
            return 0;
        }
        let o = tri!(self.sync(event, &[SyncKind::Notification, SyncKind::Synchronization]));
        // The signal handler may hold a pointer to any event ever
        // registered, so they are kept for the life of the process
        // (bounded: a guest re-registering without end is refused).
        let known = kept.iter().any(|k| Arc::ptr_eq(k, &o));
        if !known && kept.len() >= MAX_ABORT_REGISTRATIONS {
            return err(Error::LimitExceeded);
        }
        let Object::Sync(s) = &*o else { unreachable!() };
        signals::ABORT_EVENT.store(s as *const SyncObj as *mut SyncObj, Release);
        if !known {
            kept.push(o);
        }
        0
    }

    // ------------------------------------------------------------ processes

    fn dk_process_create(
        &self,
        uri: *const u8,
        uri_len: u64,
        args: *const u8,
        args_len: u64,
        process: *mut u64,
    ) -> i64 {
        let u = tri!(self.uri_in(uri as u64, uri_len));
        if !matches!(u, Uri::File(_)) {
            return err(Error::InvalidUri);
        }
        if args_len > limits::MAX_ARGS_LEN {
            return err(Error::InvalidArgument);
        }
        let argv = if args_len == 0 {
            Vec::new()
        } else {
            tri!(self.check_r(args as u64, args_len));
            tri!(validate::split_args(&sys::copy_in(
                args as u64,
                args_len as usize
            )))
        };
        tri!(self.check_w(process as u64, 8));
        let (fd, _) = tri!(self.ask_fd(&Request::ProcessCreate {
            uri: u.canonical(),
            args: argv
        }));
        self.insert_out(
            Object::Process(ProcessObj {
                pipe: fd,
                code: Mutex::new(None),
            }),
            process as u64,
        )
    }

    fn dk_process_get_exit_code(&self, process: u64, code: *mut i32) -> i64 {
        let o = tri!(self.obj(process));
        let Object::Process(p) = &*o else {
            return err(Error::WrongHandleKind);
        };
        tri!(self.check_w(code as u64, 4));
        let c = tri!(p.exit_code());
        sys::put(code as u64, c);
        0
    }

    fn dk_process_exit(&self, code: i32) -> ! {
        sys::exit_process(code)
    }

    // ------------------------------------------------------------ streams

    fn dk_stream_open(
        &self,
        uri: *const u8,
        uri_len: u64,
        acc: u32,
        cr: u32,
        options: u32,
        stream: *mut u64,
    ) -> i64 {
        let u = tri!(self.uri_in(uri as u64, uri_len));
        tri!(validate::check_access(acc));
        tri!(validate::check_create(cr));
        tri!(validate::check_options(options));
        tri!(self.check_w(stream as u64, 8));
        let nonblock = options & open_option::NONBLOCK != 0;
        let (fd, kind) = match &u {
            Uri::Dev(_) => return err(Error::NotSupported),
            Uri::Dns(_) => return err(Error::NotSupported),
            Uri::PipeServer(_) | Uri::TcpServer(_) => tri!(self.open_server(&u, nonblock)),
            _ => tri!(self.ask_fd(&Request::Open {
                uri: u.canonical(),
                access: acc,
                create: cr,
                options
            })),
        };
        let s = StreamObj {
            fd,
            kind,
            uri: Mutex::new(u.canonical()),
            readable: acc & access::READ != 0,
            writable: acc & (access::WRITE | access::APPEND) != 0,
            append: acc & access::APPEND != 0,
        };
        self.insert_out(Object::Stream(s), stream as u64)
    }

    fn dk_stream_read(&self, stream: u64, offset: u64, buf: *mut u8, len: u64) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        let n = tri!(validate::check_io_len(len));
        tri!(self.check_w(buf as u64, len));
        if s.kind == stream_kind::DIRECTORY {
            return err(Error::IsDirectory);
        }
        if !s.readable {
            return err(Error::PermissionDenied);
        }
        if n == 0 {
            return 0;
        }
        let fd = s.fd.as_raw_fd();
        loop {
            let r = if s.seekable() {
                if offset > i64::MAX as u64 {
                    return err(Error::InvalidArgument);
                }
                sys::pread(fd, buf as u64, n, offset)
            } else {
                sys::read(fd, buf as u64, n)
            };
            match r {
                Ok(v) => return ok(v as u64),
                Err(libc::EINTR) => continue,
                Err(libc::ECONNRESET) => return 0,
                Err(e) => return err(map_errno(e)),
            }
        }
    }

    fn dk_stream_write(&self, stream: u64, offset: u64, buf: *const u8, len: u64) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        let n = tri!(validate::check_io_len(len));
        tri!(self.check_r(buf as u64, len));
        if s.kind == stream_kind::DIRECTORY {
            return err(Error::IsDirectory);
        }
        if !s.writable {
            return err(Error::PermissionDenied);
        }
        if n == 0 {
            return 0;
        }
        let fd = s.fd.as_raw_fd();
        loop {
            let r = if s.seekable() && !s.append {
                if offset > i64::MAX as u64 {
                    return err(Error::InvalidArgument);
                }
                sys::pwrite(fd, buf as u64, n, offset)
            } else {
                sys::write(fd, buf as u64, n)
            };
            match r {
                Ok(v) => return ok(v as u64),
                Err(libc::EINTR) => continue,
                Err(e) => return err(map_errno(e)),
            }
        }
    }

    fn dk_stream_map(&self, stream: u64, addr: u64, p: u32, offset: u64, size: u64) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        tri!(validate::check_prot(p));
        if p == 0
            || size == 0
            || !size.is_multiple_of(PAGE)
            || !offset.is_multiple_of(PAGE)
            || !addr.is_multiple_of(PAGE)
        {
            return err(Error::InvalidArgument);
        }
        if s.kind != stream_kind::FILE {
            return err(Error::WrongHandleKind);
        }
        if (p & prot::READ != 0 && !s.readable) || (p & prot::WRITE != 0 && !s.writable) {
            return err(Error::PermissionDenied);
        }
        if offset > i64::MAX as u64 {
            return err(Error::InvalidArgument);
        }
        if addr != 0 {
            tri!(validate::check_page_range(addr, size));
        }
        let mut r = self.regions.write().unwrap();
        if r.total() + size > self.mem_limit {
            return err(Error::NoMemory);
        }
        if addr != 0 && r.overlaps(addr, addr + size) {
            return err(Error::AlreadyExists);
        }
        let shared = p & prot::WRITE != 0;
        let got = match sys::mmap_fd(addr, size, p, s.fd.as_raw_fd(), offset, shared) {
            Ok(a) => a,
            Err(libc::EACCES) => return err(Error::PermissionDenied),
            Err(libc::EEXIST) => return err(Error::AlreadyExists),
            Err(e) => return err(map_errno(e)),
        };
        if let Err(e) = r.insert(got, size, p, RegionKind::Mapped) {
            let _ = sys::munmap(got, size);
            return err(e);
        }
        ok(got)
    }

    fn dk_stream_map_pe_binary(&self, stream: u64, info: *mut ImageInfo) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        if s.kind != stream_kind::FILE {
            return err(Error::WrongHandleKind);
        }
        if !s.readable {
            return err(Error::PermissionDenied);
        }
        tri!(self.check_w(info as u64, std::mem::size_of::<ImageInfo>() as u64));
        let img = tri!(crate::image::load_from_fd(
            &self.regions,
            self.mem_limit,
            s.fd.as_raw_fd()
        ));
        sys::put(
            info as u64,
            ImageInfo {
                base: img.base,
                size: img.end - img.base,
                entry: img.entry,
            },
        );
        0
    }

    fn dk_stream_unmap(&self, addr: u64, size: u64) -> i64 {
        tri!(validate::check_page_range(addr, size));
        let mut r = self.regions.write().unwrap();
        if !r.covered_by(addr, size, RegionKind::Mapped)
            && !r.covered_by(addr, size, RegionKind::Image)
        {
            return err(Error::BadAddress);
        }
        if sys::munmap(addr, size).is_err() {
            return err(Error::InvalidArgument);
        }
        r.remove(addr, size);
        0
    }

    fn dk_stream_set_length(&self, stream: u64, length: u64) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        if s.kind != stream_kind::FILE {
            return err(Error::WrongHandleKind);
        }
        if length > 1 << 46 {
            return err(Error::InvalidArgument);
        }
        if !s.writable {
            return err(Error::PermissionDenied);
        }
        tri!(sys::ftruncate(s.fd.as_raw_fd(), length).map_err(map_errno));
        0
    }

    fn dk_stream_flush(&self, stream: u64) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        if s.kind == stream_kind::FILE && s.writable {
            tri!(sys::fsync(s.fd.as_raw_fd()).map_err(map_errno));
        }
        0
    }

    fn dk_stream_delete(&self, stream: u64, which: u32) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        match s.kind {
            stream_kind::FILE | stream_kind::DIRECTORY => {
                if which != delete::ALL {
                    return err(Error::InvalidArgument);
                }
                let uri = s.uri.lock().unwrap().clone();
                tri!(self.ask(&Request::Delete { uri }));
                0
            }
            stream_kind::PIPE | stream_kind::TCP => {
                let how = match which {
                    delete::ALL => libc::SHUT_RDWR,
                    delete::READ_SIDE => libc::SHUT_RD,
                    delete::WRITE_SIDE => libc::SHUT_WR,
                    _ => return err(Error::InvalidArgument),
                };
                tri!(sys::shutdown(s.fd.as_raw_fd(), how).map_err(map_errno));
                0
            }
            _ => err(Error::WrongHandleKind),
        }
    }

    fn dk_stream_get_event(&self, stream: u64, event: *mut u64) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        tri!(self.check_w(event as u64, 8));
        let dup = tri!(s.fd.try_clone().map_err(|_| Error::LimitExceeded));
        self.insert_out(Object::Readiness(dup), event as u64)
    }

    fn dk_stream_rename(&self, stream: u64, new_uri: *const u8, new_uri_len: u64) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        if s.kind != stream_kind::FILE && s.kind != stream_kind::DIRECTORY {
            return err(Error::WrongHandleKind);
        }
        let to = tri!(self.uri_in(new_uri as u64, new_uri_len));
        if !matches!(to, Uri::File(_)) {
            return err(Error::InvalidUri);
        }
        let to = to.canonical();
        let mut cur = s.uri.lock().unwrap();
        tri!(self.ask(&Request::Rename {
            from: cur.clone(),
            to: to.clone()
        }));
        *cur = to;
        0
    }

    fn dk_stream_enumerate_children(
        &self,
        stream: u64,
        buf: *mut u8,
        len: u64,
        cursor: *mut u64,
    ) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        if s.kind != stream_kind::DIRECTORY {
            return err(Error::NotDirectory);
        }
        if !(256..=limits::MAX_IO_LEN).contains(&len) {
            return err(Error::InvalidArgument);
        }
        tri!(self.check_w(buf as u64, len));
        tri!(self.check_w(cursor as u64, 8));
        let start: u64 = sys::get(cursor as u64);
        let names = tri!(sys::read_dir(s.fd.as_raw_fd()).map_err(map_errno));
        let mut out = Vec::new();
        let mut next = start;
        for name in names.iter().skip(start.min(usize::MAX as u64) as usize) {
            if out.len() + name.len() + 1 > len as usize {
                break;
            }
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            next += 1;
        }
        if out.is_empty() && (start as usize) < names.len() {
            // A single name longer than the buffer.
            return err(Error::InvalidArgument);
        }
        sys::copy_out(buf as u64, &out);
        sys::put(cursor as u64, next);
        ok(out.len() as u64)
    }

    fn dk_stream_attributes_query(
        &self,
        uri: *const u8,
        uri_len: u64,
        attrs: *mut StreamAttributes,
    ) -> i64 {
        let u = tri!(self.uri_in(uri as u64, uri_len));
        tri!(self.check_w(attrs as u64, std::mem::size_of::<StreamAttributes>() as u64));
        if matches!(u, Uri::Dev(_) | Uri::Dns(_)) {
            return err(Error::NotSupported);
        }
        match tri!(self.ask(&Request::Stat { uri: u.canonical() })) {
            (
                Response::Attrs {
                    kind,
                    size,
                    readable,
                    writable,
                    executable,
                },
                _,
            ) => {
                let a = StreamAttributes {
                    kind,
                    size,
                    readable: readable as u32,
                    writable: writable as u32,
                    executable: executable as u32,
                    ..Default::default()
                };
                sys::put(attrs as u64, a);
                0
            }
            _ => err(Error::Io),
        }
    }

    fn dk_stream_attributes_query_by_handle(
        &self,
        stream: u64,
        attrs: *mut StreamAttributes,
    ) -> i64 {
        let o = tri!(self.stream(stream));
        let Object::Stream(s) = &*o else {
            unreachable!()
        };
        tri!(self.check_w(attrs as u64, std::mem::size_of::<StreamAttributes>() as u64));
        let a = tri!(self.stream_attrs(s));
        sys::put(attrs as u64, a);
        0
    }

    // ------------------------------------------------------------ other

    fn dk_system_time_query(&self) -> i64 {
        ok(sys::realtime_micros())
    }

    fn dk_random_bits_read(&self, buf: *mut u8, len: u64) -> i64 {
        let n = tri!(validate::check_io_len(len));
        tri!(self.check_w(buf as u64, len));
        if n == 0 {
            return 0;
        }
        let mut tmp = vec![0u8; n.min(1 << 20)];
        let mut done = 0;
        while done < n {
            let k = (n - done).min(tmp.len());
            tri!(sys::getrandom(&mut tmp[..k]).map_err(map_errno));
            sys::copy_out(buf as u64 + done as u64, &tmp[..k]);
            done += k;
        }
        ok(n as u64)
    }

    fn dk_instruction_cache_flush(&self, addr: u64, size: u64) -> i64 {
        // x86 keeps instruction and data caches coherent; only check the range.
        if size == 0 {
            return 0;
        }
        tri!(self.check_r(addr, size));
        0
    }

    fn dk_object_reference(&self, object: u64) -> i64 {
        tri!(self.handles.lock().unwrap().reference(object));
        0
    }

    fn dk_object_close(&self, object: u64) -> i64 {
        let last = tri!(self.handles.lock().unwrap().close(object));
        // Drop the object (and its descriptor) outside the table lock.
        drop(last);
        0
    }

    fn dk_input_event_read(&self, _buf: *mut u8, _len: u64) -> i64 {
        err(Error::NotSupported)
    }

    fn dk_frame_buffer_export(&self, _addr: u64, _width: u32, _height: u32) -> i64 {
        err(Error::NotSupported)
    }

    fn dk_frame_buffer_notify_update(&self, _x: u32, _y: u32, _width: u32, _height: u32) -> i64 {
        err(Error::NotSupported)
    }

    fn dk_debug_string_print(&self, msg: *const u8, len: u64) -> i64 {
        if len > limits::MAX_DEBUG_STRING_LEN {
            return err(Error::InvalidArgument);
        }
        tri!(self.check_r(msg as u64, len));
        let bytes = sys::copy_in(msg as u64, len as usize);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        self.tell(&Request::Debug { text });
        0
    }
}

static GLOBAL: std::sync::OnceLock<LinuxPal> = std::sync::OnceLock::new();

/// Make `p` the process's PAL: the loader's, or the VMM's for every call
/// that is not about memory or threads. Once only (`None` if one is set).
/// The signal handlers learn about the guest from it.
pub fn install(p: LinuxPal) -> Option<&'static LinuxPal> {
    GLOBAL.set(p).ok()?;
    let p = GLOBAL.get()?;
    signals::attach(p);
    Some(p)
}

impl signals::GuestView for LinuxPal {
    fn monitor_fd(&self) -> RawFd {
        self.monitor_fd
    }

    fn startup_block(&self) -> u64 {
        self.startup.load(Ordering::Acquire)
    }

    fn is_guest_code(&self, rip: u64) -> bool {
        self.regions
            .try_read()
            .is_ok_and(|r| r.check(rip, 1, prot::EXEC).is_ok())
    }
}

/// The process's PAL. Panics before [`install`]: callers run after it.
pub fn global() -> &'static LinuxPal {
    GLOBAL.get().expect("PAL not initialised")
}

/// The process's PAL, if installed (signal handlers may run before).
pub fn global_opt() -> Option<&'static LinuxPal> {
    GLOBAL.get()
}
