//! Sealing the PAL's code and the function table (`mseal`, Linux 6.10).
//!
//! On host-linux the guest shares the loader's address space, and a guest
//! that calls the C library's `syscall()` (which it can find by walking
//! the loader's own tables) runs system calls from PAL code. The seccomp
//! allow-list lets the PAL change memory protections, so without more a
//! guest could `mprotect` the loader's text writable, patch it, and make
//! it executable again: the instruction-pointer check on system calls
//! would then vouch for code the guest wrote. Sealing makes every
//! read-only or executable mapping of every object the loader has loaded
//! (the loader, the C library, the dynamic linker, the vDSO), their
//! relocation tables once made read-only (`PT_GNU_RELRO`), and the page
//! holding the PAL table immutable: the kernel refuses `mprotect`,
//! `munmap`, `mremap` and `mmap(MAP_FIXED)` over them with `EPERM`, even
//! from PAL code.
//!
//! PAL code stays PAL code; a guest can still jump into it, so the
//! allow-list (and Landlock, namespaces, the broker, cgroups) stay the
//! boundary.
//!
//! A kernel without `mseal` (before 6.10) leaves these mappings unsealed:
//! [`seal_code`] says so (`Ok(false)`), and the README says what that
//! means.
use moat_pal::PalTable;

/// `mseal` (x86-64).
pub const SYS_MSEAL: libc::c_long = 462;

const PAGE: u64 = 4096;

fn mseal(addr: u64, len: u64) -> Result<(), i32> {
    // SAFETY: mseal only changes the flags of existing mappings.
    let r = unsafe { libc::syscall(SYS_MSEAL, addr, len, 0u64) };
    if r != 0 {
        return Err(crate::sys::errno());
    }
    Ok(())
}

/// The read-only and executable ranges of every loaded object (and their
/// RELRO ranges), page-aligned.
pub fn code_and_relro_ranges() -> Vec<(u64, u64)> {
    let page_down = |a: u64| a & !(PAGE - 1);
    let page_up = |a: u64| (a + PAGE - 1) & !(PAGE - 1);
    crate::sys::loaded_segments()
        .into_iter()
        .filter_map(|s| match s.p_type {
            libc::PT_LOAD if s.p_flags & libc::PF_W == 0 && s.end > s.start => {
                Some((page_down(s.start), page_up(s.end)))
            }
            // The dynamic linker made whole pages of it read-only.
            libc::PT_GNU_RELRO if page_up(s.start) < page_down(s.end) => {
                Some((page_up(s.start), page_down(s.end)))
            }
            _ => None,
        })
        .collect()
}

/// Seal every range of [`code_and_relro_ranges`]. `Ok(false)`: the kernel
/// has no `mseal`.
pub fn seal_code() -> Result<bool, String> {
    for (s, e) in code_and_relro_ranges() {
        match mseal(s, e - s) {
            Ok(()) => {}
            Err(libc::ENOSYS) => return Ok(false),
            Err(e2) => {
                return Err(format!(
                    "cannot seal PAL code at {s:#x}..{e:#x}: {}",
                    std::io::Error::from_raw_os_error(e2)
                ))
            }
        }
    }
    Ok(true)
}

/// The page the PAL table will live in: made writable now (before the
/// sandbox, so the seccomp filter can name it), filled, made read-only and
/// sealed by [`TablePage::publish`].
pub struct TablePage {
    addr: u64,
}

impl TablePage {
    /// One fresh page, read-write.
    pub fn new() -> Result<TablePage, String> {
        const _: () = assert!(std::mem::size_of::<PalTable>() as u64 <= PAGE);
        let addr = crate::sys::mmap_anon(0, PAGE, moat_pal::prot::READ | moat_pal::prot::WRITE)
            .map_err(|e| {
                format!(
                    "cannot map the PAL table's page: {}",
                    std::io::Error::from_raw_os_error(e)
                )
            })?;
        Ok(TablePage { addr })
    }

    /// Its address (the one range the filter lets `mseal` take).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Its length.
    pub fn len(&self) -> u64 {
        PAGE
    }

    /// Always a page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Write `table` in, make the page read-only and seal it (where the
    /// kernel can). The table lives there for the life of the process.
    pub fn publish(self, table: PalTable) -> Result<&'static PalTable, String> {
        let p = self.addr as *mut PalTable;
        // SAFETY: the page is ours, read-write, page-aligned (so aligned for
        // PalTable) and large enough (checked above); nothing else uses it.
        unsafe { p.write(table) };
        crate::sys::mprotect(self.addr, PAGE, moat_pal::prot::READ).map_err(|e| {
            format!(
                "cannot make the PAL table read-only: {}",
                std::io::Error::from_raw_os_error(e)
            )
        })?;
        match mseal(self.addr, PAGE) {
            Ok(()) | Err(libc::ENOSYS) => {}
            Err(e) => {
                return Err(format!(
                    "cannot seal the PAL table: {}",
                    std::io::Error::from_raw_os_error(e)
                ))
            }
        }
        // SAFETY: written above; never unmapped or written again.
        Ok(unsafe { &*p })
    }
}
