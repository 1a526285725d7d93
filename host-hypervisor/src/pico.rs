//! A picoprocess in a micro-VM: the VM, its vCPUs (one per picoprocess
//! thread, each run by its own VMM thread), hypercall dispatch and
//! exception delivery.
//!
//! Every ABI call leaves the guest through its stub (`out` to the hypercall
//! port); the vCPU thread reads the arguments from the vCPU's registers
//! (shared with KVM through `kvm_run`, no system call), decodes the call
//! with the dispatcher generated from the ABI spec, and answers in `rax`.
//! Guest exceptions go through a small IDT whose stubs leave by `out` to
//! the exception port; the VMM then runs the guest's LibOsExceptionDispatch
//! on the thread's exception stack and resumes or ends the picoprocess as
//! it answers. A vCPU that runs past its watchdog without leaving ends the
//! picoprocess with a report.
use crate::devices::DeviceSet;
use crate::layout::*;
use crate::pal::KvmPal;
use crate::watchdog::Watchdog;
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use moat_host_common::objects::{Object, ThreadObj};
use moat_host_common::pal::LinuxPal;
use moat_host_common::protocol::ReportKind;
use moat_host_common::{signals, sys};
use moat_pal::dispatch::dispatch;
use moat_pal::memory::RegionKind;
use moat_pal::{exception_disposition, exception_kind, prot, Error, ExceptionInfo, Pal};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Guest thread stacks (a guard page below each) and exception stacks.
pub const STACK_SIZE: u64 = 1 << 20;
pub const ALTSTACK_SIZE: u64 = 64 << 10;
const PAGE: u64 = 0x1000;
/// Nested exception upcalls one thread may be in at once.
const MAX_UPCALL_DEPTH: u32 = 4;
/// The VMM's own signal stack per vCPU thread.
const SIGNAL_STACK: u64 = 64 << 10;

fn nr_of(name: &str) -> u32 {
    moat_pal::CALL_NAMES
        .iter()
        .position(|n| *n == name)
        .map_or(0, |i| i as u32 + 1)
}

/// The VM of one picoprocess.
pub struct PicoVm {
    vm: VmFd,
    pub ram_end: u64,
    tss_base: u64,
    /// Free TSS slots (one per running thread).
    tss_free: Mutex<Vec<u64>>,
    dog: Watchdog,
    /// vCPUs of ended threads, for the next thread (KVM cannot destroy one).
    idle: Mutex<Vec<VcpuFd>>,
    next_id: AtomicU64,
    next_run: AtomicU64,
    template: kvm_sregs,
    pub lin: &'static LinuxPal,
    pub devices: DeviceSet,
    /// How long guest code may run without leaving the VM.
    pub watchdog: Duration,
    pub trace: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PicoError {
    #[error("KVM refused {what}: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Setup(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PicoError {
    move |err| PicoError::Kvm { what, err }
}

impl PicoVm {
    /// The picoprocess's VM, from a shell made earlier (a warm VMM makes
    /// its shell before it is handed a picoprocess).
    pub fn new(shell: VmShell, lin: &'static LinuxPal, devices: DeviceSet) -> PicoVm {
        lin.regions
            .write()
            .unwrap()
            .set_window(RAM_START, shell.tss_base);
        PicoVm {
            vm: shell.vm,
            ram_end: shell.tss_base,
            tss_base: shell.tss_base,
            tss_free: Mutex::new((0..shell.threads.max(1)).rev().collect()),
            dog: shell.dog,
            idle: Mutex::new(vec![shell.first]),
            next_id: AtomicU64::new(1),
            next_run: AtomicU64::new(0),
            template: shell.template,
            lin,
            devices,
            watchdog: Duration::from_secs(60),
            trace: false,
        }
    }

    /// A vCPU for a new thread: an idle one or a fresh one.
    /// A vCPU for a new thread: an idle one or a fresh one (KVM ids only
    /// advance when a vCPU is created). The id returned names the run for
    /// the watchdog and is never reused.
    fn vcpu(&self) -> Result<(u64, VcpuFd), Error> {
        let run = self.next_run.fetch_add(1, Ordering::Relaxed);
        if let Some(v) = self.idle.lock().unwrap().pop() {
            return Ok((run, v));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let v = self.vm.create_vcpu(id).map_err(|_| Error::LimitExceeded)?;
        Ok((run, v))
    }

    /// Allocate a stack with a guard page below it, and an exception stack.
    fn stacks(&self) -> Result<Stacks, Error> {
        let r = &self.lin.regions;
        let rw = prot::READ | prot::WRITE;
        let mut g = r.write().unwrap();
        let total = STACK_SIZE + PAGE + ALTSTACK_SIZE;
        let base = g
            .find_free(total, RAM_START, self.ram_end)
            .ok_or(Error::NoMemory)?;
        // The guard page stays unmapped: a stack overflow is a fault.
        let stack = base + PAGE;
        let alt = stack + STACK_SIZE;
        sys::mmap_anon(stack, STACK_SIZE + ALTSTACK_SIZE, rw).map_err(|_| Error::NoMemory)?;
        if g.insert(stack, STACK_SIZE, rw, RegionKind::Stack).is_err()
            || g.insert(alt, ALTSTACK_SIZE, rw, RegionKind::Stack).is_err()
        {
            g.remove(stack, STACK_SIZE);
            let _ = sys::munmap(stack, STACK_SIZE + ALTSTACK_SIZE);
            return Err(Error::NoMemory);
        }
        Ok(Stacks { stack, alt })
    }

    fn free_stacks(&self, s: &Stacks) {
        let mut g = self.lin.regions.write().unwrap();
        g.remove(s.stack, STACK_SIZE);
        g.remove(s.alt, ALTSTACK_SIZE);
        let _ = sys::munmap(s.stack, STACK_SIZE + ALTSTACK_SIZE);
    }

    /// Start a guest thread: a vCPU at `entry` with `arg` as its first
    /// argument, run by a new VMM thread. `done` is signalled when it ends.
    pub fn spawn_thread(
        self: &Arc<Self>,
        pal: Arc<KvmPal>,
        entry: u64,
        arg: u64,
        param: u64,
        done: Option<Arc<Object>>,
    ) -> Result<(), Error> {
        let (id, vcpu) = self.vcpu()?;
        let stacks = match self.stacks() {
            Ok(s) => s,
            Err(e) => {
                self.idle.lock().unwrap().push(vcpu);
                return Err(e);
            }
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(move || {
                // A signal stack of our own: a fault in the VMM is reported
                // from it (see vmm.rs), even on an overflowed stack.
                if let Ok(alt) = sys::mmap_anon(0, SIGNAL_STACK, prot::READ | prot::WRITE) {
                    signals::set_altstack(alt, SIGNAL_STACK);
                }
                let code = me.run_thread(&pal, id, vcpu, &stacks, entry, arg, param);
                me.free_stacks(&stacks);
                if let Some(o) = done {
                    if let Object::Thread(t) = &*o {
                        sys::eventfd_signal(std::os::fd::AsRawFd::as_raw_fd(&t.done));
                    }
                }
                if me.lin.threads_live.fetch_sub(1, Ordering::AcqRel) == 1 {
                    sys::exit_process(code);
                }
            });
        spawned.map(|_| ()).map_err(|_| Error::NoMemory)
    }

    /// Run one guest thread to its end; returns its exit code.
    #[allow(clippy::too_many_arguments)]
    fn run_thread(
        &self,
        pal: &KvmPal,
        id: u64,
        mut vcpu: VcpuFd,
        stacks: &Stacks,
        entry: u64,
        arg: u64,
        param: u64,
    ) -> i32 {
        PARAM.with(|p| p.set(param));
        // The thread's TSS (RSP0: where an exception from CPL 3 pushes its
        // frame) sits at the bottom of its exception stack.
        // Its I/O permission bitmap allows every port (a nested PVM host
        // checks the bitmap, not IOPL): the VMM decides on each access.
        let Some(slot) = self.tss_free.lock().unwrap().pop() else {
            return 125;
        };
        let tss = self.tss_base + slot * TSS_SLOT;
        // The VMM's own memory (outside the region map), at the same
        // address in the VMM: write it directly.
        sys::copy_out(tss, &vec![0u8; TSS_LIMIT as usize + 1]);
        sys::put(tss + 4, tss + TSS_STACK_TOP);
        sys::put(tss + 102, 104u16);
        sys::put(tss + TSS_LIMIT, 0xffu8);
        let mut sregs = self.template;
        sregs.tr = kvm_bindings::kvm_segment {
            base: tss,
            limit: TSS_LIMIT as u32,
            selector: 0x28,
            type_: 11,
            present: 1,
            ..Default::default()
        };
        if vcpu.set_sregs(&sregs).is_err() || set_syscall_msrs(&vcpu).is_err() {
            return 125;
        }
        let top = stacks.stack + STACK_SIZE - 16;
        // The return address: a thread whose entry returns ends.
        sys::put(top - 8, THREAD_RETURN);
        let regs = kvm_regs {
            rip: entry,
            rdi: arg,
            rsp: top - 8,
            rflags: USER_RFLAGS,
            ..Default::default()
        };
        if vcpu.set_regs(&regs).is_err() {
            return 125;
        }
        vcpu.set_sync_valid_reg(SyncReg::Register);
        let mut cpu = Cpu {
            id,
            vcpu,
            sregs,
            tss,
            alt_top: stacks.alt + ALTSTACK_SIZE,
            depth: 0,
        };
        let code = match self.run_until(pal, &mut cpu) {
            Outcome::ThreadExit(code) => code,
            Outcome::UpcallReturned(_) => self.die(
                ReportKind::Exception,
                format_args!("the picoprocess returned from an exception upcall it was not in"),
                134,
            ),
        };
        self.idle.lock().unwrap().push(cpu.vcpu);
        self.tss_free.lock().unwrap().push(slot);
        code
    }

    /// Report and end the picoprocess.
    fn die(&self, kind: ReportKind, msg: std::fmt::Arguments<'_>, code: i32) -> ! {
        signals::die(kind, msg, code)
    }

    /// Run a vCPU until its thread exits (or, inside an exception upcall,
    /// until the upcall returns).
    fn run_until(&self, pal: &KvmPal, cpu: &mut Cpu) -> Outcome {
        let thread_exit = nr_of("DkThreadExit");
        let process_exit = nr_of("DkProcessExit");
        let raise = nr_of("DkThreadRaiseException");
        loop {
            let armed = self.dog.arm(cpu.id, self.watchdog);
            let r = cpu.vcpu.run();
            let exit = match r {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let mut b = [0u8; 4];
                    let n = data.len().min(4);
                    b[..n].copy_from_slice(&data[..n]);
                    Ex::Out(port, u32::from_le_bytes(b), n)
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    let n = data.len().min(4);
                    match self.devices.pio_read(port, &mut data[..n]) {
                        true => Ex::Handled,
                        false => Ex::BadPort(port),
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if self.devices.mmio_read(addr, data) {
                        Ex::Handled
                    } else {
                        data.fill(0);
                        Ex::MemFault(addr, false)
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if self.devices.mmio_write(self.lin, addr, data) {
                        Ex::Handled
                    } else {
                        Ex::MemFault(addr, true)
                    }
                }
                Ok(VcpuExit::Hlt) => Ex::Fatal("halted (the picoprocess executed `hlt`)".into()),
                Ok(VcpuExit::Shutdown) | Ok(VcpuExit::InternalError) => Ex::TripleFault,
                Ok(VcpuExit::FailEntry(reason, _)) => Ex::Fatal(format!(
                    "KVM refused to enter the guest (reason {reason:#x})"
                )),
                Ok(other) => Ex::Fatal(format!("unexpected exit from the micro-VM: {other:?}")),
                Err(e) if e.errno() == libc::EINTR => Ex::Interrupted,
                // An exception pushed onto memory the picoprocess does not
                // have (a stack guard page): KVM cannot complete it.
                Err(e) if e.errno() == libc::EFAULT => Ex::HostFault,
                Err(e) => Ex::Fatal(format!("KVM could not run the vCPU: {e}")),
            };
            let fired = armed.disarm();
            match exit {
                Ex::Handled => {}
                Ex::Interrupted if fired => self.die(
                    ReportKind::Exception,
                    format_args!(
                        "watchdog: a picoprocess thread ran {:?} without leaving the VM (a runaway loop, or an instruction that never returns under this hypervisor); the limit is cpu_seconds, or 60 s",
                        self.watchdog
                    ),
                    // As the CPU-time limit ends a linux picoprocess.
                    128 + libc::SIGKILL,
                ),
                Ex::Interrupted => {}
                Ex::Out(HYPERCALL_PORT, nr, 4) => {
                    let r = cpu.vcpu.sync_regs().regs;
                    if nr == thread_exit || nr == process_exit {
                        let code = r.rsi as i32;
                        if self.trace {
                            trace_line(format_args!(
                                "{}(code={code})",
                                moat_pal::CALL_NAMES[nr as usize - 1]
                            ));
                        }
                        if nr == process_exit {
                            sys::exit_process(code);
                        }
                        return Outcome::ThreadExit(code);
                    }
                    let ret = if nr == raise {
                        match self.raise(pal, cpu, &r) {
                            Ok(v) => v,
                            Err(code) => return Outcome::ThreadExit(code),
                        }
                    } else {
                        let words = [r.rsi, r.rdx, r.rcx, r.r8, r.r9, self.stack_arg(r.rsp)];
                        let p: &dyn Pal = if self.trace {
                            &moat_pal::trace::TracePal {
                                inner: pal,
                                sink: trace_line,
                            }
                        } else {
                            pal
                        };
                        dispatch(p, nr, &words).unwrap_or(Error::NotSupported.code())
                    };
                    let regs = &mut cpu.vcpu.sync_regs_mut().regs;
                    regs.rax = ret as u64;
                    // Written back whole: keep IOPL 3 (the hypercall `out`).
                    regs.rflags |= USER_RFLAGS;
                    cpu.vcpu.set_sync_dirty_reg(SyncReg::Register);
                }
                // The VMM's own ports answer only their stubs: guest code
                // that writes to them directly is refused like any other
                // port it was not granted.
                Ex::Out(port @ (EXCEPTION_PORT | SYSCALL_PORT | UPCALL_RETURN_PORT), _, _)
                    if !from_stub(port, cpu.vcpu.sync_regs().regs.rip) =>
                {
                    self.bad_port(port)
                }
                Ex::Out(EXCEPTION_PORT, vector, 1) => {
                    if let Err(code) = self.on_exception(pal, cpu, vector as u8) {
                        return Outcome::ThreadExit(code);
                    }
                }
                Ex::Out(SYSCALL_PORT, _, 1) => {
                    // rcx: the instruction after `syscall`; rax: the number.
                    let r = cpu.vcpu.sync_regs().regs;
                    self.check_syscall(6, 0, r.rcx.wrapping_sub(2), r.rax);
                    self.die(
                        ReportKind::Violation,
                        format_args!(
                            "sandbox violation: system call {} from guest code is not allowed",
                            r.rax as u32
                        ),
                        moat_host_common::protocol::EXIT_SANDBOX_VIOLATION,
                    )
                }
                Ex::Out(UPCALL_RETURN_PORT, _, 1) if cpu.depth > 0 => {
                    let r = cpu.vcpu.sync_regs().regs;
                    return Outcome::UpcallReturned(r.rax);
                }
                Ex::Out(port, value, size) => {
                    if !self.devices.pio_write(port, &value.to_le_bytes()[..size]) {
                        self.bad_port(port)
                    }
                }
                Ex::BadPort(port) => self.bad_port(port),
                Ex::MemFault(addr, write) => {
                    if let Err(code) = self.on_memory_fault(pal, cpu, addr, write) {
                        return Outcome::ThreadExit(code);
                    }
                }
                Ex::HostFault => {
                    let r = cpu.vcpu.get_regs().unwrap_or_default();
                    self.die(
                        ReportKind::Exception,
                        format_args!(
                            "unhandled memory fault in the picoprocess at instruction {:#x} (stack {:#x}): it touched memory it does not have, such as a stack guard page",
                            r.rip, r.rsp
                        ),
                        128 + libc::SIGSEGV,
                    )
                }
                Ex::TripleFault => {
                    let r = cpu.vcpu.get_regs().unwrap_or_default();
                    let cr2 = cpu.vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0);
                    self.die(
                        ReportKind::Exception,
                        format_args!(
                            "the picoprocess crashed: triple fault at instruction {:#x} (stack {:#x}, last fault address {cr2:#x}): the vCPU could not deliver an exception (a stack overflow, or a corrupted IDT or page table)",
                            r.rip, r.rsp
                        ),
                        128 + libc::SIGSEGV,
                    )
                }
                Ex::Fatal(msg) => self.die(
                    ReportKind::Exception,
                    format_args!("the picoprocess crashed: {msg}"),
                    128 + libc::SIGSEGV,
                ),
            }
        }
    }

    fn bad_port(&self, port: u16) -> ! {
        self.die(
            ReportKind::Violation,
            format_args!(
                "sandbox violation: I/O port {port:#x} is not granted (declare a device that owns it)"
            ),
            moat_host_common::protocol::EXIT_SANDBOX_VIOLATION,
        )
    }

    /// The seventh argument word, on the guest stack above the return
    /// address; 0 if the stack is not readable guest memory.
    fn stack_arg(&self, rsp: u64) -> u64 {
        match rsp.checked_add(8) {
            Some(a) if self.lin.check_r(a, 8).is_ok() => sys::get(a),
            _ => 0,
        }
    }

    /// DkThreadRaiseException: the guest's upcall with a RAISED exception;
    /// the call returns the disposition. Err: the thread ended inside.
    fn raise(&self, pal: &KvmPal, cpu: &mut Cpu, r: &kvm_regs) -> Result<i64, i32> {
        let (code, arg) = (r.rsi as u32, r.rdx);
        if self.trace {
            trace_line(format_args!(
                "DkThreadRaiseException(code={code}, arg={arg:#x})"
            ));
        }
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
    fn on_exception(&self, pal: &KvmPal, cpu: &mut Cpu, vector: u8) -> Result<(), i32> {
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

    /// A system-call instruction never reaches the host from the VM (it
    /// faults); report it as the sandbox violation it is, named as
    /// host-linux names it (rax holds the number).
    fn check_syscall(&self, vector: u8, err: u64, rip: u64, rax: u64) {
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
    fn on_memory_fault(
        &self,
        pal: &KvmPal,
        cpu: &mut Cpu,
        addr: u64,
        write: bool,
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
        let what = if write {
            "memory fault (write)"
        } else {
            "memory fault (read)"
        };
        self.deliver(pal, cpu, info, r, what, libc::SIGSEGV)
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
        let out = self.run_until(pal, cpu);
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

/// A VM before it has a picoprocess: guest RAM slots, the VMM area, the
/// first vCPU, the watchdog. Everything here depends only on the memory
/// size, so a warm VMM makes it ahead of need.
pub struct VmShell {
    vm: VmFd,
    ram: u64,
    /// Where the TSS area starts (guest RAM above is the VMM's).
    tss_base: u64,
    threads: u64,
    dog: Watchdog,
    first: VcpuFd,
    template: kvm_sregs,
}

impl VmShell {
    /// `ram` bytes of guest RAM (a multiple of 2 MiB, at most [`MAX_RAM`])
    /// at the same host address, the VMM area written, one vCPU.
    pub fn new(kvm: &Kvm, ram: u64, threads: u64) -> Result<VmShell, PicoError> {
        if !(4 << 20..=MAX_RAM).contains(&ram) || !ram.is_multiple_of(2 << 20) {
            return Err(PicoError::Setup(format!(
                "guest memory of {ram} bytes is not possible on kvm (4 MiB to {} MiB, in 2 MiB steps)",
                MAX_RAM >> 20
            )));
        }
        // The identity range must be free in this process: reserve it once
        // to prove it, then give it back (the PAL maps guest memory there
        // with MAP_FIXED_NOREPLACE as the guest allocates).
        let probe = sys::mmap_anon(RAM_START, ram - RAM_START, 0).map_err(|e| {
            PicoError::Setup(format!(
                "the host range {RAM_START:#x}..{ram:#x} for guest memory is in use ({})",
                std::io::Error::from_raw_os_error(e)
            ))
        })?;
        let _ = sys::munmap(probe, ram - RAM_START);
        // The TSS area: the top of guest RAM, the VMM's own memory (never
        // in the region map, supervisor-only in the page tables).
        let area = tss_area(threads.max(1));
        if area > ram / 4 {
            return Err(PicoError::Setup(format!(
                "{threads} threads need {} MiB of guest memory for their task state on kvm; lower threads or raise memory_mib",
                area >> 20
            )));
        }
        let tss_base = ram - area;
        sys::mmap_anon(tss_base, area, prot::READ | prot::WRITE)
            .map_err(|_| PicoError::Setup("cannot allocate the task-state area".into()))?;
        let vm = kvm.create_vm().map_err(kvm_err("creating a VM"))?;
        let low = sys::mmap_anon(0, LOW_SIZE, prot::READ | prot::WRITE)
            .map_err(|_| PicoError::Setup("cannot allocate the VMM area".into()))?;
        let slots = [
            (0u32, 0u64, LOW_SIZE, low),
            (1, RAM_START, ram - RAM_START, RAM_START),
        ];
        for (slot, gpa, size, host) in slots {
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: slot 0 is our private mapping, owned by the VM for
            // its whole life; slot 1 is the guest RAM range, which only
            // the region map's owners (the PAL) map and unmap; KVM follows
            // those changes through its MMU notifiers.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("a guest memory region"))?;
        }
        Low(low as *mut u8).write(ram, tss_base);
        let dog = Watchdog::confined(Some(|| {
            crate::confine::apply(crate::confine::watchdog_rules())
        }))
        .map_err(|e| PicoError::Setup(format!("cannot start the watchdog: {e}")))?;
        // The first vCPU's reset state, turned into long mode, is the
        // template of every vCPU.
        let first = vm.create_vcpu(0).map_err(kvm_err("creating a vCPU"))?;
        let mut template = first.get_sregs().map_err(kvm_err("reading sregs"))?;
        crate::vm::long_mode(&mut template, GDT, PML4);
        user_mode(&mut template);
        template.idt.base = IDT;
        template.idt.limit = 32 * 16 - 1;
        // The VMM area is never unmapped: KVM maps it for the VM's life.
        Ok(VmShell {
            vm,
            ram,
            tss_base,
            threads,
            dog,
            first,
            template,
        })
    }

    pub fn ram(&self) -> u64 {
        self.ram
    }

    pub fn threads(&self) -> u64 {
        self.threads
    }
}

/// The VMM area (slot 0) in host memory, written during set-up only.
struct Low(*mut u8);

impl Low {
    fn w64(&self, gpa: u64, v: u64) {
        assert!(gpa + 8 <= LOW_SIZE);
        // SAFETY: inside our LOW_SIZE mapping (asserted); set-up only.
        unsafe { std::ptr::write_unaligned(self.0.add(gpa as usize) as *mut u64, v) };
    }

    fn bytes(&self, gpa: u64, b: &[u8]) {
        assert!(gpa as usize + b.len() <= LOW_SIZE as usize);
        // SAFETY: inside our LOW_SIZE mapping (asserted); set-up only.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.0.add(gpa as usize), b.len()) };
    }

    fn write(&self, ram_end: u64, tss_base: u64) {
        // Page tables: the first 2 MiB in 4 KiB pages without page 0, the
        // rest of RAM in 2 MiB pages, and one 2 MiB uncached page of
        // device windows at MMIO_BASE.
        // Every entry is user-accessible (U, bit 2): picoprocess code runs
        // at CPL 3. The VMM area is read-only to it.
        const P_RW_U: u64 = 0x7;
        self.w64(PML4, PDPT | P_RW_U);
        for (i, pd) in PD.iter().enumerate() {
            self.w64(PDPT + i as u64 * 8, pd | P_RW_U);
        }
        self.w64(PDPT + 3 * 8, PD_MMIO | P_RW_U);
        self.w64(PD[0], PT0 | P_RW_U);
        for p in 1..512u64 {
            // The VMM area is supervisor-only, but the page of call stubs
            // and trampolines and the page of the table (read-only).
            let a = p * PAGE;
            let flags = if a == CALL_STUBS || a == TABLE {
                0x5
            } else if a < LOW_SIZE {
                0x3
            } else {
                P_RW_U
            };
            self.w64(PT0 + p * 8, (p * PAGE) | flags);
        }
        let big = 2u64 << 20;
        for i in 1..ram_end / big {
            let gpa = i * big;
            let pd = PD[(gpa >> 30) as usize];
            let user = if gpa >= tss_base { 0 } else { 0x4 };
            self.w64(pd + ((gpa >> 21) & 511) * 8, gpa | 0x83 | user);
        }
        self.w64(PD_MMIO, MMIO_BASE | 0x80 | 0x18 | P_RW_U); // PS | PCD | PWT
                                                             // GDT: null, kernel code and data (exception stubs), user code and
                                                             // data (the picoprocess), and a 64-bit TSS descriptor (each vCPU's
                                                             // TSS base is set in its TR directly).
        self.w64(GDT, 0);
        self.w64(GDT + 0x08, 0x00af_9a00_0000_ffff);
        self.w64(GDT + 0x10, 0x00cf_9200_0000_ffff);
        self.w64(GDT + 0x18, 0x00af_fa00_0000_ffff);
        self.w64(GDT + 0x20, 0x00cf_f200_0000_ffff);
        self.w64(GDT + 0x28, 0x0000_8900_0000_0067);
        self.w64(GDT + 0x30, 0);
        // Exception stubs and the IDT (interrupt gates, ring 0).
        const WITH_ERROR_CODE: [u8; 9] = [8, 10, 11, 12, 13, 14, 17, 21, 30];
        for v in 0..32u8 {
            let mut stub = Vec::with_capacity(16);
            if !WITH_ERROR_CODE.contains(&v) {
                stub.extend([0x6a, 0x00]); // push 0
            }
            stub.push(0x50); // push rax
            stub.extend([0xb0, v]); // mov al, v
            stub.extend([0xe6, EXCEPTION_PORT as u8]); // out port, al
            stub.extend([0x0f, 0x0b]); // ud2 (never reached)
            stub.resize(16, 0xcc);
            let at = EXC_STUBS + v as u64 * 16;
            self.bytes(at, &stub);
            let lo: u64 =
                (at & 0xffff) | (8 << 16) | (0x8e00u64 << 32) | (((at >> 16) & 0xffff) << 48);
            self.w64(IDT + v as u64 * 16, lo);
            self.w64(IDT + v as u64 * 16 + 8, at >> 32);
        }
        // `syscall`/`sysenter` land here (CPL 0): out port, al; ud2
        self.bytes(SYSCALL_TRAP, &[0xe6, SYSCALL_PORT as u8, 0x0f, 0x0b]);
        // out port, al; ud2
        self.bytes(UPCALL_RETURN, &[0xe6, UPCALL_RETURN_PORT as u8, 0x0f, 0x0b]);
        // A thread whose entry returns calls DkThreadExit(0):
        // xor esi, esi; mov eax, NR; out port, eax; ud2
        let mut t = vec![0x31, 0xf6, 0xb8];
        t.extend(nr_of("DkThreadExit").to_le_bytes());
        t.extend([0xe7, HYPERCALL_PORT as u8, 0x0f, 0x0b]);
        self.bytes(THREAD_RETURN, &t);
        // Hypercall stubs and the function table.
        let n = moat_pal::NUM_CALLS as u64;
        let mut table = Vec::new();
        table.extend(moat_pal::ABI_VERSION.to_le_bytes());
        table.extend(moat_pal::NUM_CALLS.to_le_bytes());
        table.extend(0u64.to_le_bytes()); // ctx
        for i in 0..n {
            let mut stub = vec![0xb8];
            stub.extend((i as u32 + 1).to_le_bytes());
            stub.extend([0xe7, HYPERCALL_PORT as u8, 0xc3]);
            self.bytes(CALL_STUBS + i * 8, &stub);
            table.extend((CALL_STUBS + i * 8).to_le_bytes());
        }
        debug_assert_eq!(table.len(), std::mem::size_of::<moat_pal::PalTable>());
        self.bytes(TABLE, &table);
    }
}

struct Stacks {
    stack: u64,
    alt: u64,
}

struct Cpu {
    id: u64,
    vcpu: VcpuFd,
    /// Its user-mode system registers (to return from an exception stub).
    sregs: kvm_sregs,
    /// Its TSS; the CPL 0 stack is the rest of the slot.
    tss: u64,
    alt_top: u64,
    depth: u32,
}

enum Outcome {
    ThreadExit(i32),
    UpcallReturned(u64),
}

enum Ex {
    Handled,
    Interrupted,
    Out(u16, u32, usize),
    BadPort(u16),
    MemFault(u64, bool),
    TripleFault,
    HostFault,
    Fatal(String),
}

thread_local! {
    static PARAM: Cell<u64> = const { Cell::new(0) };
}

/// Picoprocess code runs at CPL 3 with IOPL 3 (so `out` and `in` work):
/// under nested PVM, code at CPL 0 is emulated instruction by
/// instruction, while CPL 3 code runs natively. Only the exception stubs
/// run at CPL 0 (a handful of instructions, on exceptions only).
fn user_mode(s: &mut kvm_sregs) {
    let seg = |selector: u16, type_: u8, l: u8| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: if l == 1 { 0 } else { 1 },
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = seg(0x1b, 11, 1);
    let d = seg(0x23, 3, 0);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
    s.gdt.limit = 7 * 8 - 1;
    // Write-protect at CPL 0 too: an exception push cannot write a
    // read-only page.
    s.cr0 |= 0x1_0000;
    s.efer |= 1; // SCE: `syscall` enters SYSCALL_TRAP
}

/// A system-call instruction in the picoprocess enters [`SYSCALL_TRAP`],
/// which reports it to the VMM: it never reaches the host.
fn set_syscall_msrs(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let entries = [
        (0xc000_0081u32, (0x08u64 << 32) | (0x10u64 << 48)), // STAR
        (0xc000_0082, SYSCALL_TRAP),                         // LSTAR
        (0xc000_0083, SYSCALL_TRAP),                         // CSTAR
        (0xc000_0084, 0x4700),                               // FMASK: TF DF IF IOPL NT
        (0x174, 0x08),                                       // SYSENTER_CS
        (0x176, SYSCALL_TRAP),                               // SYSENTER_EIP
    ];
    let list: Vec<kvm_bindings::kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = kvm_bindings::Msrs::from_entries(&list)
        .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    vcpu.set_msrs(&msrs).map(|_| ())
}

/// RFLAGS of picoprocess code: IOPL 3, reserved bit 1.
pub const USER_RFLAGS: u64 = 0x3002;

/// Whether an `out` to one of the VMM's internal ports came from the stub
/// that owns it (`rip` is the address after the instruction).
fn from_stub(port: u16, rip: u64) -> bool {
    match port {
        EXCEPTION_PORT => (EXC_STUBS..EXC_STUBS + 32 * 16).contains(&rip),
        SYSCALL_PORT => rip == SYSCALL_TRAP + 2,
        UPCALL_RETURN_PORT => rip == UPCALL_RETURN + 2,
        _ => false,
    }
}

/// DkThreadGetParameter of the calling vCPU thread.
pub fn thread_param() -> u64 {
    PARAM.with(|p| p.get())
}

pub(crate) fn trace_line(line: std::fmt::Arguments<'_>) {
    if let Some(p) = moat_host_common::pal::global_opt() {
        p.tell(&moat_host_common::protocol::Request::Debug {
            text: format!("trace: {line}"),
        });
    }
}

/// A thread object for DkThreadCreate (waitable; signalled at its end).
pub fn thread_object() -> Result<Arc<Object>, Error> {
    let done = sys::eventfd().map_err(|_| Error::LimitExceeded)?;
    Ok(Arc::new(Object::Thread(ThreadObj { done })))
}
