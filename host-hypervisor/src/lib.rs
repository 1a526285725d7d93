//! moat's KVM host, first part: a micro-VM with no guest kernel.
//!
//! [`MicroVm`] creates a VM with identity-mapped memory (guest physical ==
//! guest virtual, so an address a driver hands a device is its DMA
//! address), puts one vCPU straight into 64-bit long mode (flat GDT, 2 MiB
//! pages), and runs it until an exit the host must handle. Hypercalls are
//! `out` to an I/O port (on this nested PVM host `vmcall` never returns);
//! every run has a watchdog that ends a runaway vCPU. Guest memory is only
//! touched through bounds- and overflow-checked copies.
//!
//! [`run_image`] runs a picoprocess image in it: a first cut of the KVM PAL
//! (guest stubs, hypercalls by `out`, a handful of calls). Still to come
//! (issue 3): every call, threads as vCPUs, exceptions, policy, device
//! models and grants, the confined VMM, `--host kvm`.
pub mod devices;
mod image;
pub mod layout;
pub mod pal;
pub mod pico;
mod vm;
pub mod vmm;
mod watchdog;

pub use image::{run_image, RunError, HYPERCALL_PORT};

pub use vm::{Exit, GuestMem, MicroVm, VmError, GUEST_BASE_RESERVED};

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
