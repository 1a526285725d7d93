//! Shared sections (`shm:NAME`, ABI 1.1): memory the picoprocesses of a
//! session share with each other and with the host, and a doorbell for
//! each side.
//!
//! A section is a memfd the monitor makes (size 0), and two eventfds, the
//! doorbells: the *creator side's* (whoever made the section: the first
//! opener, or the host) and the *other side's* (everyone who opens it
//! later). Ringing a side is writing its eventfd; a wait on a doorbell
//! consumes every ring so far, so it behaves as an auto-reset event that
//! loses no wakeup (a ring before the wait leaves the count up).
//!
//! Sizing is the monitor's alone: it truncates the memfd once and seals
//! it (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`), and only then hands it
//! to anyone. So no picoprocess ever holds a descriptor whose size can
//! change: whatever a peer does, bypassing the ABI or not, the pages
//! another side mapped stay (no `SIGBUS` past a shrunk end, no view that
//! can be taken away; a peer can only change the bytes). A side with a
//! read-only grant gets a read-only descriptor (the memfd reopened
//! `O_RDONLY`): the kernel refuses a writable shared mapping of it.
//!
//! # The host side
//!
//! The host makes a section before the picoprocess that shares it starts,
//! and is its creator side:
//!
//! ```no_run
//! use moat_monitor::shm::HostSection;
//! use moat_monitor::Sandbox;
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), moat_monitor::Error> {
//! let ring = HostSection::new(64 << 10)?;           // sized and sealed now
//! let mut driver = Sandbox::new("target/debug/some-driver")
//!     .allow("shm:ring")?                             // the driver opens shm:ring
//!     .section("ring", &ring)?
//!     .spawn()?;
//! ring.write(0, b"request")?;                         // bounds-checked copies
//! ring.ring();                                        // the driver's doorbell
//! if ring.wait(Some(Duration::from_secs(1))) {        // ours, consumed
//!     let mut reply = [0u8; 5];
//!     ring.read(64, &mut reply)?;
//! }
//! # driver.wait()?; Ok(()) }
//! ```
//!
//! [`HostSection`] maps the whole section in the host and offers it as
//! atomics ([`HostSection::bytes`], [`HostSection::atomic_u32`],
//! [`HostSection::atomic_u64`]) and bounds-checked copies: its bytes
//! belong to the other side as much as to the host, so the host never
//! holds a plain reference to them, and must treat everything it reads
//! there as hostile input. One `HostSection` may be given to several
//! sessions (a driver restarted in a new session finds the same memory):
//! every picoprocess that opens it is its other side. A session holds at
//! most [`MAX_SECTIONS`] sections, the host's included.
use crate::error::Error;
use moat_host_common::sys;
use moat_pal::prot;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most sections one session may have (each is host memory and three
/// host descriptors).
pub const MAX_SECTIONS: usize = 64;

/// The index of the creator side's doorbell in [`Section::bells`].
pub(crate) const CREATOR: usize = 0;
/// The index of the other side's doorbell.
pub(crate) const OTHER: usize = 1;

const PAGE: u64 = 4096;

/// One section, as the monitor keeps it.
pub(crate) struct Section {
    /// The memfd, read-write; handed out only once sized and sealed.
    memory: OwnedFd,
    /// Set once, by [`Section::set_size`].
    sized: Mutex<Option<Sized>>,
    /// The doorbells: [`CREATOR`]'s and [`OTHER`]'s.
    bells: [OwnedFd; 2],
}

impl std::fmt::Debug for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Section")
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

struct Sized {
    size: u64,
    /// The memfd reopened read-only (for read-only sides).
    read_only: OwnedFd,
}

impl Section {
    /// A new section of size 0 (`name` only labels the memfd).
    pub(crate) fn new(name: &str) -> std::io::Result<Section> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let label = std::ffi::CString::new(format!("moat-shm:{name}"))
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let memory = memfd_create(
            &label,
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )?;
        let bell = || sys::eventfd().map_err(std::io::Error::from_raw_os_error);
        Ok(Section {
            memory,
            sized: Mutex::new(None),
            bells: [bell()?, bell()?],
        })
    }

    /// Size it once: `size` bytes, a page multiple, at least one page.
    /// A section already sized is `PermissionDenied`: its size never
    /// changes once set.
    pub(crate) fn set_size(&self, size: u64) -> Result<(), moat_pal::Error> {
        use moat_pal::Error as E;
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        let mut s = self.sized.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_some() {
            return Err(E::PermissionDenied);
        }
        if size == 0 || !size.is_multiple_of(PAGE) || size > i64::MAX as u64 {
            return Err(E::InvalidArgument);
        }
        let io = |e: nix::Error| moat_host_common::errno::to_pal(e as i32);
        nix::unistd::ftruncate(self.memory.as_fd(), size as i64).map_err(io)?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(self.memory.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(io)?;
        // A read-only descriptor of the same file: a new open file
        // description, so no write access can be regained from it.
        let read_only: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .open(format!("/proc/self/fd/{}", self.memory.as_raw_fd()))
            .map_err(|_| E::Io)?
            .into();
        *s = Some(Sized { size, read_only });
        Ok(())
    }

    /// Its size (0 until sized).
    pub(crate) fn size(&self) -> u64 {
        let s = self.sized.lock().unwrap_or_else(|e| e.into_inner());
        s.as_ref().map_or(0, |s| s.size)
    }

    /// A descriptor of its memory for a side with `write` access, once
    /// sized; `None` before.
    pub(crate) fn memory(&self, write: bool) -> std::io::Result<Option<OwnedFd>> {
        let s = self.sized.lock().unwrap_or_else(|e| e.into_inner());
        match s.as_ref() {
            None => Ok(None),
            Some(_) if write => self.memory.try_clone().map(Some),
            Some(s) => s.read_only.try_clone().map(Some),
        }
    }

    /// Duplicates of both doorbells, the creator side's first.
    pub(crate) fn bells(&self) -> std::io::Result<[OwnedFd; 2]> {
        Ok([
            self.bells[CREATOR].try_clone()?,
            self.bells[OTHER].try_clone()?,
        ])
    }
}

/// A section in the host: its memory mapped read-write, and the creator
/// side's doorbells (see the module docs).
pub struct HostSection {
    section: Arc<Section>,
    /// Where the whole section is mapped (shared) in this process.
    addr: u64,
    len: u64,
}

impl std::fmt::Debug for HostSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSection")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

fn bad(msg: String) -> Error {
    Error::BadInput(msg)
}

impl HostSection {
    /// A section of `size` bytes (a multiple of 4096, at least one page),
    /// sized and sealed at once, zeroed, mapped in this process. Give it
    /// to a session with [`Sandbox::section`](crate::Sandbox::section) or
    /// [`Session::shm_attach`](crate::session::Session::shm_attach).
    pub fn new(size: u64) -> Result<HostSection, Error> {
        if size == 0 || !size.is_multiple_of(PAGE) || size > 1 << 40 {
            return Err(bad(format!(
                "a shared section of {size} bytes is not possible: a multiple of 4096 from 4096 to 2^40"
            )));
        }
        let section = Section::new("host").map_err(|e| Error::io("a shared section", e))?;
        section.set_size(size).map_err(|e| {
            Error::io(
                "sizing a shared section",
                std::io::Error::other(format!("{e:?}")),
            )
        })?;
        let addr = sys::mmap_fd(
            0,
            size,
            prot::READ | prot::WRITE,
            section.memory.as_raw_fd(),
            0,
            true,
        )
        .map_err(|e| {
            Error::io(
                "mapping a shared section",
                std::io::Error::from_raw_os_error(e),
            )
        })?;
        Ok(HostSection {
            section: Arc::new(section),
            addr,
            len: size,
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Section> {
        &self.section
    }

    /// Its memory's descriptor (read-write), to hand to a confined process
    /// that maps it itself (a VMM's statistics page).
    pub(crate) fn memory_fd(&self) -> std::os::fd::RawFd {
        self.section.memory.as_raw_fd()
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never: a section has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where it is mapped in this process (valid while `self` lives). Any
    /// access through it races with the other side: use atomics or
    /// volatile accesses, and check what you read.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// The whole section as u64 words that other processes may change at
    /// any time (the trace ring).
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: [addr, addr+len) is a page-aligned shared read-write
        // mapping (len a multiple of the page size, so of 8) that lives as
        // long as `self`; AtomicU64 has u64's size and alignment, and every
        // access through the slice is atomic, whatever the other side does.
        unsafe {
            std::slice::from_raw_parts(self.addr as *const AtomicU64, (self.len / 8) as usize)
        }
    }

    /// The whole section as bytes that other processes may change at any
    /// time.
    pub fn bytes(&self) -> &[AtomicU8] {
        // SAFETY: [addr, addr+len) is a shared read-write mapping this
        // value owns until it is dropped (the borrow cannot outlive it);
        // AtomicU8 has u8's size and alignment, and every access through
        // it is atomic, so another process writing the same bytes is a
        // race between atomics, never a data race on plain memory.
        unsafe { std::slice::from_raw_parts(self.addr as *const AtomicU8, self.len as usize) }
    }

    /// The aligned u32 at `offset`, as an atomic (`None`: out of bounds or
    /// not 4-byte aligned).
    pub fn atomic_u32(&self, offset: u64) -> Option<&AtomicU32> {
        let b = self.bytes().get(self.range(offset, 4)?)?;
        if !offset.is_multiple_of(4) {
            return None;
        }
        // SAFETY: four bytes of the mapping at a 4-aligned offset of a
        // page-aligned mapping; AtomicU32 has u32's layout; it lives as
        // long as the borrow of `self`.
        Some(unsafe { &*(b.as_ptr() as *const AtomicU32) })
    }

    /// The aligned u64 at `offset`, as an atomic (`None`: out of bounds or
    /// not 8-byte aligned).
    pub fn atomic_u64(&self, offset: u64) -> Option<&AtomicU64> {
        let b = self.bytes().get(self.range(offset, 8)?)?;
        if !offset.is_multiple_of(8) {
            return None;
        }
        // SAFETY: as in atomic_u32, eight bytes at an 8-aligned offset.
        Some(unsafe { &*(b.as_ptr() as *const AtomicU64) })
    }

    fn range(&self, offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then_some(offset as usize..end as usize)
    }

    /// Copy `buf.len()` bytes from `offset` (a snapshot byte by byte: the
    /// other side may change them meanwhile).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let r = self.range(offset, buf.len() as u64).ok_or_else(|| {
            bad(format!(
                "{} bytes at {offset} are past the section's end",
                buf.len()
            ))
        })?;
        for (d, s) in buf.iter_mut().zip(&self.bytes()[r]) {
            *d = s.load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        Ok(())
    }

    /// Copy `data` to `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let r = self.range(offset, data.len() as u64).ok_or_else(|| {
            bad(format!(
                "{} bytes at {offset} are past the section's end",
                data.len()
            ))
        })?;
        fence(Ordering::Release);
        for (d, s) in self.bytes()[r].iter().zip(data) {
            d.store(*s, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Ring the other side's doorbell, after a release fence: what the
    /// host wrote before is visible to the other side when its wait ends.
    pub fn ring(&self) {
        fence(Ordering::Release);
        sys::eventfd_signal(self.section.bells[OTHER].as_raw_fd());
    }

    /// Wait until the other side rings the host's doorbell (at most
    /// `timeout`; `None`: for ever), and consume the rings: `true` if it
    /// rang. Rings before the wait are not lost.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let fd = self.section.bells[CREATOR].as_raw_fd();
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if take(fd) {
                fence(Ordering::Acquire);
                return true;
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };
            match sys::poll(&[(fd, libc::POLLIN)], ms) {
                Ok(_) | Err(libc::EINTR) => {}
                Err(_) => return false,
            }
        }
    }

    /// The host's doorbell (an eventfd, non-blocking), for an event loop:
    /// it polls readable once the other side rang; reading its 8 bytes
    /// consumes the rings (or use [`HostSection::wait`] with a zero timeout).
    pub fn doorbell(&self) -> BorrowedFd<'_> {
        self.section.bells[CREATOR].as_fd()
    }
}

/// Consume the rings of a doorbell: whether there were any.
fn take(fd: std::os::fd::RawFd) -> bool {
    let mut v = [0u8; 8];
    matches!(sys::read(fd, v.as_mut_ptr() as u64, 8), Ok(8))
}

/// A section name's rules: 1 to 64 of `[A-Za-z0-9._-]`.
pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    match moat_pal::uri::Uri::parse(&format!("shm:{name}")) {
        Ok(_) => Ok(()),
        Err(_) => Err(bad(format!(
            "section name `{name}` is not valid: use 1 to 64 of A-Z a-z 0-9 . _ -"
        ))),
    }
}

impl Drop for HostSection {
    fn drop(&mut self) {
        let _ = sys::munmap(self.addr, self.len);
    }
}
