//! Shared sections (`shm:NAME`, ABI 1.1) in the PAL: a stream whose
//! descriptor is this side's doorbell, with the other side's doorbell and
//! the section's memory beside it (`objects::SectionObj`).
//!
//! Everything that needs policy is the monitor's (`moat_monitor::shm`):
//! opening, which says which side this open is; sizing, which the monitor
//! does once and seals before anyone gets the memory; the memory itself,
//! read-only for a side without write access. Here: mapping it (shared,
//! within its size, never executable), ringing the other side
//! (DkStreamFlush), this side's doorbell as an event (DkStreamGetEvent),
//! attributes. A picoprocess holds at most [`MAX_OPEN_SECTIONS`] section
//! streams at once: each holds three descriptors (counted in
//! `child::FD_OVERHEAD`).
use super::LinuxPal;
use crate::errno::to_pal as map_errno;
use crate::objects::{Object, OpenCount, SectionObj, StreamObj};
use crate::protocol::{Request, Response};
use crate::sys;
use moat_pal::memory::RegionKind;
use moat_pal::uri::Uri;
use moat_pal::validate::PAGE;
use moat_pal::{access, prot, stream_kind, Error, PalResult, StreamAttributes};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Mutex, OnceLock};

/// Section streams one picoprocess may hold open at once.
pub const MAX_OPEN_SECTIONS: usize = 16;

impl LinuxPal {
    /// DkStreamOpen of `shm:NAME` (access, disposition and options
    /// already checked for range; the monitor checks the rest).
    pub(crate) fn open_section(&self, u: &Uri, acc: u32, cr: u32, options: u32) -> PalResult<u64> {
        let open =
            OpenCount::take(&self.sections_open, MAX_OPEN_SECTIONS).ok_or(Error::LimitExceeded)?;
        let uri = u.canonical();
        let (resp, fds) = self.ask(&Request::Open {
            uri: uri.clone(),
            access: acc,
            create: cr,
            options,
        })?;
        let Response::Section { size, creator } = resp else {
            return Err(Error::Io);
        };
        if fds.len() != 2 + usize::from(size > 0) {
            return Err(Error::Io);
        }
        let mut fds = fds.into_iter();
        let (Some(creator_bell), Some(other_bell)) = (fds.next(), fds.next()) else {
            return Err(Error::Io);
        };
        let (mine, peer) = if creator {
            (creator_bell, other_bell)
        } else {
            (other_bell, creator_bell)
        };
        let memory = OnceLock::new();
        if let Some(m) = fds.next() {
            let _ = memory.set((m, size));
        }
        self.insert(Object::Stream(StreamObj {
            fd: mine,
            kind: stream_kind::SHM,
            uri: Mutex::new(uri),
            readable: acc & access::READ != 0,
            writable: acc & access::WRITE != 0,
            append: false,
            device: None,
            section: Some(SectionObj {
                creator,
                peer_bell: peer,
                memory,
                open,
            }),
        }))
    }

    /// The section's memory and size; from the monitor the first time
    /// after someone sized it. `None`: not sized yet.
    fn section_memory(&self, s: &StreamObj, sec: &SectionObj) -> PalResult<Option<(RawFd, u64)>> {
        if let Some((fd, size)) = sec.memory.get() {
            return Ok(Some((fd.as_raw_fd(), *size)));
        }
        let uri = s.uri.lock().unwrap().clone();
        let (resp, fds) = self.ask(&Request::SectionMemory {
            uri,
            write: s.writable,
        })?;
        self.keep_memory(sec, resp, fds)
    }

    /// Keep the memory a `Memory` answer carries.
    fn keep_memory(
        &self,
        sec: &SectionObj,
        resp: Response,
        mut fds: Vec<OwnedFd>,
    ) -> PalResult<Option<(RawFd, u64)>> {
        match resp {
            Response::Memory { size: 0 } if fds.is_empty() => Ok(None),
            Response::Memory { size } if size > 0 && fds.len() == 1 => {
                // A racing call may have kept it first: the same section.
                let _ = sec.memory.set((fds.pop().ok_or(Error::Io)?, size));
                let (fd, size) = sec.memory.get().ok_or(Error::Io)?;
                Ok(Some((fd.as_raw_fd(), *size)))
            }
            _ => Err(Error::Io),
        }
    }

    /// DkStreamSetLength of a section: size it once, through the monitor.
    pub(crate) fn section_set_length(
        &self,
        s: &StreamObj,
        sec: &SectionObj,
        length: u64,
    ) -> PalResult<()> {
        if !s.writable || sec.memory.get().is_some() {
            return Err(Error::PermissionDenied);
        }
        if length == 0 || !length.is_multiple_of(PAGE) {
            return Err(Error::InvalidArgument);
        }
        let uri = s.uri.lock().unwrap().clone();
        let (resp, fds) = self.ask(&Request::SectionSize { uri, size: length })?;
        match self.keep_memory(sec, resp, fds)? {
            Some(_) => Ok(()),
            None => Err(Error::Io),
        }
    }

    /// DkStreamMap of a section (`p`, `offset`, `size` and `addr` already
    /// checked for form): shared, within its size, never executable.
    pub(crate) fn section_map(
        &self,
        s: &StreamObj,
        sec: &SectionObj,
        addr: u64,
        p: u32,
        offset: u64,
        size: u64,
    ) -> PalResult<u64> {
        if p & prot::EXEC != 0
            || (p & prot::READ != 0 && !s.readable)
            || (p & prot::WRITE != 0 && !s.writable)
        {
            return Err(Error::PermissionDenied);
        }
        let (fd, total) = self.section_memory(s, sec)?.ok_or(Error::InvalidArgument)?;
        if offset.checked_add(size).is_none_or(|end| end > total) {
            return Err(Error::InvalidArgument);
        }
        let (mut r, addr) = self.reserve(addr, size)?;
        let got = match sys::mmap_fd(addr, size, p, fd, offset, true) {
            Ok(a) => a,
            Err(libc::EACCES) => return Err(Error::PermissionDenied),
            Err(libc::EEXIST) => return Err(Error::AlreadyExists),
            Err(e) => return Err(map_errno(e)),
        };
        if let Err(e) = r.insert(got, size, p, RegionKind::Section) {
            let _ = sys::munmap(got, size);
            return Err(e);
        }
        Ok(got)
    }

    /// DkStreamFlush of a section: ring the other side, after a release
    /// fence (what this side wrote is visible once the other side's wait
    /// ends; the eventfd write orders it in the kernel too).
    pub(crate) fn section_ring(&self, sec: &SectionObj) {
        fence(Ordering::Release);
        sys::eventfd_signal(sec.peer_bell.as_raw_fd());
    }

    /// DkStreamGetEvent of a section: this side's doorbell.
    pub(crate) fn section_event(&self, s: &StreamObj) -> PalResult<u64> {
        let dup = s.fd.try_clone().map_err(|_| Error::LimitExceeded)?;
        self.insert(Object::Doorbell(dup))
    }

    /// Attributes of a section stream: kind SHM and its size (0 until
    /// sized).
    pub(crate) fn section_attrs(
        &self,
        s: &StreamObj,
        sec: &SectionObj,
    ) -> PalResult<StreamAttributes> {
        let size = self.section_memory(s, sec)?.map_or(0, |(_, n)| n);
        Ok(StreamAttributes {
            kind: stream_kind::SHM,
            readable: s.readable as u32,
            writable: s.writable as u32,
            size,
            ..Default::default()
        })
    }
}
