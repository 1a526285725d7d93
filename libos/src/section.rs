//! Shared sections (`shm:NAME`, ABI 1.1): memory shared with the other
//! picoprocesses of the session and with the host, and a doorbell each way.
//!
//! [`Section::create`] makes one (this side is then its *creator side*)
//! and sizes it; [`Section::open`] opens one someone else made (the host,
//! or another picoprocess: this side is the *other side*). [`Section::map`]
//! maps all of it; [`Section::ring`] rings the other side's doorbell after
//! a release fence; [`Section::doorbell`] is this side's, an auto-reset
//! [`Event`] that a wait consumes. Rings are never lost: ring after
//! writing, wait before reading, and check the shared state after every
//! wake (several rings may have become one).
//!
//! The bytes of a section belong to every side at once: another process
//! may change them at any moment. [`SectionMap`] offers them only as
//! atomics and bounds-checked copies, and what is read there is input to
//! check, not to trust. Nothing any side does can shrink the section or
//! unmap this side's view: a mapping stays valid until it is dropped.
use alloc::string::String;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};

use moat_pal::{access, create, prot, stream_kind};

use crate::stream::Stream;
use crate::sync::Event;
use crate::{raw, Error, Result};

/// A side of a shared section; the stream is closed on drop (the section
/// lives on with its session).
#[derive(Debug)]
pub struct Section {
    stream: Stream,
    writable: bool,
}

fn uri(name: &str) -> String {
    let name = name.strip_prefix("shm:").unwrap_or(name);
    let mut u = String::with_capacity(4 + name.len());
    u.push_str("shm:");
    u.push_str(name);
    u
}

impl Section {
    /// Make the section `name` (`AlreadyExists` if the session has one)
    /// and size it to `size` bytes (a page multiple, at most the memory
    /// limit). This side is its creator side.
    pub fn create(name: &str, size: u64) -> Result<Section> {
        let stream = Stream::open(
            &uri(name),
            access::READ | access::WRITE,
            create::CREATE_NEW,
            0,
        )?;
        stream.set_length(size)?;
        Ok(Section {
            stream,
            writable: true,
        })
    }

    /// Open the existing section `name` (read-write if `write`): this side
    /// is its other side. `NotFound` if the session has none yet.
    pub fn open(name: &str, write: bool) -> Result<Section> {
        let acc = if write {
            access::READ | access::WRITE
        } else {
            access::READ
        };
        let stream = Stream::open(&uri(name), acc, create::OPEN_EXISTING, 0)?;
        if stream.attributes()?.kind != stream_kind::SHM {
            return Err(Error::WrongHandleKind);
        }
        Ok(Section {
            stream,
            writable: write,
        })
    }

    /// Its size in bytes (0 until someone sized it).
    pub fn size(&self) -> Result<u64> {
        Ok(self.stream.attributes()?.size)
    }

    /// Map all of it, read-write if this side opened it for writing.
    /// `InvalidArgument` while it is not sized.
    pub fn map(&self) -> Result<SectionMap> {
        let len = self.size()?;
        let p = if self.writable {
            prot::READ | prot::WRITE
        } else {
            prot::READ
        };
        let addr = self.stream.map(0, p, 0, len)?;
        Ok(SectionMap {
            addr,
            len,
            writable: self.writable,
        })
    }

    /// Ring the other side's doorbell (DkStreamFlush): what this side
    /// wrote before is visible to it when its wait ends.
    pub fn ring(&self) -> Result<()> {
        fence(Ordering::Release);
        self.stream.flush()
    }

    /// This side's doorbell (DkStreamGetEvent): an auto-reset event the
    /// other side's [`Section::ring`] sets.
    pub fn doorbell(&self) -> Result<Event> {
        self.stream.get_event()
    }

    /// The stream (for calls this module does not wrap).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }
}

/// A whole section mapped; unmapped on drop.
#[derive(Debug)]
pub struct SectionMap {
    addr: u64,
    len: u64,
    writable: bool,
}

impl SectionMap {
    /// Its address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never: a section has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, which other processes may change at any time.
    pub fn bytes(&self) -> &[AtomicU8] {
        // SAFETY: [addr, addr+len) is mapped until `self` is dropped (the
        // borrow cannot outlive it); AtomicU8 has u8's layout, and every
        // access through it is atomic, so writes of other processes race
        // only with atomics. A read-only mapping faults on a store: the
        // caller's bug, delivered as a memory fault like any other.
        unsafe {
            core::slice::from_raw_parts(
                core::ptr::with_exposed_provenance::<AtomicU8>(self.addr as usize),
                self.len as usize,
            )
        }
    }

    fn span(&self, offset: u64, len: u64) -> Option<core::ops::Range<usize>> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then_some(offset as usize..end as usize)
    }

    /// The aligned u32 at `offset` (`None`: outside, or misaligned).
    pub fn atomic_u32(&self, offset: u64) -> Option<&AtomicU32> {
        let b = self.bytes().get(self.span(offset, 4)?)?;
        if !offset.is_multiple_of(4) {
            return None;
        }
        // SAFETY: four mapped bytes at a 4-aligned offset of a page-aligned
        // mapping, borrowed from `self`; AtomicU32 has u32's layout.
        Some(unsafe { &*b.as_ptr().cast::<AtomicU32>() })
    }

    /// The aligned u64 at `offset` (`None`: outside, or misaligned).
    pub fn atomic_u64(&self, offset: u64) -> Option<&AtomicU64> {
        let b = self.bytes().get(self.span(offset, 8)?)?;
        if !offset.is_multiple_of(8) {
            return None;
        }
        // SAFETY: as in atomic_u32, eight bytes at an 8-aligned offset.
        Some(unsafe { &*b.as_ptr().cast::<AtomicU64>() })
    }

    /// Copy `buf.len()` bytes from `offset` (`InvalidArgument` past the end).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self
            .span(offset, buf.len() as u64)
            .ok_or(Error::InvalidArgument)?;
        for (d, s) in buf.iter_mut().zip(&self.bytes()[r]) {
            *d = s.load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        Ok(())
    }

    /// Copy `data` to `offset` (`InvalidArgument` past the end,
    /// `PermissionDenied` on a read-only mapping).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::PermissionDenied);
        }
        let r = self
            .span(offset, data.len() as u64)
            .ok_or(Error::InvalidArgument)?;
        fence(Ordering::Release);
        for (d, s) in self.bytes()[r].iter().zip(data) {
            d.store(*s, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for SectionMap {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours, and nothing borrows it any more
        // (every borrow of its bytes borrowed `self`).
        let _ = unsafe { raw::stream_unmap(self.addr, self.len) };
    }
}
