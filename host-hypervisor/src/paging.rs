//! The guest's page tables for guest RAM, kept equal to the region map:
//! W^X inside the VM.
//!
//! Every page of guest RAM has its own 4 KiB page-table entry: present,
//! user, writable and executable exactly as the region map says (EFER.NXE
//! is on, so a page without [`prot::EXEC`] is NX), and not present where
//! the map has no region. The first 2 MiB use `PT0` in the VMM area; every
//! further 2 MiB has its own table in the page-table pool (memory slot 2 at
//! [`PT_POOL`], which no page table maps). The page directories point at
//! these tables from the start and never change, so every protection
//! change is a change of leaf entries only. The task-state area above guest
//! RAM keeps its supervisor-only 2 MiB pages.
//!
//! Why 4 KiB entries everywhere, and no 2 MiB page for a uniform range:
//! KVM may run the VM on shadow page tables (it does under nested PVM),
//! and it learns of changes to guest page tables only by trapping the
//! guest's own writes to them. The VMM writes them from outside, so KVM
//! keeps what it derived from the old entries — across a guest CR3 reload
//! or `invlpg` too (measured). What KVM never keeps is a translation of a
//! host page whose mapping changed: the kernel's MMU notifier makes it
//! drop every such translation, on every vCPU, before `munmap` or
//! `mprotect` returns, and a later access walks the guest tables afresh.
//! A directory entry that turned from a 2 MiB page into a table would
//! leave a stale shadow structure that no host-page change reaches; leaf
//! entries are always reached.
//!
//! So the order of each change is what keeps every vCPU coherent (the
//! KVM PAL and the thread stacks follow it, under [`PageTables::lock`]):
//!
//! 1. entries that lose an access lose it first ([`PageTables::restrict`]:
//!    free and unmap clear them, protect keeps what old and new protection
//!    both allow);
//! 2. the host mapping changes (host-common's `munmap`/`mprotect`, with
//!    the same protection): KVM drops its translations of those pages on
//!    every vCPU, and any vCPU that touches one again reads the restricted
//!    entry;
//! 3. entries that gain an access gain it from the region map
//!    ([`PageTables::sync`]). A cached translation that allows less than
//!    the entry is at worst a spurious fault, which the exception path
//!    retries (see `pico::exception`).
//!
//! A protection change leaves every vCPU unable to use the old access
//! before the call returns to the guest; a guest thread racing with it on
//! another vCPU sees either the old or the new protection (or, while a
//! page gains an access, a retried fault), never an access that neither
//! allows. A protection that does not change the entry changes nothing.
use crate::layout::{PT_POOL, RAM_START};
use crate::longmode::{PTE_NX, PTE_PRESENT, PTE_USER, PTE_WRITE};
use moat_pal::memory::RegionMap;
use moat_pal::prot;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

const PAGE: u64 = 0x1000;
/// The guest RAM one page table maps.
pub const TABLE_SPAN: u64 = 2 << 20;
/// Entries per page table.
const ENTRIES: usize = 512;

/// The leaf entries of guest RAM, in host memory the VM reads as its page
/// tables.
pub struct PageTables {
    /// `PT0`'s entries (the first 2 MiB), in the VMM area.
    pt0: &'static [AtomicU64],
    /// The pool: table `i` maps the 2 MiB from `i * TABLE_SPAN`.
    pool: &'static [AtomicU64],
    /// Where guest RAM ends (the task-state area above is the VMM's).
    ram_end: u64,
    /// Held across each change of the region map and its entries.
    lock: Mutex<()>,
}

/// The entry of the page at `gpa` for protection `p` (0: not present).
pub fn entry_for(p: u32, gpa: u64) -> u64 {
    if p & (prot::READ | prot::WRITE | prot::EXEC) == 0 {
        return 0;
    }
    let mut e = gpa | PTE_PRESENT | PTE_USER;
    if p & prot::WRITE != 0 {
        e |= PTE_WRITE;
    }
    if p & prot::EXEC == 0 {
        e |= PTE_NX;
    }
    e
}

/// An entry that allows only what both `a` and `b` allow (same page).
fn narrower(a: u64, b: u64) -> u64 {
    if a & b & PTE_PRESENT == 0 {
        return 0;
    }
    (a & !PTE_WRITE) | (a & b & PTE_WRITE) | ((a | b) & PTE_NX)
}

impl PageTables {
    /// Over `PT0`'s 512 entries and the pool's (a table per 2 MiB of
    /// RAM, table 0 unused); guest RAM ends at `ram_end`.
    pub(crate) fn new(
        pt0: &'static [AtomicU64],
        pool: &'static [AtomicU64],
        ram_end: u64,
    ) -> PageTables {
        assert_eq!(pt0.len(), ENTRIES);
        assert!(pool.len() as u64 >= ram_end.div_ceil(TABLE_SPAN) * ENTRIES as u64);
        PageTables {
            pt0,
            pool,
            ram_end,
            lock: Mutex::new(()),
        }
    }

    /// The directory entry's target for the table of 2 MiB block `i`
    /// (`i >= 1`).
    pub fn table_gpa(i: u64) -> u64 {
        PT_POOL + i * PAGE
    }

    /// Where guest RAM (the part the region map may hold) ends.
    pub fn ram_end(&self) -> u64 {
        self.ram_end
    }

    /// Held by whoever changes the region map of the VM, from before the
    /// change until its entries are in step.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, gpa: u64) -> Option<&AtomicU64> {
        if !(RAM_START..self.ram_end).contains(&gpa) {
            return None;
        }
        let block = gpa / TABLE_SPAN;
        let i = ((gpa / PAGE) % ENTRIES as u64) as usize;
        if block == 0 {
            self.pt0.get(i)
        } else {
            self.pool.get(block as usize * ENTRIES + i)
        }
    }

    /// The entry of the page at `gpa` (0 outside guest RAM).
    pub fn get(&self, gpa: u64) -> u64 {
        self.entry(gpa & !(PAGE - 1))
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    fn set(&self, gpa: u64, v: u64) {
        if let Some(e) = self.entry(gpa) {
            // One aligned 8-byte store: a walker sees the old entry or the
            // new one.
            if e.load(Ordering::Relaxed) != v {
                e.store(v, Ordering::Release);
            }
        }
    }

    /// The pages of [start, start+len) inside guest RAM, page-aligned.
    fn pages(&self, start: u64, len: u64) -> (u64, u64) {
        let lo = (start & !(PAGE - 1)).max(RAM_START);
        let hi = start
            .saturating_add(len)
            .saturating_add(PAGE - 1)
            .min(self.ram_end)
            & !(PAGE - 1);
        (lo, hi.max(lo))
    }

    /// Step 1: the pages of [start, start+len) allow at most protection `p`
    /// from now on (0: nothing).
    pub fn restrict(&self, start: u64, len: u64, p: u32) {
        let (lo, hi) = self.pages(start, len);
        for gpa in (lo..hi).step_by(PAGE as usize) {
            let now = self.get(gpa);
            self.set(gpa, narrower(now, entry_for(p, gpa)));
        }
    }

    /// Step 3: the pages of [start, start+len) as the region map says.
    pub fn sync(&self, map: &RegionMap, start: u64, len: u64) {
        let (lo, hi) = self.pages(start, len);
        let mut at = lo;
        for (s, r) in map.iter() {
            if r.end <= at {
                continue;
            }
            if s >= hi {
                break;
            }
            while at < s.min(hi) {
                self.set(at, 0);
                at += PAGE;
            }
            while at < r.end.min(hi) {
                self.set(at, entry_for(r.prot, at));
                at += PAGE;
            }
        }
        while at < hi {
            self.set(at, 0);
            at += PAGE;
        }
    }

    /// Every region of `map` into tables that map nothing yet (before the
    /// first vCPU runs): only the regions' pages are visited.
    pub fn map_all(&self, map: &RegionMap) {
        for (s, r) in map.iter() {
            let (lo, hi) = self.pages(s, r.end - s);
            for gpa in (lo..hi).step_by(PAGE as usize) {
                self.set(gpa, entry_for(r.prot, gpa));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_pal::memory::RegionKind;

    fn tables(ram_end: u64) -> PageTables {
        let pt0: &'static [AtomicU64] =
            Vec::leak((0..ENTRIES).map(|_| AtomicU64::new(0)).collect());
        let n = ram_end.div_ceil(TABLE_SPAN) as usize * ENTRIES;
        let pool: &'static [AtomicU64] = Vec::leak((0..n).map(|_| AtomicU64::new(0)).collect());
        PageTables::new(pt0, pool, ram_end)
    }

    const RW: u32 = prot::READ | prot::WRITE;
    const RX: u32 = prot::READ | prot::EXEC;

    #[test]
    fn entries_follow_the_region_map() {
        let t = tables(8 << 20);
        let mut m = RegionMap::new();
        m.insert(0x10000, 0x2000, RX, RegionKind::Image).unwrap();
        m.insert(0x1ff000, 0x2000, RW, RegionKind::Alloc).unwrap();
        m.insert(0x400000, 0x1000, prot::READ, RegionKind::Alloc)
            .unwrap();
        t.map_all(&m);
        assert_eq!(t.get(0x10000), 0x10000 | PTE_PRESENT | PTE_USER);
        assert_eq!(t.get(0x11fff), 0x11000 | PTE_PRESENT | PTE_USER);
        assert_eq!(t.get(0x12000), 0);
        let rw = PTE_PRESENT | PTE_USER | PTE_WRITE | PTE_NX;
        assert_eq!(t.get(0x1ff000), 0x1ff000 | rw, "last page of PT0");
        assert_eq!(t.get(0x200000), 0x200000 | rw, "first page of table 1");
        assert_eq!(t.get(0x400000), 0x400000 | PTE_PRESENT | PTE_USER | PTE_NX);
        assert_eq!(t.get(0x8000), 0, "the VMM area is not guest RAM");
        assert_eq!(t.get(8 << 20), 0, "above guest RAM");
        // Free one page, protect another: restrict first, then sync.
        t.restrict(0x1ff000, 0x1000, 0);
        assert_eq!(t.get(0x1ff000), 0);
        m.remove(0x1ff000, 0x1000);
        t.restrict(0x10000, 0x1000, RW);
        assert_eq!(
            t.get(0x10000),
            0x10000 | PTE_PRESENT | PTE_USER | PTE_NX,
            "RX to RW: neither W nor X in between"
        );
        m.protect(0x10000, 0x1000, RW);
        t.sync(&m, 0x10000, 0x1000);
        t.sync(&m, 0x1ff000, 0x1000);
        assert_eq!(t.get(0x10000), 0x10000 | rw);
        assert_eq!(t.get(0x1ff000), 0);
        assert_eq!(t.get(0x200000), 0x200000 | rw);
        // A sync of a range wider than any region clears what is not there.
        t.sync(&RegionMap::new(), 0, u64::MAX);
        assert_eq!(t.get(0x10000) | t.get(0x200000) | t.get(0x400000), 0);
    }

    #[test]
    fn narrower_keeps_only_common_access() {
        let g = 0x5000;
        let e = |p| entry_for(p, g);
        assert_eq!(narrower(e(RW), e(RX)), e(prot::READ));
        assert_eq!(narrower(e(RX), e(RW)), e(prot::READ));
        assert_eq!(narrower(e(RW), e(0)), 0);
        assert_eq!(narrower(e(RW), e(RW)), e(RW));
        assert_eq!(entry_for(prot::WRITE, g), e(RW), "x86 has no write-only");
    }
}
