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

mod calls;
mod oracle;

use oracle::{expect, verify, word};

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
