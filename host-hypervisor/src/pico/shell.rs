//! The VM shell: a VM before it has a picoprocess. KVM's VM and first
//! vCPU, guest RAM (slot 1, at the same host address), the task-state
//! area at the top of it, the watchdog, the VMM area (slot 0) that `Low`
//! writes once: page tables, GDT, IDT and exception stubs, the
//! system-call and return trampolines, the hypercall stubs and the PAL
//! function table; and the page-table pool (slot 2) whose entries
//! [`PageTables`] keeps equal to the region map. Everything here depends
//! only on the memory size and the thread limit, so a warm VMM makes it
//! ahead of need.
//!
//! What the picoprocess (CPL 3) can reach of it: guest RAM, as the region
//! map allows (none of it until the image is mapped); the page of call
//! stubs (read and execute) and the page of the PAL table (read). The
//! GDT, IDT, exception stubs and task-state area are supervisor-only;
//! the page tables and the pool are mapped by no page table at all.
use crate::layout::*;
use crate::longmode::{self, PTE_HUGE, PTE_NX, PTE_PCD, PTE_PRESENT, PTE_PWT, PTE_USER, PTE_WRITE};
use crate::paging::{PageTables, TABLE_SPAN};
use crate::watchdog::Watchdog;
use kvm_bindings::{kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use moat_host_common::sys;
use moat_pal::prot;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

const PAGE: u64 = 0x1000;
/// Exception vectors in the IDT (the architecture's 32), 16 bytes each.
const VECTORS: u64 = 32;
const IDT_LIMIT: u16 = (VECTORS * 16 - 1) as u16;

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

/// A VM before it has a picoprocess: guest RAM slots, the VMM area, the
/// first vCPU, the watchdog. Everything here depends only on the memory
/// size, so a warm VMM makes it ahead of need.
pub struct VmShell {
    pub(super) vm: VmFd,
    ram: u64,
    /// Where the TSS area starts (guest RAM above is the VMM's).
    pub(super) tss_base: u64,
    pub(super) threads: u64,
    pub(super) dog: Watchdog,
    pub(super) first: VcpuFd,
    pub(super) template: kvm_sregs,
    /// The leaf entries of guest RAM.
    pub(super) pt: Arc<PageTables>,
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
        // A page table per 2 MiB of RAM (table 0 unused: PT0 maps the
        // first 2 MiB); only the tables of mapped memory are ever touched.
        let pool_size = ram / TABLE_SPAN * 0x1000;
        let pool = sys::mmap_anon(0, pool_size, prot::READ | prot::WRITE)
            .map_err(|_| PicoError::Setup("cannot allocate the page-table pool".into()))?;
        let slots = [
            (0u32, 0u64, LOW_SIZE, low),
            (1, RAM_START, ram - RAM_START, RAM_START),
            (2, PT_POOL, pool_size, pool),
        ];
        for (slot, gpa, size, host) in slots {
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: slots 0 and 2 are our private mappings, owned by the
            // VM for its whole life; slot 1 is the guest RAM range, which
            // only the region map's owners (the PAL) map and unmap; KVM
            // follows those changes through its MMU notifiers.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("a guest memory region"))?;
        }
        Low(low as *mut u8).write(ram, tss_base);
        let pt = Arc::new(PageTables::new(
            table_entries(low + PT0, 512),
            table_entries(pool, (pool_size / 8) as usize),
            tss_base,
        ));
        let dog = Watchdog::confined(Some(|| {
            crate::confine::apply(crate::confine::watchdog_rules())
        }))
        .map_err(|e| PicoError::Setup(format!("cannot start the watchdog: {e}")))?;
        // The first vCPU's reset state, turned into long mode, is the
        // template of every vCPU.
        let first = vm.create_vcpu(0).map_err(kvm_err("creating a vCPU"))?;
        let mut template = first.get_sregs().map_err(kvm_err("reading sregs"))?;
        // Picoprocess code runs at CPL 3 with IOPL 3 (so `out` and `in`
        // work): under nested PVM, code at CPL 0 is emulated instruction
        // by instruction, while CPL 3 code runs natively. Only the
        // exception stubs run at CPL 0 (a handful of instructions, on
        // exceptions only).
        longmode::long_mode(&mut template, GDT, PML4);
        longmode::user_mode(&mut template);
        // Write-protect at CPL 0 too: an exception push cannot write a
        // read-only page.
        template.cr0 |= longmode::CR0_WP;
        template.efer |= longmode::EFER_SCE; // `syscall` enters SYSCALL_TRAP
        template.efer |= longmode::EFER_NXE; // W^X: data pages are NX
        template.idt.base = IDT;
        template.idt.limit = IDT_LIMIT;
        // The VMM area is never unmapped: KVM maps it for the VM's life.
        Ok(VmShell {
            vm,
            ram,
            tss_base,
            threads,
            dog,
            first,
            template,
            pt,
        })
    }

    pub fn ram(&self) -> u64 {
        self.ram
    }

    pub fn threads(&self) -> u64 {
        self.threads
    }
}

/// `n` page-table entries at host address `at`, for the VM's life.
fn table_entries(at: u64, n: usize) -> &'static [AtomicU64] {
    // SAFETY: `at` is a page-aligned private mapping of at least `n * 8`
    // bytes that this VMM never unmaps (a memory slot of the VM, kept for
    // the process's life), so the slice stays valid; AtomicU64 has u64's
    // size and alignment, and from here on the VMM writes these entries
    // only through the atomics (the vCPUs' page walks only read them).
    unsafe { std::slice::from_raw_parts(at as *const AtomicU64, n) }
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
        // Page tables: the first 2 MiB in 4 KiB pages (PT0), every further
        // 2 MiB of guest RAM in its own table of the pool (its entries
        // follow the region map: none is present yet), the task-state
        // area in supervisor-only 2 MiB pages, and one 2 MiB uncached page
        // of device windows at MMIO_BASE. The upper levels allow
        // everything; each leaf says what its page allows. EFER.NXE is
        // on: every page that holds no code is NX.
        const P_RW_U: u64 = PTE_PRESENT | PTE_WRITE | PTE_USER;
        self.w64(PML4, PDPT | P_RW_U);
        for (i, pd) in PD.iter().enumerate() {
            self.w64(PDPT + i as u64 * 8, pd | P_RW_U);
        }
        self.w64(PDPT + 3 * 8, PD_MMIO | P_RW_U);
        self.w64(PD[0], PT0 | P_RW_U);
        // The VMM area: the GDT (the CPU sets its accessed bits), the IDT
        // and the exception stubs supervisor-only; the call stubs user
        // read-and-execute; the PAL table user read-only. The page tables
        // themselves, page 0 and the unused pages: not mapped at all.
        let vmm_pages = [
            (GDT, PTE_PRESENT | PTE_WRITE | PTE_NX),
            (IDT, PTE_PRESENT | PTE_NX),
            (EXC_STUBS, PTE_PRESENT),
            (CALL_STUBS, PTE_PRESENT | PTE_USER),
            (TABLE, PTE_PRESENT | PTE_USER | PTE_NX),
        ];
        for (at, flags) in vmm_pages {
            self.w64(PT0 + at / PAGE * 8, at | flags);
        }
        for i in 1..ram_end / TABLE_SPAN {
            let gpa = i * TABLE_SPAN;
            let pd = PD[(gpa >> 30) as usize];
            let e = if gpa >= tss_base {
                gpa | PTE_PRESENT | PTE_WRITE | PTE_HUGE | PTE_NX
            } else {
                PageTables::table_gpa(i) | P_RW_U
            };
            self.w64(pd + ((gpa >> 21) & 511) * 8, e);
        }
        let uncached = PTE_HUGE | PTE_PCD | PTE_PWT | PTE_NX;
        self.w64(PD_MMIO, MMIO_BASE | uncached | P_RW_U);
        // GDT: null, kernel code and data (exception stubs), user code and
        // data (the picoprocess), and a 64-bit TSS descriptor (each vCPU's
        // TSS base is set in its TR directly).
        for (i, e) in longmode::GDT.iter().enumerate() {
            self.w64(GDT + i as u64 * 8, *e);
        }
        // Exception stubs and the IDT (interrupt gates, ring 0).
        const WITH_ERROR_CODE: [u8; 9] = [8, 10, 11, 12, 13, 14, 17, 21, 30];
        for v in 0..VECTORS as u8 {
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
            let [lo, hi] = longmode::interrupt_gate(at);
            self.w64(IDT + v as u64 * 16, lo);
            self.w64(IDT + v as u64 * 16 + 8, hi);
        }
        // `syscall`/`sysenter` land here (CPL 0): out port, al; ud2
        self.bytes(SYSCALL_TRAP, &[0xe6, SYSCALL_PORT as u8, 0x0f, 0x0b]);
        // out port, al; ud2
        self.bytes(UPCALL_RETURN, &[0xe6, UPCALL_RETURN_PORT as u8, 0x0f, 0x0b]);
        // A thread whose entry returns calls DkThreadExit(0):
        // xor esi, esi; mov eax, NR; out port, eax; ud2
        let mut t = vec![0x31, 0xf6, 0xb8];
        t.extend(moat_pal::nr::DK_THREAD_EXIT.to_le_bytes());
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
