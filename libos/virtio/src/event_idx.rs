//! `VIRTIO_RING_F_EVENT_IDX` done in the transport, for `virtio_drivers`'
//! queues: [`EventIdx`] wraps a transport, negotiates the feature with the
//! device on the driver's behalf, and decides each notification itself.
//!
//! Why not leave it to `virtio_drivers` (0.13), which supports the
//! feature? Its check (`avail_idx >= avail_event + 1`, no wrapping, and no
//! full fence between publishing the index and reading `avail_event`)
//! notifies on *every* request while the device polls with an old
//! `avail_event`, which is what a polling device leaves there, and can
//! miss the one notification a device that just went to sleep needs. Here
//! the driver's queue runs without the feature (so it asks the transport
//! after every request, and never writes `used_event` itself), and the
//! transport, which saw where the rings are (`queue_set`), applies the
//! virtio rule:
//!
//! - **Notifications** (`notify`): a full fence, then notify only if the
//!   new available index has just passed the device's `avail_event`
//!   (`vring_need_event(avail_event, new, old)`, wrapping). A polling
//!   device is never notified; a device going to sleep sets `avail_event`
//!   and looks again, so one of the two sides always sees the other.
//! - **Interrupts** ([`Rings::want_interrupt`]): `used_event` is written
//!   only when the driver is about to wait, to the used index it has
//!   consumed up to; while it polls, `used_event` stays behind and the
//!   device raises no interrupt.
//!
//! The rings are the driver's own DMA memory, identity-mapped, so their
//! guest-physical addresses from `queue_set` are their addresses here.

use alloc::rc::Rc;
use core::cell::Cell;
use core::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The feature bit.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Queues this wrapper keeps track of (a block device has one).
const QUEUES: usize = 4;

/// Where one queue's rings are.
#[derive(Debug, Clone, Copy)]
struct Ring {
    /// The available ring (`flags`, `idx`, `ring[size]`, `used_event`).
    avail: u64,
    /// The used ring (`flags`, `idx`, `ring[size]`, `avail_event`).
    used: u64,
    size: u16,
}

impl Ring {
    /// The u16 at `addr` as an atomic.
    fn at(addr: u64) -> &'static AtomicU16 {
        // SAFETY: `addr` is inside a ring `queue_set` described: DMA
        // memory the driver's queue allocated (identity-mapped, 2-byte
        // aligned ring fields) that stays allocated until `queue_unset`,
        // which forgets the ring first; the device writes the same
        // fields, which is why every access is atomic.
        unsafe { AtomicU16::from_ptr(addr as *mut u16) }
    }
    fn avail_idx(&self) -> &'static AtomicU16 {
        Ring::at(self.avail + 2)
    }
    fn used_event(&self) -> &'static AtomicU16 {
        Ring::at(self.avail + 4 + 2 * u64::from(self.size))
    }
    fn used_idx(&self) -> &'static AtomicU16 {
        Ring::at(self.used + 2)
    }
    fn avail_event(&self) -> &'static AtomicU16 {
        Ring::at(self.used + 4 + 8 * u64::from(self.size))
    }
}

/// The rings of a device's queues, shared by the transport and the
/// driver (which asks for interrupts through it).
#[derive(Debug, Default)]
pub struct Rings {
    /// Whether the device accepted EVENT_IDX.
    on: Cell<bool>,
    rings: [Cell<Option<Ring>>; QUEUES],
    /// Per queue, the available index at the last notification check.
    checked: [Cell<u16>; QUEUES],
    /// Notifications sent and spared (for statistics).
    sent: Cell<u64>,
    spared: Cell<u64>,
}

impl Rings {
    fn ring(&self, queue: u16) -> Option<Ring> {
        self.rings.get(usize::from(queue))?.get()
    }

    /// Whether the device took `VIRTIO_RING_F_EVENT_IDX`.
    pub fn enabled(&self) -> bool {
        self.on.get()
    }

    /// Before the driver waits for an interrupt: asks the device to raise
    /// one when it uses the next buffer of `queue` (`used_event` set to the
    /// used index as it stands, after a full fence both ways). The caller
    /// then looks at the used ring once more before it waits: a buffer
    /// used just before this call raised no interrupt. Without the feature
    /// the device interrupts every time anyway.
    pub fn want_interrupt(&self, queue: u16) {
        let Some(r) = self.ring(queue).filter(|_| self.on.get()) else {
            return;
        };
        fence(Ordering::SeqCst);
        let used = r.used_idx().load(Ordering::Acquire);
        r.used_event().store(used, Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// Notifications sent to the device and notifications spared.
    pub fn notifications(&self) -> (u64, u64) {
        (self.sent.get(), self.spared.get())
    }
}

/// A transport that does `VIRTIO_RING_F_EVENT_IDX` for the driver (see
/// the module docs).
#[derive(Debug)]
pub struct EventIdx<T> {
    inner: T,
    rings: Rc<Rings>,
    /// Whether the device offered the feature.
    offered: bool,
}

impl<T: Transport> EventIdx<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> EventIdx<T> {
        EventIdx {
            inner,
            rings: Rc::default(),
            offered: false,
        }
    }

    /// The rings, for the driver to ask for interrupts.
    pub fn rings(&self) -> Rc<Rings> {
        self.rings.clone()
    }
}

impl<T: Transport> Transport for EventIdx<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    /// The device's features without EVENT_IDX: the driver's queue runs
    /// without it, this transport does it.
    fn read_device_features(&mut self) -> u64 {
        let f = self.inner.read_device_features();
        self.offered = f & VIRTIO_RING_F_EVENT_IDX != 0;
        f & !VIRTIO_RING_F_EVENT_IDX
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        let mut f = driver_features;
        if self.offered {
            f |= VIRTIO_RING_F_EVENT_IDX;
        }
        self.rings.on.set(self.offered);
        self.inner.write_driver_features(f)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        let Some(r) = self.rings.ring(queue).filter(|_| self.rings.on.get()) else {
            return self.inner.notify(queue);
        };
        let q = usize::from(queue);
        // The new index is published; the fence orders that store before
        // the load of avail_event (the device fences the other way).
        fence(Ordering::SeqCst);
        let new = r.avail_idx().load(Ordering::Relaxed);
        let event = r.avail_event().load(Ordering::Acquire);
        let old = self.rings.checked[q].replace(new);
        // vring_need_event: `new` passed `event` since `old`.
        if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.rings.sent.set(self.rings.sent.get() + 1);
            self.inner.notify(queue)
        } else {
            self.rings.spared.set(self.rings.spared.get() + 1);
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area);
        let q = usize::from(queue);
        if let (Some(cell), Ok(size)) = (self.rings.rings.get(q), u16::try_from(size)) {
            // Both rings start zeroed: nothing published, nothing used.
            cell.set(Some(Ring {
                avail: driver_area,
                used: device_area,
                size,
            }));
            self.rings.checked[q].set(0);
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        // Forgotten before the memory can go.
        if let Some(cell) = self.rings.rings.get(usize::from(queue)) {
            cell.set(None);
        }
        self.inner.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> Result<V> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
