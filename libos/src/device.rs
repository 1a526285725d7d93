//! Devices granted to the picoprocess (`dev:` streams; host-hypervisor only).
//!
//! A device is a stream: [`Device::open`] opens `dev:NAME` (a device the
//! manifest declares; any other name fails with `NotFound` or
//! `PermissionDenied`), its attributes are its [`Resources`], and from it
//! come
//!
//! - [`Mmio`]: its MMIO window mapped into memory, with volatile accessors;
//! - [`Interrupt`]: its interrupt line as an event to wait on;
//! - [`Ports`]: its I/O ports, reached with the `in`/`out` instructions.
//!
//! Picoprocess memory is identity-mapped on the hypervisor host: the address
//! of any buffer (from the allocator, [`crate::raw::virtual_memory_alloc`],
//! the stack or a static) is also the physical address a device uses for DMA.
//!
//! # Out-of-range accesses
//!
//! Register offsets are constants of a driver, so a bad one is a bug: every
//! accessor of [`Mmio`] and [`Ports`] **panics** if the access does not lie
//! wholly inside the window or port range, or (MMIO) is not naturally
//! aligned. Nothing outside the device's resources is ever touched.
//!
//! # What stays the driver's job
//!
//! Register accesses are not `unsafe`: they cannot break anything the
//! compiler relies on. A device that does DMA, however, reads and writes the
//! memory it is told to; giving it only addresses of buffers that stay valid
//! and untouched until it is done is the driver's responsibility (for virtio
//! devices, the `virtio-drivers` crate and moat-libos-virtio's Hal do it).
//! Each access is fenced (see [`Mmio`] and [`Ports`]), so buffers written
//! before a doorbell write are seen by the device, and buffers read after a
//! status read are read after it.
use alloc::string::String;
use core::arch::asm;
use core::ptr::NonNull;
use core::sync::atomic::{fence, AtomicBool, Ordering};

use moat_pal::{access, create, limits, prot, stream_kind};

use crate::stream::Stream;
use crate::sync::{self, Event};
use crate::{raw, Error, Result};

/// What a device has, from its stream attributes (0 where it has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Guest-physical base of the MMIO window.
    pub mmio_base: u64,
    /// Size of the MMIO window in bytes.
    pub mmio_size: u64,
    /// First I/O port.
    pub io_base: u32,
    /// Number of I/O ports.
    pub io_count: u32,
    /// Interrupt line.
    pub irq: u32,
}

/// An open `dev:` stream; closed on drop.
#[derive(Debug)]
pub struct Device {
    stream: Stream,
    name: String,
    resources: Resources,
    /// Whether an [`Mmio`] of this device exists (at most one does).
    mapped: AtomicBool,
}

impl Device {
    /// Open the declared device `name` (`"com1"`; a `dev:` prefix is
    /// accepted too) for reading and writing, and read its resources.
    ///
    /// `Err(WrongHandleKind)` if the stream is not a device.
    pub fn open(name: &str) -> Result<Device> {
        let name = name.strip_prefix("dev:").unwrap_or(name);
        if name.is_empty() {
            return Err(Error::InvalidArgument);
        }
        let mut uri = String::with_capacity(4 + name.len());
        uri.push_str("dev:");
        uri.push_str(name);
        let stream = Stream::open(&uri, access::READ | access::WRITE, create::OPEN_EXISTING, 0)?;
        let a = stream.attributes()?;
        if a.kind != stream_kind::DEVICE {
            return Err(Error::WrongHandleKind);
        }
        Ok(Device {
            stream,
            name: String::from(name),
            resources: Resources {
                mmio_base: a.dev_mmio_base,
                mmio_size: a.size,
                io_base: a.dev_io_base,
                io_count: a.dev_io_count,
                irq: a.dev_irq,
            },
            mapped: AtomicBool::new(false),
        })
    }

    /// The device's name (without `dev:`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's resources, as reported when it was opened.
    pub fn resources(&self) -> Resources {
        self.resources
    }

    /// The stream (for calls this module does not wrap).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Map the MMIO window (DkStreamMap, read-write; the mapping call covers
    /// the window rounded up to whole pages, the accessors only the window).
    ///
    /// `Err(NotFound)` if the device has no window; `Err(AlreadyExists)`
    /// while another [`Mmio`] of this device exists.
    pub fn map_mmio(&self) -> Result<Mmio<'_>> {
        let len = self.resources.mmio_size;
        if len == 0 {
            return Err(Error::NotFound);
        }
        let page = limits::PAGE_SIZE;
        let map_len = len.checked_add(page - 1).ok_or(Error::InvalidArgument)? & !(page - 1);
        let len = usize::try_from(len).map_err(|_| Error::InvalidArgument)?;
        if self.mapped.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyExists);
        }
        let addr = match self
            .stream
            .map(0, prot::READ | prot::WRITE, 0, map_len)
            .and_then(|a| {
                NonNull::new(core::ptr::with_exposed_provenance_mut(a as usize)).ok_or(Error::Io)
            }) {
            Ok(a) => a,
            Err(e) => {
                self.mapped.store(false, Ordering::Release);
                return Err(e);
            }
        };
        Ok(Mmio {
            addr,
            len,
            map_len,
            device: self,
        })
    }

    /// The device's interrupt as an event (DkStreamGetEvent).
    pub fn interrupt(&self) -> Result<Interrupt> {
        Ok(Interrupt {
            event: self.stream.get_event()?,
        })
    }

    /// The device's I/O ports; `None` if it has none (or the host reported
    /// a range past port 0xffff).
    pub fn io_ports(&self) -> Option<Ports> {
        let Resources {
            io_base, io_count, ..
        } = self.resources;
        if io_count == 0 || io_base.checked_add(io_count)? > 0x1_0000 {
            return None;
        }
        Some(Ports {
            base: io_base as u16,
            count: io_count,
        })
    }
}

// ------------------------------------------------------------------ MMIO

/// A device's MMIO window, mapped; unmapped on drop.
///
/// Accessors take byte offsets into the window and panic unless the access
/// lies wholly inside it and is naturally aligned. Each is a single volatile
/// access of its width (one device register access), with a full fence
/// before a write and after a read.
#[derive(Debug)]
pub struct Mmio<'a> {
    addr: NonNull<u8>,
    len: usize,
    map_len: u64,
    device: &'a Device,
}

// SAFETY: the mapping may be used from any thread; `Mmio` is not `Sync`, so
// only one thread at a time accesses it through this value.
unsafe impl Send for Mmio<'_> {}

impl Mmio<'_> {
    /// The window's address (equal to its guest-physical base).
    pub fn addr(&self) -> NonNull<u8> {
        self.addr
    }

    /// The window's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty (it never is).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keep the window mapped for the rest of the picoprocess's life (the
    /// device then refuses another mapping). Returns its address and size.
    pub fn leak(self) -> (NonNull<u8>, usize) {
        let r = (self.addr, self.len);
        core::mem::forget(self);
        r
    }

    /// The address of `size` bytes at `offset`, checked.
    #[inline]
    #[track_caller]
    fn at(&self, offset: usize, size: usize) -> *mut u8 {
        match offset.checked_add(size) {
            Some(end) if end <= self.len => {}
            _ => panic!(
                "MMIO access of {size} bytes at {offset:#x} is outside the {:#x}-byte window of device `{}`",
                self.len, self.device.name
            ),
        }
        if !offset.is_multiple_of(size) {
            panic!("MMIO access of {size} bytes at {offset:#x} is misaligned");
        }
        // The window base is page-aligned, so the address is aligned too.
        // SAFETY: `offset + size <= len`, so the result stays in the mapping.
        unsafe { self.addr.as_ptr().add(offset) }
    }

    #[inline]
    #[track_caller]
    pub fn read8(&self, offset: usize) -> u8 {
        let p = self.at(offset, 1);
        // SAFETY: `p` is inside the mapped window (checked by `at`), aligned,
        // and the window stays mapped while `self` lives.
        let v = unsafe { p.read_volatile() };
        fence(Ordering::SeqCst);
        v
    }

    #[inline]
    #[track_caller]
    pub fn read16(&self, offset: usize) -> u16 {
        let p = self.at(offset, 2).cast::<u16>();
        // SAFETY: as in `read8`.
        let v = unsafe { p.read_volatile() };
        fence(Ordering::SeqCst);
        v
    }

    #[inline]
    #[track_caller]
    pub fn read32(&self, offset: usize) -> u32 {
        let p = self.at(offset, 4).cast::<u32>();
        // SAFETY: as in `read8`.
        let v = unsafe { p.read_volatile() };
        fence(Ordering::SeqCst);
        v
    }

    #[inline]
    #[track_caller]
    pub fn read64(&self, offset: usize) -> u64 {
        let p = self.at(offset, 8).cast::<u64>();
        // SAFETY: as in `read8`.
        let v = unsafe { p.read_volatile() };
        fence(Ordering::SeqCst);
        v
    }

    #[inline]
    #[track_caller]
    pub fn write8(&self, offset: usize, value: u8) {
        let p = self.at(offset, 1);
        fence(Ordering::SeqCst);
        // SAFETY: as in `read8`; the window is mapped writable.
        unsafe { p.write_volatile(value) }
    }

    #[inline]
    #[track_caller]
    pub fn write16(&self, offset: usize, value: u16) {
        let p = self.at(offset, 2).cast::<u16>();
        fence(Ordering::SeqCst);
        // SAFETY: as in `write8`.
        unsafe { p.write_volatile(value) }
    }

    #[inline]
    #[track_caller]
    pub fn write32(&self, offset: usize, value: u32) {
        let p = self.at(offset, 4).cast::<u32>();
        fence(Ordering::SeqCst);
        // SAFETY: as in `write8`.
        unsafe { p.write_volatile(value) }
    }

    #[inline]
    #[track_caller]
    pub fn write64(&self, offset: usize, value: u64) {
        let p = self.at(offset, 8).cast::<u64>();
        fence(Ordering::SeqCst);
        // SAFETY: as in `write8`.
        unsafe { p.write_volatile(value) }
    }
}

impl Drop for Mmio<'_> {
    fn drop(&mut self) {
        // SAFETY: the mapping is only reached through `self`, which is going
        // away; `leak` forgets `self` instead of dropping it.
        let _ = unsafe { raw::stream_unmap(self.addr.as_ptr() as u64, self.map_len) };
        self.device.mapped.store(false, Ordering::Release);
    }
}

// ------------------------------------------------------------------ interrupt

/// A device's interrupt line, as the event the host sets when the device
/// raises it. There is no interrupt delivery into the guest: after a wake-up,
/// read the device's status registers to see what happened (and acknowledge
/// it the device's way). Wake-ups may be spurious, and one wake-up may stand
/// for several interrupts.
#[derive(Debug)]
pub struct Interrupt {
    event: Event,
}

impl Interrupt {
    /// Wait up to `timeout_micros` (0 polls, negative waits for ever):
    /// `Ok(true)` if the interrupt fired, `Ok(false)` on timeout.
    pub fn wait(&self, timeout_micros: i64) -> Result<bool> {
        match sync::wait_one(self.event.handle(), timeout_micros) {
            Ok(()) => Ok(true),
            Err(Error::TimedOut) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The event handle, to wait on together with other objects
    /// ([`crate::sync::wait_any`]).
    pub fn handle(&self) -> u64 {
        self.event.handle()
    }
}

// ------------------------------------------------------------------ ports

/// A device's I/O ports `[base, base + count)`.
///
/// Accessors take an offset from `base` and panic unless every port the
/// access touches (1, 2 or 4 consecutive ports) is in the range. Each is one
/// `in`/`out` instruction, which the compiler treats as a memory barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    base: u16,
    count: u32,
}

impl Ports {
    /// The first port.
    pub fn base(&self) -> u16 {
        self.base
    }

    /// The number of ports.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The port number of a `size`-byte access at `offset`, checked.
    #[inline]
    #[track_caller]
    fn port(&self, offset: u16, size: u32) -> u16 {
        if u32::from(offset) + size > self.count {
            panic!(
                "I/O access of {size} bytes at port offset {offset:#x} is outside the {} ports at {:#x}",
                self.count, self.base
            );
        }
        // No overflow: base + count <= 0x10000 (checked by `io_ports`).
        self.base + offset
    }

    #[inline]
    #[track_caller]
    pub fn inb(&self, offset: u16) -> u8 {
        let port = self.port(offset, 1);
        let v: u8;
        // SAFETY: `port` is one of the device's granted ports; `in` touches no
        // memory the compiler knows of (no `nomem`, so it is a barrier).
        unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nostack, preserves_flags)) };
        v
    }

    #[inline]
    #[track_caller]
    pub fn inw(&self, offset: u16) -> u16 {
        let port = self.port(offset, 2);
        let v: u16;
        // SAFETY: as in `inb`.
        unsafe { asm!("in ax, dx", out("ax") v, in("dx") port, options(nostack, preserves_flags)) };
        v
    }

    #[inline]
    #[track_caller]
    pub fn inl(&self, offset: u16) -> u32 {
        let port = self.port(offset, 4);
        let v: u32;
        // SAFETY: as in `inb`.
        unsafe {
            asm!("in eax, dx", out("eax") v, in("dx") port, options(nostack, preserves_flags))
        };
        v
    }

    #[inline]
    #[track_caller]
    pub fn outb(&self, offset: u16, value: u8) {
        let port = self.port(offset, 1);
        // SAFETY: as in `inb`.
        unsafe {
            asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags))
        };
    }

    #[inline]
    #[track_caller]
    pub fn outw(&self, offset: u16, value: u16) {
        let port = self.port(offset, 2);
        // SAFETY: as in `inb`.
        unsafe {
            asm!("out dx, ax", in("dx") port, in("ax") value, options(nostack, preserves_flags))
        };
    }

    #[inline]
    #[track_caller]
    pub fn outl(&self, offset: u16, value: u32) {
        let port = self.port(offset, 4);
        // SAFETY: as in `inb`.
        unsafe {
            asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
        };
    }
}
