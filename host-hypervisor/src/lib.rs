//! moat's KVM host: each picoprocess in a micro-VM with no guest kernel.
//!
//! - [`vmm`]: the `moat-vmm` process the monitor starts for a picoprocess
//!   on `--host kvm` (same namespaces, rlimits, protocol and broker as a
//!   loader), confined by a seccomp allow-list per thread kind
//!   ([`confine`]);
//! - [`pico`]: the VM of one picoprocess: identity-mapped guest RAM at the
//!   same host address, one vCPU per guest thread, hypercalls by `out`,
//!   exceptions through an IDT to LibOsExceptionDispatch, a watchdog per
//!   vCPU ([`pico::shell`]: the VM before its picoprocess, with its page
//!   tables, GDT, IDT and stubs; the vCPU loop and exception delivery
//!   inside); [`layout`] is its guest-physical map;
//! - [`paging`]: the page tables' entries for guest RAM, kept equal to
//!   the region map (W^X inside the VM), and the order of each change that
//!   keeps every vCPU's TLB coherent;
//! - [`pal`]: the KVM PAL (memory and threads here, everything else the
//!   host-linux PAL's code over the same guest pointers); it reaches the
//!   VM only through [`pal::SpawnThread`], and shares the per-vCPU-thread
//!   state of [`guest_thread`] with the vCPU loop;
//! - [`devices`]: granted devices (`dev:` streams) over the models of
//!   `moat-devices`;
//! - [`longmode`]: the long-mode set-up every vCPU starts with (control
//!   registers, GDT and segments, TSS, interrupt gates, page-table bits,
//!   system-call MSRs), for [`pico`], [`MicroVm`] and the benchmarks' raw
//!   VM;
//! - [`stats`]: the statistics page the VMM counts its exits in, for the
//!   host to read;
//! - [`MicroVm`]: a bare VM (the floor the benchmarks compare with).
pub mod confine;
pub mod devices;
pub mod guest_thread;
pub mod layout;
pub mod longmode;
pub mod paging;
pub mod pal;
pub mod pico;
mod resume;
pub mod stats;
mod vm;
pub mod vmm;
mod watchdog;

pub use layout::HYPERCALL_PORT;

pub use vm::{GuestMem, MicroVm, VmError, VmExit, GUEST_BASE_RESERVED};

/// Whether this machine offers KVM. With `MOAT_REQUIRE_KVM` set (CI), a
/// machine without it is a failure, not a skip.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok && std::env::var_os("MOAT_REQUIRE_KVM").is_some() {
        panic!("/dev/kvm is not usable here, and MOAT_REQUIRE_KVM is set");
    }
    ok
}
