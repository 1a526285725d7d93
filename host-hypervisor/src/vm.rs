//! The micro-VM. `unsafe` here is confined to mapping guest memory into
//! KVM (the memory region outlives the VM) and the watchdog's signal.
use crate::longmode::{self, PTE_HUGE, PTE_PRESENT, PTE_WRITE};
use crate::watchdog::Watchdog;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Low guest memory the VMM keeps for itself: GDT (0x500), page tables
/// (0x1000-0x3fff). Guest images and stacks go above.
pub const GUEST_BASE_RESERVED: u64 = 0x4000;

const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}; KVM is needed for --host kvm")]
    NoKvm(kvm_ioctls::Error),
    #[error("KVM refused {what}: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("guest memory of {0} bytes is not allowed (2 MiB to 1 GiB, a multiple of 2 MiB)")]
    BadSize(u64),
    #[error("cannot allocate {0} bytes of guest memory")]
    NoMemory(u64),
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u64 },
}

/// Why a run stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// `out` to `port` (the value zero-extended from 1, 2 or 4 bytes).
    IoOut {
        port: u16,
        value: u32,
        size: u8,
    },
    /// `in` from `port`: answer it (`MicroVm::set_io_in`) before running on.
    IoIn {
        port: u16,
        size: u8,
    },
    /// A memory-mapped access outside guest RAM.
    MmioWrite {
        addr: u64,
        data: Vec<u8>,
    },
    MmioRead {
        addr: u64,
        size: u8,
    },
    Hlt,
    /// The vCPU cannot run on: a triple fault (KVM reports it as a
    /// shutdown, or under nested PVM as an internal error).
    Crashed(String),
    /// The watchdog ended a run that took longer than its deadline.
    Watchdog,
    /// Anything else KVM reported.
    Other(String),
}

pub struct MicroVm {
    // Field order: the watchdog, vCPU and VM go before the memory they map.
    dog: Watchdog,
    vcpu: VcpuFd,
    _vm: VmFd,
    mem: GuestMem,
}

/// Guest memory, identity-mapped: every access is a bounds- and
/// overflow-checked copy, so what the host validates is its own copy,
/// never memory the guest can still change.
#[derive(Clone)]
pub struct GuestMem {
    mem: GuestMemoryMmap<()>,
    size: u64,
}

impl GuestMem {
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), VmError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(VmError::OutOfRange { addr, len }),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), VmError> {
        self.check(addr, data.len() as u64)?;
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| VmError::OutOfRange {
                addr,
                len: data.len() as u64,
            })
    }

    pub fn read(&self, addr: u64, len: u64) -> Result<Vec<u8>, VmError> {
        self.check(addr, len)?;
        let mut v = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .map_err(|_| VmError::OutOfRange { addr, len })?;
        Ok(v)
    }
}

impl MicroVm {
    /// A VM with `size` bytes of identity-mapped memory and one vCPU in
    /// long mode, about to run at `GUEST_BASE_RESERVED` (set it with
    /// [`MicroVm::set_entry`]).
    pub fn new(size: u64) -> Result<MicroVm, VmError> {
        if !(2 << 20..=1 << 30).contains(&size) || !size.is_multiple_of(2 << 20) {
            return Err(VmError::BadSize(size));
        }
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        let vm = kvm.create_vm().map_err(|err| VmError::Kvm {
            what: "creating a VM",
            err,
        })?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|_| VmError::NoMemory(size))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|_| VmError::NoMemory(size))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `mem` maps `size` bytes at `host` and is owned by the
        // MicroVm, whose VM and vCPU fields are dropped before it.
        unsafe { vm.set_user_memory_region(region) }.map_err(|err| VmError::Kvm {
            what: "the guest memory region",
            err,
        })?;
        let vcpu = vm.create_vcpu(0).map_err(|err| VmError::Kvm {
            what: "creating a vCPU",
            err,
        })?;
        let dog = Watchdog::new().map_err(|_| VmError::NoMemory(0))?;
        let mut m = MicroVm {
            dog,
            vcpu,
            _vm: vm,
            mem: GuestMem { mem, size },
        };
        m.setup_long_mode()?;
        Ok(m)
    }

    fn w64(&self, addr: u64, v: u64) -> Result<(), VmError> {
        self.write(addr, &v.to_le_bytes())
    }

    fn setup_long_mode(&mut self) -> Result<(), VmError> {
        // Flat GDT: null, 64-bit code, data (all at CPL 0).
        for (i, e) in longmode::GDT[..longmode::KERNEL_GDT_LEN].iter().enumerate() {
            self.w64(GDT + i as u64 * 8, *e)?;
        }
        // Identity map of all guest memory with 2 MiB pages.
        let rw = PTE_PRESENT | PTE_WRITE;
        self.w64(PML4, PDPT | rw)?;
        self.w64(PDPT, PD | rw)?;
        for i in 0..self.mem.size / (2 << 20) {
            self.w64(PD + i * 8, (i * (2 << 20)) | rw | PTE_HUGE)?;
        }
        let kvm_err = |what| move |err| VmError::Kvm { what, err };
        let mut s = self.vcpu.get_sregs().map_err(kvm_err("reading sregs"))?;
        longmode::long_mode(&mut s, GDT, PML4);
        self.vcpu.set_sregs(&s).map_err(kvm_err("setting sregs"))?;
        self.set_entry(GUEST_BASE_RESERVED, 0, 0)
    }

    /// Where the vCPU starts: `rip`, `rsp`, and `rdi` (the first argument).
    pub fn set_entry(&mut self, rip: u64, rsp: u64, rdi: u64) -> Result<(), VmError> {
        let mut r = self.vcpu.get_regs().map_err(|err| VmError::Kvm {
            what: "reading registers",
            err,
        })?;
        r.rip = rip;
        r.rsp = rsp;
        r.rdi = rdi;
        r.rflags = longmode::KERNEL_RFLAGS;
        self.vcpu.set_regs(&r).map_err(|err| VmError::Kvm {
            what: "setting registers",
            err,
        })
    }

    pub fn memory_size(&self) -> u64 {
        self.mem.size
    }

    /// A handle on the guest memory (shared, checked access).
    pub fn memory(&self) -> GuestMem {
        self.mem.clone()
    }

    /// Copy `data` into guest memory at `addr` (bounds- and overflow-checked).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), VmError> {
        self.mem.write(addr, data)
    }

    /// Copy `len` bytes of guest memory at `addr` out (checked).
    pub fn read(&self, addr: u64, len: u64) -> Result<Vec<u8>, VmError> {
        self.mem.read(addr, len)
    }

    /// Run until an exit the host must handle, or until `deadline` passes
    /// (then [`VmExit::Watchdog`]; the vCPU can be run again).
    pub fn run(&mut self, deadline: Duration) -> Result<VmExit, VmError> {
        let armed = self.dog.arm(0, deadline);
        let r = self.vcpu.run();
        let fired = armed.disarm();
        let exit = match r {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                VmExit::IoOut {
                    port,
                    value: u32::from_le_bytes(b),
                    size: n as u8,
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                // No device answers yet: an open bus reads all ones.
                data.fill(0xff);
                VmExit::IoIn {
                    port,
                    size: data.len().min(4) as u8,
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => VmExit::MmioWrite {
                addr,
                data: data.to_vec(),
            },
            Ok(VcpuExit::MmioRead(addr, data)) => VmExit::MmioRead {
                addr,
                size: data.len() as u8,
            },
            Ok(VcpuExit::Hlt) => VmExit::Hlt,
            Ok(VcpuExit::Shutdown) => VmExit::Crashed("shutdown (triple fault)".into()),
            Ok(VcpuExit::InternalError) => VmExit::Crashed(
                "KVM internal error (triple fault under nested virtualisation)".into(),
            ),
            Ok(other) => VmExit::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR && fired => VmExit::Watchdog,
            Err(e) if e.errno() == libc::EINTR => VmExit::Other("interrupted".into()),
            Err(err) => {
                return Err(VmError::Kvm {
                    what: "running the vCPU",
                    err,
                })
            }
        };
        Ok(exit)
    }
}
