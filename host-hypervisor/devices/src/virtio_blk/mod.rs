//! A virtio-mmio (version 2) block device backed by a host file, on top of
//! `virtio-queue`: the register file and the queue here, the execution of
//! one request in `backend.rs`, the I/O thread that may serve the queue in
//! `serving.rs`.
//!
//! **Two ways to serve the queue.** By default a `QueueNotify` write
//! serves the available ring at once, on the thread that wrote it (the
//! vCPU thread, in the VMM): simple, and every request costs the driver a
//! VM exit. Handed to an [`IoThread`] ([`VirtioBlk::set_kick`]), the
//! device is served by that thread instead, which polls the available
//! ring while requests keep coming and sleeps only when it has been empty
//! for a while; with `VIRTIO_RING_F_EVENT_IDX` ([`VirtioBlk::set_event_idx`])
//! the driver then notifies only a sleeping device (`avail_event`), and
//! the device interrupts only a driver that asked (`used_event`).
//!
//! The device state is one value behind its owner's lock: the vCPU thread
//! takes it for a register access, the I/O thread for one pass over the
//! ring, so a queue is never reset or re-addressed in the middle of a pass.

mod backend;
mod serving;

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

use self::backend::Backend;
pub(crate) use self::serving::Kicker;
pub use self::serving::{Gate, IoConfig, IoEvent, IoThread};
use crate::dma::{normalize, DmaMemory};
use crate::virtio_mmio::{self, MmioDevice, Regs};
use crate::{Device, Irq};

/// Offset of the `QueueNotify` register in the MMIO window (a VMM may
/// make writes of 0 there an ioeventfd that wakes the [`IoThread`]).
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// Size of a [`VirtioBlk`]'s MMIO window.
pub const VIRTIO_BLK_MMIO_SIZE: u64 = 0x1000;
/// Size of a sector, the unit of the request header's `sector` field and
/// of the capacity in config space; also the `blk_size` offered.
pub const SECTOR_SIZE: u64 = 512;
/// Largest queue size offered (`QueueNumMax`).
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Most data bytes a single read or write request may move; larger
/// requests complete with `VIRTIO_BLK_S_IOERR`.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Most data segments per request (`seg_max` in config space). A chain
/// with more than `SEG_MAX + 2` descriptors (header and status included)
/// is refused.
pub const SEG_MAX: u32 = 128;

const MAX_CHAIN_DESCRIPTORS: usize = SEG_MAX as usize + 2;
const CONFIG_SIZE: usize = 0x40;
const REQUEST_HEADER_SIZE: usize = 16;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// What a [`VirtioBlk`] has done so far. Counts only grow (a device reset
/// does not clear them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkCounters {
    /// Writes to `QueueNotify` for the device's queue.
    pub notifications: u64,
    /// Descriptor chains taken from the available ring.
    pub requests: u64,
    /// Read (`IN`) requests completed successfully.
    pub reads: u64,
    /// Write (`OUT`) requests completed successfully.
    pub writes: u64,
    /// Flush requests completed successfully.
    pub flushes: u64,
    /// `GET_ID` requests completed.
    pub get_ids: u64,
    /// Bytes read from the backing file into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the backing file.
    pub bytes_written: u64,
    /// Requests completed with `VIRTIO_BLK_S_IOERR`: out-of-range sectors,
    /// lengths that are not whole sectors or are over [`MAX_REQUEST_BYTES`],
    /// writes to a read-only device, host I/O errors.
    pub io_errors: u64,
    /// Requests completed with `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: u64,
    /// Chains refused as malformed or hostile: a buffer outside guest
    /// memory or outside the DMA window, too many descriptors (including
    /// loops), no room for the status byte, a short header. The status byte
    /// is set to `VIRTIO_BLK_S_IOERR` when it can be located and written;
    /// the chain is returned to the used ring either way (with length 0 when
    /// nothing could be written) unless its head index is out of range.
    pub refused: u64,
    /// Notifications on a queue whose rings are not in guest memory (or
    /// the DMA window) or whose available index is corrupt; the device then
    /// sets `DEVICE_NEEDS_RESET` and raises a configuration interrupt.
    pub queue_errors: u64,
    /// Times the interrupt eventfd could not be signalled.
    pub irq_errors: u64,
    /// Used-buffer interrupts raised (with `EVENT_IDX`, only those the
    /// driver asked for).
    pub interrupts: u64,
}

/// A virtio-mmio (version 2, "modern") block device backed by a host file.
///
/// Offers `VIRTIO_F_VERSION_1`, `VIRTIO_BLK_F_SEG_MAX`,
/// `VIRTIO_BLK_F_BLK_SIZE` (512), `VIRTIO_BLK_F_FLUSH`, and
/// `VIRTIO_BLK_F_RO` when made read-only; one split virtqueue of at most
/// [`QUEUE_MAX_SIZE`] entries. Handles `IN`, `OUT`, `FLUSH` (`fdatasync` of
/// the file) and `GET_ID` (`"moat-" + name`, zero-padded to 20 bytes); other
/// request types complete with `VIRTIO_BLK_S_UNSUPP`.
///
/// Requests are processed synchronously, on the thread that performs the
/// `QueueNotify` write, unless an [`IoThread`] serves the queue (see the
/// module docs); afterwards `InterruptStatus` bit 0 is set and the [`Irq`]
/// is signalled (with `EVENT_IDX`, when the driver's `used_event` asks).
///
/// The capacity is the backing file's size at construction, rounded down to
/// whole sectors.
pub struct VirtioBlk {
    name: String,
    irq: Irq,
    mem: GuestMemoryMmap<()>,
    /// `None`: DMA may reach all of `mem`.
    dma_ranges: Option<Vec<Range<u64>>>,
    queue: Queue,
    backend: Backend,
    regs: Regs,
    /// Offer `VIRTIO_RING_F_EVENT_IDX`.
    offer_event_idx: bool,
    /// Set when an I/O thread serves the queue: called instead of serving
    /// it on a `QueueNotify` write, and when the device starts running.
    kick: Option<Kick>,
}

/// How the device wakes the thread that serves its queue.
pub type Kick = Arc<dyn Fn() + Send + Sync>;

impl VirtioBlk {
    /// A block device named `name` over `file` (opened by the caller, for
    /// reading and writing unless the device is made read-only), doing DMA
    /// in `mem` and signalling `irq`.
    ///
    /// Fails only if the size of `file` cannot be determined.
    pub fn new(
        name: impl Into<String>,
        file: File,
        mem: GuestMemoryMmap<()>,
        irq: Irq,
    ) -> io::Result<VirtioBlk> {
        let name = name.into();
        // Seeking to the end works for block devices too, where the
        // metadata length is 0; reads and writes are positional, so the
        // file offset does not matter.
        let size = (&file).seek(SeekFrom::End(0))?;
        let mut id = [0u8; ID_BYTES];
        let full = format!("moat-{name}");
        let n = full.len().min(ID_BYTES);
        id[..n].copy_from_slice(&full.as_bytes()[..n]);
        Ok(VirtioBlk {
            name,
            irq,
            mem,
            dma_ranges: None,
            queue: Queue::new(QUEUE_MAX_SIZE).map_err(io::Error::other)?,
            backend: Backend {
                file,
                capacity_sectors: size / SECTOR_SIZE,
                read_only: false,
                id,
                counters: BlkCounters::default(),
                buf: Vec::new(),
            },
            regs: Regs::default(),
            offer_event_idx: false,
            kick: None,
        })
    }

    /// Offers `VIRTIO_RING_F_EVENT_IDX` (or stops offering it): the driver
    /// then notifies only when the device asked (`avail_event`), and the
    /// device interrupts only when the driver asked (`used_event`). Call it
    /// before the guest driver negotiates features.
    pub fn set_event_idx(&mut self, offer: bool) {
        self.offer_event_idx = offer;
    }

    /// Hands the queue to another thread (an [`IoThread`]): a `QueueNotify`
    /// write then calls `kick` instead of serving the queue, and so does
    /// the device starting to run (`DRIVER_OK`, the queue made ready), so
    /// that the thread looks. `None` serves on the writing thread again.
    pub fn set_kick(&mut self, kick: Option<Kick>) {
        self.kick = kick;
    }

    /// Adds `n` notifications that reached the serving thread without a
    /// register write (through an ioeventfd) to the counters.
    pub fn count_notifications(&mut self, n: u64) {
        self.backend.counters.notifications += n;
    }

    /// Makes the device read-only (offering `VIRTIO_BLK_F_RO`, and failing
    /// writes with `VIRTIO_BLK_S_IOERR`) or read-write. Call it before the
    /// guest driver negotiates features.
    pub fn set_read_only(&mut self, read_only: bool) {
        self.backend.read_only = read_only;
    }

    /// Restricts DMA to guest-physical addresses in `start..end` (end
    /// exclusive), e.g. the picoprocess's memory. The rings, descriptor
    /// tables and every data buffer must lie entirely inside; anything else
    /// is refused. `start >= end` allows nothing.
    pub fn set_dma_window(&mut self, start: u64, end: u64) {
        self.set_dma_ranges(std::slice::from_ref(&(start..end)));
    }

    /// Like [`VirtioBlk::set_dma_window`], with several allowed ranges (end
    /// exclusive; they may overlap). An empty list allows nothing.
    pub fn set_dma_ranges(&mut self, ranges: &[Range<u64>]) {
        self.dma_ranges = Some(normalize(ranges));
    }

    /// Lifts the DMA restriction: all of guest memory is reachable again.
    pub fn clear_dma_window(&mut self) {
        self.dma_ranges = None;
    }

    /// Replaces the guest memory map, e.g. after the VMM added a region.
    pub fn set_memory(&mut self, mem: GuestMemoryMmap<()>) {
        self.mem = mem;
    }

    /// Capacity in 512-byte sectors, as the config space reports it.
    pub fn capacity_sectors(&self) -> u64 {
        self.backend.capacity_sectors
    }

    /// The 20 bytes a `GET_ID` request returns.
    pub fn id(&self) -> [u8; ID_BYTES] {
        self.backend.id
    }

    /// The counters so far.
    pub fn counters(&self) -> BlkCounters {
        self.backend.counters
    }

    /// The interrupt this device signals.
    pub fn irq(&self) -> &Irq {
        &self.irq
    }

    /// The device status register (`VIRTIO_CONFIG_S_*` bits).
    pub fn device_status(&self) -> u32 {
        self.regs.status
    }

    /// The `InterruptStatus` register: bit 0 used buffers, bit 1
    /// configuration change (here: the device needs a reset).
    pub fn interrupt_status(&self) -> u32 {
        self.regs.interrupt_status
    }

    /// Feature bits offered to the driver.
    pub fn device_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.backend.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.offer_event_idx {
            f |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        f
    }

    /// Feature bits the driver accepted (final once `FEATURES_OK` is set).
    pub fn driver_features(&self) -> u64 {
        self.regs.driver_features
    }

    /// `struct virtio_blk_config`, as far as this device fills it.
    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&self.backend.capacity_sectors.to_le_bytes());
        // size_max (0x08) is not offered; seg_max at 0x0c; geometry at 0x10
        // is not offered; blk_size at 0x14.
        c[0x0c..0x10].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[0x14..0x18].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    fn signal(&mut self, bits: u32) {
        if bits & VIRTIO_MMIO_INT_VRING != 0 {
            self.backend.counters.interrupts += 1;
        }
        self.regs.interrupt_status |= bits;
        if self.irq.trigger().is_err() {
            self.backend.counters.irq_errors += 1;
        }
    }

    fn needs_reset(&mut self) {
        self.backend.counters.queue_errors += 1;
        self.regs.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    /// A `QueueNotify` write: serve the queue here, or wake the thread
    /// that serves it.
    fn notify(&mut self) {
        self.backend.counters.notifications += 1;
        if self.kick.is_some() {
            self.wake();
        } else {
            self.serve();
        }
    }

    /// Whether the device runs with its queue ready: there is something to
    /// serve.
    pub fn serving(&self) -> bool {
        self.regs.running() && self.queue.ready()
    }

    /// The DMA view of guest memory, if the queue's rings lie inside it;
    /// otherwise the device needs a reset (and `None`).
    fn rings(&mut self) -> Option<()> {
        let dma = DmaMemory::new(&self.mem, self.dma_ranges.as_deref());
        let q = &self.queue;
        let n = usize::from(q.size());
        // The used ring with its avail_event, the available ring with its
        // used_event: 6 bytes of header and trailer each.
        let ok = dma.check_range(GuestAddress(q.desc_table()), 16 * n)
            && dma.check_range(GuestAddress(q.avail_ring()), 6 + 2 * n)
            && dma.check_range(GuestAddress(q.used_ring()), 6 + 8 * n);
        if ok {
            Some(())
        } else {
            self.needs_reset();
            None
        }
    }

    /// Serves every chain in the available ring (at most a ring's worth)
    /// and raises the interrupt if the driver asked for it; returns how
    /// many chains were taken. Does nothing unless [`VirtioBlk::serving`].
    pub fn serve(&mut self) -> usize {
        if !self.serving() || self.rings().is_none() {
            return 0;
        }
        let dma = DmaMemory::new(&self.mem, self.dma_ranges.as_deref());
        let q = &mut self.queue;
        // At most `size` chains: `iter` refuses an available index that is
        // more than a ring's worth ahead.
        let chains: Vec<DescriptorChain<&DmaMemory>> = match q.iter(&dma) {
            Ok(it) => it.collect(),
            Err(_) => {
                self.needs_reset();
                return 0;
            }
        };
        let taken = chains.len();
        let mut used = false;
        let mut broken = false;
        for chain in chains {
            let head = chain.head_index();
            let len = self.backend.execute(&dma, chain);
            if head >= self.queue.size() {
                // Nothing to return to the driver.
                continue;
            }
            if self.queue.add_used(&dma, head, len).is_err() {
                broken = true;
                break;
            }
            used = true;
        }
        let notify = used && self.queue.needs_notification(&dma).unwrap_or(true);
        if broken {
            self.needs_reset();
        }
        if notify {
            self.signal(VIRTIO_MMIO_INT_VRING);
        }
        taken
    }

    /// Before the serving thread sleeps: asks the driver to notify at its
    /// next request (with `EVENT_IDX`, `avail_event` set to the next
    /// available index), then looks once more. True: nothing is waiting,
    /// the thread may sleep; false: requests came in meanwhile. A device
    /// that is not serving, or whose rings are broken, may always sleep
    /// (its driver must start it again, which wakes the thread).
    pub fn enable_notification(&mut self) -> bool {
        if !self.serving() || self.rings().is_none() {
            return true;
        }
        let dma = DmaMemory::new(&self.mem, self.dma_ranges.as_deref());
        match self.queue.enable_notification(&dma) {
            Ok(pending) => !pending,
            Err(_) => {
                self.needs_reset();
                true
            }
        }
    }

    /// After the serving thread woke: the driver need not notify while the
    /// thread polls. (With `EVENT_IDX` this writes nothing: a driver
    /// notifies only when it reaches `avail_event`, which the device moves
    /// only when it is going to sleep.)
    pub fn disable_notification(&mut self) {
        if !self.serving() || self.rings().is_none() {
            return;
        }
        let dma = DmaMemory::new(&self.mem, self.dma_ranges.as_deref());
        if self.queue.disable_notification(&dma).is_err() {
            self.needs_reset();
        }
    }
}

impl Device for VirtioBlk {
    fn name(&self) -> &str {
        &self.name
    }

    fn io_ports(&self) -> u16 {
        0
    }

    fn mmio_size(&self) -> u64 {
        VIRTIO_BLK_MMIO_SIZE
    }

    fn pio_read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _offset: u16, _data: &[u8]) {}

    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        virtio_mmio::mmio_read(self, offset, data);
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        virtio_mmio::mmio_write(self, offset, data);
    }
}

impl MmioDevice for VirtioBlk {
    const DEVICE_ID: u32 = VIRTIO_ID_BLOCK;

    fn regs(&self) -> &Regs {
        &self.regs
    }
    fn regs_mut(&mut self) -> &mut Regs {
        &mut self.regs
    }
    fn device_features(&self) -> u64 {
        VirtioBlk::device_features(self)
    }
    fn queues(&self) -> &[Queue] {
        std::slice::from_ref(&self.queue)
    }
    fn queues_mut(&mut self) -> &mut [Queue] {
        std::slice::from_mut(&mut self.queue)
    }
    fn config_space(&self) -> Vec<u8> {
        VirtioBlk::config_space(self).to_vec()
    }
    fn notify(&mut self, _queue: usize) {
        self.notify();
    }
    fn wake(&self) {
        if let Some(k) = &self.kick {
            k();
        }
    }
}
