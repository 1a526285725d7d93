//! A virtio-mmio (version 2) network device whose wire is a TAP
//! descriptor, on `virtio-queue`: the register file and the two queues
//! here, the moving of frames between the queues and the wire in
//! `frames.rs`, the thread that serves them in `serving.rs`.
//!
//! Queue 0 receives (the driver lends buffers, the device fills each with
//! one frame read from the TAP), queue 1 transmits (each chain is one
//! frame, written to the TAP). Every frame is preceded by the 12-byte
//! `virtio_net_hdr_v1` (`VIRTIO_F_VERSION_1`); the device offers no
//! offloads, so the header it writes is zero but for `num_buffers` = 1
//! and the one it reads is ignored. The TAP is opened without
//! `IFF_VNET_HDR` and with `IFF_NO_PI`: it carries bare Ethernet frames.
//!
//! The same rules as virtio-blk hold for what the driver writes: every
//! ring and buffer must lie in the DMA window (the picoprocess's own
//! read-write memory), a chain is bounded, a malformed one is returned
//! with nothing written and counted, a broken ring sets
//! `DEVICE_NEEDS_RESET`. A frame on the wire longer than the buffer the
//! driver lent is dropped and counted (the buffer stays lent); a frame the
//! driver sends that is shorter than an Ethernet header or longer than
//! [`MAX_FRAME`] is dropped and counted.

mod frames;
mod serving;

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

pub use self::frames::Pass;
pub use self::serving::{NetPrologue, NetReport, NetThread};
use crate::dma::{normalize, DmaMemory};
use crate::virtio_blk::Kick;
use crate::virtio_mmio::{self, MmioDevice, Regs};
use crate::{Device, Irq};

/// Size of a [`VirtioNet`]'s MMIO window.
pub const VIRTIO_NET_MMIO_SIZE: u64 = 0x1000;
/// Largest queue size offered (`QueueNumMax`), for both queues.
pub const NET_QUEUE_MAX_SIZE: u16 = 256;
/// The header before every frame in a buffer (`virtio_net_hdr_v1`).
pub const NET_HDR_SIZE: usize = 12;
/// Longest frame moved either way: an Ethernet header, a VLAN tag and a
/// 1500-byte payload.
pub const MAX_FRAME: usize = 1518;
/// Shortest frame the driver may send: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// The receive queue's index.
const RX: usize = 0;
/// The transmit queue's index.
const TX: usize = 1;
/// `struct virtio_net_config` as far as offered: mac, status.
const CONFIG_SIZE: usize = 8;

/// What a [`VirtioNet`] has done so far. Counts only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetDevCounters {
    /// Writes to `QueueNotify`, either queue.
    pub notifications: u64,
    /// Frames written to the wire.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Frames the wire refused (the TAP's write failed: its link is down,
    /// its queue full).
    pub tx_errors: u64,
    /// Frames put in the driver's receive buffers.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames from the wire dropped: longer than the buffer the driver
    /// lent, or than [`MAX_FRAME`].
    pub rx_dropped: u64,
    /// Chains refused as malformed or hostile: a buffer outside the DMA
    /// window, too many descriptors (loops included), a transmit chain
    /// shorter than a header and an Ethernet header or longer than a
    /// header and [`MAX_FRAME`], a receive chain that is not writable.
    pub refused: u64,
    /// Rings outside guest memory or the DMA window, or a corrupt
    /// available index: the device then needs a reset.
    pub queue_errors: u64,
    /// Times the interrupt could not be signalled.
    pub irq_errors: u64,
    /// Used-buffer interrupts raised.
    pub interrupts: u64,
}

/// A virtio-mmio network device over a TAP descriptor.
///
/// Offers `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_STATUS`
/// (the link is always up) and `VIRTIO_RING_F_EVENT_IDX`; two split
/// virtqueues of at most [`NET_QUEUE_MAX_SIZE`] entries. Its queues are
/// served by a [`NetThread`], which a `QueueNotify` write wakes
/// ([`VirtioNet::set_kick`]). With `EVENT_IDX` the driver notifies only a
/// device about to sleep, and the device interrupts only a driver that
/// asked.
pub struct VirtioNet {
    name: String,
    irq: Irq,
    mem: GuestMemoryMmap<()>,
    /// `None`: DMA may reach all of `mem`.
    dma_ranges: Option<Vec<Range<u64>>>,
    queues: [Queue; 2],
    tap: File,
    mac: [u8; 6],
    regs: Regs,
    kick: Option<Kick>,
    counters: NetDevCounters,
    /// A frame read from the wire that waits for a receive buffer.
    pending: Option<usize>,
    /// Frame buffers: the one read from the wire, the one being sent.
    rx_frame: Box<[u8; MAX_FRAME + 1]>,
    tx_frame: Box<[u8; MAX_FRAME + 1]>,
}

impl VirtioNet {
    /// A network device named `name` whose wire is `tap` (made
    /// non-blocking here), reporting `mac`, doing DMA in `mem` and
    /// signalling `irq`.
    pub fn new(
        name: impl Into<String>,
        tap: File,
        mac: [u8; 6],
        mem: GuestMemoryMmap<()>,
        irq: Irq,
    ) -> io::Result<VirtioNet> {
        set_nonblocking(&tap)?;
        let queue = || Queue::new(NET_QUEUE_MAX_SIZE).map_err(io::Error::other);
        Ok(VirtioNet {
            name: name.into(),
            irq,
            mem,
            dma_ranges: None,
            queues: [queue()?, queue()?],
            tap,
            mac,
            regs: Regs::default(),
            kick: None,
            counters: NetDevCounters::default(),
            pending: None,
            rx_frame: Box::new([0; MAX_FRAME + 1]),
            tx_frame: Box::new([0; MAX_FRAME + 1]),
        })
    }

    /// What wakes the thread that serves the queues (a `QueueNotify`
    /// write, the device starting to run).
    pub fn set_kick(&mut self, kick: Option<Kick>) {
        self.kick = kick;
    }

    /// Restricts DMA to the given guest-physical ranges (end exclusive).
    /// An empty list allows nothing.
    pub fn set_dma_ranges(&mut self, ranges: &[Range<u64>]) {
        self.dma_ranges = Some(normalize(ranges));
    }

    /// The counters so far.
    pub fn counters(&self) -> NetDevCounters {
        self.counters
    }

    /// The wire's descriptor (the serving thread waits on it).
    pub fn tap_fd(&self) -> std::os::fd::RawFd {
        self.tap.as_raw_fd()
    }

    /// The device status register (`VIRTIO_CONFIG_S_*` bits).
    pub fn device_status(&self) -> u32 {
        self.regs.status
    }

    /// Feature bits offered to the driver.
    pub fn device_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn signal(&mut self, bits: u32) {
        if bits & VIRTIO_MMIO_INT_VRING != 0 {
            self.counters.interrupts += 1;
        }
        self.regs.interrupt_status |= bits;
        if self.irq.trigger().is_err() {
            self.counters.irq_errors += 1;
        }
    }

    fn needs_reset(&mut self) {
        self.counters.queue_errors += 1;
        self.regs.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Whether the device runs with both queues ready.
    pub fn serving(&self) -> bool {
        self.regs.running() && self.queues.iter().all(|q| q.ready())
    }

    /// Whether both queues' rings lie in the DMA view; otherwise the
    /// device needs a reset.
    fn rings_ok(&mut self) -> bool {
        let dma = DmaMemory::new(&self.mem, self.dma_ranges.as_deref());
        let ok = self.queues.iter().all(|q| {
            let n = usize::from(q.size());
            dma.check_range(GuestAddress(q.desc_table()), 16 * n)
                && dma.check_range(GuestAddress(q.avail_ring()), 6 + 2 * n)
                && dma.check_range(GuestAddress(q.used_ring()), 6 + 8 * n)
        });
        if !ok {
            self.needs_reset();
        }
        ok
    }
}

/// Makes `f` non-blocking (the serving thread reads the wire until it is
/// empty, then waits for it in `poll`).
fn set_nonblocking(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor `f` owns, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Device for VirtioNet {
    fn name(&self) -> &str {
        &self.name
    }

    fn io_ports(&self) -> u16 {
        0
    }

    fn mmio_size(&self) -> u64 {
        VIRTIO_NET_MMIO_SIZE
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

impl MmioDevice for VirtioNet {
    const DEVICE_ID: u32 = VIRTIO_ID_NET;

    fn regs(&self) -> &Regs {
        &self.regs
    }
    fn regs_mut(&mut self) -> &mut Regs {
        &mut self.regs
    }
    fn device_features(&self) -> u64 {
        VirtioNet::device_features(self)
    }
    fn queues(&self) -> &[Queue] {
        &self.queues
    }
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }
    fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_SIZE];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c
    }
    fn notify(&mut self, _queue: usize) {
        self.counters.notifications += 1;
        self.wake();
    }
    fn wake(&self) {
        if let Some(k) = &self.kick {
            k();
        }
    }
}
