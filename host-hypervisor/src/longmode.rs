//! x86-64 long mode as every vCPU of moat starts it, in one place: the
//! control-register, EFER and RFLAGS bits, the GDT (flat kernel and user
//! segments and a 64-bit TSS descriptor) and the segment registers loaded
//! from it, the TSS with an I/O permission bitmap, interrupt gates,
//! page-table entry bits, and the MSRs that send `syscall` and `sysenter`
//! to a trap.
//!
//! Its users are the bare [`crate::MicroVm`], the picoprocess VM
//! ([`crate::pico`]) and moat-bench's raw VM; where each puts its tables
//! in guest memory, and which of the optional bits it sets, stays theirs.
use kvm_bindings::{kvm_msr_entry, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.MP: `wait`/`fwait` honour CR0.TS.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.ET: the FPU is a 387 (fixed to 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE: FPU errors as exceptions, not the legacy IRQ.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP: CPL 0 writes honour read-only pages too.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR0 of a vCPU in long mode.
pub const CR0: u64 = CR0_PG | CR0_NE | CR0_ET | CR0_MP | CR0_PE;

/// CR4.PAE: 64-bit page-table entries (needed for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR: `fxsave`/`fxrstor` and SSE instructions.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT: SSE floating-point exceptions as #XM.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4 of a vCPU in long mode (SSE on: Rust code uses it).
pub const CR4: u64 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;

/// EFER.SCE: `syscall`/`sysret` enabled.
pub const EFER_SCE: u64 = 1 << 0;
/// EFER.LME: long mode enabled.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE: the page-table entries' no-execute bit ([`PTE_NX`]) is
/// honoured.
pub const EFER_NXE: u64 = 1 << 11;
/// EFER of a vCPU in long mode.
pub const EFER: u64 = EFER_LME | EFER_LMA;

/// RFLAGS bit 1, reserved, always set.
pub const RFLAGS_FIXED: u64 = 1 << 1;
/// RFLAGS.IOPL = 3: `in` and `out` allowed at CPL 3.
pub const RFLAGS_IOPL3: u64 = 3 << 12;
/// RFLAGS of code at CPL 0.
pub const KERNEL_RFLAGS: u64 = RFLAGS_FIXED;
/// RFLAGS of picoprocess code (CPL 3): IOPL 3, so its `out` and `in`
/// reach the VMM.
pub const USER_RFLAGS: u64 = RFLAGS_IOPL3 | RFLAGS_FIXED;

/// 64-bit code, DPL 0 (base 0, limit 4 GiB, L set).
pub const KERNEL_CODE_DESC: u64 = 0x00af_9a00_0000_ffff;
/// Data, DPL 0 (base 0, limit 4 GiB).
pub const KERNEL_DATA_DESC: u64 = 0x00cf_9200_0000_ffff;
/// 64-bit code, DPL 3.
pub const USER_CODE_DESC: u64 = 0x00af_fa00_0000_ffff;
/// Data, DPL 3.
pub const USER_DATA_DESC: u64 = 0x00cf_f200_0000_ffff;
/// The low half of an available 64-bit TSS descriptor (base 0, limit
/// 0x67); a vCPU's TSS base and limit are set in its TR directly.
pub const TSS_DESC: u64 = 0x0000_8900_0000_0067;

/// The GDT of every vCPU: null, kernel code and data, user code and data,
/// and the TSS descriptor (16 bytes, so two entries).
pub const GDT: [u64; 7] = [
    0,
    KERNEL_CODE_DESC,
    KERNEL_DATA_DESC,
    USER_CODE_DESC,
    USER_DATA_DESC,
    TSS_DESC,
    0,
];
/// The GDT limit covering all of [`GDT`].
pub const GDT_LIMIT: u16 = (GDT.len() * 8 - 1) as u16;
/// How many entries of [`GDT`] code at CPL 0 alone needs (null, kernel
/// code and data): what [`long_mode`] sets the limit to.
pub const KERNEL_GDT_LEN: usize = 3;

/// Selectors into [`GDT`] (index * 8, with the RPL in the low bits).
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_CS: u16 = 0x18 | 3;
pub const USER_DS: u16 = 0x20 | 3;
pub const TSS_SELECTOR: u16 = 0x28;

/// A flat segment register (base 0, limit 4 GiB) for `selector`: 64-bit
/// code (execute/read) or data (read/write), with the selector's RPL as
/// its DPL.
pub fn flat_segment(selector: u16, code: bool) -> kvm_segment {
    let l = u8::from(code);
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: 1 - l,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode at CPL 0: paging with the PML4 at `cr3`, flat kernel
/// segments, the GDT at `gdt` (its kernel part, [`KERNEL_GDT_LEN`]
/// entries, in the limit), SSE usable.
pub fn long_mode(s: &mut kvm_sregs, gdt: u64, cr3: u64) {
    s.cs = flat_segment(KERNEL_CS, true);
    let d = flat_segment(KERNEL_DS, false);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
    s.gdt.base = gdt;
    s.gdt.limit = (KERNEL_GDT_LEN * 8 - 1) as u16;
    s.cr3 = cr3;
    s.cr4 = CR4;
    s.cr0 = CR0;
    s.efer = EFER;
}

/// On top of [`long_mode`]: flat user segments (code runs at CPL 3) and
/// the whole [`GDT`] in the limit.
pub fn user_mode(s: &mut kvm_sregs) {
    s.cs = flat_segment(USER_CS, true);
    let d = flat_segment(USER_DS, false);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
    s.gdt.limit = GDT_LIMIT;
}

/// Size of the 64-bit TSS proper; its I/O permission bitmap follows it.
pub const TSS_SIZE: u64 = 104;
/// The limit of a TSS with a full I/O permission bitmap (a bit per port,
/// 8192 bytes) and the bitmap's end byte: its last byte's offset.
pub const TSS_LIMIT: u64 = TSS_SIZE + 8192;
/// Offset of RSP0, the stack an exception from CPL 3 pushes its frame on.
const TSS_RSP0: usize = 4;
/// Offset of the I/O permission bitmap's offset.
const TSS_IOPB: usize = 102;

/// The bytes of a TSS ([`TSS_LIMIT`] + 1 of them) whose CPL 0 stack is
/// `rsp0` and whose I/O permission bitmap allows every port (a nested PVM
/// host checks the bitmap, not IOPL).
pub fn tss(rsp0: u64) -> Vec<u8> {
    let mut t = vec![0u8; TSS_LIMIT as usize + 1];
    t[TSS_RSP0..TSS_RSP0 + 8].copy_from_slice(&rsp0.to_le_bytes());
    t[TSS_IOPB..TSS_IOPB + 2].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    t[TSS_LIMIT as usize] = 0xff;
    t
}

/// The task register for a [`tss`] at `base`.
pub fn tss_segment(base: u64) -> kvm_segment {
    kvm_segment {
        base,
        limit: TSS_LIMIT as u32,
        selector: TSS_SELECTOR,
        type_: 11,
        present: 1,
        ..Default::default()
    }
}

/// An IDT entry (its two words): a 64-bit interrupt gate, present, DPL 0,
/// to `handler` in the kernel code segment.
pub fn interrupt_gate(handler: u64) -> [u64; 2] {
    let lo = (handler & 0xffff)
        | ((KERNEL_CS as u64) << 16)
        | (0x8e00u64 << 32)
        | (((handler >> 16) & 0xffff) << 48);
    [lo, handler >> 32]
}

/// Page-table entry bits.
pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_WRITE: u64 = 1 << 1;
/// Reachable from CPL 3.
pub const PTE_USER: u64 = 1 << 2;
/// Write-through.
pub const PTE_PWT: u64 = 1 << 3;
/// Cache disabled.
pub const PTE_PCD: u64 = 1 << 4;
/// A 2 MiB page (in a page directory entry).
pub const PTE_HUGE: u64 = 1 << 7;
/// No instruction fetch from this page (with [`EFER_NXE`] set).
pub const PTE_NX: u64 = 1 << 63;

/// MSRs of the system-call instructions.
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_FMASK: u32 = 0xc000_0084;
pub const MSR_SYSENTER_CS: u32 = 0x174;
pub const MSR_SYSENTER_EIP: u32 = 0x176;

/// Send `syscall` (with [`EFER_SCE`] set) and `sysenter` to `trap`, at
/// CPL 0 in the kernel code segment, with TF, DF, IF, IOPL and NT clear.
pub fn set_syscall_msrs(vcpu: &VcpuFd, trap: u64) -> Result<(), kvm_ioctls::Error> {
    let entries = [
        // SYSCALL's CS, and SYSRET's selector base (never used: nothing
        // returns from the trap).
        (MSR_STAR, ((KERNEL_CS as u64) << 32) | (0x10u64 << 48)),
        (MSR_LSTAR, trap),
        (MSR_CSTAR, trap),
        (MSR_FMASK, 0x4700), // TF DF IF IOPL NT
        (MSR_SYSENTER_CS, KERNEL_CS as u64),
        (MSR_SYSENTER_EIP, trap),
    ];
    let list: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&list).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    vcpu.set_msrs(&msrs).map(|_| ())
}

// The values moat has always used, spelled as numbers.
const _: () = {
    assert!(CR0 == 0x8000_0033);
    assert!(CR0 | CR0_WP == 0x8001_0033);
    assert!(CR4 == 0x20 | 0x200 | 0x400);
    assert!(EFER == 0x500);
    assert!(USER_RFLAGS == 0x3002 && KERNEL_RFLAGS == 2);
    assert!(GDT_LIMIT == 55);
    assert!(PTE_PRESENT | PTE_WRITE | PTE_HUGE == 0x83);
    assert!(PTE_PCD | PTE_PWT == 0x18);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_opens_every_port() {
        let t = tss(0x1234_5678_9abc);
        assert_eq!(t.len(), 104 + 8192 + 1);
        assert_eq!(&t[4..12], &0x1234_5678_9abcu64.to_le_bytes());
        assert_eq!(&t[102..104], &104u16.to_le_bytes());
        assert!(t[104..104 + 8192].iter().all(|&b| b == 0));
        assert_eq!(t[104 + 8192], 0xff);
    }

    #[test]
    fn gate_and_segments_as_before() {
        let at = 0xa010u64;
        let old = (at & 0xffff) | (8 << 16) | (0x8e00u64 << 32) | (((at >> 16) & 0xffff) << 48);
        assert_eq!(interrupt_gate(at), [old, 0]);
        let cs = flat_segment(USER_CS, true);
        assert_eq!(
            (cs.selector, cs.type_, cs.dpl, cs.db, cs.l),
            (0x1b, 11, 3, 0, 1)
        );
        let ds = flat_segment(KERNEL_DS, false);
        assert_eq!(
            (ds.selector, ds.type_, ds.dpl, ds.db, ds.l),
            (0x10, 3, 0, 1, 0)
        );
    }
}
