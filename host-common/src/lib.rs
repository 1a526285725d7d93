//! What every confined moat process shares on Linux: the loader of
//! host-linux and the VMM of host-hypervisor are both a Linux process in
//! the sandbox's namespaces, serving the ABI with the same code for every
//! call that is not about memory or threads. Like Gramine's
//! `linux-common` or Solo5's `tenders/common`: each host depends on this
//! crate, never on the other host.
//!
//! - [`protocol`]: the wire to the monitor (and to the zygote), exit codes
//!   and fixed descriptor numbers.
//! - [`pal`]: the in-process PAL (`LinuxPal`): fast-path calls here,
//!   policy calls brokered by the monitor; [`objects`] are its host
//!   objects, [`image`] maps ELF images into the guest, [`elf`] checks
//!   them (the monitor and `moat inspect` use it too).
//! - [`sandbox`]: Landlock and the loader's seccomp allow-list; [`seal`]:
//!   the PAL's code and table sealed (`mseal`, or [`seal_filter`] where the
//!   kernel has none);
//!   [`signals`]: fault, timer and `SIGSYS` handling, reports;
//!   [`mountns`]: the empty mount namespace; [`sys`]: system-call helpers;
//!   [`startup`]: the start-up block both hosts hand the guest;
//!   [`vmstats`]: the VMM's statistics page (exits by reason);
//!   [`trace_ring`]: the trace layers' ring, mapped.
//! - [`child`]: the child side of starting a confined process (between
//!   `clone`/`fork` and `execve`); [`zygote`]: the zygote's loop, which
//!   keeps a warm loader or VMM forked.
//!
//! Invariant: nothing here trusts the guest. Guest pointers are checked
//! against the region map and copied in once before they are used.
pub mod child;
pub mod elf;
pub mod errno;
pub mod freeze;
pub mod image;
pub mod mountns;
pub mod objects;
pub mod pal;
pub mod protocol;
pub mod sandbox;
pub mod seal;
pub mod seal_filter;
pub mod signals;
pub mod startup;
pub mod sys;
pub mod trace_ring;
pub mod vmstats;
pub mod zygote;
