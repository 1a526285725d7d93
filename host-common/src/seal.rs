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
//! A kernel without `mseal` (before 6.10) gets the same ranges refused by
//! an argument check in the seccomp program instead
//! ([`crate::seal_filter`]); [`seal_code`] says which of the two holds.
//! `MOAT_SEAL=seccomp` in the environment of `moat` takes that path on a
//! kernel that has `mseal` (the tests use it).
use moat_pal::PalTable;

/// How the PAL's code and table are kept from being changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sealing {
    /// By the kernel (`mseal`).
    Kernel,
    /// By the seccomp program: these ranges (page-aligned) and the table's
    /// page are refused to every memory call.
    Seccomp(Vec<(u64, u64)>),
}

/// The environment variable (and its one value) that makes the loader
/// seal by seccomp even where the kernel has `mseal`.
pub const ENV_FORCE_SECCOMP: (&str, &str) = ("MOAT_SEAL", "seccomp");

fn forced_seccomp() -> bool {
    std::env::var_os(ENV_FORCE_SECCOMP.0).is_some_and(|v| v == ENV_FORCE_SECCOMP.1)
}

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

/// Seal every range of [`code_and_relro_ranges`] with `mseal`; where the
/// kernel has none (or [`ENV_FORCE_SECCOMP`] asks), return the ranges for
/// the seccomp program to refuse instead.
pub fn seal_code() -> Result<Sealing, String> {
    let ranges = code_and_relro_ranges();
    if forced_seccomp() {
        return Ok(Sealing::Seccomp(ranges));
    }
    for &(s, e) in &ranges {
        match mseal(s, e - s) {
            Ok(()) => {}
            // The first call fails if any does: nothing is half sealed.
            Err(libc::ENOSYS) => return Ok(Sealing::Seccomp(ranges)),
            Err(e2) => {
                return Err(format!(
                    "cannot seal PAL code at {s:#x}..{e:#x}: {}",
                    std::io::Error::from_raw_os_error(e2)
                ))
            }
        }
    }
    Ok(Sealing::Kernel)
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

    /// Write `table` in, make the page read-only and seal it (with
    /// `mseal` under [`Sealing::Kernel`]; the seccomp program already
    /// guards it otherwise). The table lives there for the life of the
    /// process.
    pub fn publish(self, table: PalTable, sealing: &Sealing) -> Result<&'static PalTable, String> {
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
        if *sealing == Sealing::Kernel {
            mseal(self.addr, PAGE).map_err(|e| {
                format!(
                    "cannot seal the PAL table: {}",
                    std::io::Error::from_raw_os_error(e)
                )
            })?;
        }
        // SAFETY: written above; never unmapped or written again.
        Ok(unsafe { &*p })
    }
}
