//! Exceptions into the picoprocess: a vector from the IDT's stubs, a
//! memory fault KVM reports as an MMIO access inside guest RAM, or a
//! DkThreadRaiseException; each goes to the guest's registered
//! LibOsExceptionDispatch (an upcall on the thread's exception stack, run
//! by the same vCPU loop), which resumes the thread or leaves the
//! picoprocess to end as host-linux ends it for the same signal. A
//! system-call instruction never reaches the host: it is reported as the
//! sandbox violation it is.
//!
//! The page tables follow the region map (see [`crate::paging`]), so an
//! instruction fetch from a page without EXEC, a write to a page without
//! WRITE, and any access to a page the picoprocess does not have are page
//! faults: a MEMORY_FAULT upcall with the faulting address, or, without a
//! handler, exit 139 and the report host-linux gives for the SIGSEGV
//! (`unhandled memory fault in the picoprocess at address A (instruction
//! I)`). A page fault the region map allows is a translation cached
//! before its page gained that access: the instruction is retried.
use super::vcpu::{Cpu, Outcome};
use super::PicoVm;
use crate::layout::*;
use crate::longmode::USER_RFLAGS;
use crate::pal::KvmPal;
use kvm_bindings::kvm_regs;
use kvm_ioctls::SyncReg;
use moat_host_common::protocol::ReportKind;
use moat_host_common::sys;
use moat_pal::{exception_disposition, exception_kind, prot, ExceptionInfo};
use std::sync::atomic::Ordering;

/// Nested exception upcalls one thread may be in at once.
const MAX_UPCALL_DEPTH: u32 = 4;

impl PicoVm {
    /// DkThreadRaiseException: the guest's upcall with a RAISED exception;
    /// the call returns the disposition. Err: the thread ended inside.
    pub(super) fn raise(&self, pal: &KvmPal, cpu: &mut Cpu, r: &kvm_regs) -> Result<i64, i32> {
        let (code, arg) = (r.rsi as u32, r.rdx);
        let info = ExceptionInfo {
            kind: exception_kind::RAISED,
            code,
            fault_addr: 0,
            arg,
            rip: r.rip,
            rsp: r.rsp,
        };
        match self.upcall(pal, cpu, info, *r)? {
            Some((d, _, _)) => Ok(d as i64),
            None => self.die(
                ReportKind::Exception,
                format_args!("unhandled raised exception (code {code}, argument {arg:#x}): no exception handler is registered"),
                134,
            ),
        }
    }

    /// An exception from the IDT: the stub pushed an error code (or 0) and
    /// rax, then left with the vector in al.
    pub(super) fn on_exception(&self, pal: &KvmPal, cpu: &mut Cpu, vector: u8) -> Result<(), i32> {
        let r = cpu.vcpu.sync_regs().regs;
        // The frame is on this thread's CPL 0 stack, in the VMM's own
        // memory (the picoprocess cannot reach it).
        let (lo, hi) = (cpu.tss + TSS_LIMIT + 1, cpu.tss + TSS_STACK_TOP);
        let frame_ok = r.rsp >= lo && r.rsp.checked_add(7 * 8).is_some_and(|e| e <= hi);
        if !frame_ok {
            self.die(
                ReportKind::Exception,
                format_args!(
                    "exception {vector} with an unusable stack (rsp {:#x})",
                    r.rsp
                ),
                128 + libc::SIGSEGV,
            );
        }
        let w = |i: u64| -> u64 { sys::get(r.rsp + i * 8) };
        let (saved_rax, err, rip, _cs, rflags, rsp) = (w(0), w(1), w(2), w(3), w(4), w(5));
        self.check_syscall(vector, err, rip, saved_rax);
        let mut ctx = r;
        ctx.rax = saved_rax;
        ctx.rip = rip;
        ctx.rsp = rsp;
        // Arithmetic and direction flags from the guest; IOPL 3 always.
        ctx.rflags = (rflags & 0xcd5) | USER_RFLAGS;
        let fault_addr = if vector == 14 {
            cpu.vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0)
        } else {
            0
        };
        // Back to CPL 3: the upcall and the resumed code run there.
        if cpu.vcpu.set_sregs(&cpu.sregs).is_err() {
            self.die(
                ReportKind::Exception,
                format_args!("cannot return from exception {vector} to the picoprocess"),
                125,
            );
        }
        if vector == 14 && self.stale_fault(cpu, err, fault_addr, rip) {
            self.set_regs(cpu, &ctx);
            return Ok(());
        }
        let (kind, sig, what) = match vector {
            0 | 16 | 19 => (
                exception_kind::ARITHMETIC,
                libc::SIGFPE,
                "arithmetic exception",
            ),
            6 => (
                exception_kind::ILLEGAL_INSTRUCTION,
                libc::SIGILL,
                "illegal instruction",
            ),
            1 | 3 => (exception_kind::BREAKPOINT, libc::SIGTRAP, "breakpoint"),
            12 | 17 => (exception_kind::MEMORY_FAULT, libc::SIGBUS, "memory fault"),
            _ => (exception_kind::MEMORY_FAULT, libc::SIGSEGV, "memory fault"),
        };
        let info = ExceptionInfo {
            kind,
            code: vector as u32,
            fault_addr,
            arg: 0,
            rip,
            rsp,
        };
        self.deliver(pal, cpu, info, ctx, what, sig)
    }

    /// Whether a page fault (error code `err`) at `addr` is one the region
    /// map allows: a vCPU that cached the page's translation before a
    /// change gave the page this access (see [`crate::paging`], step 3).
    /// Waits for a change in progress first. The same fault three times in
    /// a row is not stale.
    fn stale_fault(&self, cpu: &mut Cpu, err: u64, addr: u64, rip: u64) -> bool {
        const WRITE: u64 = 1 << 1;
        const FETCH: u64 = 1 << 4;
        let need = if err & FETCH != 0 {
            prot::EXEC
        } else if err & WRITE != 0 {
            prot::WRITE
        } else {
            prot::READ
        };
        let allowed = {
            let _pt = self.pt.lock();
            let map = self.lin.regions.read().unwrap();
            map.check(addr, 1, need).is_ok()
        };
        if !allowed {
            cpu.stale = (0, 0, 0);
            return false;
        }
        let n = match cpu.stale {
            (r, a, n) if (r, a) == (rip, addr) => n + 1,
            _ => 1,
        };
        cpu.stale = (rip, addr, n);
        n <= 3
    }

    /// A system-call instruction never reaches the host from the VM (it
    /// faults); report it as the sandbox violation it is, named as
    /// host-linux names it (rax holds the number).
    pub(super) fn check_syscall(&self, vector: u8, err: u64, rip: u64, rax: u64) {
        let insn: [u8; 2] = if self.lin.check_r(rip, 2).is_ok() {
            sys::get(rip)
        } else {
            [0, 0]
        };
        let violation = |msg: std::fmt::Arguments<'_>| -> ! {
            self.die(
                ReportKind::Violation,
                msg,
                moat_host_common::protocol::EXIT_SANDBOX_VIOLATION,
            )
        };
        if vector == 6 && (insn == [0x0f, 0x05] || insn == [0x0f, 0x34]) {
            let nr = rax as u32;
            let t = sys::SYSCALL_NAMES;
            match t.binary_search_by_key(&nr, |(n, _)| *n) {
                Ok(i) => violation(format_args!(
                    "sandbox violation: system call `{}` ({nr}) from guest code at {rip:#x} is not allowed",
                    t[i].1
                )),
                Err(_) => violation(format_args!(
                    "sandbox violation: system call {nr} from guest code at {rip:#x} is not allowed"
                )),
            }
        }
        // `int 0x80`: a #GP naming IDT entry 0x80 (or, nested, a #UD).
        if (vector == 13 && err == (0x80 << 3) | 2) || insn == [0xcd, 0x80] {
            violation(format_args!(
                "sandbox violation: 32-bit system call {} (int 0x80) at {rip:#x} is not allowed",
                rax as u32
            ))
        }
    }

    /// A guest access to RAM the picoprocess does not have (or not with
    /// that access): KVM reports it as an MMIO access inside guest RAM.
    /// The access has been skipped (a read yields zeros); the exception
    /// reports the instruction after it.
    pub(super) fn on_memory_fault(
        &self,
        pal: &KvmPal,
        cpu: &mut Cpu,
        addr: u64,
        _write: bool,
    ) -> Result<(), i32> {
        // Complete the pending emulated access before touching registers.
        cpu.vcpu.set_kvm_immediate_exit(1);
        let _ = cpu.vcpu.run();
        cpu.vcpu.set_kvm_immediate_exit(0);
        let r = match cpu.vcpu.get_regs() {
            Ok(r) => r,
            Err(_) => self.die(
                ReportKind::Exception,
                format_args!("memory fault at {addr:#x}"),
                128 + libc::SIGSEGV,
            ),
        };
        let info = ExceptionInfo {
            kind: exception_kind::MEMORY_FAULT,
            code: 14,
            fault_addr: addr,
            arg: 0,
            rip: r.rip,
            rsp: r.rsp,
        };
        // Worded as host-linux words the SIGSEGV (which does not tell a
        // read from a write either).
        self.deliver(pal, cpu, info, r, "memory fault", libc::SIGSEGV)
    }

    /// Hand an exception to the guest's handler; resume where it says, or
    /// end the picoprocess as host-linux does for the same signal.
    fn deliver(
        &self,
        pal: &KvmPal,
        cpu: &mut Cpu,
        info: ExceptionInfo,
        ctx: kvm_regs,
        what: &str,
        sig: i32,
    ) -> Result<(), i32> {
        let (addr, rip) = (info.fault_addr, info.rip);
        match self.upcall(pal, cpu, info, ctx)? {
            Some((d, new, mut ctx)) if d == exception_disposition::RESUME as u64 => {
                ctx.rip = new.rip;
                ctx.rsp = new.rsp;
                self.set_regs(cpu, &ctx);
                Ok(())
            }
            _ => self.die(
                ReportKind::Exception,
                format_args!(
                    "unhandled {what} in the picoprocess at address {addr:#x} (instruction {rip:#x})"
                ),
                128 + sig,
            ),
        }
    }

    fn set_regs(&self, cpu: &mut Cpu, r: &kvm_regs) {
        cpu.vcpu.sync_regs_mut().regs = kvm_regs {
            rflags: r.rflags | USER_RFLAGS,
            ..*r
        };
        cpu.vcpu.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Run the registered LibOsExceptionDispatch with `info` on the
    /// thread's exception stack. Ok(None): no usable handler. Ok(Some):
    /// the disposition, the info as the handler left it, and `ctx` (the
    /// registers to resume with; for a raised exception, with the call's
    /// result). Err: the thread ended inside the handler.
    fn upcall(
        &self,
        pal: &KvmPal,
        cpu: &mut Cpu,
        info: ExceptionInfo,
        ctx: kvm_regs,
    ) -> Result<Option<(u64, ExceptionInfo, kvm_regs)>, i32> {
        let sb = self.lin.startup.load(Ordering::Acquire);
        let field = sb + std::mem::offset_of!(moat_pal::StartupBlock, exception_upcall) as u64;
        if sb == 0 || self.lin.check_r(field, 8).is_err() {
            return Ok(None);
        }
        let upcall: u64 = sys::get(field);
        let exec = self
            .lin
            .regions
            .read()
            .unwrap()
            .check(upcall, 1, prot::EXEC)
            .is_ok();
        if upcall == 0 || !exec || cpu.depth >= MAX_UPCALL_DEPTH {
            return Ok(None);
        }
        // Nested upcalls run below the interrupted one on the same stack.
        let top = if cpu.depth == 0 {
            cpu.alt_top
        } else {
            ctx.rsp.saturating_sub(256)
        };
        let size = std::mem::size_of::<ExceptionInfo>() as u64;
        let Some(at) = top.checked_sub(size + 16).map(|a| (a + 8) & !15) else {
            return Ok(None);
        };
        if at < 8 || self.lin.check_w(at - 8, size + 8).is_err() {
            return Ok(None);
        }
        sys::put(at, info);
        sys::put(at - 8, UPCALL_RETURN);
        let call = kvm_regs {
            rip: upcall,
            rdi: at,
            rsp: at - 8,
            rflags: USER_RFLAGS,
            ..ctx
        };
        self.set_regs(cpu, &call);
        cpu.depth += 1;
        // Seen by the freeze too: waits inside an upcall are not cut.
        moat_host_common::signals::upcall(true);
        let out = self.run_until(pal, cpu);
        moat_host_common::signals::upcall(false);
        cpu.depth -= 1;
        match out {
            Outcome::ThreadExit(code) => Err(code),
            Outcome::UpcallReturned(d) => {
                let new: ExceptionInfo = if self.lin.check_r(at, size).is_ok() {
                    sys::get(at)
                } else {
                    info
                };
                let mut ctx = ctx;
                if info.kind == exception_kind::RAISED {
                    // The raising call returns the disposition, after its `out`.
                    ctx.rax = d;
                }
                self.set_regs(cpu, &ctx);
                Ok(Some((d, new, ctx)))
            }
        }
    }
}
