//! The global allocator: talc over arenas from DkVirtualMemoryAlloc.
//!
//! When talc runs out of room it calls [`Arenas::acquire`], which asks the
//! host for a new read-write arena (at least [`MIN_ARENA`], more for a large
//! request) and hands it to talc. Arenas are never returned to the host.
use core::alloc::Layout;

use moat_pal::{limits, prot};
use talc::base::binning::Binning;
use talc::base::Talc;
use talc::source::Source;
use talc::TalcLock;

use crate::raw;
use crate::sync::RawLock;

/// Smallest arena requested from the host.
pub const MIN_ARENA: usize = 1 << 20;

/// Talc's source of memory: new arenas from the host.
#[derive(Debug)]
pub struct Arenas;

// SAFETY: `acquire` only claims fresh memory from the host and never touches
// the global allocator.
unsafe impl Source for Arenas {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        let page = limits::PAGE_SIZE as usize;
        // Room for the request at its alignment plus talc's bookkeeping.
        let want = layout
            .size()
            .checked_add(layout.align())
            .and_then(|n| n.checked_add(talc::min_first_heap_size::<B>() + 4 * page))
            .ok_or(())?;
        let size = want.max(MIN_ARENA).checked_add(page - 1).ok_or(())? & !(page - 1);
        let addr = match raw::virtual_memory_alloc(0, size as u64, ARENA_PROT) {
            Ok(addr) if addr != 0 => addr,
            _ => return Err(()),
        };
        // SAFETY: the host just gave us `size` bytes of fresh read-write
        // memory that nothing else uses.
        match unsafe { talc.claim(addr as *mut u8, size) } {
            Some(_) => Ok(()),
            None => Err(()),
        }
    }
}

/// The global allocator of every image that links moat-libos.
#[global_allocator]
pub static ALLOCATOR: TalcLock<RawLock, Arenas> = TalcLock::new(Arenas);

/// Arenas are read-write, never executable.
pub const ARENA_PROT: u32 = prot::READ | prot::WRITE;
