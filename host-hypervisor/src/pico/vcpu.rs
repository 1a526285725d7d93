//! The vCPU loop of one guest thread: set the vCPU up (its TSS, user
//! mode, the system-call MSRs, the entry registers), run it, and act on
//! each exit: hypercalls (`out` to the hypercall port, decoded by the
//! dispatcher generated from the ABI spec, answered in `rax`), device
//! ports and MMIO, the VMM's own ports (exceptions, system-call
//! instructions, the end of an exception upcall), the watchdog, and the
//! ways a vCPU cannot go on.
use super::{PicoVm, Stacks, ALTSTACK_SIZE, STACK_SIZE};
use crate::guest_thread::set_thread_param;
use crate::layout::*;
use crate::longmode::{self, USER_RFLAGS};
use crate::pal::KvmPal;
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use moat_host_common::protocol::ReportKind;
use moat_host_common::sys;
use moat_host_common::vmstats::Counter;
use moat_pal::dispatch::dispatch;
use moat_pal::nr::{DK_PROCESS_EXIT, DK_THREAD_EXIT, DK_THREAD_RAISE_EXCEPTION};
use moat_pal::{Error, Pal};

impl PicoVm {
    /// Set a vCPU up for a thread: its TSS slot (RSP0: where an exception
    /// from CPL 3 pushes its frame, at the bottom of its exception stack;
    /// an I/O permission bitmap that allows every port, since a nested
    /// PVM host checks the bitmap, not IOPL: the VMM decides on each
    /// access), user mode, the system-call MSRs. `None` if KVM refuses.
    pub(super) fn prepare(&self, vcpu: &VcpuFd) -> Option<(u64, u64, kvm_sregs)> {
        let slot = self.tss_free.lock().unwrap().pop()?;
        let tss = self.tss_base + slot * TSS_SLOT;
        // The VMM's own memory (outside the region map), at the same
        // address in the VMM: write it directly.
        sys::copy_out(tss, &longmode::tss(tss + TSS_STACK_TOP));
        let mut sregs = self.template;
        sregs.tr = longmode::tss_segment(tss);
        // A system-call instruction in the picoprocess enters
        // SYSCALL_TRAP, which reports it to the VMM: it never reaches the
        // host.
        if vcpu.set_sregs(&sregs).is_err()
            || longmode::set_syscall_msrs(vcpu, SYSCALL_TRAP).is_err()
        {
            self.tss_free.lock().unwrap().push(slot);
            return None;
        }
        Some((slot, tss, sregs))
    }

    /// Run one guest thread to its end; returns its exit code.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_thread(
        &self,
        pal: &KvmPal,
        id: u64,
        vcpu: VcpuFd,
        stacks: &Stacks,
        entry: u64,
        arg: u64,
        param: u64,
    ) -> i32 {
        set_thread_param(param);
        let Some((slot, tss, sregs)) = self.prepare(&vcpu) else {
            return 125;
        };
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
        self.run_from(pal, id, vcpu, (slot, tss, sregs), regs, stacks.alt)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_from(
        &self,
        pal: &KvmPal,
        id: u64,
        mut vcpu: VcpuFd,
        (slot, tss, sregs): (u64, u64, kvm_sregs),
        regs: kvm_regs,
        alt: u64,
    ) -> i32 {
        if vcpu.set_regs(&regs).is_err() {
            return 125;
        }
        vcpu.set_sync_valid_reg(SyncReg::Register);
        let mut cpu = Cpu {
            id,
            vcpu,
            sregs,
            tss,
            alt_top: alt + ALTSTACK_SIZE,
            depth: 0,
            stale: (0, 0, 0),
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

    /// Run a vCPU until its thread exits (or, inside an exception upcall,
    /// until the upcall returns).
    pub(super) fn run_until(&self, pal: &KvmPal, cpu: &mut Cpu) -> Outcome {
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
                        true => Ex::Handled(None),
                        false => Ex::BadPort(port),
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if self.devices.mmio_read(addr, data) {
                        Ex::Handled(Some(false))
                    } else {
                        data.fill(0);
                        Ex::MemFault(addr, false)
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if self.devices.mmio_write(self.lin, addr, data) {
                        Ex::Handled(Some(true))
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
            crate::stats::count(exit.counter());
            match exit {
                Ex::Handled(_) => {}
                Ex::Interrupted if fired => self.die(
                    ReportKind::Exception,
                    format_args!(
                        "watchdog: a picoprocess thread ran {:?} without leaving the VM (a runaway loop, or an instruction that never returns under this hypervisor); the limit is cpu_seconds, or 60 s",
                        self.watchdog
                    ),
                    // As the CPU-time limit ends a linux picoprocess.
                    128 + libc::SIGKILL,
                ),
                Ex::Interrupted => {
                    if moat_host_common::freeze::freezing() {
                        self.maybe_stop(cpu, None);
                    }
                }
                Ex::Out(HYPERCALL_PORT, nr, 4) => {
                    let r = cpu.vcpu.sync_regs().regs;
                    // Calls served here rather than through the layers:
                    // each layer still sees them (`Stack::enter`).
                    let layers = self.layers.get().filter(|s| !s.is_empty());
                    if nr == DK_THREAD_EXIT || nr == DK_PROCESS_EXIT {
                        if let Some(s) = layers {
                            s.enter(nr, &[r.rsi, r.rdx]);
                        }
                        let code = r.rsi as i32;
                        moat_host_common::freeze::exiting();
                        if nr == DK_PROCESS_EXIT {
                            sys::exit_process(code);
                        }
                        return Outcome::ThreadExit(code);
                    }
                    let ret = if nr == DK_THREAD_RAISE_EXCEPTION {
                        if let Some(s) = layers {
                            s.enter(nr, &[r.rsi, r.rdx]);
                        }
                        match self.raise(pal, cpu, &r) {
                            Ok(v) => v,
                            Err(code) => return Outcome::ThreadExit(code),
                        }
                    } else {
                        let words = [r.rsi, r.rdx, r.rcx, r.r8, r.r9, self.stack_arg(r.rsp)];
                        let p: &dyn Pal = match layers {
                            Some(s) => s.top,
                            None => pal,
                        };
                        dispatch(p, nr, &words).unwrap_or(Error::NotSupported.code())
                    };
                    let regs = &mut cpu.vcpu.sync_regs_mut().regs;
                    regs.rax = ret as u64;
                    // Written back whole: keep IOPL 3 (the hypercall `out`).
                    regs.rflags |= USER_RFLAGS;
                    cpu.vcpu.set_sync_dirty_reg(SyncReg::Register);
                    // The checkpoint layer asked for a stop as it returns.
                    if let Some(stop) = moat_host_common::freeze::take_stop() {
                        self.maybe_stop(cpu, Some(stop));
                    }
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
}

/// A guest thread's vCPU as its loop runs it.
pub(super) struct Cpu {
    /// Names the run for the watchdog.
    pub(super) id: u64,
    pub(super) vcpu: VcpuFd,
    /// Its user-mode system registers (to return from an exception stub).
    pub(super) sregs: kvm_sregs,
    /// Its TSS; the CPL 0 stack is the rest of the slot.
    pub(super) tss: u64,
    /// The top of its exception stack.
    pub(super) alt_top: u64,
    /// How many exception upcalls it is in.
    pub(super) depth: u32,
    /// The last page fault retried as stale: instruction, address, times.
    pub(super) stale: (u64, u64, u32),
}

/// Why [`PicoVm::run_until`] returned.
pub(super) enum Outcome {
    ThreadExit(i32),
    UpcallReturned(u64),
}

/// A vCPU exit, as the loop sorts it.
enum Ex {
    /// A device access served: `Some(write)` for MMIO, `None` for a port.
    Handled(Option<bool>),
    Interrupted,
    Out(u16, u32, usize),
    BadPort(u16),
    MemFault(u64, bool),
    TripleFault,
    HostFault,
    Fatal(String),
}

impl Ex {
    /// The statistics counter of this exit.
    fn counter(&self) -> Counter {
        match self {
            Ex::Out(HYPERCALL_PORT, _, 4) => Counter::ExitHypercall,
            Ex::Out(..) | Ex::BadPort(_) => Counter::ExitPio,
            Ex::Interrupted => Counter::ExitInterrupted,
            Ex::Handled(Some(write)) | Ex::MemFault(_, write) => {
                if *write {
                    Counter::ExitMmioWrite
                } else {
                    Counter::ExitMmioRead
                }
            }
            Ex::Handled(None) => Counter::ExitPio,
            Ex::TripleFault | Ex::HostFault | Ex::Fatal(_) => Counter::ExitOther,
        }
    }
}

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
