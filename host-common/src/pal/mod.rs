//! The in-process PAL of host-linux (and of the VMM for every call that
//! is not about memory or threads): every ABI call, as the typed host
//! traits of `moat_pal::host_calls`, one file per call group (`memory`,
//! `threads`, `sync`, `process`, `streams` with `section` for shared
//! sections, `other`).
//!
//! Calls that need no policy run here on the fast path (memory, threads,
//! synchronisation, I/O on descriptors already held, time, random). Calls
//! that need policy (opening streams, attributes by URI, rename, delete,
//! child processes) go to the monitor, which answers with descriptors.
//!
//! Every guest pointer is checked against the guest region map before the
//! PAL touches it (by the generated adapter, through [`GuestMemory`]), and
//! strings are copied in once before they are parsed, so a guest racing
//! with its own call cannot change what was validated.
mod memory;
mod other;
mod process;
mod section;
mod streams;
mod sync;
mod threads;

use crate::objects::{Object, StreamObj, SyncKind};
use crate::protocol::{self, Request, Response};
use crate::{signals, sys};
use moat_pal::handles::HandleTable;
use moat_pal::host::{GuestIn, GuestMemory};
use moat_pal::memory::{RegionKind, RegionMap};
use moat_pal::uri::Uri;
use moat_pal::validate::{self, PAGE};
use moat_pal::{prot, stream_kind, Error, PalResult, StreamAttributes};
use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Distinct pipe and TCP server URIs one picoprocess may open: each keeps
/// a listening socket (see `open_server`), counted in its descriptor limit.
pub const MAX_SERVERS: usize = 16;

pub use section::MAX_OPEN_SECTIONS;

/// How many times a picoprocess may call DkAbortEventRegister with an event.
pub const MAX_ABORT_REGISTRATIONS: usize = 64;

/// Guest thread stacks (plus one guard page below).
pub const STACK_SIZE: u64 = 1 << 20;
/// Signal stacks, where exception upcalls run.
pub const ALTSTACK_SIZE: u64 = 64 << 10;

pub struct LinuxPal {
    /// Unique in the process (the key of each thread's remembered lookup,
    /// see [`LinuxPal::obj`]).
    id: u64,
    pub regions: RwLock<RegionMap>,
    pub(crate) handles: Mutex<HandleTable<Object>>,
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
    /// Section streams open now (at most [`MAX_OPEN_SECTIONS`]).
    sections_open: Arc<std::sync::atomic::AtomicUsize>,
}

thread_local! {
    static PARAM: Cell<u64> = const { Cell::new(0) };
    static EXIT_SLOT: Cell<*mut u64> = const { Cell::new(std::ptr::null_mut()) };
    static EXIT_CODE: Cell<i32> = const { Cell::new(0) };
}

use crate::errno::to_pal as map_errno;

impl LinuxPal {
    pub fn new(monitor: OwnedFd, max_threads: u64, max_handles: u64, mem_limit: u64) -> LinuxPal {
        let monitor_fd = monitor.as_raw_fd();
        static IDS: AtomicU64 = AtomicU64::new(1);
        LinuxPal {
            id: IDS.fetch_add(1, Ordering::Relaxed),
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
            sections_open: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }

    // ------------------------------------------------------------ helpers

    pub fn check_r(&self, addr: u64, len: u64) -> PalResult<()> {
        self.regions.read().unwrap().check_read(addr, len)
    }

    pub fn check_w(&self, addr: u64, len: u64) -> PalResult<()> {
        self.regions.read().unwrap().check_write(addr, len)
    }

    /// Copy a guest URI in (once) and parse it.
    pub fn uri_in(&self, uri: GuestIn) -> PalResult<Uri> {
        let n = validate::check_uri_len(uri.len())?;
        let bytes = sys::copy_in(uri.addr(), n);
        Uri::parse_bytes(&bytes)
    }

    /// Before mapping `size` bytes at `addr` (0: the host chooses): the
    /// region map, locked for the mapping, once the range is checked and
    /// the memory limit has room, and the address to map at. Holding the
    /// lock until the mapping is in the map keeps concurrent mappings from
    /// both passing the limit. With a window (always, once the loader or
    /// the VMM has set it: see `moat_pal::layout`) the host's choice is
    /// the lowest free range inside it, so that every region lies where
    /// either host can rebuild it.
    pub(crate) fn reserve(
        &self,
        addr: u64,
        size: u64,
    ) -> PalResult<(std::sync::RwLockWriteGuard<'_, RegionMap>, u64)> {
        if addr != 0 {
            validate::check_page_range(addr, size)?;
        }
        let r = self.regions.write().unwrap();
        if r.total() + size > self.mem_limit {
            return Err(Error::NoMemory);
        }
        if addr != 0 && r.overlaps(addr, addr + size) {
            return Err(Error::AlreadyExists);
        }
        let at = match (addr, r.window()) {
            (0, Some(_)) => r.find_free(size, 0, u64::MAX).ok_or(Error::NoMemory)?,
            _ => addr,
        };
        Ok((r, at))
    }

    /// The object behind handle `h`. Each thread remembers the last one
    /// it looked up (weakly: a remembered object is never kept alive),
    /// valid until any handle is closed, so a thread that calls on one
    /// stream over and over does not take the table's lock each time.
    pub fn obj(&self, h: u64) -> PalResult<Arc<Object>> {
        let me = self.id;
        let closes = HANDLE_CLOSES.load(Ordering::Acquire);
        let hit = LAST_OBJECT.with(|c| {
            let c = c.borrow();
            let (who, lh, lc, w) = c.as_ref()?;
            if *who == me && *lh == h && *lc == closes {
                w.upgrade()
            } else {
                None
            }
        });
        if let Some(o) = hit {
            return Ok(o);
        }
        let o = self.handles.lock().unwrap().get(h)?;
        LAST_OBJECT.with(|c| *c.borrow_mut() = Some((me, h, closes, Arc::downgrade(&o))));
        Ok(o)
    }

    /// Close one reference of handle `h`; the object if it was the last.
    /// Every thread's remembered lookup ([`LinuxPal::obj`]) is stale after.
    pub fn close_handle(&self, h: u64) -> PalResult<Option<Arc<Object>>> {
        let r = self.handles.lock().unwrap().close(h);
        HANDLE_CLOSES.fetch_add(1, Ordering::AcqRel);
        r
    }

    /// Insert an object shared with the host (a thread's completion, a
    /// device's interrupt event).
    pub fn insert_arc(&self, o: Arc<Object>) -> PalResult<u64> {
        self.handles.lock().unwrap().insert(o)
    }

    pub fn insert(&self, o: Object) -> PalResult<u64> {
        self.handles.lock().unwrap().insert(Arc::new(o))
    }

    pub fn stream(&self, h: u64) -> PalResult<Arc<Object>> {
        let o = self.obj(h)?;
        match &*o {
            Object::Stream(_) => Ok(o),
            _ => Err(Error::WrongHandleKind),
        }
    }

    pub(crate) fn sync(&self, h: u64, kinds: &[SyncKind]) -> PalResult<Arc<Object>> {
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
            channel_broken();
        }
        match protocol::recv::<Response>(fd) {
            Ok((Response::Err { code }, _)) => {
                Err(Error::from_code(-(code as i64)).unwrap_or(Error::Io))
            }
            Ok(r) => Ok(r),
            Err(_) => channel_broken(),
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

    /// Allocate a guest stack (with a guard page) and a signal stack, in
    /// the guest window.
    pub(crate) fn alloc_stacks(&self) -> PalResult<((u64, u64), (u64, u64))> {
        let total = STACK_SIZE + PAGE;
        let rw = prot::READ | prot::WRITE;
        let mut r = self.regions.write().unwrap();
        let place = |r: &RegionMap, len: u64| match r.window() {
            Some(_) => r.find_free(len, 0, u64::MAX).ok_or(Error::NoMemory),
            None => Ok(0),
        };
        let at = place(&r, total)?;
        let base = sys::mmap_anon(at, total, rw).map_err(|_| Error::NoMemory)?;
        let _ = sys::mprotect(base, PAGE, 0);
        // The guard page stays in the map (no access) so that nothing is
        // placed on it.
        if let Err(e) = r
            .insert(base, PAGE, 0, RegionKind::Stack)
            .and_then(|()| r.insert(base + PAGE, STACK_SIZE, rw, RegionKind::Stack))
        {
            r.remove(base, PAGE);
            let _ = sys::munmap(base, total);
            return Err(e);
        }
        let alt = place(&r, ALTSTACK_SIZE)
            .and_then(|at| sys::mmap_anon(at, ALTSTACK_SIZE, rw).map_err(|_| Error::NoMemory));
        let alt = match alt.and_then(|a| {
            r.insert(a, ALTSTACK_SIZE, rw, RegionKind::Stack)
                .map(|()| a)
        }) {
            Ok(a) => a,
            Err(e) => {
                r.remove(base, total);
                let _ = sys::munmap(base, total);
                return Err(e);
            }
        };
        Ok(((base, total), (alt, ALTSTACK_SIZE)))
    }

    /// Unmap a thread's stacks. Under the map's lock: a range the map
    /// calls free is free in the process too (another thread placing a
    /// stack there must find it unmapped).
    pub(crate) fn free_stacks(&self, stack: (u64, u64), alt: (u64, u64)) {
        let mut r = self.regions.write().unwrap();
        r.remove(stack.0, stack.1);
        r.remove(alt.0, alt.1);
        let _ = sys::munmap(stack.0, stack.1);
        let _ = sys::munmap(alt.0, alt.1);
    }

    /// Run a guest thread on the calling OS thread until it calls
    /// DkThreadExit; then clean up, and end the process if it was the last.
    pub fn run_guest_thread(
        &self,
        entry: u64,
        arg: u64,
        param: u64,
        handle: Option<u64>,
        done: Option<Arc<Object>>,
    ) {
        let (stack, alt) = match self.alloc_stacks() {
            Ok(s) => s,
            Err(_) => {
                self.thread_ended(done, 134);
                return;
            }
        };
        let top = stack.0 + stack.1 - 64;
        let code = self.run_here(handle, param, alt, None, (entry, arg, top));
        self.free_stacks(stack, alt);
        self.thread_ended(done, code);
    }

    /// Run guest code on this OS thread, registered for the freeze, with
    /// the signal stack `alt`: `entry(arg)` on the stack at `top`; or,
    /// with `load`, the carried state (`entry` the resume trampoline).
    /// Returns the code the thread ended with (DkThreadExit). Private:
    /// its two callers pass an entry checked to be executable guest code
    /// (or the trampoline, PAL code) and a 16-byte aligned `top` with
    /// writable memory below it.
    fn run_here(
        &self,
        handle: Option<u64>,
        param: u64,
        alt: (u64, u64),
        load: Option<crate::freeze::Saved>,
        (entry, arg, top): (u64, u64, u64),
    ) -> i32 {
        signals::set_altstack(alt.0, alt.1);
        PARAM.with(|p| p.set(param));
        let mut saved: u64 = 0;
        EXIT_SLOT.with(|s| s.set(&mut saved));
        let fresh = load.is_none();
        crate::freeze::register(handle, param, alt, load);
        if fresh {
            crate::freeze::before_guest(entry, arg, top - 8);
        }
        // SAFETY: per the callers' contract above (entry and top); `saved`
        // outlives the call, which returns only through leave_guest.
        unsafe { sys::run_on_stack(entry, arg, top, &mut saved) };
        crate::freeze::unregister();
        EXIT_SLOT.with(|s| s.set(std::ptr::null_mut()));
        signals::disable_altstack();
        EXIT_CODE.with(|c| c.get())
    }

    /// Run a thread a checkpoint carried (its stack is one of the regions
    /// restored): it starts on a trampoline that loads `state` (see
    /// `crate::freeze`), and ends as any guest thread. Its stack stays
    /// mapped after it ends (the checkpoint does not say which region it
    /// was).
    pub fn run_restored_thread(
        &self,
        handle: Option<u64>,
        state: crate::freeze::Saved,
        param: u64,
        done: Option<Arc<Object>>,
    ) {
        let rsp = state.regs.0[moat_checkpoint::Regs::RSP];
        // The trampoline's few frames go below the guest's red zone.
        let top = (rsp.wrapping_sub(4096)) & !15;
        let usable = self.check_w(top.wrapping_sub(4096), 4096).is_ok();
        let alt = match self.alloc_alt() {
            Ok(a) if usable => a,
            Ok(a) => {
                self.free_alt(a);
                self.thread_ended(done, 134);
                return;
            }
            Err(_) => {
                self.thread_ended(done, 134);
                return;
            }
        };
        // The trampoline loads the carried state through a signal and
        // never returns; below `top` a page of guest stack is writable
        // (checked above).
        let entry = crate::freeze::resume_trampoline as *const () as u64;
        let code = self.run_here(handle, param, alt, Some(state), (entry, 0, top));
        self.free_alt(alt);
        self.thread_ended(done, code);
    }

    /// A signal stack alone (a restored thread's guest stack is carried).
    fn alloc_alt(&self) -> PalResult<(u64, u64)> {
        let rw = prot::READ | prot::WRITE;
        let mut r = self.regions.write().unwrap();
        let at = match r.window() {
            Some(_) => r
                .find_free(ALTSTACK_SIZE, 0, u64::MAX)
                .ok_or(Error::NoMemory)?,
            None => 0,
        };
        let a = sys::mmap_anon(at, ALTSTACK_SIZE, rw).map_err(|_| Error::NoMemory)?;
        if let Err(e) = r.insert(a, ALTSTACK_SIZE, rw, RegionKind::Stack) {
            let _ = sys::munmap(a, ALTSTACK_SIZE);
            return Err(e);
        }
        Ok((a, ALTSTACK_SIZE))
    }

    fn free_alt(&self, alt: (u64, u64)) {
        // Under the map's lock, as `free_stacks`.
        let mut r = self.regions.write().unwrap();
        r.remove(alt.0, alt.1);
        let _ = sys::munmap(alt.0, alt.1);
    }

    pub(crate) fn thread_ended(&self, done: Option<Arc<Object>>, code: i32) {
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
        self.run_guest_thread(entry, startup, 0, None, None);
        // Other threads still run; the last one to end exits the process.
        loop {
            std::thread::park();
        }
    }

    pub(crate) fn stream_attrs(&self, s: &StreamObj) -> PalResult<StreamAttributes> {
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

    pub(crate) fn open_server(&self, uri: &Uri, nonblock: bool) -> PalResult<(OwnedFd, u32)> {
        let key = uri.canonical();
        let listener = {
            let found = self.servers.lock().unwrap().get(&key).cloned();
            match found {
                Some(l) => l,
                None if self.servers.lock().unwrap().len() >= MAX_SERVERS => {
                    return Err(Error::LimitExceeded)
                }
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

/// The monitor channel broke (the guest closed or misused descriptor 3,
/// or sent the monitor something it refused): the monitor sees it and
/// ends this process with a violation report (exit 159), so wait for that
/// rather than exit with a code of our own; should the monitor be gone
/// instead, end as a violation after a while.
fn channel_broken() -> ! {
    std::thread::sleep(std::time::Duration::from_secs(10));
    sys::exit_process(crate::protocol::EXIT_SANDBOX_VIOLATION)
}

impl GuestMemory for LinuxPal {
    fn check_guest(&self, addr: u64, len: u64, prot: u32) -> PalResult<()> {
        self.regions.read().unwrap().check(addr, len, prot)
    }

    fn read_value<T: Copy>(&self, addr: u64) -> T {
        sys::get(addr)
    }

    fn write_value<T: Copy>(&self, addr: u64, value: T) {
        sys::put(addr, value)
    }
}

/// Handles closed so far, in any LinuxPal of the process: a thread's
/// remembered lookup is valid only while this has not moved.
static HANDLE_CLOSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Each thread's last lookup: (whose table, handle, closes then, object).
type Remembered = Option<(u64, u64, u64, std::sync::Weak<Object>)>;

thread_local! {
    static LAST_OBJECT: std::cell::RefCell<Remembered> = const { std::cell::RefCell::new(None) };
}

impl moat_layers::GuestAccess for LinuxPal {
    fn copy_in(&self, addr: u64, len: u64) -> PalResult<Vec<u8>> {
        self.check_guest(addr, len, prot::READ)?;
        Ok(sys::copy_in(addr, len as usize))
    }

    fn copy_out(&self, addr: u64, data: &[u8]) -> PalResult<()> {
        self.check_guest(addr, data.len() as u64, prot::WRITE)?;
        sys::copy_out(addr, data);
        Ok(())
    }
}

/// Whether `addr` lies in executable guest memory.
fn exec_region(pal: &LinuxPal, addr: u64) -> bool {
    pal.regions
        .read()
        .unwrap()
        .check(addr, 1, prot::EXEC)
        .is_ok()
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

    fn is_guest_memory(&self, addr: u64) -> bool {
        self.regions
            .try_read()
            .is_ok_and(|r| r.check(addr, 1, 0).is_ok())
    }

    fn guest_writable(&self, addr: u64, len: u64) -> bool {
        self.check_w(addr, len).is_ok()
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
