//! Signals in the sandboxed loader: hardware exceptions become
//! LibOsExceptionDispatch upcalls; SIGSYS (a refused system call) becomes a
//! one-line report to the monitor and the violation exit code; SIGTERM
//! (the host's stop request) sets the registered abort event.
//!
//! Handlers never allocate: reports are formatted into a stack buffer and
//! encoded by hand into one protocol packet.
use crate::protocol::ReportKind;
use crate::sys;
use std::os::fd::RawFd;
use std::sync::OnceLock;

/// What the handlers need to know about the guest, from whoever serves it
/// (the PAL, which registers itself with [`attach`]): kept behind a trait
/// so that this module does not depend on the PAL.
pub trait GuestView: Sync {
    /// The descriptor of the monitor socket (reports go there).
    fn monitor_fd(&self) -> RawFd;
    /// The guest address of the start-up block (0 before it exists).
    fn startup_block(&self) -> u64;
    /// Whether `rip` lies in executable guest memory (without blocking:
    /// `false` when the answer is not available at once).
    fn is_guest_code(&self, rip: u64) -> bool;
    /// Whether `addr` lies in guest memory of any protection (without
    /// blocking, as [`GuestView::is_guest_code`]).
    fn is_guest_memory(&self, _addr: u64) -> bool {
        false
    }
    /// Whether `[addr, addr+len)` is writable guest memory, waiting for the
    /// map if need be: only for a thread that holds no lock of the PAL's
    /// (a thread stopped at guest level).
    fn guest_writable(&self, _addr: u64, _len: u64) -> bool {
        false
    }
}

static GUEST: OnceLock<&'static dyn GuestView> = OnceLock::new();

/// Register the process's guest (once; later calls are ignored).
pub fn attach(g: &'static dyn GuestView) {
    let _ = GUEST.set(g);
}

fn guest() -> Option<&'static dyn GuestView> {
    GUEST.get().copied()
}
use moat_pal::{exception_disposition, exception_kind, ExceptionInfo, LibOsExceptionDispatchFn};
use std::fmt::Write as _;

/// A fixed buffer implementing fmt::Write, truncating on overflow.
pub struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    pub fn new() -> Self {
        StackBuf {
            buf: [0; N],
            len: 0,
        }
    }
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("(report not UTF-8)")
    }
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> std::fmt::Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut take = s.len().min(N - self.len);
        while take > 0 && !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

fn push_varint(out: &mut [u8], at: &mut usize, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if *at < out.len() {
            out[*at] = if v == 0 { b } else { b | 0x80 };
            *at += 1;
        }
        if v == 0 {
            break;
        }
    }
}

/// Encode `Request::Report { kind, text }` exactly as postcard does,
/// without allocating. Returns the packet length.
pub fn encode_report(kind: ReportKind, text: &str, out: &mut [u8]) -> usize {
    const REPORT_VARIANT: u64 = 7; // index of Request::Report
    let k = match kind {
        ReportKind::Violation => 0,
        ReportKind::Exception => 1,
        ReportKind::Startup => 2,
        ReportKind::Limit => 3,
    };
    let mut at = 0;
    push_varint(out, &mut at, REPORT_VARIANT);
    push_varint(out, &mut at, k);
    let t = &text.as_bytes()[..text.len().min(out.len().saturating_sub(16))];
    push_varint(out, &mut at, t.len() as u64);
    out[at..at + t.len()].copy_from_slice(t);
    at + t.len()
}

/// Send a report to the monitor without allocating or locking.
pub fn report(kind: ReportKind, text: &str) {
    let mut pkt = [0u8; 1024];
    let n = encode_report(kind, text, &mut pkt);
    let fd = guest()
        .map(|g| g.monitor_fd())
        .unwrap_or(crate::protocol::MONITOR_FD);
    // SAFETY: pkt is a valid buffer of n bytes; MSG_NOSIGNAL avoids SIGPIPE.
    unsafe { libc::send(fd, pkt.as_ptr() as *const _, n, libc::MSG_NOSIGNAL) };
}

/// Report and end the picoprocess.
pub fn die(kind: ReportKind, msg: std::fmt::Arguments<'_>, code: i32) -> ! {
    let mut b = StackBuf::<900>::new();
    let _ = b.write_fmt(msg);
    report(kind, b.as_str());
    sys::exit_process(code)
}

/// Call the guest's registered exception upcall, if any and if it points
/// into executable guest memory. Returns its disposition.
pub fn call_upcall(info: &mut ExceptionInfo) -> Option<i64> {
    let g = guest()?;
    let sb = g.startup_block();
    if sb == 0 {
        return None;
    }
    let field = sb + std::mem::offset_of!(moat_pal::StartupBlock, exception_upcall) as u64;
    let upcall: u64 = sys::get(field);
    if upcall == 0 {
        return None;
    }
    if !g.is_guest_code(upcall) {
        return None;
    }
    // SAFETY: the address lies in executable guest memory; the guest
    // declared it as its LibOsExceptionDispatch. `info` is valid for the call.
    let f: LibOsExceptionDispatchFn =
        unsafe { std::mem::transmute::<u64, LibOsExceptionDispatchFn>(upcall) };
    UPCALLS.with(|u| u.set(u.get() + 1));
    // SAFETY: see above.
    let d = unsafe { f(info) };
    UPCALLS.with(|u| u.set(u.get() - 1));
    Some(d)
}

pub(crate) fn in_guest_code(rip: u64) -> bool {
    guest().is_some_and(|g| g.is_guest_code(rip))
}

thread_local! {
    /// Exception upcalls the calling thread is inside.
    static UPCALLS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// See [`GuestView::guest_writable`].
pub(crate) fn guest_writable(addr: u64, len: u64) -> bool {
    guest().is_some_and(|g| g.guest_writable(addr, len))
}

/// Whether the calling thread is running an exception upcall.
pub fn in_upcall() -> bool {
    UPCALLS.with(|u| u.get() > 0)
}

/// The calling thread starts (`true`) or ends an exception upcall that a
/// host runs itself (the kvm vCPU loop; `call_upcall` counts its own).
pub fn upcall(starts: bool) {
    UPCALLS.with(|u| {
        u.set(if starts {
            u.get() + 1
        } else {
            u.get().saturating_sub(1)
        })
    });
}

extern "C" fn on_fault(sig: i32, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // A step of a thread the freeze moves to guest code.
    if sig == libc::SIGTRAP && TRAP_HOOK.get().is_some_and(|hook| hook(uc)) {
        return;
    }
    // SAFETY: the kernel passes valid siginfo and ucontext to an SA_SIGINFO handler.
    let (ctx, addr) = unsafe {
        (
            &mut *(uc as *mut libc::ucontext_t),
            (*info).si_addr() as u64,
        )
    };
    let rip = ctx.uc_mcontext.gregs[libc::REG_RIP as usize] as u64;
    let rsp = ctx.uc_mcontext.gregs[libc::REG_RSP as usize] as u64;
    let (kind, what) = match sig {
        libc::SIGSEGV | libc::SIGBUS => (exception_kind::MEMORY_FAULT, "memory fault"),
        libc::SIGILL => (exception_kind::ILLEGAL_INSTRUCTION, "illegal instruction"),
        libc::SIGFPE => (exception_kind::ARITHMETIC, "arithmetic exception"),
        _ => (exception_kind::BREAKPOINT, "breakpoint"),
    };
    // An instruction fetch from guest memory that is not executable (W^X)
    // is the guest's fault too: only the guest's control flow goes there.
    let guest_fetch = rip == addr && guest().is_some_and(|g| g.is_guest_memory(rip));
    if in_guest_code(rip) || guest_fetch {
        let mut ei = ExceptionInfo {
            kind,
            code: sig as u32,
            fault_addr: if kind == exception_kind::MEMORY_FAULT {
                addr
            } else {
                0
            },
            arg: 0,
            rip,
            rsp,
        };
        if let Some(d) = call_upcall(&mut ei) {
            if d == exception_disposition::RESUME as i64 {
                ctx.uc_mcontext.gregs[libc::REG_RIP as usize] = ei.rip as i64;
                ctx.uc_mcontext.gregs[libc::REG_RSP as usize] = ei.rsp as i64;
                return;
            }
        }
        die(
            ReportKind::Exception,
            format_args!(
                "unhandled {what} in the picoprocess at address {addr:#x} (instruction {rip:#x})"
            ),
            128 + sig,
        );
    }
    die(
        ReportKind::Exception,
        format_args!(
            "{what} inside the PAL at address {addr:#x} (instruction {rip:#x}); the picoprocess passed memory it changed or freed during the call"
        ),
        128 + sig,
    );
}

extern "C" fn on_sigsys(_sig: i32, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // siginfo for SIGSYS: si_call_addr at offset 16, si_syscall at 24.
    // SAFETY: the kernel passed a valid siginfo of at least 128 bytes.
    let (call_addr, nr, arch) = unsafe {
        let p = info as *const u8;
        (
            std::ptr::read_unaligned(p.add(16) as *const u64),
            std::ptr::read_unaligned(p.add(24) as *const i32),
            std::ptr::read_unaligned(p.add(28) as *const u32),
        )
    };
    // SAFETY: valid ucontext from the kernel.
    let ctx = unsafe { &*(uc as *const libc::ucontext_t) };
    let rip = ctx.uc_mcontext.gregs[libc::REG_RIP as usize] as u64;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    if arch != AUDIT_ARCH_X86_64 {
        die(
            ReportKind::Violation,
            format_args!("sandbox violation: 32-bit system call {nr} (int 0x80) at {call_addr:#x} is not allowed"),
            crate::protocol::EXIT_SANDBOX_VIOLATION,
        );
    }
    let name = syscall_name_static(nr as i64);
    let whence = if in_guest_code(rip.wrapping_sub(2)) {
        "guest code"
    } else {
        "the PAL"
    };
    match name {
        Some(n) => die(
            ReportKind::Violation,
            format_args!("sandbox violation: system call `{n}` ({nr}) from {whence} at {call_addr:#x} is not allowed"),
            crate::protocol::EXIT_SANDBOX_VIOLATION,
        ),
        None => die(
            ReportKind::Violation,
            format_args!("sandbox violation: system call {nr} from {whence} at {call_addr:#x} is not allowed"),
            crate::protocol::EXIT_SANDBOX_VIOLATION,
        ),
    }
}

fn syscall_name_static(nr: i64) -> Option<&'static str> {
    let t = sys::SYSCALL_NAMES;
    match t.binary_search_by_key(&(nr as u32), |(n, _)| *n) {
        Ok(i) if nr >= 0 => Some(t[i].1),
        // Calls newer than the kernel headers the table was built from,
        // that moat itself names in reports.
        _ if nr == crate::seal::SYS_MSEAL => Some("mseal"),
        _ => None,
    }
}

/// The registered abort event (a `SyncObj` kept alive by the PAL for the
/// life of the process), or null.
pub static ABORT_EVENT: std::sync::atomic::AtomicPtr<crate::objects::SyncObj> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_term(_sig: i32) {
    let p = ABORT_EVENT.load(std::sync::atomic::Ordering::Acquire);
    if p.is_null() {
        sys::exit_process(128 + libc::SIGTERM);
    }
    // SAFETY: registered events are never freed (see dk_abort_event_register).
    unsafe { (*p).set_from_signal() };
}

fn install(sig: i32, handler: usize, siginfo: bool) -> Result<(), String> {
    // SAFETY: a zeroed sigaction is valid; we fill in the handler and flags.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler;
    sa.sa_flags = libc::SA_ONSTACK | libc::SA_RESTART | if siginfo { libc::SA_SIGINFO } else { 0 };
    // SAFETY: installing a handler for a signal we own; sa is valid.
    if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
        return Err(format!("sigaction({sig}) failed"));
    }
    Ok(())
}

/// The handlers a VMM needs (the KVM host): SIGTERM sets the registered
/// abort event, SIGPIPE is ignored. Faults of the VMM itself stay fatal.
pub fn install_for_vmm() -> Result<(), String> {
    // SAFETY: ignoring SIGPIPE so writes to closed pipes return EPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    install(libc::SIGTERM, on_term as *const () as usize, false)?;
    // A refused call in the VMM is reported by name, as in a loader.
    install(libc::SIGSYS, on_sigsys as *const () as usize, true)?;
    // A fault in the VMM (a guest freeing memory the VMM is copying, a
    // mapped file shorter than its mapping) is reported as a loader
    // reports a fault inside the PAL, and ends the picoprocess.
    install(libc::SIGSEGV, on_fault as *const () as usize, true)?;
    install(libc::SIGBUS, on_fault as *const () as usize, true)
}

/// Install all handlers. No helper thread: a loader stays single-threaded
/// until its guest makes threads (a multi-threaded process pays a
/// reference count on every descriptor it uses in a system call).
pub fn install_all() -> Result<(), String> {
    for s in [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGTRAP,
    ] {
        install(s, on_fault as *const () as usize, true)?;
    }
    install(libc::SIGSYS, on_sigsys as *const () as usize, true)?;
    // SAFETY: ignoring SIGPIPE so writes to closed pipes return EPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    install(libc::SIGTERM, on_term as *const () as usize, false)?;
    Ok(())
}

/// What takes a `SIGTRAP` before the guest's exception path: the freeze's
/// single steps (see `crate::freeze`), which answer whether it was theirs.
type TrapHook = fn(*mut libc::c_void) -> bool;
static TRAP_HOOK: OnceLock<TrapHook> = OnceLock::new();

/// Install `hook` (once) for `SIGTRAP`s.
pub(crate) fn set_trap_hook(hook: TrapHook) {
    let _ = TRAP_HOOK.set(hook);
}

/// Install an `SA_SIGINFO` handler for `sig` (before the sandbox closes
/// `sigaction`).
pub(crate) fn install_handler(sig: i32, handler: usize) -> Result<(), String> {
    install(sig, handler, true)
}

pub fn set_altstack(base: u64, size: u64) {
    let ss = libc::stack_t {
        ss_sp: base as *mut _,
        ss_flags: 0,
        ss_size: size as usize,
    };
    // SAFETY: [base, base+size) is a mapping owned by this thread's lifetime.
    unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
}

pub fn disable_altstack() {
    let ss = libc::stack_t {
        ss_sp: std::ptr::null_mut(),
        ss_flags: libc::SS_DISABLE,
        ss_size: 0,
    };
    // SAFETY: disabling the alternate stack has no memory preconditions.
    unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn report_encoding_matches_postcard() {
        let mut b = [0u8; 1024];
        let n = encode_report(ReportKind::Exception, "héllo", &mut b);
        let r: crate::protocol::Request = postcard::from_bytes(&b[..n]).unwrap();
        match r {
            crate::protocol::Request::Report { kind, text } => {
                assert_eq!(kind, ReportKind::Exception);
                assert_eq!(text, "héllo");
            }
            other => panic!("{other:?}"),
        }
    }
}
