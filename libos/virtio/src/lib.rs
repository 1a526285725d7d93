//! A [`virtio_drivers::Hal`] over the moat ABI, so that crate's drivers run
//! unmodified in a picoprocess on the hypervisor host, and a helper that
//! turns a granted virtio-mmio device into a [`MmioTransport`].
//!
//! Picoprocess memory there is identity-mapped (guest-physical address ==
//! virtual address), so:
//!
//! - DMA memory is plain memory from DkVirtualMemoryAlloc (zeroed, whole
//!   pages); its address is the address the device uses;
//! - sharing a buffer with the device is handing over its address: no bounce
//!   buffers, no copies, nothing to undo;
//! - an MMIO physical address is its own virtual address.
//!
//! ```ignore
//! let dev = moat_libos_virtio::open("blk0")?;
//! let mut blk = VirtIOBlk::<MoatHal, _>::new(dev.transport)?;
//! ```
//!
//! [`EventIdx`] wraps a transport to do `VIRTIO_RING_F_EVENT_IDX` for the
//! driver (notify a device only when it sleeps, be interrupted only when
//! about to wait): see [`event_idx`].
#![no_std]

extern crate alloc;

pub mod event_idx;

pub use event_idx::{EventIdx, Rings};

use core::fmt;
use core::ptr::NonNull;

use moat_libos::device::{Device, Interrupt, Mmio, Resources};
use moat_libos::moat_pal::{limits, prot};
use moat_libos::raw;
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

pub use virtio_drivers;

// The crate's page size is the ABI's, so DMA allocations are whole ABI pages.
const _: () = assert!(PAGE_SIZE as u64 == limits::PAGE_SIZE);

/// The [`Hal`] of moat picoprocesses on the hypervisor host.
#[derive(Debug, Clone, Copy, Default)]
pub struct MoatHal;

/// The size in bytes of `pages` pages, if it fits.
fn pages_to_bytes(pages: usize) -> Option<u64> {
    (pages as u64).checked_mul(limits::PAGE_SIZE)
}

// SAFETY: `dma_alloc` returns fresh, page-aligned, zeroed memory that
// nothing else uses until `dma_dealloc`; every address handed to the device
// is the identity-mapped address of memory the caller keeps valid.
unsafe impl Hal for MoatHal {
    /// DkVirtualMemoryAlloc of `pages` pages, read-write. The ABI returns
    /// zeroed memory at a page-aligned address. On failure returns physical
    /// address 0, which `virtio_drivers` reports as `Error::DmaError`.
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let alloc = pages_to_bytes(pages)
            .filter(|&size| size != 0)
            .and_then(|size| raw::virtual_memory_alloc(0, size, prot::READ | prot::WRITE).ok());
        match alloc.and_then(|a| {
            NonNull::new(core::ptr::with_exposed_provenance_mut::<u8>(a as usize)).map(|p| (a, p))
        }) {
            Some((addr, ptr)) => (addr, ptr),
            None => (0, NonNull::dangling()),
        }
    }

    /// DkVirtualMemoryFree of what `dma_alloc` returned: 0 on success, -1 if
    /// the host refused.
    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(size) = pages_to_bytes(pages) else {
            return -1;
        };
        // SAFETY: the caller guarantees the memory came from `dma_alloc` with
        // this `pages` and is no longer used.
        match unsafe { raw::virtual_memory_free(vaddr.as_ptr() as u64, size) } {
            Ok(_) => 0,
            Err(_) => -1,
        }
    }

    /// Identity: the MMIO window is mapped at its physical address (only
    /// the PCI transport calls this; the MMIO transport is built from the
    /// mapped window, see [`open`]).
    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(core::ptr::with_exposed_provenance_mut(paddr as usize))
            .expect("MMIO physical address 0")
    }

    /// Identity: the buffer's address is its physical address.
    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr().expose_provenance() as u64
    }

    /// Nothing to do: the device wrote the buffer itself.
    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// A virtio-mmio transport over a mapped window, borrowing it.
pub fn transport<'a>(mmio: &'a mut Mmio<'_>) -> Result<MmioTransport<'a>, MmioError> {
    let header = mmio.addr().cast::<VirtIOHeader>();
    // SAFETY: the window is mapped (page-aligned, so aligned for the header)
    // for `mmio.len()` bytes while `mmio` lives, which is at least `'a`, and
    // the exclusive borrow keeps every other access out for `'a`.
    unsafe { MmioTransport::new(header, mmio.len()) }
}

/// A granted virtio-mmio device, ready for a `virtio_drivers` driver.
#[derive(Debug)]
pub struct VirtioMmio {
    /// The transport, for `VirtIOBlk::<MoatHal, _>::new` and the like.
    pub transport: MmioTransport<'static>,
    /// The device's interrupt, if the host gives it one.
    pub interrupt: Option<Interrupt>,
    /// The device's resources.
    pub resources: Resources,
}

/// Open the declared device `name`, map its MMIO window and check its
/// virtio-mmio header (magic, version 1 or 2, a non-zero device ID).
///
/// The device stays open and its window mapped for the rest of the
/// picoprocess's life (a driver image drives its device until it exits), so
/// the transport is `'static`. Dropping the transport resets the device.
pub fn open(name: &str) -> Result<VirtioMmio, OpenError> {
    // Never closed: the transport may be used until the picoprocess ends.
    let device: &'static Device = alloc_leak(Device::open(name).map_err(OpenError::Device)?);
    let resources = device.resources();
    let interrupt = device.interrupt().ok();
    let (addr, len) = device.map_mmio().map_err(OpenError::Map)?.leak();
    // SAFETY: the window is mapped at `addr` for `len` bytes and never
    // unmapped (leaked, and the device refuses a second mapping), and the
    // transport is the only thing that accesses it. `addr` is page-aligned.
    let transport = unsafe { MmioTransport::new(addr.cast::<VirtIOHeader>(), len) }
        .map_err(OpenError::Transport)?;
    Ok(VirtioMmio {
        transport,
        interrupt,
        resources,
    })
}

fn alloc_leak(device: Device) -> &'static Device {
    alloc::boxed::Box::leak(alloc::boxed::Box::new(device))
}

/// Why [`open`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The device could not be opened (not declared, not a device, ...).
    Device(moat_libos::Error),
    /// Its MMIO window could not be mapped (`NotFound`: it has none).
    Map(moat_libos::Error),
    /// The window does not hold a usable virtio-mmio header.
    Transport(MmioError),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Device(e) => write!(f, "cannot open the device: {}", e.name()),
            OpenError::Map(moat_libos::Error::NotFound) => {
                f.write_str("the device has no MMIO window")
            }
            OpenError::Map(e) => write!(f, "cannot map the MMIO window: {}", e.name()),
            OpenError::Transport(e) => write!(f, "not a virtio-mmio device: {e}"),
        }
    }
}
