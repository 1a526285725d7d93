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
#[derive(Debug)]
pub struct Irq {
    fd: File,
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
        match (&self.fd).write(&1u64.to_ne_bytes()) {
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
        match (&self.fd).read(&mut buf) {
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
        Ok(self.fd.try_clone()?.into())
    }

    /// Another handle on the same eventfd.
    pub fn try_clone(&self) -> io::Result<Irq> {
        Ok(Irq {
            fd: self.fd.try_clone()?,
        })
    }
}

/// Takes ownership of an eventfd created by the caller.
impl From<OwnedFd> for Irq {
    fn from(fd: OwnedFd) -> Irq {
        Irq { fd: File::from(fd) }
    }
}

impl AsFd for Irq {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Irq {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
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
