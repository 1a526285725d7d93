//! The hypercall path of the KVM host, below the vCPU: a call number and
//! six argument words go through [`moat_pal::dispatch::dispatch`] into the
//! generated adapter (`pal/src/host_calls.rs`) and on to a host. Here the
//! host is a fake whose guest memory is a `Vec<u8>` behind a
//! [`RegionMap`] confined to a window, as KvmPal's is (guest RAM), with
//! memory calls that change the map as LinuxPal's and KvmPal's do.
//!
//! The checks, for every call the fuzzer makes:
//!
//! - an oracle built from the ABI spec (`abi-spec/abi.toml`, read through
//!   moat-abi-spec, not through the generated code) says what the adapter
//!   must do with the words: refuse a length outside the bounds its doc
//!   gives with `InvalidArgument` (lengths first), then a pointer that
//!   does not lie in guest memory with the access it needs with
//!   `BadAddress` (in argument order), or else call the host once, with
//!   the scalars truncated to their types, exactly the checked ranges,
//!   the handles and in-out value read from guest memory, and then write
//!   each out-value where the guest asked, only on success;
//! - every range the adapter hands the host, and every value it reads or
//!   writes, lies inside the fake's memory with the right access,
//!   according to a page model kept beside the region map (so the fake
//!   never touches anything outside its `Vec`);
//! - the region map agrees with that page model after every call (its
//!   pointer checks, its placement, its bookkeeping).
use crate::input::Input;
use moat_abi_spec::{len_bounds, Spec, LEN_TYPES};
use moat_pal::host::{GuestIn, GuestMemory, GuestOut};
use moat_pal::host_calls::{
    MemoryCalls, OtherCalls, ProcessCalls, StreamCalls, SyncCalls, ThreadCalls,
};
use moat_pal::memory::{RegionKind, RegionMap};
use moat_pal::{nr, prot, validate, Error, ImageInfo, PalResult, StreamAttributes};
use std::sync::{Mutex, RwLock};

const PAGE: u64 = 4096;
/// Pages of fake guest RAM.
const PAGES: usize = 16;
/// Where guest RAM starts and ends (the region map's window).
const LO: u64 = 0x10000;
const HI: u64 = LO + PAGES as u64 * PAGE;
/// Most calls one input makes.
const MAX_CALLS: usize = 64;

const KINDS: [RegionKind; 5] = [
    RegionKind::Image,
    RegionKind::Alloc,
    RegionKind::Stack,
    RegionKind::Mapped,
    RegionKind::Host,
];

/// What the fake saw during one call.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// The host was called.
    Call(HostCall),
    /// The adapter read a `u64` of guest memory.
    Read { addr: u64 },
    /// The adapter wrote `size` bytes of guest memory (`value`: for `u64`
    /// and `i32` values, the value).
    Write {
        addr: u64,
        size: u64,
        value: Option<u64>,
    },
}

/// One call of a host method, as the host saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostCall {
    nr: u32,
    /// Integer arguments, in order (`u32`, `i32` as their bits).
    scalars: Vec<u64>,
    /// `(addr, len)` of the `GuestIn` ranges, in order.
    ins: Vec<(u64, u64)>,
    /// `(addr, len)` of the `GuestOut` ranges, in order.
    outs: Vec<(u64, u64)>,
    /// The handle array.
    handles: Vec<u64>,
    /// The in-out value (DkStreamEnumerateChildren's cursor).
    inout: Option<u64>,
    /// What the host answered: the ABI's return value on success (0 for
    /// calls whose result goes to out-pointers), or the error.
    ret: Result<i64, Error>,
    /// The `u64` or `i32` values the adapter must write, in order.
    out_values: Vec<u64>,
}

impl Default for HostCall {
    fn default() -> HostCall {
        HostCall {
            nr: 0,
            scalars: Vec::new(),
            ins: Vec::new(),
            outs: Vec::new(),
            handles: Vec::new(),
            inout: None,
            ret: Ok(0),
            out_values: Vec::new(),
        }
    }
}

/// A page of the model: its protection and kind, if mapped.
type Page = Option<(u32, RegionKind)>;

/// The fake host.
struct Guest {
    ram: Mutex<Vec<u8>>,
    regions: RwLock<RegionMap>,
    pages: Mutex<[Page; PAGES]>,
    /// The answer the next host method gives (see [`Guest::answer`]).
    script: Mutex<u8>,
    log: Mutex<Vec<Event>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// Guest RAM, reused from one input to the next.
    static RAM: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for Guest {
    fn drop(&mut self) {
        let ram = std::mem::take(&mut *lock(&self.ram));
        RAM.with(|r| *r.borrow_mut() = ram);
    }
}

impl Guest {
    fn new(inp: &mut Input) -> Guest {
        let mut map = RegionMap::new();
        map.set_window(LO, HI);
        let mut pages = [None; PAGES];
        for _ in 0..inp.u8() % 9 {
            let first = usize::from(inp.u8()) % PAGES;
            let n = 1 + usize::from(inp.u8() % 4);
            let b = inp.u8();
            let p = u32::from(b & 7);
            let kind = KINDS[usize::from(b >> 3) % KINDS.len()];
            let start = LO + first as u64 * PAGE;
            if map.insert(start, n as u64 * PAGE, p, kind).is_ok() {
                for pg in pages.iter_mut().skip(first).take(n) {
                    *pg = Some((p, kind));
                }
            }
        }
        // Guest RAM: a pattern from the input (what handle arrays and the
        // cursor read), in one buffer per thread (a fresh 64 KiB per input
        // would be most of the target's time).
        let pattern = inp.bytes(32);
        let mut ram = RAM.with(|r| std::mem::take(&mut *r.borrow_mut()));
        ram.resize(PAGES * PAGE as usize, 0);
        if pattern.is_empty() {
            ram.fill(0);
        } else {
            for chunk in ram.chunks_mut(pattern.len()) {
                chunk.copy_from_slice(&pattern[..chunk.len()]);
            }
        }
        Guest {
            ram: Mutex::new(ram),
            regions: RwLock::new(map),
            pages: Mutex::new(pages),
            script: Mutex::new(0),
            log: Mutex::new(Vec::new()),
        }
    }

    /// Whether `[addr, addr + len)` is mapped with `need` in the page
    /// model (an empty range: anywhere but at 0, as the region map says).
    fn model_ok(&self, addr: u64, len: u64, need: u32) -> bool {
        if len == 0 {
            return addr != 0;
        }
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        if addr < LO || end > HI {
            return false;
        }
        let pages = lock(&self.pages);
        let first = ((addr - LO) / PAGE) as usize;
        let last = ((end - 1 - LO) / PAGE) as usize;
        pages[first..=last]
            .iter()
            .all(|p| p.is_some_and(|(p, _)| p & need == need))
    }

    /// Whether `[addr, addr + len)` is all of `kind` in the page model.
    fn model_covered(&self, addr: u64, len: u64, kind: RegionKind) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        if len == 0 {
            return true;
        }
        if addr < LO || end > HI {
            return false;
        }
        let pages = lock(&self.pages);
        let first = ((addr - LO) / PAGE) as usize;
        let last = ((end - 1 - LO) / PAGE) as usize;
        pages[first..=last]
            .iter()
            .all(|p| p.is_some_and(|(_, k)| k == kind))
    }

    /// Set the model's pages of a page-aligned range inside the window.
    fn model_set(&self, addr: u64, len: u64, f: impl Fn(Page) -> Page) {
        let mut pages = lock(&self.pages);
        let first = ((addr - LO) / PAGE) as usize;
        let n = (len / PAGE) as usize;
        for p in pages.iter_mut().skip(first).take(n) {
            *p = f(*p);
        }
    }

    /// The region map and the page model describe the same memory.
    fn check_map(&self) {
        let map = self.regions.read().unwrap();
        let mut expect: [Page; PAGES] = [None; PAGES];
        let mut prev_end = LO;
        let mut total = 0;
        for (start, r) in map.iter() {
            assert!(
                start >= prev_end && r.end > start && r.end <= HI,
                "region {start:#x}..{:#x} overlaps, is empty or leaves the window",
                r.end
            );
            assert!(
                start % PAGE == 0 && r.end % PAGE == 0,
                "region {start:#x}..{:#x} is not page-aligned",
                r.end
            );
            prev_end = r.end;
            total += r.end - start;
            for pg in expect
                .iter_mut()
                .take(((r.end - LO) / PAGE) as usize)
                .skip(((start - LO) / PAGE) as usize)
            {
                *pg = Some((r.prot, r.kind));
            }
        }
        assert_eq!(map.total(), total, "the region map's total is off");
        assert_eq!(*lock(&self.pages), expect, "region map and model differ");
    }

    fn record(&self, e: Event) {
        lock(&self.log).push(e);
    }

    /// The scripted answer: an error, or a value.
    fn answer(&self) -> PalResult<u64> {
        let s = *lock(&self.script);
        if s.is_multiple_of(4) {
            Err(Error::ALL[usize::from(s / 4) % Error::ALL.len()])
        } else {
            Ok(u64::from(s).rotate_left(u32::from(s) * 7))
        }
    }

    /// Record a call of a host method and give its scripted answer; `ret`
    /// makes the ABI's return value of a successful answer, `outs` the
    /// values the adapter must write.
    fn call(
        &self,
        mut c: HostCall,
        ret: impl Fn(u64) -> i64,
        outs: impl Fn(u64) -> Vec<u64>,
    ) -> PalResult<u64> {
        let a = self.answer();
        c.ret = a.map(&ret);
        c.out_values = a.map(&outs).unwrap_or_default();
        self.record(Event::Call(c));
        a
    }

    fn call_value(&self, nr: u32, scalars: Vec<u64>) -> PalResult<u64> {
        let c = HostCall {
            nr,
            scalars,
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }

    fn call_unit(&self, nr: u32, scalars: Vec<u64>) -> PalResult<()> {
        let c = HostCall {
            nr,
            scalars,
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new()).map(|_| ())
    }

    /// A call whose result is a handle (or other `u64`) written out.
    fn call_out(&self, nr: u32, scalars: Vec<u64>, ins: Vec<(u64, u64)>) -> PalResult<u64> {
        let c = HostCall {
            nr,
            scalars,
            ins,
            ..HostCall::default()
        };
        self.call(c, |_| 0, |v| vec![v])
    }

    /// A range the adapter handed over: inside guest memory with `need`;
    /// touch every byte of it the way a host would (copy in, or fill).
    fn use_range(&self, addr: u64, len: u64, need: u32) {
        if len == 0 {
            return;
        }
        assert!(
            self.model_ok(addr, len, need),
            "the adapter handed the host {addr:#x}+{len:#x}, not guest memory with access {need}"
        );
        let mut ram = lock(&self.ram);
        let (a, b) = ((addr - LO) as usize, (addr - LO + len) as usize);
        if need & prot::WRITE != 0 {
            ram[a..b].fill(0xa5);
        } else {
            std::hint::black_box(&ram[a..b]);
        }
    }

    fn guest_in(&self, r: GuestIn) -> (u64, u64) {
        self.use_range(r.addr(), r.len(), prot::READ);
        (r.addr(), r.len())
    }

    fn guest_out(&self, r: GuestOut) -> (u64, u64) {
        self.use_range(r.addr(), r.len(), prot::READ | prot::WRITE);
        (r.addr(), r.len())
    }

    fn ram_u64(&self, addr: u64) -> u64 {
        let ram = lock(&self.ram);
        let a = (addr - LO) as usize;
        let mut b = [0u8; 8];
        b.copy_from_slice(&ram[a..a + 8]);
        u64::from_le_bytes(b)
    }
}

impl GuestMemory for Guest {
    fn check_guest(&self, addr: u64, len: u64, p: u32) -> PalResult<()> {
        let r = self.regions.read().unwrap().check(addr, len, p);
        assert_eq!(
            r.is_ok(),
            self.model_ok(addr, len, p),
            "RegionMap::check({addr:#x}, {len:#x}, {p}) disagrees with the page model"
        );
        r
    }

    fn read_value<T: Copy>(&self, addr: u64) -> T {
        assert!(
            std::any::type_name::<T>() == "u64",
            "the adapter reads only u64s from guest memory"
        );
        assert!(
            self.model_ok(addr, 8, prot::READ),
            "the adapter read {addr:#x}, not readable guest memory"
        );
        self.record(Event::Read { addr });
        let v = self.ram_u64(addr);
        // SAFETY: T is u64 (its type name, checked above), so this copies
        // a u64 into a u64.
        unsafe { std::mem::transmute_copy::<u64, T>(&v) }
    }

    fn write_value<T: Copy>(&self, addr: u64, value: T) {
        let size = std::mem::size_of::<T>() as u64;
        assert!(
            self.model_ok(addr, size, prot::READ | prot::WRITE),
            "the adapter wrote {addr:#x}+{size}, not writable guest memory"
        );
        let bytes: Option<Vec<u8>> = match std::any::type_name::<T>() {
            // SAFETY: T is u64 (its type name), so this copies a u64.
            "u64" => Some(
                unsafe { std::mem::transmute_copy::<T, u64>(&value) }
                    .to_le_bytes()
                    .to_vec(),
            ),
            // SAFETY: T is i32 (its type name), so this copies an i32.
            "i32" => Some(
                unsafe { std::mem::transmute_copy::<T, i32>(&value) }
                    .to_le_bytes()
                    .to_vec(),
            ),
            _ => None,
        };
        let value = bytes.as_ref().map(|b| {
            let mut w = [0u8; 8];
            w[..b.len()].copy_from_slice(b);
            u64::from_le_bytes(w)
        });
        if let Some(b) = bytes {
            let a = (addr - LO) as usize;
            lock(&self.ram)[a..a + b.len()].copy_from_slice(&b);
        }
        self.record(Event::Write { addr, size, value });
    }
}

impl MemoryCalls for Guest {
    // As LinuxPal's, with KvmPal's placement inside guest RAM.
    fn virtual_memory_alloc(&self, addr: u64, size: u64, p: u32) -> PalResult<u64> {
        let r = (|| {
            validate::check_prot(p)?;
            if size == 0 || !size.is_multiple_of(PAGE) || !addr.is_multiple_of(PAGE) {
                return Err(Error::InvalidArgument);
            }
            let mut map = self.regions.write().unwrap();
            let at = if addr == 0 {
                map.find_free(size, LO, HI).ok_or(Error::NoMemory)?
            } else {
                validate::check_page_range(addr, size)?;
                addr
            };
            map.insert(at, size, p, RegionKind::Alloc)?;
            self.model_set(at, size, |_| Some((p, RegionKind::Alloc)));
            Ok(at)
        })();
        self.record_memory(nr::DK_VIRTUAL_MEMORY_ALLOC, vec![addr, size, p.into()], r)
    }

    fn virtual_memory_free(&self, addr: u64, size: u64) -> PalResult<()> {
        let r = (|| {
            validate::check_page_range(addr, size)?;
            let mut map = self.regions.write().unwrap();
            let covered = map.covered_by(addr, size, RegionKind::Alloc);
            assert_eq!(
                covered,
                self.model_covered(addr, size, RegionKind::Alloc),
                "RegionMap::covered_by disagrees with the page model"
            );
            if !covered {
                return Err(Error::BadAddress);
            }
            map.remove(addr, size);
            self.model_set(addr, size, |_| None);
            Ok(0)
        })();
        self.record_memory(nr::DK_VIRTUAL_MEMORY_FREE, vec![addr, size], r)
            .map(|_| ())
    }

    fn virtual_memory_protect(&self, addr: u64, size: u64, p: u32) -> PalResult<()> {
        let r = (|| {
            validate::check_prot(p)?;
            validate::check_page_range(addr, size)?;
            let mut map = self.regions.write().unwrap();
            if !map.covered_by(addr, size, RegionKind::Alloc) {
                return Err(Error::BadAddress);
            }
            map.protect(addr, size, p);
            self.model_set(addr, size, |pg| pg.map(|(_, k)| (p, k)));
            Ok(0)
        })();
        self.record_memory(nr::DK_VIRTUAL_MEMORY_PROTECT, vec![addr, size, p.into()], r)
            .map(|_| ())
    }
}

impl Guest {
    fn record_memory(&self, nr: u32, scalars: Vec<u64>, r: PalResult<u64>) -> PalResult<u64> {
        let ret = r.map(|v| {
            if nr == nr::DK_VIRTUAL_MEMORY_ALLOC {
                moat_pal::encode(Ok(v))
            } else {
                0
            }
        });
        self.record(Event::Call(HostCall {
            nr,
            scalars,
            ret,
            ..HostCall::default()
        }));
        r
    }
}

impl ThreadCalls for Guest {
    fn thread_create(&self, entry: u64, param: u64) -> PalResult<u64> {
        self.call_out(nr::DK_THREAD_CREATE, vec![entry, param], Vec::new())
    }
    fn thread_delay_execution(&self, micros: u64) -> PalResult<()> {
        self.call_unit(nr::DK_THREAD_DELAY_EXECUTION, vec![micros])
    }
    fn thread_yield_execution(&self) -> PalResult<()> {
        self.call_unit(nr::DK_THREAD_YIELD_EXECUTION, Vec::new())
    }
    fn thread_exit(&self, _code: i32) -> ! {
        panic!("DkThreadExit was dispatched: the vCPU loop ends threads itself")
    }
    fn thread_get_parameter(&self) -> PalResult<u64> {
        self.call_value(nr::DK_THREAD_GET_PARAMETER, Vec::new())
    }
    fn thread_raise_exception(&self, code: u32, arg: u64) -> PalResult<u64> {
        self.call_value(nr::DK_THREAD_RAISE_EXCEPTION, vec![code.into(), arg])
    }
}

impl SyncCalls for Guest {
    fn notification_event_create(&self, initial: u32) -> PalResult<u64> {
        self.call_out(
            nr::DK_NOTIFICATION_EVENT_CREATE,
            vec![initial.into()],
            Vec::new(),
        )
    }
    fn synchronization_event_create(&self, initial: u32) -> PalResult<u64> {
        self.call_out(
            nr::DK_SYNCHRONIZATION_EVENT_CREATE,
            vec![initial.into()],
            Vec::new(),
        )
    }
    fn semaphore_create(&self, initial: u32, max: u32) -> PalResult<u64> {
        self.call_out(
            nr::DK_SEMAPHORE_CREATE,
            vec![initial.into(), max.into()],
            Vec::new(),
        )
    }
    fn semaphore_release(&self, semaphore: u64, count: u32) -> PalResult<u64> {
        self.call_value(nr::DK_SEMAPHORE_RELEASE, vec![semaphore, count.into()])
    }
    fn semaphore_peek(&self, semaphore: u64) -> PalResult<u64> {
        self.call_value(nr::DK_SEMAPHORE_PEEK, vec![semaphore])
    }
    fn event_set(&self, event: u64) -> PalResult<()> {
        self.call_unit(nr::DK_EVENT_SET, vec![event])
    }
    fn event_clear(&self, event: u64) -> PalResult<()> {
        self.call_unit(nr::DK_EVENT_CLEAR, vec![event])
    }
    fn event_peek(&self, event: u64) -> PalResult<u64> {
        self.call_value(nr::DK_EVENT_PEEK, vec![event])
    }
    fn objects_wait_any(&self, handles: &[u64], timeout_micros: i64) -> PalResult<u64> {
        let c = HostCall {
            nr: nr::DK_OBJECTS_WAIT_ANY,
            scalars: vec![timeout_micros as u64],
            handles: handles.to_vec(),
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }
    fn abort_event_register(&self, event: u64) -> PalResult<()> {
        self.call_unit(nr::DK_ABORT_EVENT_REGISTER, vec![event])
    }
}

impl ProcessCalls for Guest {
    fn process_create(&self, uri: GuestIn, args: GuestIn) -> PalResult<u64> {
        let ins = vec![self.guest_in(uri), self.guest_in(args)];
        self.call_out(nr::DK_PROCESS_CREATE, Vec::new(), ins)
    }
    fn process_get_exit_code(&self, process: u64) -> PalResult<i32> {
        let c = HostCall {
            nr: nr::DK_PROCESS_GET_EXIT_CODE,
            scalars: vec![process],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |v| vec![u64::from(v as i32 as u32)])
            .map(|v| v as i32)
    }
    fn process_exit(&self, _code: i32) -> ! {
        panic!("DkProcessExit was dispatched: the vCPU loop ends the picoprocess itself")
    }
}

impl StreamCalls for Guest {
    fn stream_open(&self, uri: GuestIn, access: u32, create: u32, options: u32) -> PalResult<u64> {
        let ins = vec![self.guest_in(uri)];
        let s = vec![access.into(), create.into(), options.into()];
        self.call_out(nr::DK_STREAM_OPEN, s, ins)
    }
    fn stream_read(&self, stream: u64, offset: u64, buf: GuestOut) -> PalResult<u64> {
        let c = HostCall {
            nr: nr::DK_STREAM_READ,
            scalars: vec![stream, offset],
            outs: vec![self.guest_out(buf)],
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }
    fn stream_write(&self, stream: u64, offset: u64, buf: GuestIn) -> PalResult<u64> {
        let c = HostCall {
            nr: nr::DK_STREAM_WRITE,
            scalars: vec![stream, offset],
            ins: vec![self.guest_in(buf)],
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }
    fn stream_map(&self, stream: u64, addr: u64, p: u32, offset: u64, size: u64) -> PalResult<u64> {
        self.call_value(
            nr::DK_STREAM_MAP,
            vec![stream, addr, p.into(), offset, size],
        )
    }
    fn stream_map_pe_binary(&self, stream: u64) -> PalResult<ImageInfo> {
        let c = HostCall {
            nr: nr::DK_STREAM_MAP_PE_BINARY,
            scalars: vec![stream],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new()).map(|v| ImageInfo {
            base: v,
            size: v,
            entry: v,
        })
    }
    fn stream_unmap(&self, addr: u64, size: u64) -> PalResult<()> {
        self.call_unit(nr::DK_STREAM_UNMAP, vec![addr, size])
    }
    fn stream_set_length(&self, stream: u64, length: u64) -> PalResult<()> {
        self.call_unit(nr::DK_STREAM_SET_LENGTH, vec![stream, length])
    }
    fn stream_flush(&self, stream: u64) -> PalResult<()> {
        self.call_unit(nr::DK_STREAM_FLUSH, vec![stream])
    }
    fn stream_delete(&self, stream: u64, which: u32) -> PalResult<()> {
        self.call_unit(nr::DK_STREAM_DELETE, vec![stream, which.into()])
    }
    fn stream_get_event(&self, stream: u64) -> PalResult<u64> {
        self.call_out(nr::DK_STREAM_GET_EVENT, vec![stream], Vec::new())
    }
    fn stream_rename(&self, stream: u64, new_uri: GuestIn) -> PalResult<()> {
        let c = HostCall {
            nr: nr::DK_STREAM_RENAME,
            scalars: vec![stream],
            ins: vec![self.guest_in(new_uri)],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new()).map(|_| ())
    }
    fn stream_enumerate_children(
        &self,
        stream: u64,
        buf: GuestOut,
        cursor: u64,
    ) -> PalResult<(u64, u64)> {
        let c = HostCall {
            nr: nr::DK_STREAM_ENUMERATE_CHILDREN,
            scalars: vec![stream],
            outs: vec![self.guest_out(buf)],
            inout: Some(cursor),
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |v| vec![v ^ 0x5555])
            .map(|v| (v, v ^ 0x5555))
    }
    fn stream_attributes_query(&self, uri: GuestIn) -> PalResult<StreamAttributes> {
        let c = HostCall {
            nr: nr::DK_STREAM_ATTRIBUTES_QUERY,
            ins: vec![self.guest_in(uri)],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new())
            .map(|v| StreamAttributes {
                size: v,
                ..StreamAttributes::default()
            })
    }
    fn stream_attributes_query_by_handle(&self, stream: u64) -> PalResult<StreamAttributes> {
        let c = HostCall {
            nr: nr::DK_STREAM_ATTRIBUTES_QUERY_BY_HANDLE,
            scalars: vec![stream],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new())
            .map(|v| StreamAttributes {
                size: v,
                ..StreamAttributes::default()
            })
    }
}

impl OtherCalls for Guest {
    fn system_time_query(&self) -> PalResult<u64> {
        self.call_value(nr::DK_SYSTEM_TIME_QUERY, Vec::new())
    }
    fn random_bits_read(&self, buf: GuestOut) -> PalResult<u64> {
        let c = HostCall {
            nr: nr::DK_RANDOM_BITS_READ,
            outs: vec![self.guest_out(buf)],
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }
    fn instruction_cache_flush(&self, addr: u64, size: u64) -> PalResult<()> {
        self.call_unit(nr::DK_INSTRUCTION_CACHE_FLUSH, vec![addr, size])
    }
    fn object_reference(&self, object: u64) -> PalResult<()> {
        self.call_unit(nr::DK_OBJECT_REFERENCE, vec![object])
    }
    fn object_close(&self, object: u64) -> PalResult<()> {
        self.call_unit(nr::DK_OBJECT_CLOSE, vec![object])
    }
    fn input_event_read(&self, buf: GuestOut) -> PalResult<u64> {
        let c = HostCall {
            nr: nr::DK_INPUT_EVENT_READ,
            outs: vec![self.guest_out(buf)],
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }
    fn frame_buffer_export(&self, addr: u64, width: u32, height: u32) -> PalResult<()> {
        self.call_unit(
            nr::DK_FRAME_BUFFER_EXPORT,
            vec![addr, width.into(), height.into()],
        )
    }
    fn frame_buffer_notify_update(&self, x: u32, y: u32, width: u32, height: u32) -> PalResult<()> {
        self.call_unit(
            nr::DK_FRAME_BUFFER_NOTIFY_UPDATE,
            vec![x.into(), y.into(), width.into(), height.into()],
        )
    }
    fn debug_string_print(&self, msg: GuestIn) -> PalResult<()> {
        let c = HostCall {
            nr: nr::DK_DEBUG_STRING_PRINT,
            ins: vec![self.guest_in(msg)],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new()).map(|_| ())
    }
}

/// Values worth trying for an argument word: bounds of the spec's limits,
/// the window's edges, overflows, truncations.
const SPECIAL: [u64; 32] = [
    0,
    1,
    8,
    64,
    65,
    255,
    256,
    4095,
    4096,
    4097,
    4096 * 4,
    65536,
    65537,
    1 << 30,
    (1 << 30) + 1,
    u32::MAX as u64,
    1 << 32,
    (1 << 32) + 1,
    (1 << 32) + 64,
    (1 << 32) + 65,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
    u64::MAX - 7,
    u64::MAX / 8 + 1,
    LO,
    LO - 8,
    HI,
    HI - 8,
    HI - 1,
    LO + PAGE,
    0x0000_8000_0000_0000,
];

/// One argument word: small numbers, guest addresses and edge values
/// are likelier than a uniform `u64` would make them.
fn word(inp: &mut Input) -> u64 {
    let sel = inp.u8();
    let hi = u64::from(sel >> 3);
    match sel & 7 {
        0 => hi,
        1 => inp.u8().into(),
        2 => inp.u16().into(),
        3 => inp.u64(),
        4 | 5 => LO + u64::from(inp.u16()),
        6 => LO + u64::from(inp.u8() % PAGES as u8) * PAGE + hi * 8,
        _ => SPECIAL[(hi as usize) % SPECIAL.len()],
    }
}

/// What the spec says the adapter must do with a call.
#[derive(Debug)]
enum Expect {
    /// No such call, or one that does not return: not dispatched.
    NotDispatched,
    /// Refused before the host is called.
    Refused(Error),
    /// The host is called with these; then these `(addr, size)` are
    /// written, in order, on success.
    Called {
        call: HostCall,
        writes: Vec<(u64, u64)>,
    },
}

/// An argument word as the dispatcher truncates it to the spec's type.
fn truncate(w: u64, ty: &str) -> u64 {
    match ty {
        "u32" | "i32" => u64::from(w as u32),
        _ => w,
    }
}

/// Bytes an out-pointer of type `ty` receives.
fn out_size(ty: &str) -> Option<u64> {
    Some(match ty {
        "handle_out" | "u64_inout" => 8,
        "i32_out" => 4,
        "attrs_out" => std::mem::size_of::<StreamAttributes>() as u64,
        "image_out" => std::mem::size_of::<ImageInfo>() as u64,
        _ => return None,
    })
}

/// The oracle: what the adapter must do with call `nr` and `words`, from
/// the spec and the guest's memory as it is before the call.
fn expect(spec: &Spec, g: &Guest, nr: u32, words: &[u64; 6]) -> Expect {
    let Some(c) = spec.calls.iter().find(|c| c.number == nr) else {
        return Expect::NotDispatched;
    };
    if c.is_never() {
        return Expect::NotDispatched;
    }
    assert!(c.args.len() <= 6, "{} has more than six arguments", c.name);
    let index = |name: &str| c.args.iter().position(|a| a.name == name).unwrap();
    let value = |i: usize| truncate(words[i], &c.args[i].ty);
    let len_args: Vec<usize> = c
        .args
        .iter()
        .filter(|a| LEN_TYPES.contains(&a.ty.as_str()))
        .map(|a| index(a.len.as_deref().unwrap()))
        .collect();
    // Lengths first.
    for &j in &len_args {
        let l = value(j);
        let doc = c.args[j].doc.as_deref().unwrap_or("");
        if let Some((min, max)) = len_bounds(&spec.limits, doc) {
            if l < min || max.is_some_and(|m| l > m) {
                return Expect::Refused(Error::InvalidArgument);
            }
        }
    }
    // Then pointers, in argument order.
    let mut call = HostCall {
        nr,
        ..HostCall::default()
    };
    let mut writes = Vec::new();
    for (i, a) in c.args.iter().enumerate() {
        let w = words[i];
        let len = || value(index(a.len.as_deref().unwrap()));
        let ok = match a.ty.as_str() {
            "bytes_in" => {
                let l = len();
                call.ins.push((w, l));
                l == 0 || g.model_ok(w, l, prot::READ)
            }
            "bytes_out" => {
                let l = len();
                call.outs.push((w, l));
                l == 0 || g.model_ok(w, l, prot::READ | prot::WRITE)
            }
            "handles_in" => {
                let n = len();
                let ok = n
                    .checked_mul(8)
                    .is_some_and(|b| g.model_ok(w, b, prot::READ));
                if ok {
                    call.handles = (0..n).map(|k| g.ram_u64(w + 8 * k)).collect();
                }
                ok
            }
            t => match out_size(t) {
                Some(size) => {
                    let ok = g.model_ok(w, size, prot::READ | prot::WRITE);
                    if ok && t == "u64_inout" {
                        call.inout = Some(g.ram_u64(w));
                    }
                    writes.push((w, size));
                    ok
                }
                None => {
                    if !len_args.contains(&i) {
                        call.scalars.push(value(i));
                    }
                    true
                }
            },
        };
        if !ok {
            return Expect::Refused(Error::BadAddress);
        }
    }
    Expect::Called { call, writes }
}

/// Check what happened against what the oracle said.
fn verify(expect: Expect, nr: u32, ret: Option<i64>, events: &[Event]) {
    match expect {
        Expect::NotDispatched => {
            assert_eq!(ret, None, "call {nr} should not be dispatched");
            assert!(events.is_empty(), "call {nr}: {events:?}");
        }
        Expect::Refused(e) => {
            assert_eq!(ret, Some(e.code()), "call {nr} should fail with {e:?}");
            assert!(
                !events.iter().any(|e| matches!(e, Event::Call(_))),
                "call {nr} reached the host though it should fail: {events:?}"
            );
            assert!(
                !events.iter().any(|e| matches!(e, Event::Write { .. })),
                "call {nr} failed but wrote guest memory: {events:?}"
            );
        }
        Expect::Called { call, writes } => {
            let calls: Vec<&HostCall> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Call(c) => Some(c),
                    _ => None,
                })
                .collect();
            assert_eq!(calls.len(), 1, "call {nr}: the host was called {calls:?}");
            let got = calls[0];
            let mut want = call;
            want.ret = got.ret;
            want.out_values = got.out_values.clone();
            assert_eq!(*got, want, "call {nr}: the host got other arguments");
            let done: Vec<(u64, u64, Option<u64>)> = events
                .iter()
                .skip_while(|e| !matches!(e, Event::Call(_)))
                .filter_map(|e| match e {
                    Event::Write { addr, size, value } => Some((*addr, *size, *value)),
                    _ => None,
                })
                .collect();
            match got.ret {
                Ok(r) => {
                    assert_eq!(ret, Some(r), "call {nr}: wrong return value");
                    let at: Vec<(u64, u64)> = done.iter().map(|w| (w.0, w.1)).collect();
                    assert_eq!(at, writes, "call {nr}: out-values written elsewhere");
                    let values: Vec<u64> = done.iter().filter_map(|w| w.2).collect();
                    assert_eq!(values, got.out_values, "call {nr}: wrong out-values");
                }
                Err(e) => {
                    assert_eq!(ret, Some(e.code()), "call {nr}: the host's error is lost");
                    assert!(done.is_empty(), "call {nr} failed but wrote {done:?}");
                }
            }
            assert!(
                !events
                    .iter()
                    .take_while(|e| !matches!(e, Event::Call(_)))
                    .any(|e| matches!(e, Event::Write { .. })),
                "call {nr}: guest memory written before the call"
            );
        }
    }
}

/// Run one input: a guest memory layout, then up to 64 calls.
pub fn run(data: &[u8]) {
    let spec = moat_abi_spec::spec();
    let mut inp = Input::new(data);
    let g = Guest::new(&mut inp);
    g.check_map();
    for _ in 0..MAX_CALLS {
        if inp.is_empty() {
            break;
        }
        let nr = u32::from(inp.u8() % 48);
        let mut words = [0u64; 6];
        for w in &mut words {
            *w = word(&mut inp);
        }
        *lock(&g.script) = inp.u8();
        lock(&g.log).clear();
        let want = expect(spec, &g, nr, &words);
        let ret = moat_pal::dispatch::dispatch(&g, nr, &words);
        let events = std::mem::take(&mut *lock(&g.log));
        verify(want, nr, ret, &events);
        g.check_map();
    }
}
