//! The guest memory map: which address ranges belong to the picoprocess and
//! with what access. Every host checks every guest pointer against it
//! before touching the memory, so a bad pointer is an error code, never a
//! fault in the host.
use crate::{prot, Error, PalResult};
use alloc::collections::BTreeMap;

/// What a region is, for reports and for which call may free it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    Image,
    Alloc,
    Stack,
    /// A file mapped by DkStreamMap (its pages past the file's end fault).
    Mapped,
    /// A shared section mapped by DkStreamMap: sized and sealed before it
    /// was mapped, so every page of it exists while it is mapped (a device
    /// may use it for DMA).
    Section,
    Host,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub end: u64,
    pub prot: u32,
    pub kind: RegionKind,
}

#[derive(Default, Debug)]
pub struct RegionMap {
    // start -> region; regions never overlap.
    map: BTreeMap<u64, Region>,
    total: u64,
    /// With a window, only [lo, hi) can hold regions (the KVM host: guest
    /// RAM); anything outside counts as in use.
    window: Option<(u64, u64)>,
    /// Changes so far: whoever caches something derived from the map
    /// (a device's DMA window) compares it to know when to derive again.
    changes: u64,
}

impl RegionMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes covered by regions.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// How many times the map changed (an insertion, a removal, a change
    /// of protection), wrapping.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Confine every region to [lo, hi): ranges outside count as in use.
    pub fn set_window(&mut self, lo: u64, hi: u64) {
        self.changes = self.changes.wrapping_add(1);
        self.window = Some((lo, hi));
    }

    /// The window regions are confined to, if any.
    pub fn window(&self) -> Option<(u64, u64)> {
        self.window
    }

    /// The lowest page-aligned free range of `len` bytes at or above `from`,
    /// inside the window (or below `limit` without one).
    pub fn find_free(&self, len: u64, from: u64, limit: u64) -> Option<u64> {
        let (lo, hi) = self.window.unwrap_or((0, limit));
        let mut at = from.max(lo).checked_next_multiple_of(0x1000)?;
        if let Some((_, r)) = self.map.range(..=at).next_back() {
            at = at.max(r.end);
        }
        for (&start, r) in self.map.range(at..) {
            if start >= at.checked_add(len)? {
                break;
            }
            at = r.end;
        }
        (at.checked_add(len)? <= hi).then_some(at)
    }

    /// Whether any byte of [start, end) is covered (or, with a window,
    /// lies outside it).
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if let Some((lo, hi)) = self.window {
            if start < lo || end > hi || end < start {
                return true;
            }
        }
        if let Some((_, r)) = self.map.range(..end).next_back() {
            if r.end > start {
                return true;
            }
        }
        false
    }

    /// Add a region; it must not overlap an existing one.
    pub fn insert(&mut self, start: u64, len: u64, prot: u32, kind: RegionKind) -> PalResult<()> {
        let end = start.checked_add(len).ok_or(Error::InvalidArgument)?;
        if len == 0 {
            return Err(Error::InvalidArgument);
        }
        if self.overlaps(start, end) {
            return Err(Error::AlreadyExists);
        }
        self.map.insert(start, Region { end, prot, kind });
        self.total += len;
        self.changes = self.changes.wrapping_add(1);
        Ok(())
    }

    /// Whether [start, start+len) is entirely covered by regions of `kind`.
    pub fn covered_by(&self, start: u64, len: u64, kind: RegionKind) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let mut at = start;
        while at < end {
            match self.map.range(..=at).next_back() {
                Some((_, r)) if r.end > at && r.kind == kind => at = r.end,
                _ => return false,
            }
        }
        true
    }

    /// Remove [start, start+len), splitting regions at the edges.
    pub fn remove(&mut self, start: u64, len: u64) {
        self.changes = self.changes.wrapping_add(1);
        let end = start.saturating_add(len);
        self.split_at(start);
        self.split_at(end);
        let keys: alloc::vec::Vec<u64> = self.map.range(start..end).map(|(k, _)| *k).collect();
        for k in keys {
            let r = self.map.remove(&k).unwrap();
            self.total -= r.end - k;
        }
    }

    /// Change the protection of [start, start+len).
    pub fn protect(&mut self, start: u64, len: u64, prot: u32) {
        self.changes = self.changes.wrapping_add(1);
        let end = start.saturating_add(len);
        self.split_at(start);
        self.split_at(end);
        for (_, r) in self.map.range_mut(start..end) {
            r.prot = prot;
        }
    }

    fn split_at(&mut self, at: u64) {
        if let Some((&s, &r)) = self.map.range(..at).next_back() {
            if r.end > at {
                self.map.insert(s, Region { end: at, ..r });
                self.map.insert(at, r);
            }
        }
    }

    /// Check that [addr, addr+len) lies in guest memory with `need` access.
    /// A zero length is always fine (no byte is touched), except that a
    /// null pointer is refused anyway so that callers see one behaviour.
    pub fn check(&self, addr: u64, len: u64, need: u32) -> PalResult<()> {
        if len == 0 {
            return if addr == 0 {
                Err(Error::BadAddress)
            } else {
                Ok(())
            };
        }
        let end = addr.checked_add(len).ok_or(Error::BadAddress)?;
        let mut at = addr;
        while at < end {
            match self.map.range(..=at).next_back() {
                Some((_, r)) if r.end > at && r.prot & need == need => at = r.end,
                _ => return Err(Error::BadAddress),
            }
        }
        Ok(())
    }

    pub fn check_read(&self, addr: u64, len: u64) -> PalResult<()> {
        self.check(addr, len, prot::READ)
    }

    pub fn check_write(&self, addr: u64, len: u64) -> PalResult<()> {
        self.check(addr, len, prot::READ | prot::WRITE)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Region)> {
        self.map.iter().map(|(k, v)| (*k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const RW: u32 = prot::READ | prot::WRITE;

    #[test]
    fn window_and_first_fit() {
        let mut m = RegionMap::new();
        m.set_window(0x10000, 0x20000);
        assert!(m.overlaps(0x8000, 0x11000), "below the window");
        assert!(m.overlaps(0x1f000, 0x21000), "above the window");
        assert_eq!(
            m.insert(0x20000, 0x1000, RW, RegionKind::Alloc),
            Err(Error::AlreadyExists)
        );
        assert_eq!(m.find_free(0x1000, 0, 0), Some(0x10000));
        m.insert(0x10000, 0x2000, RW, RegionKind::Alloc).unwrap();
        m.insert(0x13000, 0x1000, RW, RegionKind::Alloc).unwrap();
        assert_eq!(m.find_free(0x1000, 0, 0), Some(0x12000));
        assert_eq!(m.find_free(0x2000, 0, 0), Some(0x14000));
        assert_eq!(m.find_free(0x1000, 0x10800, 0), Some(0x12000));
        assert_eq!(m.find_free(0xc000, 0, 0), Some(0x14000));
        assert_eq!(m.find_free(0xd000, 0, 0), None);
        assert_eq!(m.find_free(u64::MAX - 0xfff, 0, 0), None);
    }

    #[test]
    fn checks() {
        let mut m = RegionMap::new();
        m.insert(0x1000, 0x2000, RW, RegionKind::Alloc).unwrap();
        m.insert(0x3000, 0x1000, prot::READ, RegionKind::Image)
            .unwrap();
        assert!(m.check_write(0x1000, 0x2000).is_ok());
        assert!(m.check_read(0x1000, 0x3000).is_ok());
        assert_eq!(m.check_write(0x1000, 0x3000), Err(Error::BadAddress));
        assert_eq!(m.check_read(0x0, 1), Err(Error::BadAddress));
        assert_eq!(m.check_read(u64::MAX, 2), Err(Error::BadAddress));
        assert_eq!(m.check_read(0, 0), Err(Error::BadAddress));
        assert_eq!(
            m.insert(0x2000, 0x1000, RW, RegionKind::Alloc),
            Err(Error::AlreadyExists)
        );
        m.remove(0x1800, 0x800);
        assert_eq!(m.check_read(0x1800, 1), Err(Error::BadAddress));
        assert!(m.check_read(0x1000, 0x800).is_ok());
        assert!(m.check_read(0x2000, 0x100).is_ok());
        m.protect(0x2000, 0x1000, prot::READ);
        assert_eq!(m.check_write(0x2000, 1), Err(Error::BadAddress));
        assert!(m.covered_by(0x2000, 0x1000, RegionKind::Alloc));
        assert!(!m.covered_by(0x2000, 0x2000, RegionKind::Alloc));
        assert_eq!(m.total(), 0x800 + 0x1000 + 0x1000);
    }
}
