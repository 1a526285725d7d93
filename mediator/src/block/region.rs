//! The mediator's view of one driver incarnation's shared section
//! ([`Region`]: a `moat_monitor::shm::HostSection`, which the monitor made,
//! sized, sealed and mapped, seen through the ring's bounds-checked
//! accessors, with the two doorbells), and the mediator's own wake-up
//! event for the supervisor ([`Bell`]).
//!
//! A region stays mapped as long as anything refers to it: the live
//! incarnation, and accepted read answers not yet copied to their clients
//! (which may outlive the incarnation that wrote them: the driver is dead
//! by then, so nothing writes the bytes any more).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::time::Duration;

use moat_monitor::shm::HostSection;
use moat_service_proto::ring::{Layout, Section};

/// A driver incarnation's shared section, laid out as `layout` says.
#[derive(Debug)]
pub(crate) struct Region {
    host: HostSection,
    layout: Layout,
}

impl Region {
    /// A new section for `layout` (sized, sealed and mapped by the
    /// monitor).
    pub(crate) fn new(layout: Layout) -> std::io::Result<Region> {
        let host = HostSection::new(layout.size() as u64)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Region { host, layout })
    }

    /// The monitor's section, to give to the driver's session.
    pub(crate) fn host(&self) -> &HostSection {
        &self.host
    }

    /// A view of the whole section. It must not outlive the region: the
    /// caller keeps an `Arc<Region>` beside it (the live incarnation's
    /// ring does).
    pub(crate) fn section(&self) -> Section {
        let base = NonNull::new(self.host.as_ptr()).expect("a mapped section");
        // SAFETY: the host section is mapped shared read-write,
        // page-aligned, `len` bytes, until it is dropped with the region;
        // every holder of a section made here keeps the region alive (see
        // above); the mediator makes no Rust references into the mapping
        // (the host section hands out atomics only, and is not used for
        // access here).
        unsafe { Section::new(base, self.host.len() as usize) }
    }

    /// Copies the first `out.len()` bytes of buffer `buf` out.
    pub(crate) fn read_buf(&self, buf: u32, out: &mut [u8]) {
        assert!(out.len() <= self.layout.buf_size as usize);
        self.section().copy_out(self.layout.buf(buf), out);
    }

    /// Rings the driver's doorbell.
    pub(crate) fn kick(&self) {
        self.host.ring();
    }

    /// The mediator's doorbell, readable once the driver rang.
    pub(crate) fn bell(&self) -> BorrowedFd<'_> {
        self.host.doorbell()
    }

    /// Consumes the driver's rings so far.
    pub(crate) fn reset_bell(&self) {
        self.host.wait(Some(Duration::ZERO));
    }
}

/// The supervisor's wake-up event (an eventfd, non-blocking).
#[derive(Debug)]
pub(crate) struct Bell(OwnedFd);

impl Bell {
    pub(crate) fn new() -> std::io::Result<Bell> {
        let fd = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )
        .map_err(std::io::Error::from)?;
        Ok(Bell(fd.into()))
    }

    /// Rings it.
    pub(crate) fn ring(&self) {
        let _ = nix::unistd::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Resets it (a bell that did not ring is left alone).
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
    timeout: Duration,
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
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let mut out = [false; N];
    if let Ok(n) = poll(
        &mut pfds,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    ) {
        if n > 0 {
            for i in 0..N {
                if which[i] != usize::MAX {
                    out[i] = pfds[which[i]].revents().is_some_and(|r| !r.is_empty());
                }
            }
        }
    }
    out
}
