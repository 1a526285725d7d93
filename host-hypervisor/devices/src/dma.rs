//! Guest memory as a device may reach it: the guest's memory, optionally cut
//! down to the ranges the VMM allows for DMA.
//!
//! [`DmaMemory`] implements `vm_memory::GuestMemory`, so the virtqueue code
//! (`virtio-queue`) and every buffer access go through it: an address outside
//! the allowed ranges is simply not memory, and the checked accessors refuse
//! it like any other address outside the guest. That covers the rings, the
//! descriptor table, indirect tables and the data buffers alike, without a
//! window between a check and the use of an address the guest can race.

use std::io::{Read, Write};
use std::ops::Range;
use std::sync::atomic::Ordering;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{Error, Result};
use vm_memory::{
    Address, AtomicAccess, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

/// A part of a guest memory region that a device may access.
#[derive(Debug)]
pub(crate) struct DmaRegion<'a> {
    inner: &'a GuestRegionMmap<()>,
    /// Offset of this part within `inner`.
    offset: u64,
    start: GuestAddress,
    /// Never 0.
    len: u64,
}

impl<'a> DmaRegion<'a> {
    /// The whole part, as one volatile slice.
    fn slice(&self) -> Result<VolatileSlice<'a, ()>> {
        let len = usize::try_from(self.len).map_err(|_| Error::InvalidBackendAddress)?;
        self.inner.get_slice(MemoryRegionAddress(self.offset), len)
    }
}

/// Guest memory restricted to the allowed DMA ranges (all of it when no
/// range is set).
#[derive(Debug)]
pub(crate) struct DmaMemory<'a> {
    /// Sorted by start address, non-overlapping.
    regions: Vec<DmaRegion<'a>>,
}

impl<'a> DmaMemory<'a> {
    /// The parts of `mem` inside `allowed` (`None`: all of `mem`).
    ///
    /// `allowed` must be sorted and non-overlapping (see [`normalize`]).
    pub(crate) fn new(mem: &'a GuestMemoryMmap<()>, allowed: Option<&[Range<u64>]>) -> Self {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let r_start = r.start_addr().raw_value();
            // Exclusive end; regions never wrap (vm-memory checks that).
            let r_end = r_start.saturating_add(r.len());
            let mut push = |start: u64, end: u64| {
                if start < end {
                    regions.push(DmaRegion {
                        inner: r,
                        offset: start - r_start,
                        start: GuestAddress(start),
                        len: end - start,
                    });
                }
            };
            match allowed {
                None => push(r_start, r_end),
                Some(ranges) => {
                    for w in ranges {
                        push(w.start.max(r_start), w.end.min(r_end));
                    }
                }
            }
        }
        regions.sort_by_key(|r| r.start);
        DmaMemory { regions }
    }
}

/// Sorts and merges ranges, dropping empty ones, so that the result is
/// sorted and non-overlapping.
pub(crate) fn normalize(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

impl<'a> GuestMemory for DmaMemory<'a> {
    type R = DmaRegion<'a>;

    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&Self::R> {
        let i = self.regions.partition_point(|r| r.start <= addr);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (addr.raw_value() - r.start.raw_value() < r.len).then_some(r)
    }

    fn iter(&self) -> impl Iterator<Item = &Self::R> {
        self.regions.iter()
    }
}

impl GuestMemoryRegion for DmaRegion<'_> {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.len
    }

    fn start_addr(&self) -> GuestAddress {
        self.start
    }

    fn bitmap(&self) -> &() {
        &()
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, ()>>> {
        let end = offset
            .raw_value()
            .checked_add(count as u64)
            .ok_or(Error::InvalidBackendAddress)?;
        if end > self.len {
            return Err(Error::InvalidBackendAddress);
        }
        self.inner
            .get_slice(MemoryRegionAddress(self.offset + offset.raw_value()), count)
    }
}

fn at(addr: MemoryRegionAddress) -> usize {
    // Region parts are at most the size of a host mapping, so offsets that
    // do not fit a usize are out of range anyway; saturate and let the
    // volatile slice refuse them.
    usize::try_from(addr.raw_value()).unwrap_or(usize::MAX)
}

impl Bytes<MemoryRegionAddress> for DmaRegion<'_> {
    type E = Error;

    fn write(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<usize> {
        Ok(self.slice()?.write(buf, at(addr))?)
    }

    fn read(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<usize> {
        Ok(self.slice()?.read(buf, at(addr))?)
    }

    fn write_slice(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<()> {
        Ok(self.slice()?.write_slice(buf, at(addr))?)
    }

    fn read_slice(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<()> {
        Ok(self.slice()?.read_slice(buf, at(addr))?)
    }

    #[allow(deprecated)]
    fn read_from<F: Read>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<usize> {
        Ok(self.slice()?.read_from(at(addr), src, count)?)
    }

    #[allow(deprecated)]
    fn read_exact_from<F: Read>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<()> {
        Ok(self.slice()?.read_exact_from(at(addr), src, count)?)
    }

    #[allow(deprecated)]
    fn write_to<F: Write>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<usize> {
        Ok(self.slice()?.write_to(at(addr), dst, count)?)
    }

    #[allow(deprecated)]
    fn write_all_to<F: Write>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<()> {
        Ok(self.slice()?.write_all_to(at(addr), dst, count)?)
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> Result<()> {
        Ok(self.slice()?.store(val, at(addr), order)?)
    }

    fn load<T: AtomicAccess>(&self, addr: MemoryRegionAddress, order: Ordering) -> Result<T> {
        Ok(self.slice()?.load(at(addr), order)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10000), 0x2000)])
            .unwrap()
    }

    #[test]
    fn unrestricted_view_is_all_memory() {
        let m = mem();
        let d = DmaMemory::new(&m, None);
        assert_eq!(d.num_regions(), 2);
        d.write_obj(0x1234_5678u32, GuestAddress(0x3ffc)).unwrap();
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x3ffc)).unwrap(),
            0x1234_5678
        );
        assert!(d.read_obj::<u32>(GuestAddress(0x3ffe)).is_err());
        assert!(d.read_obj::<u8>(GuestAddress(0x4000)).is_err());
        assert!(d.read_obj::<u8>(GuestAddress(0x11fff)).is_ok());
        assert!(d.read_obj::<u8>(GuestAddress(0x12000)).is_err());
        assert!(d.read_obj::<u8>(GuestAddress(u64::MAX)).is_err());
    }

    #[test]
    fn window_cuts_regions() {
        let m = mem();
        let w = normalize(&[0x11000..0x20000, 0x1000..0x2000, 0x1800..0x2800, 5..5]);
        assert_eq!(w, vec![0x1000..0x2800, 0x11000..0x20000]);
        let d = DmaMemory::new(&m, Some(&w));
        assert_eq!(d.num_regions(), 2);
        assert!(d.read_obj::<u8>(GuestAddress(0xfff)).is_err());
        assert!(d.read_obj::<u8>(GuestAddress(0x1000)).is_ok());
        assert!(d.read_obj::<u8>(GuestAddress(0x27ff)).is_ok());
        assert!(d.read_obj::<u16>(GuestAddress(0x27ff)).is_err());
        assert!(d.read_obj::<u8>(GuestAddress(0x2800)).is_err());
        assert!(d.read_obj::<u8>(GuestAddress(0x10fff)).is_err());
        assert!(d.read_obj::<u64>(GuestAddress(0x11ff8)).is_ok());
        d.write_obj(0xabu8, GuestAddress(0x2000)).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0xab);
        let r = d.find_region(GuestAddress(0x1800)).unwrap();
        assert!(r.get_slice(MemoryRegionAddress(0x17ff), 2).is_err());
        assert!(r.get_slice(MemoryRegionAddress(0x17ff), 1).is_ok());
        assert!(r.get_slice(MemoryRegionAddress(u64::MAX), 2).is_err());
        assert!(d.check_range(GuestAddress(0x1000), 0x1800));
        assert!(!d.check_range(GuestAddress(0x1000), 0x1801));
        // A window outside all memory leaves nothing.
        let d = DmaMemory::new(&m, Some(std::slice::from_ref(&(0x5000..0x6000))));
        assert_eq!(d.num_regions(), 0);
        assert!(d.read_obj::<u8>(GuestAddress(0x5000)).is_err());
    }
}
