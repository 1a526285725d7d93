//! A picoprocess in a micro-VM: [`PicoVm`], the VM of one picoprocess,
//! and its threads (one vCPU per picoprocess thread, each run by its own
//! VMM thread, with a stack and an exception stack in guest RAM).
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
//!
//! - [`shell`]: the VM before its picoprocess ([`VmShell`]: KVM's VM,
//!   guest RAM, the VMM area with its page tables, GDT, IDT and stubs);
//! - `vcpu`: a thread's vCPU loop (exits, hypercalls, the watchdog);
//! - `exception`: exceptions, system-call instructions and memory
//!   faults delivered to the guest's handler.
use crate::devices::DeviceSet;
use crate::layout::*;
use crate::paging::PageTables;
use crate::pal::{KvmPal, SpawnThread};
use crate::watchdog::Watchdog;
use kvm_bindings::kvm_sregs;
use kvm_ioctls::{VcpuFd, VmFd};
use moat_host_common::objects::Object;
use moat_host_common::pal::LinuxPal;
use moat_host_common::protocol::ReportKind;
use moat_host_common::{signals, sys};
use moat_pal::memory::RegionKind;
use moat_pal::{prot, Error};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod exception;
mod frozen;
pub mod shell;
mod vcpu;

pub use shell::{PicoError, VmShell};

/// Guest thread stacks (a guard page below each) and exception stacks.
pub const STACK_SIZE: u64 = 1 << 20;
pub const ALTSTACK_SIZE: u64 = 64 << 10;
const PAGE: u64 = 0x1000;
/// The VMM's own signal stack per vCPU thread.
const SIGNAL_STACK: u64 = 64 << 10;

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
    /// Its page tables' entries for guest RAM (see [`crate::paging`]).
    pub pt: Arc<PageTables>,
    pub lin: &'static LinuxPal,
    pub devices: Arc<DeviceSet>,
    /// How long guest code may run without leaving the VM.
    pub watchdog: Duration,
    /// The layers between the guest and the PAL (`--trace`, `--layer`),
    /// set once the PAL exists; see `moat_layers`.
    pub layers: std::sync::OnceLock<moat_layers::Stack>,
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
            pt: shell.pt,
            lin,
            devices: Arc::new(devices),
            watchdog: Duration::from_secs(60),
            layers: std::sync::OnceLock::new(),
        }
    }

    /// Makes 4-byte writes of 0 at guest-physical `addr` signal the
    /// eventfd `fd` inside KVM (an ioeventfd: the write never reaches the
    /// VMM). False where KVM refuses it.
    pub fn register_notify(&self, fd: std::os::fd::BorrowedFd<'_>, addr: u64) -> bool {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let Ok(dup) = fd.try_clone_to_owned() else {
            return false;
        };
        // SAFETY: `dup` is a descriptor owned here and nowhere else; the
        // EventFd takes it over and closes it when dropped (KVM keeps its
        // own reference to the eventfd).
        let ev = unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(dup.into_raw_fd()) };
        self.vm
            .register_ioevent(&ev, &kvm_ioctls::IoEventAddress::Mmio(addr), 0u32)
            .is_ok()
    }

    /// The PAL of this VM's threads: the VM's memory bounds and devices,
    /// and the VM itself to start more threads on.
    pub fn pal(self: &Arc<Self>) -> KvmPal {
        KvmPal {
            lin: self.lin,
            ram_end: self.ram_end,
            pt: self.pt.clone(),
            devices: self.devices.clone(),
            vm: self.clone(),
        }
    }

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
        let _pt = self.pt.lock();
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
        self.pt.sync(&g, stack, STACK_SIZE + ALTSTACK_SIZE);
        Ok(Stacks { stack, alt })
    }

    /// An exception stack alone (a restored thread's stack is carried).
    fn alt_stack(&self) -> Result<u64, Error> {
        let rw = prot::READ | prot::WRITE;
        let _pt = self.pt.lock();
        let mut g = self.lin.regions.write().unwrap();
        let alt = g
            .find_free(ALTSTACK_SIZE, RAM_START, self.ram_end)
            .ok_or(Error::NoMemory)?;
        sys::mmap_anon(alt, ALTSTACK_SIZE, rw).map_err(|_| Error::NoMemory)?;
        if g.insert(alt, ALTSTACK_SIZE, rw, RegionKind::Stack).is_err() {
            let _ = sys::munmap(alt, ALTSTACK_SIZE);
            return Err(Error::NoMemory);
        }
        self.pt.sync(&g, alt, ALTSTACK_SIZE);
        Ok(alt)
    }

    fn free_alt_stack(&self, alt: u64) {
        let _pt = self.pt.lock();
        self.pt.restrict(alt, ALTSTACK_SIZE, 0);
        let mut g = self.lin.regions.write().unwrap();
        g.remove(alt, ALTSTACK_SIZE);
        let _ = sys::munmap(alt, ALTSTACK_SIZE);
        self.pt.sync(&g, alt, ALTSTACK_SIZE);
    }

    /// Start a thread a checkpoint carried (see `frozen`): a vCPU loaded
    /// with its state, run by a new VMM thread. Its stack is a restored
    /// region and stays mapped after it ends.
    pub fn spawn_restored(
        self: Arc<Self>,
        pal: Arc<KvmPal>,
        handle: Option<u64>,
        state: moat_host_common::freeze::Saved,
        param: u64,
        done: Option<Arc<Object>>,
    ) -> Result<(), Error> {
        let (id, vcpu) = self.vcpu()?;
        let alt = match self.alt_stack() {
            Ok(a) => a,
            Err(e) => {
                self.idle.lock().unwrap().push(vcpu);
                return Err(e);
            }
        };
        self.vcpu_thread(handle, param, alt, done, move |me| {
            let code = me.run_restored_thread(&pal, id, vcpu, alt, &state, param);
            me.free_alt_stack(alt);
            code
        })
    }

    /// Run `body` (a guest thread's vCPU loop, to its end) on a new VMM
    /// thread registered as the guest thread `handle` for the freeze, with
    /// its exception stack at `alt`; then signal `done`, and end the
    /// process with the last thread.
    fn vcpu_thread(
        self: Arc<Self>,
        handle: Option<u64>,
        param: u64,
        alt: u64,
        done: Option<Arc<Object>>,
        body: impl FnOnce(&Arc<Self>) -> i32 + Send + 'static,
    ) -> Result<(), Error> {
        let me = self;
        let spawned = std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(move || {
                // A signal stack of our own: a fault in the VMM is reported
                // from it (see vmm.rs), even on an overflowed stack.
                if let Ok(s) = sys::mmap_anon(0, SIGNAL_STACK, prot::READ | prot::WRITE) {
                    signals::set_altstack(s, SIGNAL_STACK);
                }
                moat_host_common::freeze::register(handle, param, (alt, ALTSTACK_SIZE), None);
                let code = body(&me);
                moat_host_common::freeze::unregister();
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

    fn free_stacks(&self, s: &Stacks) {
        // Entries first, then the host mapping (see crate::paging).
        let _pt = self.pt.lock();
        let len = STACK_SIZE + ALTSTACK_SIZE;
        self.pt.restrict(s.stack, len, 0);
        let mut g = self.lin.regions.write().unwrap();
        g.remove(s.stack, STACK_SIZE);
        g.remove(s.alt, ALTSTACK_SIZE);
        let _ = sys::munmap(s.stack, len);
        self.pt.sync(&g, s.stack, len);
    }

    /// Report and end the picoprocess.
    fn die(&self, kind: ReportKind, msg: std::fmt::Arguments<'_>, code: i32) -> ! {
        signals::die(kind, msg, code)
    }
}

impl SpawnThread for PicoVm {
    /// Start a guest thread: a vCPU at `entry` with `arg` as its first
    /// argument, run by a new VMM thread. `done` is signalled when it ends.
    fn spawn_thread(
        self: Arc<Self>,
        pal: Arc<KvmPal>,
        entry: u64,
        arg: u64,
        param: u64,
        handle: Option<u64>,
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
        let alt = stacks.alt;
        self.vcpu_thread(handle, param, alt, done, move |me| {
            let code = me.run_thread(&pal, id, vcpu, &stacks, entry, arg, param);
            me.free_stacks(&stacks);
            code
        })
    }
}

/// A guest thread's stack (a guard page below it) and exception stack.
struct Stacks {
    stack: u64,
    alt: u64,
}
