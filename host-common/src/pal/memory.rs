//! The memory calls: anonymous guest memory, accounted against the memory
//! limit in the region map before it is mapped.
use super::LinuxPal;
use crate::sys;
use moat_pal::host_calls::MemoryCalls;
use moat_pal::memory::RegionKind;
use moat_pal::validate::{self, PAGE};
use moat_pal::{Error, PalResult};

impl MemoryCalls for LinuxPal {
    fn virtual_memory_alloc(&self, addr: u64, size: u64, p: u32) -> PalResult<u64> {
        validate::check_prot(p)?;
        if size == 0 || !size.is_multiple_of(PAGE) || !addr.is_multiple_of(PAGE) {
            return Err(Error::InvalidArgument);
        }
        if size > self.mem_limit {
            return Err(Error::NoMemory);
        }
        let (mut r, addr) = self.reserve(addr, size)?;
        let got = match sys::mmap_anon(addr, size, p) {
            Ok(a) => a,
            Err(libc::EEXIST) => return Err(Error::AlreadyExists),
            Err(_) => return Err(Error::NoMemory),
        };
        if let Err(e) = r.insert(got, size, p, RegionKind::Alloc) {
            let _ = sys::munmap(got, size);
            return Err(e);
        }
        Ok(got)
    }

    fn virtual_memory_free(&self, addr: u64, size: u64) -> PalResult<()> {
        validate::check_page_range(addr, size)?;
        let mut r = self.regions.write().unwrap();
        if !r.covered_by(addr, size, RegionKind::Alloc) {
            return Err(Error::BadAddress);
        }
        if sys::munmap(addr, size).is_err() {
            return Err(Error::InvalidArgument);
        }
        r.remove(addr, size);
        Ok(())
    }

    fn virtual_memory_protect(&self, addr: u64, size: u64, p: u32) -> PalResult<()> {
        validate::check_prot(p)?;
        validate::check_page_range(addr, size)?;
        let mut r = self.regions.write().unwrap();
        if !r.covered_by(addr, size, RegionKind::Alloc) {
            return Err(Error::BadAddress);
        }
        if sys::mprotect(addr, size, p).is_err() {
            return Err(Error::InvalidArgument);
        }
        r.protect(addr, size, p);
        Ok(())
    }
}
