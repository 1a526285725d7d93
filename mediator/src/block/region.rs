//! The mediator's view of one driver incarnation's shared section: the
//! section's memory file mapped into this process ([`Region`]), and the
//! event descriptors that are the two doorbells ([`Bell`]). This is the
//! only module of the mediator that maps memory.
//!
//! A region stays mapped as long as anything refers to it: the ring of
//! the live incarnation, and accepted read answers not yet copied to their
//! clients (which may outlive the incarnation that wrote them: the driver
//! is dead by then, so nothing writes the bytes any more).

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use moat_service_proto::ring::{Layout, Section};

/// A shared section mapped read-write into this process.
#[derive(Debug)]
pub(crate) struct Region {
    base: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the mapping is plain shared memory; `Region` hands it out only
// as `Section`s, whose accesses are atomic or copies (see
// `moat_service_proto::ring`), so it may move between and be shared by
// threads.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Maps the first `layout.size()` bytes of `memory` (a memory file at
    /// least that long) shared and read-write.
    pub(crate) fn map(memory: &OwnedFd, layout: Layout) -> std::io::Result<Region> {
        let len = layout.size();
        let size = NonZeroUsize::new(len).ok_or_else(|| std::io::Error::other("empty section"))?;
        // SAFETY: a new shared mapping at an address the kernel picks: it
        // overlaps nothing this process uses. The file's size was set by
        // whoever created it; `len` bytes are mapped and a shorter file
        // would fault on access past its end, which the caller rules out
        // by sizing the file from the same layout.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                size,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                memory,
                0,
            )
        }
        .map_err(std::io::Error::from)?;
        Ok(Region {
            base: p.cast(),
            len,
            layout,
        })
    }

    /// The layout the mediator chose for this section.
    pub(crate) fn layout(&self) -> Layout {
        self.layout
    }

    /// A view of the whole section. It must not outlive the region: the
    /// caller keeps an `Arc<Region>` beside it (the live incarnation's
    /// ring does).
    pub(crate) fn section(&self) -> Section {
        // SAFETY: `base` is page-aligned and `len` bytes are mapped
        // read-write until `drop`; every holder of a section made here
        // keeps the region alive (see above); the mediator makes no Rust
        // references into the mapping.
        unsafe { Section::new(self.base, self.len) }
    }

    /// Copies the first `out.len()` bytes of buffer `buf` out.
    pub(crate) fn read_buf(&self, buf: u32, out: &mut [u8]) {
        assert!(out.len() <= self.layout.buf_size as usize);
        self.section().copy_out(self.layout.buf(buf), out);
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; nothing refers
        // to it any more (every section made from it is gone with the
        // last `Arc<Region>`).
        let _ = unsafe { nix::sys::mman::munmap(self.base.cast(), self.len) };
    }
}

/// One doorbell: an event counter one side adds to and the other waits on.
#[derive(Debug)]
pub(crate) struct Bell(pub(crate) OwnedFd);

impl Bell {
    /// Rings it.
    pub(crate) fn ring(&self) {
        let _ = nix::unistd::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Resets it after it rang (non-blocking: a bell that did not ring is
    /// left alone).
    pub(crate) fn reset(&self) {
        let mut b = [0u8; 8];
        let _ = nix::unistd::read(self.0.as_raw_fd(), &mut b);
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Waits until one of `fds` is readable or `timeout` passes; returns which
/// were readable (all false on a timeout or an interruption).
pub(crate) fn wait_readable<const N: usize>(
    fds: [Option<BorrowedFd<'_>>; N],
    timeout: std::time::Duration,
) -> [bool; N] {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut pfds: Vec<PollFd> = Vec::with_capacity(N);
    let mut which = [usize::MAX; N];
    for (i, fd) in fds.iter().enumerate() {
        if let Some(fd) = fd {
            which[i] = pfds.len();
            pfds.push(PollFd::new(*fd, PollFlags::POLLIN));
        }
    }
    let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as i32;
    // Round a sub-millisecond wait up, so a near deadline is not a spin.
    let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
    let mut out = [false; N];
    if let Ok(n) = poll(&mut pfds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
        if n > 0 {
            for i in 0..N {
                if which[i] != usize::MAX {
                    out[i] = pfds[which[i]]
                        .revents()
                        .is_some_and(|r| !r.is_empty());
                }
            }
        }
    }
    out
}
