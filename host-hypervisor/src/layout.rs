//! The guest-physical layout of a picoprocess VM. Guest memory is
//! identity-mapped (guest virtual == guest physical), so an address the
//! picoprocess hands a device is its DMA address.
//!
//! ```text
//! 0x0000_0000  page 0: not present (null pointers fault)
//! 0x0000_1000  VMM area (slot 0, 64 KiB): page tables, GDT, IDT, the
//!              exception and hypercall stubs, the PAL function table
//! 0x0001_0000  guest RAM (slot 1) up to the memory limit: image, heap,
//!              stacks, mapped files. The VMM maps it at the same host
//!              virtual address, so a guest pointer is a host pointer once
//!              the region map has checked it.
//! 0xc000_0000  device MMIO windows, 4 KiB each (no memory slot: every
//!              access is an MMIO exit to the device model)
//! 0xc020_0000  the page-table pool (slot 2): a 4 KiB page table per 2 MiB
//!              of guest RAM; guest-physical only (no page table maps it)
//! ```
pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
/// Page directories of the first three GiB.
pub const PD: [u64; 3] = [0x3000, 0x4000, 0x5000];
/// Page directory of the fourth GiB (device windows).
pub const PD_MMIO: u64 = 0x6000;
/// 4 KiB page table of the first 2 MiB (page 0 left out).
pub const PT0: u64 = 0x7000;
/// The page-table pool (memory slot 2): page table `i` (at
/// `PT_POOL + i * 4096`) maps the 2 MiB of guest RAM from `i * 2 MiB`
/// (table 0 is unused: [`PT0`] maps the first 2 MiB). No page table maps
/// the pool, so no guest access, at any privilege, reaches it.
pub const PT_POOL: u64 = MMIO_BASE + (2 << 20);
/// The pool's largest size: a table per 2 MiB of [`MAX_RAM`].
pub const PT_POOL_MAX: u64 = MAX_RAM / 512;
const _: () = assert!(PT_POOL + PT_POOL_MAX <= 1 << 32);
pub const GDT: u64 = 0x8000;
pub const IDT: u64 = 0x9000;
/// 32 exception stubs, 16 bytes each (CPL 0, supervisor-only page).
pub const EXC_STUBS: u64 = 0xa000;
/// One 8-byte stub per ABI call: `mov eax, NR; out HYPERCALL_PORT, eax;
/// ret` (the one page of the VMM area the picoprocess may execute).
pub const CALL_STUBS: u64 = 0xb000;
/// The upcall-return and thread-return trampolines, on the same page.
pub const UPCALL_RETURN: u64 = CALL_STUBS + 0x800;
pub const THREAD_RETURN: u64 = UPCALL_RETURN + 16;
/// Where `syscall` and `sysenter` land (LSTAR, SYSENTER_EIP). On the user
/// page: a nested PVM host enters it without changing privilege.
pub const SYSCALL_TRAP: u64 = THREAD_RETURN + 16;
/// The PAL function table (readable by the picoprocess).
pub const TABLE: u64 = 0xc000;
/// Per thread, at the top of guest RAM in supervisor-only 2 MiB pages
/// (out of the picoprocess's reach): its TSS (104 bytes, an I/O bitmap
/// that opens every port, the end byte) and the CPL 0 stack its
/// exception stubs push their frame on. The area's size is part of the
/// guest window both hosts share (`moat_pal::layout`).
pub use moat_pal::layout::{tss_area, TSS_SLOT};
/// The TSS's limit (it ends with a full I/O permission bitmap).
pub const TSS_LIMIT: u64 = crate::longmode::TSS_LIMIT;
/// Where a slot's CPL 0 stack starts (it grows down from the slot end).
pub const TSS_STACK_TOP: u64 = TSS_SLOT;

/// Size of the VMM area (memory slot 0).
pub const LOW_SIZE: u64 = 0x10000;
/// Guest RAM starts here (memory slot 1).
pub const RAM_START: u64 = moat_pal::layout::GUEST_BASE;
const _: () = assert!(RAM_START == LOW_SIZE);
/// The largest guest RAM this layout holds.
pub const MAX_RAM: u64 = moat_policy::KVM_MAX_MEMORY_MIB << 20;
const _: () = assert!(MAX_RAM <= MMIO_BASE);
/// Device MMIO windows.
pub const MMIO_BASE: u64 = 0xc000_0000;
pub const MMIO_WINDOW: u64 = 0x1000;
/// How many device windows the mapped MMIO page (2 MiB) holds.
pub const MAX_DEVICES: u64 = 64;

/// `out` to this port: an ABI call; eax holds its number, the arguments
/// are in the registers of the C calling convention (the seventh on the
/// stack).
pub const HYPERCALL_PORT: u16 = 0x50;
/// `out` from an exception stub: al holds the vector.
pub const EXCEPTION_PORT: u16 = 0x51;
/// `out` from the upcall-return trampoline: rax holds the disposition.
pub const UPCALL_RETURN_PORT: u16 = 0x52;
/// `out` from the system-call trap: a sandbox violation.
pub const SYSCALL_PORT: u16 = 0x53;
