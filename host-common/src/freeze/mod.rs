//! Freezing a picoprocess's threads where they are, for a checkpoint, and
//! starting them again from a carried state (on this host: the loader's
//! guest threads are the process's own threads).
//!
//! Every guest thread registers a [`Slot`]. To freeze, the coordinator
//! (the loader's checkpoint thread) marks each slot and sends its thread
//! [`SIG_FREEZE`]. The handler stops the thread if it interrupted guest
//! code at the guest's own level (not inside a call, not inside an
//! exception upcall): it saves the registers and the vector state into
//! the slot and waits there. A thread inside a call is stopped by the
//! checkpoint layer as the call returns (`FreezeHost::stop_on_return`,
//! which sends the signal again, now from PAL code); a thread in PAL
//! code anywhere else resumes with the trap flag set and is stopped at
//! the first guest instruction it reaches (the `SIGTRAP` of each step is
//! taken by `on_trap` before the exception path sees it). Blocking
//! waits and delays watch [`wake_fd`] and end early while freezing.
//!
//! So every thread is carried at an instruction boundary of guest code
//! with its whole user state, and nothing of the host is in it.
//!
//! Restoring starts each thread on a trampoline that sends itself
//! [`SIG_RESUME`]; its handler loads the carried state into the signal
//! frame and returns into it (see `context`).
mod context;
pub mod control;
pub mod restore;
pub mod write;

use crate::sys;
use moat_checkpoint::{Regs, Restart, MAX_FPU};
use std::cell::Cell;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The freeze request to a thread.
pub const SIG_FREEZE: i32 = 40;
/// A restored thread loading its carried state.
pub const SIG_RESUME: i32 = 41;

const RUN: u32 = 0;
const FREEZE: u32 = 1;
const STOPPED: u32 = 2;
const THAW: u32 = 3;
const EXITING: u32 = 4;

/// A thread's state, as carried.
pub struct Saved {
    pub regs: Regs,
    pub fpu: Box<[u8; MAX_FPU]>,
    pub fpu_len: usize,
    /// The call to make again as it resumes.
    pub restart: Option<Restart>,
    /// Load `regs` and `fpu` as it resumes (a restored thread).
    pub load: bool,
}

/// One guest thread.
pub struct Slot {
    tid: i32,
    /// Its handle (`None`: the first thread).
    pub handle: Option<u64>,
    pub param: u64,
    /// Its signal stack (host memory in the guest window: not carried).
    pub alt: (u64, u64),
    state: AtomicU32,
    /// Single-stepping towards guest code (touched by its own thread).
    stepping: AtomicBool,
    pub saved: Mutex<Saved>,
}

static ENABLED: OnceLock<OwnedFd> = OnceLock::new();
/// The host's code (the loader's or VMM's executable segments, the C
/// library's, the vDSO): fixed once the process is confined, so a signal
/// handler tells guest code from host code without a lock.
static HOST_CODE: OnceLock<Vec<(u64, u64)>> = OnceLock::new();
static FREEZING: AtomicBool = AtomicBool::new(false);
static THREADS: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());
/// Rung when the checkpoint layer takes a template (the checkpoint
/// thread waits on it; see `control`).
static TEMPLATE_BELL: OnceLock<OwnedFd> = OnceLock::new();
/// The checkpoint thread has ended: nobody would answer the bell.
static NO_COORDINATOR: AtomicBool = AtomicBool::new(false);
/// The guest's PAL table: its context word and its entry of each call,
/// for a restart.
static ENTRIES: OnceLock<(u64, Vec<u64>)> = OnceLock::new();

thread_local! {
    static MINE: Cell<*const Slot> = const { Cell::new(std::ptr::null()) };
}

/// Install the freeze's signal handlers (a loader or a VMM, before its
/// sandbox closes `sigaction`); inert until freezing is on.
pub fn install_handlers() -> Result<(), String> {
    let _ = HOST_CODE.set(sys::pal_code_ranges());
    crate::signals::set_trap_hook(on_trap);
    crate::signals::install_handler(SIG_FREEZE, on_freeze as *const () as usize)?;
    crate::signals::install_handler(SIG_RESUME, on_resume as *const () as usize)
}

/// Turn freezing on for this process (a picoprocess with a checkpoint
/// layer): waits watch the returned descriptor from now on.
pub fn enable() -> Result<(), String> {
    let fd = sys::eventfd().map_err(|e| format!("eventfd: errno {e}"))?;
    let _ = ENABLED.set(fd);
    Ok(())
}

/// The descriptor a blocking wait adds to its set (readable while
/// freezing), if freezing is on.
pub fn wake_fd() -> Option<RawFd> {
    ENABLED.get().map(|f| f.as_raw_fd())
}

/// A freeze is under way.
pub fn freezing() -> bool {
    FREEZING.load(Ordering::Acquire)
}

/// The table the guest calls (once it is published): a restarted call
/// enters it again.
pub fn set_table(t: &moat_pal::PalTable) {
    let base = t as *const moat_pal::PalTable as u64;
    let n = (t.num_calls as u64).min(moat_pal::NUM_CALLS as u64);
    // The functions follow the version, the count and the context word,
    // in call order (the generated table is `repr(C)`).
    const FIRST: usize = std::mem::offset_of!(moat_pal::PalTable, dk_virtual_memory_alloc);
    const _: () = assert!(FIRST == 16);
    let entries = (0..n).map(|i| sys::get::<u64>(base + 16 + 8 * i)).collect();
    let _ = ENTRIES.set((t.ctx as u64, entries));
}

/// The calling thread's slot, if it is a registered guest thread.
pub fn current() -> Option<&'static Slot> {
    mine()
}

fn mine() -> Option<&'static Slot> {
    let p = MINE.with(|m| m.get());
    // SAFETY: MINE points into an Arc held by THREADS from `register`
    // until `unregister` clears MINE first; only this thread reads it.
    (!p.is_null()).then(|| unsafe { &*p })
}

fn blank_fpu() -> Box<[u8; MAX_FPU]> {
    let mut f = Box::new([0u8; MAX_FPU]);
    // x87 control word and MXCSR at their reset values.
    f[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
    f[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    f[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    f
}

/// Register the calling thread as a guest thread (before it runs guest
/// code). `load`: a restored thread's carried state.
pub fn register(handle: Option<u64>, param: u64, alt: (u64, u64), load: Option<Saved>) {
    if ENABLED.get().is_none() {
        return;
    }
    let saved = load.unwrap_or_else(|| Saved {
        regs: Regs([0; 18]),
        fpu: blank_fpu(),
        fpu_len: 0,
        restart: None,
        load: false,
    });
    let s = Arc::new(Slot {
        tid: sys::gettid(),
        handle,
        param,
        alt,
        state: AtomicU32::new(RUN),
        stepping: AtomicBool::new(false),
        saved: Mutex::new(saved),
    });
    MINE.with(|m| m.set(Arc::as_ptr(&s)));
    THREADS.lock().unwrap().push(s);
}

/// A thread that is about to enter guest code at `entry(arg)` with its
/// stack at `rsp`: while a freeze is under way it is carried as being
/// there, and waits for the thaw.
pub fn before_guest(entry: u64, arg: u64, rsp: u64) {
    let Some(s) = mine() else { return };
    if !freezing() {
        return;
    }
    {
        let mut sv = s.saved.lock().unwrap();
        let mut r = [0u64; 18];
        r[Regs::RIP] = entry;
        r[Regs::RDI] = arg;
        r[Regs::RSP] = rsp;
        r[Regs::RFLAGS] = 0x202 & Regs::USER_FLAGS;
        sv.regs = Regs(r);
        sv.fpu_len = 512;
        sv.restart = None;
    }
    park(s);
}

/// The calling thread leaves for good (DkThreadExit): never carried.
pub fn exiting() {
    if let Some(s) = mine() {
        s.state.store(EXITING, Ordering::Release);
        sys::futex_wake(&s.state);
    }
}

/// The calling thread is done with guest code.
pub fn unregister() {
    let p = MINE.with(|m| m.replace(std::ptr::null()));
    if p.is_null() {
        return;
    }
    THREADS
        .lock()
        .unwrap()
        .retain(|s| !std::ptr::eq(Arc::as_ptr(s), p));
}

/// Whether `rip` is the host's code.
fn host_code(rip: u64) -> bool {
    HOST_CODE
        .get()
        .is_some_and(|v| v.iter().any(|&(a, b)| (a..b).contains(&rip)))
}

/// Whether the interrupted state is the guest's own: not the host's code
/// (so the guest's: nothing else executes), outside any call and any
/// exception upcall. Lock-free, so that a thread stepping out of PAL code
/// stops at its first guest instruction, never a later one.
fn at_guest_level(rip: u64) -> bool {
    HOST_CODE.get().is_some()
        && !host_code(rip)
        && !moat_layers::checkpointer::in_call()
        && !crate::signals::in_upcall()
}

/// Wait (the calling thread, stopped) until thawed.
pub fn park(s: &Slot) {
    s.state.store(STOPPED, Ordering::Release);
    sys::futex_wake(&s.state);
    while s.state.load(Ordering::Acquire) == STOPPED {
        sys::futex_wait(&s.state, STOPPED, Duration::from_millis(100));
        // A coordinator that gave up or ended thaws; never wait on none.
        if !freezing() {
            break;
        }
    }
    s.state.store(RUN, Ordering::Release);
}

fn stop(s: &Slot, f: &mut context::Frame<'_>) {
    {
        let mut sv = s.saved.lock().unwrap();
        let sv = &mut *sv;
        sv.fpu_len = f.save(&mut sv.regs, &mut sv.fpu);
    }
    park(s);
    let mut sv = s.saved.lock().unwrap();
    if let Some(r) = sv.restart.take() {
        apply_restart(f, r);
    }
}

/// Whether call `nr` takes six argument words: the sixth goes on the
/// stack above the return address, in the caller's outgoing area (the
/// callee's to use, so a restart may write it; for a call of fewer
/// arguments that word is the caller's own and is left alone). Of the
/// calls made again (waits, delays, a template's open), only
/// `DkStreamOpen` has six.
pub fn six_args(nr: u32) -> bool {
    nr == moat_pal::nr::DK_STREAM_OPEN
}

/// Make the thread, stopped as it returned from call `r.nr`, make it
/// again: the return address back on its stack, the arguments in their
/// registers, the host's entry of the call next.
fn apply_restart(f: &mut context::Frame<'_>, r: Restart) {
    let Some((ctx, entry)) = ENTRIES.get().and_then(|(ctx, e)| {
        let f = e.get((r.nr as usize).wrapping_sub(1)).copied()?;
        Some((*ctx, f))
    }) else {
        return;
    };
    let rsp = f.reg(libc::REG_RSP).wrapping_sub(8);
    let six = six_args(r.nr);
    // Blocking: this thread is at guest level and holds no lock.
    if !crate::signals::guest_writable(rsp, if six { 16 } else { 8 }) {
        return;
    }
    sys::put(rsp, f.rip());
    if six {
        sys::put(rsp + 8, r.args[5]);
    }
    f.set_reg(libc::REG_RSP, rsp);
    f.set_reg(libc::REG_RIP, entry);
    // The table's functions take its context word first, then the
    // call's arguments (five in registers, the sixth on the stack).
    f.set_reg(libc::REG_RDI, ctx);
    let regs = [
        libc::REG_RSI,
        libc::REG_RDX,
        libc::REG_RCX,
        libc::REG_R8,
        libc::REG_R9,
    ];
    for (g, v) in regs.iter().zip(r.args) {
        f.set_reg(*g, v);
    }
}

extern "C" fn on_freeze(_sig: i32, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // In a VMM the signal only interrupts KVM_RUN; the vCPU loop stops.
    if VCPUS.load(Ordering::Acquire) {
        return;
    }
    let Some(s) = mine() else { return };
    if s.state.load(Ordering::Acquire) != FREEZE {
        return;
    }
    // SAFETY: uc is this SA_SIGINFO handler's context.
    let mut f = unsafe { context::Frame::new(uc) };
    if at_guest_level(f.rip()) {
        stop(s, &mut f);
    } else if !moat_layers::checkpointer::in_call()
        && !crate::signals::in_upcall()
        && !f.blocks(libc::SIGTRAP)
    {
        // PAL code outside a call (a thread starting or ending): step to
        // the guest. Never where a step's trap would be blocked (inside
        // the SIGTRAP handler itself, or an upcall it runs): the
        // coordinator asks again later.
        s.stepping.store(true, Ordering::Relaxed);
        f.set_trap(true);
    }
}

/// A `SIGTRAP`: ours if the thread is stepping towards guest code
/// (handled: true), else the guest's breakpoint.
fn on_trap(uc: *mut libc::c_void) -> bool {
    let Some(s) = mine() else { return false };
    if !s.stepping.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: uc is the SIGTRAP handler's context.
    let mut f = unsafe { context::Frame::new(uc) };
    if !at_guest_level(f.rip()) {
        return true;
    }
    s.stepping.store(false, Ordering::Relaxed);
    f.set_trap(false);
    if s.state.load(Ordering::Acquire) == FREEZE && freezing() {
        stop(s, &mut f);
    } else {
        // Thawed on the way (the freeze gave up): a call it cut short is
        // made again now, as if the freeze had not happened.
        let r = s.saved.lock().unwrap().restart.take();
        if let Some(r) = r {
            apply_restart(&mut f, r);
        }
    }
    true
}

extern "C" fn on_resume(_sig: i32, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let Some(s) = mine() else { return };
    // SAFETY: uc is this SA_SIGINFO handler's context.
    let mut f = unsafe { context::Frame::new(uc) };
    let mut sv = s.saved.lock().unwrap();
    if !sv.load {
        return;
    }
    sv.load = false;
    f.load(&sv.regs, &sv.fpu[..sv.fpu_len]);
    if let Some(r) = sv.restart.take() {
        apply_restart(&mut f, r);
    }
}

/// Where a restored thread starts: it loads its state (never returns
/// here).
pub extern "C" fn resume_trampoline(_arg: u64) {
    sys::signal_self(SIG_RESUME);
    crate::signals::die(
        crate::protocol::ReportKind::Startup,
        format_args!("a restored thread did not take its state"),
        crate::protocol::EXIT_HOST_FAILURE,
    );
}

/// What the host does for the checkpoint layer.
pub struct Host;

/// Threads run in vCPUs (the kvm host): a stop on return is taken by the
/// vCPU loop after the call ([`take_stop`]), and the freeze signal only
/// interrupts KVM_RUN.
static VCPUS: AtomicBool = AtomicBool::new(false);

/// Say that guest threads run in vCPUs (the VMM, before any runs).
pub fn set_vcpus() {
    VCPUS.store(true, Ordering::Release);
}

thread_local! {
    /// A stop the checkpoint layer asked for as the current call returns
    /// (vCPU threads): `Some(restart)`.
    static STOP: Cell<Option<Option<Restart>>> = const { Cell::new(None) };
}

/// The stop the checkpoint layer asked for during the call the vCPU loop
/// just served, if any.
pub fn take_stop() -> Option<Option<Restart>> {
    STOP.with(|s| s.take())
}

impl Slot {
    /// Move the state from `from` to `to`; whether it was `from`.
    fn cas(&self, from: u32, to: u32) -> bool {
        self.state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The coordinator asked this thread to stop.
    pub fn wants_stop(&self) -> bool {
        self.state.load(Ordering::Acquire) == FREEZE
    }
}

impl moat_layers::checkpointer::FreezeHost for Host {
    fn freezing(&self) -> bool {
        freezing()
    }

    fn stop_on_return(&self, restart: Option<Restart>) {
        let Some(s) = mine() else { return };
        // Marked for the freeze, unless it has ended meanwhile (then
        // nobody waits for this thread).
        let _ = s.cas(RUN, FREEZE);
        let stopping = freezing() || !s.cas(FREEZE, RUN);
        if VCPUS.load(Ordering::Acquire) {
            // The vCPU loop stops, or makes a cut-short call again.
            STOP.with(|c| c.set(Some(restart)));
        } else if stopping {
            s.saved.lock().unwrap().restart = restart;
            sys::signal_self(SIG_FREEZE);
        }
    }

    fn can_carry(&self) -> bool {
        // Never from an exception upcall: no thread is carried there.
        mine().is_some() && !crate::signals::in_upcall()
    }

    fn take_template(&self) -> bool {
        let Some(bell) = TEMPLATE_BELL.get() else {
            return false;
        };
        if NO_COORDINATOR.load(Ordering::SeqCst) || !self.can_carry() {
            return false;
        }
        // The freeze begins here, so that this thread stops as it leaves
        // the call; the checkpoint thread stops the others.
        FREEZING.store(true, Ordering::SeqCst);
        // A checkpoint thread that ended meanwhile thawed before this
        // freeze began: nobody would end it.
        if NO_COORDINATOR.load(Ordering::SeqCst) {
            thaw_all();
            return false;
        }
        if let Some(fd) = wake_fd() {
            sys::eventfd_signal(fd);
        }
        sys::eventfd_signal(bell.as_raw_fd());
        true
    }
}

/// The checkpoint thread ends: no template is taken from now on, and a
/// freeze a template began is let go (its stopped threads go on, a cut
/// open is made again).
pub(crate) fn coordinator_gone() {
    NO_COORDINATOR.store(true, Ordering::SeqCst);
    thaw_all();
}

/// Let the checkpoint layer take a template, ringing the returned
/// descriptor when it does (once per process).
pub fn template_bell() -> Result<RawFd, String> {
    let fd = sys::eventfd().map_err(|e| format!("eventfd: errno {e}"))?;
    let raw = fd.as_raw_fd();
    TEMPLATE_BELL
        .set(fd)
        .map_err(|_| "a template was asked for twice".to_string())?;
    Ok(raw)
}

/// A thread as frozen.
pub struct Frozen {
    pub handle: Option<u64>,
    pub thread: moat_checkpoint::Thread,
    pub alt: (u64, u64),
}

/// Stop every guest thread (within `limit`), and say what each is.
/// `live` counts the threads that exist (some may not have registered
/// yet).
pub fn freeze_all(limit: Duration, live: &dyn Fn() -> u64) -> Result<Vec<Frozen>, String> {
    FREEZING.store(true, Ordering::Release);
    if let Some(fd) = wake_fd() {
        sys::eventfd_signal(fd);
    }
    let t0 = Instant::now();
    let mut last_kick = t0;
    loop {
        let slots: Vec<Arc<Slot>> = THREADS.lock().unwrap().clone();
        let mut waiting = Vec::new();
        let kick = last_kick.elapsed() > Duration::from_millis(20);
        for s in &slots {
            match s.state.load(Ordering::Acquire) {
                RUN => {
                    if s.cas(RUN, FREEZE) {
                        sys::signal_thread(s.tid, SIG_FREEZE);
                    }
                    waiting.push(s.handle);
                }
                FREEZE => {
                    if kick {
                        sys::signal_thread(s.tid, SIG_FREEZE);
                    }
                    waiting.push(s.handle);
                }
                // Still leaving the last freeze: it goes back to RUN.
                THAW => waiting.push(s.handle),
                _ => {}
            }
        }
        if kick {
            last_kick = Instant::now();
        }
        // Every thread that exists has a slot (one just made registers
        // before it runs guest code; one ending keeps its slot until it is
        // no longer counted), and every slot is stopped or ending.
        let n = live();
        if waiting.is_empty() && n > 0 && slots.len() as u64 == n {
            return Ok(slots
                .iter()
                .filter(|s| s.state.load(Ordering::Acquire) == STOPPED)
                .map(|s| {
                    let sv = s.saved.lock().unwrap();
                    Frozen {
                        handle: s.handle,
                        alt: s.alt,
                        thread: moat_checkpoint::Thread {
                            param: s.param,
                            regs: sv.regs,
                            fpu: sv.fpu[..sv.fpu_len.max(512)].to_vec(),
                            restart: sv.restart,
                        },
                    }
                })
                .collect());
        }
        if t0.elapsed() > limit {
            let names: Vec<String> = waiting
                .iter()
                .map(|h| match h {
                    None => "the first thread".to_string(),
                    Some(h) => format!("thread {h:#x}"),
                })
                .collect();
            thaw_all();
            if names.is_empty() {
                return Err(format!(
                    "its threads were still starting or ending after {} ms; try again",
                    limit.as_millis()
                ));
            }
            return Err(format!(
                "{} did not stop within {} ms (a call that cannot be cut short, such as a read that waits for data, holds it); try again when it is idle",
                names.join(", "),
                limit.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Let every stopped thread go on.
pub fn thaw_all() {
    FREEZING.store(false, Ordering::Release);
    if let Some(fd) = wake_fd() {
        sys::eventfd_drain(fd);
    }
    for s in THREADS.lock().unwrap().iter() {
        if s.cas(STOPPED, THAW) {
            sys::futex_wake(&s.state);
        } else {
            let _ = s.cas(FREEZE, RUN);
        }
    }
}
