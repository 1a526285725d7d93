//! Interrupts as eventfds.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A device's interrupt line: an eventfd the device signals (adds 1 to)
/// each time it raises its interrupt.
///
/// The VMM keeps a duplicate of the descriptor ([`Irq::try_clone_fd`], or
/// the fd it created before handing it over with `Irq::from`) and turns its
/// readability into the event the guest driver waits on; reading the eventfd
/// (see [`Irq::take`]) clears it. The device never reads it.
///
/// The descriptor should be an eventfd opened with `EFD_NONBLOCK` (as
/// [`Irq::new`] does): a counter that is already at its maximum makes the
/// write fail with `EAGAIN`, which [`Irq::trigger`] treats as "already
/// signalled" rather than blocking the vCPU.
pub struct Irq {
    fd: Option<File>,
    /// Called on every trigger instead of (or besides) the eventfd: the
    /// VMM sets the picoprocess's interrupt event from here directly.
    notify: Option<std::sync::Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Irq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Irq")
            .field("fd", &self.fd)
            .field("notify", &self.notify.is_some())
            .finish()
    }
}

impl Irq {
    /// Creates a fresh eventfd (`EFD_CLOEXEC | EFD_NONBLOCK`, counter 0).
    pub fn new() -> io::Result<Irq> {
        // SAFETY: eventfd takes no pointers; it returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a valid descriptor that was just created and is
        // owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Irq::from(fd))
    }

    /// Signals the interrupt: adds 1 to the eventfd's counter.
    pub fn trigger(&self) -> io::Result<()> {
        if let Some(n) = &self.notify {
            n();
        }
        let Some(fd) = &self.fd else { return Ok(()) };
        match (&*fd).write(&1u64.to_ne_bytes()) {
            Ok(8) => Ok(()),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write of {n} bytes to an interrupt eventfd"),
            )),
            // The counter is saturated: the interrupt is already pending.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads and clears the counter: how many times the interrupt was
    /// signalled since the last read (0 if none, without blocking when the
    /// eventfd is non-blocking).
    pub fn take(&self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        let Some(fd) = &self.fd else { return Ok(0) };
        match (&*fd).read(&mut buf) {
            Ok(8) => Ok(u64::from_ne_bytes(buf)),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read of {n} bytes from an interrupt eventfd"),
            )),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Duplicates the descriptor (`F_DUPFD_CLOEXEC`), e.g. for the VMM to
    /// wait on while the device keeps the original.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        Ok(self.file()?.try_clone()?.into())
    }

    /// An interrupt that calls `f` on every trigger (no eventfd).
    pub fn from_fn(f: std::sync::Arc<dyn Fn() + Send + Sync>) -> Irq {
        Irq {
            fd: None,
            notify: Some(f),
        }
    }

    fn file(&self) -> io::Result<&File> {
        self.fd.as_ref().ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "this interrupt has no eventfd")
        })
    }

    /// Another handle on the same eventfd.
    pub fn try_clone(&self) -> io::Result<Irq> {
        Ok(Irq {
            fd: self.fd.as_ref().map(|f| f.try_clone()).transpose()?,
            notify: self.notify.clone(),
        })
    }
}

/// Takes ownership of an eventfd created by the caller.
impl From<OwnedFd> for Irq {
    fn from(fd: OwnedFd) -> Irq {
        Irq {
            fd: Some(File::from(fd)),
            notify: None,
        }
    }
}

impl Irq {
    /// The eventfd, if this interrupt has one.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// The eventfd's number, if this interrupt has one.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_and_take() {
        let irq = Irq::new().unwrap();
        assert_eq!(irq.take().unwrap(), 0);
        irq.trigger().unwrap();
        irq.trigger().unwrap();
        let other = Irq::from(irq.try_clone_fd().unwrap());
        assert_eq!(other.take().unwrap(), 2);
        assert_eq!(irq.take().unwrap(), 0);
    }
}
