//! The only code that touches a shared section's bytes: aligned atomic
//! loads and stores of the ring indices and flags, descriptor copies as
//! four atomic words, and bulk copies of buffer bytes. Every access is
//! bounds-checked against the section's length, so a wrong offset is a
//! panic here, never a stray access; offsets come from a
//! [`Layout`](super::Layout) that was checked against the same length.
//!
//! The peer can write any byte at any time. Nothing read from the section
//! is trusted: indices and descriptors are copied out once (one atomic
//! load per word, so a value is never read twice) and checked by the
//! caller; buffer bytes are copied in bulk and are the driver's business.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::DESCRIPTOR;

/// A mapped shared section, seen through bounds-checked accessors. It does
/// not own the mapping: whoever made it keeps the mapping alive while the
/// section, or anything built on it, is in use.
#[derive(Debug)]
pub struct Section {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a section is a pointer to memory shared with another process
// anyway; every access is atomic or a copy whose bytes are never trusted,
// so using it from another thread adds no data race the peer could not
// already cause.
unsafe impl Send for Section {}

impl Section {
    /// A section over `len` bytes at `base`.
    ///
    /// # Safety
    ///
    /// `base` is 8-byte aligned, and `base..base + len` is mapped readable
    /// and writable for as long as the section, or anything built on it,
    /// is used; nothing else in this process makes Rust references into
    /// it.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Section {
        assert!(base.as_ptr().align_offset(8) == 0, "section not aligned");
        Section { base, len }
    }

    /// The section's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the section is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of `len` bytes at `off`, aligned to `align`.
    fn at(&self, off: usize, len: usize, align: usize) -> *mut u8 {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len) && off.is_multiple_of(align),
            "shared-section access out of bounds: {len} bytes at {off} of {}",
            self.len
        );
        // SAFETY: off + len <= self.len, checked above, so the result
        // stays within the mapping `new` was given.
        unsafe { self.base.as_ptr().add(off) }
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        let p = self.at(off, 4, 4).cast::<u32>();
        // SAFETY: p is in bounds and 4-byte aligned (checked by `at`), the
        // mapping outlives `self` (the contract of `new`), and every access
        // to these bytes from this process is atomic.
        unsafe { AtomicU32::from_ptr(p) }
    }

    fn word64(&self, off: usize) -> &AtomicU64 {
        let p = self.at(off, 8, 8).cast::<u64>();
        // SAFETY: as in `word32`, with 8-byte alignment checked by `at`.
        unsafe { AtomicU64::from_ptr(p) }
    }

    /// Loads the u32 at `off` (4-byte aligned).
    pub fn load(&self, off: usize, order: Ordering) -> u32 {
        self.word32(off).load(order)
    }

    /// Stores `v` at `off` (4-byte aligned).
    pub fn store(&self, off: usize, v: u32, order: Ordering) {
        self.word32(off).store(v, order)
    }

    /// Loads the u64 at `off` (8-byte aligned).
    pub fn load64(&self, off: usize) -> u64 {
        self.word64(off).load(Ordering::Relaxed)
    }

    /// Stores `v` at `off` (8-byte aligned).
    pub fn store64(&self, off: usize, v: u64) {
        self.word64(off).store(v, Ordering::Relaxed)
    }

    /// Copies the descriptor at `off` (8-byte aligned) out, one load per
    /// word.
    pub fn read_desc(&self, off: usize) -> [u8; DESCRIPTOR] {
        let mut d = [0u8; DESCRIPTOR];
        for (i, w) in d.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&self.load64(off + i * 8).to_le_bytes());
        }
        d
    }

    /// Writes a descriptor at `off` (8-byte aligned), one store per word.
    pub fn write_desc(&self, off: usize, d: &[u8; DESCRIPTOR]) {
        for (i, w) in d.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.store64(off + i * 8, u64::from_le_bytes(b));
        }
    }

    /// Copies `out.len()` bytes at `off` out of the section.
    pub fn copy_out(&self, off: usize, out: &mut [u8]) {
        let src = self.at(off, out.len(), 1);
        // SAFETY: src..src+len is in bounds (checked by `at`) and mapped;
        // `out` is a distinct local buffer. The peer may write the source
        // meanwhile: the bytes copied are then some mix of old and new,
        // which is all a buffer's bytes are ever taken to be.
        unsafe { core::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
    }

    /// Copies `data` into the section at `off`.
    pub fn copy_in(&self, off: usize, data: &[u8]) {
        let dst = self.at(off, data.len(), 1);
        // SAFETY: dst..dst+len is in bounds (checked by `at`) and mapped
        // writable; `data` is a distinct buffer of this process.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
    }

    /// The address of the `len` bytes at `off`, for a driver whose device
    /// fills or reads them after this call (DMA). Using it is the caller's
    /// business, under the terms of [`Section::slice_mut`].
    pub fn ptr(&self, off: usize, len: usize) -> NonNull<[u8]> {
        let p = self.at(off, len, 1);
        NonNull::slice_from_raw_parts(NonNull::new(p).unwrap_or(self.base), len)
    }

    /// The `len` bytes at `off` as a mutable slice, for a driver that reads
    /// a file straight into its answer's buffer.
    ///
    /// # Safety
    ///
    /// Nothing else in this process uses these bytes while the slice
    /// lives. (The peer may: the bytes are plain data, and the side that
    /// holds the slice owns the buffer by the ring's rules; a peer that
    /// breaks them only spoils its own data.)
    pub unsafe fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        let p = self.at(off, len, 1);
        // SAFETY: in bounds and mapped (checked by `at`); exclusive within
        // this process by the caller's contract.
        unsafe { core::slice::from_raw_parts_mut(p, len) }
    }
}
