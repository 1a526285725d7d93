//! Drives a `VirtioNet` through its MMIO registers the way a guest driver
//! would, with both split virtqueues (0: receive, 1: transmit) laid out by
//! hand in real guest memory, and plays the network at the other end of
//! its wire, a `UnixDatagram` pair (one frame per datagram).
//!
//! Most tests serve the queues by calling `VirtioNet::serve` directly; one
//! runs a `NetThread`. Beyond the well-formed paths (register identity,
//! feature negotiation, frames out and in, frames waiting for a buffer,
//! `EVENT_IDX`), they feed the device hostile input: transmit chains too
//! short or too long, wrongly directed descriptors, buffers outside guest
//! memory or the DMA window, descriptor loops and over-long chains,
//! receive buffers too small, oversized or runt datagrams, rings outside
//! memory and a corrupt available index. Nothing may panic, hang, reach
//! the wire or guest memory it should not, and every refusal is counted.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moat_devices::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use moat_devices::{
    Device, Gate, Irq, NetThread, Pass, VirtioNet, MAX_FRAME, NET_HDR_SIZE, NET_QUEUE_MAX_SIZE,
    VIRTIO_NET_MMIO_SIZE,
};

// virtio-mmio registers.
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

// Status bits.
const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 64;
const RUNNING: u32 = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;

// Interrupt status bits.
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;

// Feature bits.
const F_CSUM: u64 = 1 << 0;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
const F_ACCESS_PLATFORM: u64 = 1 << 33;
const OFFERED: u64 = F_VERSION_1 | F_MAC | F_STATUS | F_EVENT_IDX;

// Descriptor flags.
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;

/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;

// Queues.
const RX: usize = 0;
const TX: usize = 1;
const QSIZE: u16 = 256;

// Guest memory layout: each queue's descriptor table, available and used
// rings at `QUEUE_BASE[q]` + 0, + 0x1000, + 0x2000.
const MEM_SIZE: usize = 4 << 20;
const QUEUE_BASE: [u64; 2] = [0x1000, 0x5000];
/// End of the ring area.
const RINGS_END: u64 = 0x8000;
/// Receive buffers, one 4 KiB slot each.
const RX_BUFS: u64 = 0x20000;
/// Transmit buffers, one 4 KiB slot each.
const TX_BUFS: u64 = 0x80000;
const SLOT: u64 = 0x1000;
const OUTSIDE: u64 = 0x1_0000_0000;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
/// What the driver puts in receive buffers, to see what the device wrote.
const UNTOUCHED: u8 = 0xee;
/// The header the driver sends: the device must ignore it (and never put
/// it on the wire).
const TX_HDR: [u8; NET_HDR_SIZE] = [0xa5; NET_HDR_SIZE];
/// The header the device writes: all zero but `num_buffers` = 1.
const RX_HDR: [u8; NET_HDR_SIZE] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

/// A descriptor: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
struct Buf(u64, u32, bool);

/// The driver's view of one queue.
struct Ring {
    base: u64,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
    /// The next free descriptor (chains are written one after another).
    next_desc: u16,
}

impl Ring {
    fn new(q: usize) -> Ring {
        Ring {
            base: QUEUE_BASE[q],
            size: QSIZE,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        }
    }

    fn desc(&self) -> u64 {
        self.base
    }

    fn avail(&self) -> u64 {
        self.base + 0x1000
    }

    fn used(&self) -> u64 {
        self.base + 0x2000
    }
}

/// A guest driver and the network beyond the device's wire.
struct Driver {
    dev: Arc<Mutex<VirtioNet>>,
    mem: GuestMemoryMmap<()>,
    irq: Irq,
    /// The network's end of the wire (non-blocking).
    wire: UnixDatagram,
    q: [Ring; 2],
    /// The next buffer slot, per queue.
    slot: [u64; 2],
}

/// An Ethernet frame of `len` bytes (truncated if shorter than a header):
/// to the device's MAC from the peer's, then a pattern seeded by `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len.max(14));
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut i = 0u8;
    while f.len() < len {
        f.push(i.wrapping_mul(31).wrapping_add(seed));
        i = i.wrapping_add(1);
    }
    f.truncate(len);
    f
}

/// Waits up to five seconds for `cond`.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Driver {
    /// A device with a fresh wire, not yet initialised.
    fn raw() -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Irq::new().unwrap();
        let (dev_end, wire) = UnixDatagram::pair().unwrap();
        wire.set_nonblocking(true).unwrap();
        let tap = File::from(OwnedFd::from(dev_end));
        let dev = VirtioNet::new("net0", tap, MAC, mem.clone(), irq.try_clone().unwrap()).unwrap();
        Driver {
            dev: Arc::new(Mutex::new(dev)),
            mem,
            irq,
            wire,
            q: [Ring::new(RX), Ring::new(TX)],
            slot: [0, 0],
        }
    }

    /// A device the driver has set up and started, without `EVENT_IDX`
    /// (so that every used buffer interrupts).
    fn new() -> Driver {
        let mut d = Driver::raw();
        d.init(F_VERSION_1 | F_MAC | F_STATUS);
        d
    }

    fn dev(&self) -> MutexGuard<'_, VirtioNet> {
        self.dev.lock().unwrap()
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0xffu8; 4];
        self.dev().mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.dev().mmio_write(off, &v.to_le_bytes());
    }

    fn read_bytes(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0xffu8; len];
        self.dev().mmio_read(off, &mut b);
        b
    }

    fn features(&mut self) -> u64 {
        self.w32(DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(DEVICE_FEATURES);
        self.w32(DEVICE_FEATURES_SEL, 1);
        let hi = self.r32(DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Resets the device and negotiates `features`; true if the device
    /// accepted them.
    fn negotiate(&mut self, features: u64) -> bool {
        self.w32(STATUS, 0);
        assert_eq!(self.r32(STATUS), 0);
        self.w32(STATUS, S_ACKNOWLEDGE);
        self.w32(STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.w32(DRIVER_FEATURES_SEL, 0);
        self.w32(DRIVER_FEATURES, features as u32);
        self.w32(DRIVER_FEATURES_SEL, 1);
        self.w32(DRIVER_FEATURES, (features >> 32) as u32);
        self.w32(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        self.r32(STATUS) & S_FEATURES_OK != 0
    }

    /// Sets queue `q` up at its usual place with `size` entries, rings
    /// cleared.
    fn setup_queue(&mut self, q: usize, size: u16) {
        self.w32(QUEUE_SEL, q as u32);
        assert_eq!(self.r32(QUEUE_READY), 0);
        assert_eq!(self.r32(QUEUE_NUM_MAX), u32::from(NET_QUEUE_MAX_SIZE));
        self.q[q] = Ring::new(q);
        self.q[q].size = size;
        let (desc, avail, used) = (self.q[q].desc(), self.q[q].avail(), self.q[q].used());
        self.w32(QUEUE_NUM, u32::from(size));
        self.w32(QUEUE_DESC_LOW, desc as u32);
        self.w32(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w32(QUEUE_DRIVER_LOW, avail as u32);
        self.w32(QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.w32(QUEUE_DEVICE_LOW, used as u32);
        self.w32(QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.mem
            .write_slice(&[0u8; 0x2000], GuestAddress(avail))
            .unwrap();
        self.w32(QUEUE_READY, 1);
        assert_eq!(self.r32(QUEUE_READY), 1);
    }

    fn init_sized(&mut self, features: u64, size: u16) {
        assert!(self.negotiate(features));
        self.setup_queue(RX, size);
        self.setup_queue(TX, size);
        self.w32(STATUS, RUNNING);
        assert_eq!(self.r32(STATUS), RUNNING);
        assert!(self.dev().serving());
    }

    fn init(&mut self, features: u64) {
        self.init_sized(features, QSIZE);
    }

    fn write_desc(&self, q: usize, i: u16, b: Buf, flags: u16, next: u16) {
        let at = self.q[q].desc() + 16 * u64::from(i);
        self.mem.write_obj(b.0.to_le(), GuestAddress(at)).unwrap();
        self.mem
            .write_obj(b.1.to_le(), GuestAddress(at + 8))
            .unwrap();
        let flags = flags | if b.2 { D_WRITE } else { 0 };
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap();
        self.mem
            .write_obj(next.to_le(), GuestAddress(at + 14))
            .unwrap();
    }

    /// Writes `bufs` as a chain in free descriptors; returns its head.
    fn write_chain(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let n = bufs.len().max(1) as u16;
        let r = &mut self.q[q];
        if r.next_desc + n > r.size {
            r.next_desc = 0;
        }
        let first = r.next_desc;
        r.next_desc += n;
        for (k, b) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let last = k + 1 == bufs.len();
            let flags = if last { 0 } else { D_NEXT };
            self.write_desc(q, i, *b, flags, if last { 0 } else { i + 1 });
        }
        first
    }

    /// Makes the chain at `head` available on queue `q`.
    fn offer(&mut self, q: usize, head: u16) {
        let r = &mut self.q[q];
        let slot = u64::from(r.avail_idx % r.size);
        let avail = r.avail();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        let idx = r.avail_idx;
        self.mem
            .write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.mem
            .write_obj(idx.to_le(), GuestAddress(avail + 2))
            .unwrap();
    }

    /// Writes and offers a chain; returns its head.
    fn post(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let head = self.write_chain(q, bufs);
        self.offer(q, head);
        head
    }

    fn notify(&mut self, q: usize) {
        self.w32(QUEUE_NOTIFY, q as u32);
    }

    fn serve(&mut self) -> Pass {
        self.dev().serve()
    }

    /// New used-ring entries of queue `q`: (id, len).
    fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let r = &mut self.q[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(r.used() + 2)).unwrap();
        let mut out = Vec::new();
        while r.used_seen != idx {
            let at = r.used() + 4 + 8 * u64::from(r.used_seen % r.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            r.used_seen = r.used_seen.wrapping_add(1);
        }
        out
    }

    /// Checks that the interrupt was signalled, then acknowledges it.
    fn take_interrupt(&mut self) -> u32 {
        assert!(
            self.irq.take().unwrap() > 0,
            "interrupt eventfd not signalled"
        );
        let isr = self.r32(INTERRUPT_STATUS);
        self.w32(INTERRUPT_ACK, isr);
        assert_eq!(self.r32(INTERRUPT_STATUS), 0);
        isr
    }

    /// A fresh 4 KiB buffer slot for queue `q`.
    fn slot(&mut self, q: usize) -> u64 {
        let base = if q == RX { RX_BUFS } else { TX_BUFS };
        let at = base + SLOT * (self.slot[q] % 256);
        self.slot[q] += 1;
        at
    }

    fn guest_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn fill_guest(&self, at: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
    }

    /// Puts the driver's header and `frame` in a fresh transmit slot;
    /// returns its address (the frame starts `NET_HDR_SIZE` further).
    fn stage(&mut self, frame: &[u8]) -> u64 {
        let at = self.slot(TX);
        self.fill_guest(at, &TX_HDR);
        self.fill_guest(at + NET_HDR_SIZE as u64, frame);
        at
    }

    /// Queues `frame` for sending as one descriptor; returns the head.
    fn send(&mut self, frame: &[u8]) -> u16 {
        let at = self.stage(frame);
        let len = (NET_HDR_SIZE + frame.len()) as u32;
        self.post(TX, &[Buf(at, len, false)])
    }

    /// Lends a receive buffer of `len` bytes (filled with `UNTOUCHED`) as
    /// one descriptor; returns (head, address).
    fn lend(&mut self, len: u32) -> (u16, u64) {
        let at = self.slot(RX);
        self.fill_guest(at, &vec![UNTOUCHED; len as usize]);
        (self.post(RX, &[Buf(at, len, true)]), at)
    }

    /// The next datagram the device put on the wire, if any.
    fn peer_recv(&self) -> Option<Vec<u8>> {
        let mut b = vec![0u8; 65536];
        match self.wire.recv(&mut b) {
            Ok(n) => {
                b.truncate(n);
                Some(b)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => panic!("wire: {e}"),
        }
    }

    fn peer_send(&self, frame: &[u8]) {
        assert_eq!(self.wire.send(frame).unwrap(), frame.len());
    }

    /// Nothing reached the wire.
    fn wire_silent(&self) {
        assert_eq!(self.peer_recv(), None, "something reached the wire");
    }

    fn counters(&self) -> moat_devices::NetDevCounters {
        self.dev().counters()
    }

    /// A frame goes out and one comes in: the device still works.
    fn still_works(&mut self) {
        let before = self.counters();
        let out = frame(100, 0x77);
        let head = self.send(&out);
        let (rx_head, at) = self.lend(2048);
        let inbound = frame(90, 0x78);
        self.peer_send(&inbound);
        self.notify(TX);
        let pass = self.serve();
        assert_eq!(pass.moved, 2, "{pass:?}");
        assert_eq!(self.peer_recv().as_deref(), Some(&out[..]));
        assert_eq!(self.used(TX), vec![(u32::from(head), 0)]);
        assert_eq!(self.used(RX), vec![(u32::from(rx_head), 102)]);
        assert_eq!(self.guest_bytes(at, 12), RX_HDR);
        assert_eq!(self.guest_bytes(at + 12, 90), inbound);
        let after = self.counters();
        assert_eq!(after.tx_frames, before.tx_frames + 1);
        assert_eq!(after.rx_frames, before.rx_frames + 1);
        let _ = self.irq.take();
        let isr = self.r32(INTERRUPT_STATUS);
        self.w32(INTERRUPT_ACK, isr);
    }
}

#[test]
fn registers_identify_a_virtio_mmio_v2_network_device() {
    let mut d = Driver::raw();
    assert_eq!(d.dev().name(), "net0");
    assert_eq!(d.dev().mmio_size(), VIRTIO_NET_MMIO_SIZE);
    assert_eq!(d.dev().io_ports(), 0);
    assert_eq!(d.r32(MAGIC), 0x7472_6976);
    assert_eq!(d.r32(VERSION), 2);
    assert_eq!(d.r32(DEVICE_ID), 1);
    assert_eq!(d.r32(VENDOR_ID), u32::from_le_bytes(*b"moat"));
    assert_eq!(d.r32(CONFIG_GENERATION), 0);
    assert_eq!(d.features(), OFFERED);
    assert_eq!(d.dev().device_features(), OFFERED);
    d.w32(DEVICE_FEATURES_SEL, 2);
    assert_eq!(d.r32(DEVICE_FEATURES), 0);
    d.w32(DEVICE_FEATURES_SEL, u32::MAX);
    assert_eq!(d.r32(DEVICE_FEATURES), 0);

    // Both queues offer 256 entries; there is no third.
    for q in 0..2 {
        d.w32(QUEUE_SEL, q);
        assert_eq!(d.r32(QUEUE_NUM_MAX), u32::from(NET_QUEUE_MAX_SIZE));
        assert_eq!(d.r32(QUEUE_READY), 0);
    }
    d.w32(QUEUE_SEL, 2);
    assert_eq!(d.r32(QUEUE_NUM_MAX), 0);
    d.w32(QUEUE_READY, 1);
    assert_eq!(d.r32(QUEUE_READY), 0);

    // Config space: the MAC, byte by byte and as wider reads, then the
    // status (link up).
    for (i, b) in MAC.iter().enumerate() {
        assert_eq!(d.read_bytes(CONFIG + i as u64, 1), vec![*b]);
    }
    assert_eq!(d.read_bytes(CONFIG, 4), MAC[..4]);
    assert_eq!(d.read_bytes(CONFIG + 4, 2), MAC[4..]);
    assert_eq!(d.read_bytes(CONFIG + 6, 2), LINK_UP.to_le_bytes());
    let mut all = MAC.to_vec();
    all.extend_from_slice(&LINK_UP.to_le_bytes());
    assert_eq!(d.read_bytes(CONFIG, 8), all);
    // Past the structure, straddling its end, or odd widths: zeros.
    assert_eq!(d.read_bytes(CONFIG + 8, 4), [0; 4]);
    assert_eq!(d.read_bytes(CONFIG + 6, 4), [0; 4]);
    assert_eq!(d.read_bytes(CONFIG + 4, 8), [0; 8]);
    assert_eq!(d.read_bytes(CONFIG, 3), [0; 3]);
    assert_eq!(d.read_bytes(CONFIG, 16), [0; 16]);
    assert_eq!(d.read_bytes(u64::MAX - 1, 1), [0]);
    assert_eq!(d.r32(VIRTIO_NET_MMIO_SIZE - 4), 0);
    // Config space is read-only.
    d.w32(CONFIG, 0);
    d.dev().mmio_write(CONFIG + 4, &[0, 0]);
    assert_eq!(d.read_bytes(CONFIG, 8), all);

    // Registers: wrong widths and misaligned accesses read zero, writes do
    // nothing.
    assert_eq!(d.read_bytes(MAGIC, 2), [0; 2]);
    assert_eq!(d.read_bytes(MAGIC, 8), [0; 8]);
    assert_eq!(d.r32(MAGIC + 1), 0);
    d.dev().mmio_write(STATUS, &[S_ACKNOWLEDGE as u8]);
    assert_eq!(d.r32(STATUS), 0);
    d.dev().mmio_write(STATUS + 2, &1u32.to_le_bytes());
    assert_eq!(d.r32(STATUS), 0);
    d.w32(0x0c0, 1);
    assert_eq!(d.r32(0x0c0), 0);
    let mut p = [0xffu8; 1];
    d.dev().pio_read(0, &mut p);
    assert_eq!(p, [0]);
    d.dev().pio_write(0, &[1]);
    assert_eq!(d.counters(), Default::default());
}

#[test]
fn feature_negotiation_refuses_what_was_not_offered() {
    let mut d = Driver::raw();
    // Without VERSION_1 (a legacy driver).
    assert!(!d.negotiate(F_MAC | F_STATUS));
    assert!(!d.negotiate(0));
    // Anything not offered, in either half.
    for extra in [
        F_CSUM,
        F_MRG_RXBUF,
        F_INDIRECT_DESC,
        F_ACCESS_PLATFORM,
        1 << 63,
    ] {
        assert!(!d.negotiate(F_VERSION_1 | extra), "{extra:#x} accepted");
    }
    // A refused FEATURES_OK leaves a device that never serves, queues
    // ready or not.
    d.setup_queue(RX, QSIZE);
    d.setup_queue(TX, QSIZE);
    d.w32(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
    assert_eq!(d.r32(STATUS), S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
    assert!(!d.dev().serving());
    d.send(&frame(60, 1));
    d.notify(TX);
    assert_eq!(d.serve(), Pass::default());
    d.wire_silent();

    // What was offered, all or part, with VERSION_1.
    assert!(d.negotiate(OFFERED));
    assert!(d.negotiate(F_VERSION_1));
    assert!(d.negotiate(F_VERSION_1 | F_EVENT_IDX));
    // Once FEATURES_OK is set, the features no longer change.
    d.w32(DRIVER_FEATURES_SEL, 0);
    d.w32(DRIVER_FEATURES, F_CSUM as u32);
    d.w32(STATUS, RUNNING);
    assert_eq!(d.r32(STATUS), RUNNING);
    // A driver cannot clear a status bit but by resetting.
    d.w32(STATUS, S_ACKNOWLEDGE | S_DRIVER);
    assert_eq!(d.r32(STATUS), RUNNING);

    d.init(F_VERSION_1 | F_MAC);
    d.still_works();
}

#[test]
fn nothing_moves_before_driver_ok() {
    let mut d = Driver::raw();
    assert!(d.negotiate(F_VERSION_1));
    d.setup_queue(RX, QSIZE);
    d.setup_queue(TX, QSIZE);
    d.send(&frame(60, 1));
    d.lend(2048);
    d.peer_send(&frame(60, 2));
    d.notify(TX);
    assert_eq!(d.serve(), Pass::default());
    d.wire_silent();
    assert!(d.used(TX).is_empty() && d.used(RX).is_empty());
    assert_eq!(d.irq.take().unwrap(), 0);

    // Started: both frames move.
    d.w32(STATUS, RUNNING);
    let pass = d.serve();
    assert_eq!(pass.moved, 2);
    assert_eq!(d.peer_recv(), Some(frame(60, 1)));
    assert_eq!(d.used(RX), vec![(0, 72)]);
}

#[test]
fn a_transmitted_frame_reaches_the_wire_intact() {
    let mut d = Driver::new();
    let f = frame(60, 3);
    let head = d.send(&f);
    d.notify(TX);
    assert_eq!(d.counters().notifications, 1);
    let pass = d.serve();
    assert_eq!(pass.moved, 1);
    // Only the frame: the driver's header stays behind.
    assert_eq!(d.peer_recv(), Some(f));
    d.wire_silent();
    assert_eq!(d.used(TX), vec![(u32::from(head), 0)]);
    assert_eq!(d.take_interrupt() & INT_VRING, INT_VRING);
    let c = d.counters();
    assert_eq!((c.tx_frames, c.tx_bytes), (1, 60));
    assert_eq!((c.refused, c.tx_errors, c.interrupts), (0, 0, 1));

    // The shortest and the longest frames, and several per pass, in order.
    let frames = [frame(14, 4), frame(MAX_FRAME, 5), frame(1500, 6)];
    for f in &frames {
        d.send(f);
    }
    d.notify(TX);
    assert_eq!(d.serve().moved, 3);
    for f in &frames {
        assert_eq!(d.peer_recv().as_ref(), Some(f));
    }
    d.wire_silent();
    assert_eq!(d.used(TX).len(), 3);
    let c = d.counters();
    assert_eq!(
        (c.tx_frames, c.tx_bytes),
        (4, 60 + 14 + MAX_FRAME as u64 + 1500)
    );
}

#[test]
fn a_transmitted_frame_split_across_descriptors_arrives_whole() {
    let mut d = Driver::new();
    let f = frame(200, 7);
    let at = d.stage(&f);
    let h = NET_HDR_SIZE as u64;
    let layouts: [&[(u64, u32)]; 4] = [
        // Header, then frame.
        &[(0, 12), (h, 200)],
        // Header and part of the frame, then the rest.
        &[(0, 50), (50, 162)],
        // Header split, frame split.
        &[(0, 5), (5, 7 + 100), (h + 100, 100)],
        // A zero-length descriptor in the middle.
        &[(0, 12), (h, 0), (h, 200)],
    ];
    for (n, layout) in layouts.iter().enumerate() {
        let bufs: Vec<Buf> = layout
            .iter()
            .map(|&(off, len)| Buf(at + off, len, false))
            .collect();
        let head = d.post(TX, &bufs);
        d.notify(TX);
        assert_eq!(d.serve().moved, 1, "layout {n}");
        assert_eq!(d.peer_recv().as_ref(), Some(&f), "layout {n}");
        assert_eq!(d.used(TX), vec![(u32::from(head), 0)]);
    }
    // Descriptors in scattered places of memory.
    let a = d.slot(TX);
    let b = d.slot(TX);
    d.fill_guest(a, &TX_HDR);
    d.fill_guest(a + h, &f[..100]);
    d.fill_guest(b + 0x800, &f[100..]);
    d.post(TX, &[Buf(a, 112, false), Buf(b + 0x800, 100, false)]);
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.peer_recv().as_ref(), Some(&f));
    let c = d.counters();
    assert_eq!((c.tx_frames, c.tx_bytes, c.refused), (5, 1000, 0));
}

#[test]
fn a_frame_from_the_wire_fills_a_lent_buffer() {
    let mut d = Driver::new();
    let (head, at) = d.lend(2048);
    let f = frame(60, 8);
    d.peer_send(&f);
    let pass = d.serve();
    assert_eq!(pass.moved, 1);
    assert_eq!(d.used(RX), vec![(u32::from(head), 72)]);
    assert_eq!(d.guest_bytes(at, NET_HDR_SIZE), RX_HDR);
    assert_eq!(d.guest_bytes(at + 12, 60), f);
    // Nothing written past the frame.
    assert_eq!(
        d.guest_bytes(at + 72, 2048 - 72),
        vec![UNTOUCHED; 2048 - 72]
    );
    assert_eq!(d.take_interrupt() & INT_VRING, INT_VRING);
    let c = d.counters();
    assert_eq!(
        (c.rx_frames, c.rx_bytes, c.rx_dropped, c.refused),
        (1, 60, 0, 0)
    );

    // A frame of the longest size into a buffer of exactly its size, and
    // one across a header-sized descriptor and a data descriptor.
    let big = frame(MAX_FRAME, 9);
    let (h1, a1) = d.lend((NET_HDR_SIZE + MAX_FRAME) as u32);
    let a2 = d.slot(RX);
    let a3 = d.slot(RX);
    d.fill_guest(a2, &[UNTOUCHED; 12]);
    let h2 = d.post(RX, &[Buf(a2, 12, true), Buf(a3, 1600, true)]);
    let small = frame(300, 10);
    d.peer_send(&big);
    d.peer_send(&small);
    assert_eq!(d.serve().moved, 2);
    assert_eq!(
        d.used(RX),
        vec![
            (u32::from(h1), (12 + MAX_FRAME) as u32),
            (u32::from(h2), 312)
        ]
    );
    assert_eq!(d.guest_bytes(a1, 12), RX_HDR);
    assert_eq!(d.guest_bytes(a1 + 12, MAX_FRAME), big);
    assert_eq!(d.guest_bytes(a2, 12), RX_HDR);
    assert_eq!(d.guest_bytes(a3, 300), small);
    let c = d.counters();
    assert_eq!(c.rx_frames, 3);
    assert_eq!(c.rx_bytes, 60 + MAX_FRAME as u64 + 300);
}

#[test]
fn a_frame_waits_for_a_buffer() {
    let mut d = Driver::new();
    let (f1, f2) = (frame(80, 11), frame(90, 12));
    d.peer_send(&f1);
    // No buffer: the frame is read and kept; the wire is not wanted.
    let pass = d.serve();
    assert_eq!(pass, Pass::default());
    d.peer_send(&f2);
    assert_eq!(d.serve(), Pass::default());
    let c = d.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (0, 0));
    assert_eq!(d.irq.take().unwrap(), 0);

    // One buffer: the first frame lands, the second now waits.
    let (h1, a1) = d.lend(2048);
    d.notify(RX);
    let pass = d.serve();
    assert_eq!(pass.moved, 1);
    assert!(!pass.wire_wanted);
    assert_eq!(d.used(RX), vec![(u32::from(h1), 92)]);
    assert_eq!(d.guest_bytes(a1 + 12, 80), f1);

    // Two more buffers: the second frame lands in the first of them; one
    // is left and the wire is empty, so the wire is wanted.
    let (h2, a2) = d.lend(2048);
    let (_h3, a3) = d.lend(2048);
    d.notify(RX);
    let pass = d.serve();
    assert_eq!(pass.moved, 1);
    assert!(pass.wire_wanted);
    assert_eq!(d.used(RX), vec![(u32::from(h2), 102)]);
    assert_eq!(d.guest_bytes(a2 + 12, 90), f2);
    assert_eq!(d.guest_bytes(a3, 16), [UNTOUCHED; 16]);
    let pass = d.serve();
    assert_eq!(
        pass,
        Pass {
            moved: 0,
            wire_wanted: true,
            more: false
        }
    );
    let c = d.counters();
    assert_eq!((c.rx_frames, c.rx_bytes, c.rx_dropped), (2, 170, 0));
}

/// `Pass::wire_wanted` is documented as false when no buffer is lent.
#[test]
fn wire_is_not_wanted_without_a_buffer() {
    let mut d = Driver::new();
    // Nothing lent, nothing on the wire.
    assert_eq!(d.serve(), Pass::default());
    // The only buffer lent is used, then the wire is empty.
    d.lend(2048);
    d.peer_send(&frame(60, 50));
    assert_eq!(
        d.serve(),
        Pass {
            moved: 1,
            wire_wanted: false,
            more: false
        }
    );
}

#[test]
fn transmit_chains_too_short_or_too_long_are_refused() {
    let mut d = Driver::new();
    let big = frame(MAX_FRAME + 1, 13);
    let at = d.stage(&big);
    // Lengths of whole chains (header included), with how many refused.
    let cases: [(u32, bool); 8] = [
        (0, false),
        (1, false),
        (12, false),
        (12 + 13, false),
        (12 + 14, true),
        (12 + MAX_FRAME as u32, true),
        (12 + MAX_FRAME as u32 + 1, false),
        (u32::MAX, false),
    ];
    let mut refused = 0;
    let mut sent = 0;
    for (len, ok) in cases {
        let bufs = if len == u32::MAX {
            // Two descriptors of 2 GiB.
            vec![Buf(at, 0x8000_0000, false), Buf(at, 0x8000_0000, false)]
        } else {
            vec![Buf(at, len, false)]
        };
        let head = d.post(TX, &bufs);
        d.notify(TX);
        assert_eq!(d.serve().moved, 1, "length {len}");
        assert_eq!(d.used(TX), vec![(u32::from(head), 0)], "length {len}");
        if ok {
            sent += 1;
            let n = len as usize - NET_HDR_SIZE;
            assert_eq!(d.peer_recv().as_deref(), Some(&big[..n]), "length {len}");
        } else {
            refused += 1;
            d.wire_silent();
        }
        let c = d.counters();
        assert_eq!((c.refused, c.tx_frames), (refused, sent), "length {len}");
    }
    // The same limits across descriptors: 12 + 13 in three, 12 + 1519 in two.
    d.post(
        TX,
        &[
            Buf(at, 5, false),
            Buf(at + 5, 10, false),
            Buf(at + 15, 10, false),
        ],
    );
    d.post(
        TX,
        &[
            Buf(at, 12, false),
            Buf(at + 12, MAX_FRAME as u32 + 1, false),
        ],
    );
    d.notify(TX);
    assert_eq!(d.serve().moved, 2);
    d.wire_silent();
    assert_eq!(d.used(TX).len(), 2);
    assert_eq!(d.counters().refused, refused + 2);
    d.still_works();
}

#[test]
fn wrongly_directed_descriptors_are_refused() {
    let mut d = Driver::new();
    let f = frame(60, 14);
    let at = d.stage(&f);
    // Transmit: a write-only descriptor anywhere in the chain.
    let chains: [&[Buf]; 3] = [
        &[Buf(at, 72, true)],
        &[Buf(at, 12, false), Buf(at + 12, 60, true)],
        &[Buf(at, 12, true), Buf(at + 12, 60, false)],
    ];
    for bufs in chains {
        let head = d.post(TX, bufs);
        d.notify(TX);
        assert_eq!(d.serve().moved, 1);
        assert_eq!(d.used(TX), vec![(u32::from(head), 0)]);
        d.wire_silent();
        // The device wrote nothing into the "writable" transmit buffer.
        assert_eq!(d.guest_bytes(at, 12), TX_HDR);
        assert_eq!(d.guest_bytes(at + 12, 60), f);
    }
    assert_eq!(d.counters().refused, 3);
    assert_eq!(d.counters().tx_frames, 0);

    // Receive: a read-only descriptor anywhere in the chain. Each is
    // returned empty and untouched; the frame goes to the next good one.
    let a = d.slot(RX);
    let b = d.slot(RX);
    let good = d.slot(RX);
    d.fill_guest(a, &[UNTOUCHED; 2048]);
    d.fill_guest(b, &[UNTOUCHED; 2048]);
    d.fill_guest(good, &[UNTOUCHED; 2048]);
    let h1 = d.post(RX, &[Buf(a, 2048, false)]);
    let h2 = d.post(RX, &[Buf(b, 12, true), Buf(b + 12, 2000, false)]);
    let h3 = d.post(RX, &[Buf(b, 12, false), Buf(b + 12, 2000, true)]);
    let h4 = d.post(RX, &[Buf(good, 2048, true)]);
    let inbound = frame(64, 15);
    d.peer_send(&inbound);
    let pass = d.serve();
    assert_eq!(pass.moved, 4);
    assert_eq!(
        d.used(RX),
        vec![
            (u32::from(h1), 0),
            (u32::from(h2), 0),
            (u32::from(h3), 0),
            (u32::from(h4), 76)
        ]
    );
    assert_eq!(d.guest_bytes(a, 2048), vec![UNTOUCHED; 2048]);
    assert_eq!(d.guest_bytes(b, 2048), vec![UNTOUCHED; 2048]);
    assert_eq!(d.guest_bytes(good + 12, 64), inbound);
    let c = d.counters();
    assert_eq!((c.refused, c.rx_frames, c.rx_dropped), (6, 1, 0));
    d.still_works();
}

#[test]
fn buffers_outside_guest_memory_are_refused() {
    let mut d = Driver::new();
    let f = frame(60, 16);
    let at = d.stage(&f);
    let end = MEM_SIZE as u64;
    let chains: [Vec<Buf>; 5] = [
        vec![Buf(OUTSIDE, 72, false)],
        // Straddling the end of memory.
        vec![Buf(end - 40, 72, false)],
        vec![Buf(at, 12, false), Buf(OUTSIDE, 60, false)],
        vec![Buf(at, 12, false), Buf(u64::MAX - 10, 60, false)],
        // A zero-length descriptor outside memory.
        vec![Buf(at, 72, false), Buf(OUTSIDE, 0, false)],
    ];
    for bufs in &chains {
        let head = d.post(TX, bufs);
        d.notify(TX);
        assert_eq!(d.serve().moved, 1, "{bufs:?}");
        assert_eq!(d.used(TX), vec![(u32::from(head), 0)], "{bufs:?}");
        d.wire_silent();
    }
    assert_eq!(d.counters().refused, chains.len() as u64);

    // Receive buffers outside memory: returned empty; the frame waits and
    // then goes to a good buffer.
    let last = end - 100;
    d.fill_guest(last, &[UNTOUCHED; 100]);
    let h1 = d.post(RX, &[Buf(OUTSIDE, 2048, true)]);
    let h2 = d.post(RX, &[Buf(last, 2048, true)]);
    let h3 = d.post(RX, &[Buf(last, 12, true), Buf(u64::MAX - 100, 2048, true)]);
    d.peer_send(&frame(60, 17));
    assert_eq!(d.serve().moved, 3);
    assert_eq!(
        d.used(RX),
        vec![(u32::from(h1), 0), (u32::from(h2), 0), (u32::from(h3), 0)]
    );
    assert_eq!(d.guest_bytes(last, 100), vec![UNTOUCHED; 100]);
    assert_eq!(d.counters().refused, chains.len() as u64 + 3);
    assert_eq!(d.counters().rx_frames, 0);
    let (h4, a4) = d.lend(128);
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.used(RX), vec![(u32::from(h4), 72)]);
    assert_eq!(d.guest_bytes(a4 + 12, 60), frame(60, 17));
    d.still_works();
}

#[test]
fn the_dma_window_refuses_buffers_outside_it() {
    let mut d = Driver::new();
    // Rings and the first slot of each buffer area only.
    d.dev().set_dma_ranges(&[
        0..RINGS_END,
        RX_BUFS..RX_BUFS + SLOT,
        TX_BUFS..TX_BUFS + SLOT,
    ]);
    let f = frame(100, 18);
    let inside = d.stage(&f);
    assert_eq!(inside, TX_BUFS);
    let outside = d.stage(&f);
    // Outside, straddling the window's end, and split across in and out.
    let chains: [Vec<Buf>; 3] = [
        vec![Buf(outside, 112, false)],
        vec![Buf(TX_BUFS + SLOT - 50, 112, false)],
        vec![Buf(inside, 12, false), Buf(outside + 12, 100, false)],
    ];
    for bufs in &chains {
        let head = d.post(TX, bufs);
        d.notify(TX);
        assert_eq!(d.serve().moved, 1, "{bufs:?}");
        assert_eq!(d.used(TX), vec![(u32::from(head), 0)]);
        d.wire_silent();
    }
    assert_eq!(d.counters().refused, 3);
    d.post(TX, &[Buf(inside, 112, false)]);
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.peer_recv(), Some(f));

    // Receive: a buffer outside the window stays untouched.
    let out_rx = RX_BUFS + 4 * SLOT;
    d.fill_guest(out_rx, &[UNTOUCHED; 256]);
    let h1 = d.post(RX, &[Buf(out_rx, 256, true)]);
    let h2 = d.post(RX, &[Buf(RX_BUFS, 12, true), Buf(out_rx, 256, true)]);
    d.fill_guest(RX_BUFS, &[UNTOUCHED; 256]);
    let h3 = d.post(RX, &[Buf(RX_BUFS, 256, true)]);
    let inbound = frame(100, 19);
    d.peer_send(&inbound);
    assert_eq!(d.serve().moved, 3);
    assert_eq!(
        d.used(RX),
        vec![(u32::from(h1), 0), (u32::from(h2), 0), (u32::from(h3), 112)]
    );
    assert_eq!(d.guest_bytes(out_rx, 256), vec![UNTOUCHED; 256]);
    assert_eq!(d.guest_bytes(RX_BUFS + 12, 100), inbound);
    assert_eq!(d.counters().refused, 5);
}

#[test]
fn descriptor_loops_and_long_chains_are_refused() {
    let mut d = Driver::new();
    let f = frame(60, 20);
    let at = d.stage(&f);
    // 0 -> 1 -> 0 -> ...
    d.write_desc(TX, 0, Buf(at, 12, false), D_NEXT, 1);
    d.write_desc(TX, 1, Buf(at + 12, 60, false), D_NEXT, 0);
    d.offer(TX, 0);
    // A descriptor pointing at itself.
    d.write_desc(TX, 5, Buf(at, 72, false), D_NEXT, 5);
    d.offer(TX, 5);
    d.notify(TX);
    assert_eq!(d.serve().moved, 2);
    assert_eq!(d.used(TX), vec![(0, 0), (5, 0)]);
    d.wire_silent();
    assert_eq!(d.counters().refused, 2);

    // 17 descriptors of a well-sized frame: refused; 16: sent.
    let big = frame(17 * 50, 21);
    let at = d.stage(&big);
    let mut bufs = vec![Buf(at, 12, false)];
    bufs.extend((0..16).map(|i| Buf(at + 12 + 50 * i, 50, false)));
    d.q[TX].next_desc = 10;
    let head = d.post(TX, &bufs);
    d.notify(TX);
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.used(TX), vec![(u32::from(head), 0)]);
    d.wire_silent();
    assert_eq!(d.counters().refused, 3);
    bufs.pop();
    let head = d.post(TX, &bufs);
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.used(TX), vec![(u32::from(head), 0)]);
    assert_eq!(d.peer_recv().as_deref(), Some(&big[..15 * 50]));

    // The same on the receive side: a loop, 17 descriptors; the frame goes
    // to the 16-descriptor chain after them.
    let a = d.slot(RX);
    d.fill_guest(a, &[UNTOUCHED; 2048]);
    d.write_desc(RX, 0, Buf(a, 100, true), D_NEXT, 1);
    d.write_desc(RX, 1, Buf(a + 100, 100, true), D_NEXT, 0);
    d.offer(RX, 0);
    d.q[RX].next_desc = 2;
    let long: Vec<Buf> = (0..17).map(|i| Buf(a + 100 * i, 100, true)).collect();
    let h2 = d.post(RX, &long);
    let h3 = d.post(RX, &long[..16]);
    let inbound = frame(1000, 22);
    d.peer_send(&inbound);
    assert_eq!(d.serve().moved, 3);
    assert_eq!(
        d.used(RX),
        vec![(0, 0), (u32::from(h2), 0), (u32::from(h3), 1012)]
    );
    assert_eq!(d.guest_bytes(a + 12, 1000), inbound);
    assert_eq!(d.counters().refused, 5);
    d.still_works();
}

/// The iterator of `virtio-queue` ends a chain silently after a queue's
/// worth of descriptors or at a next index outside the table; the device
/// then takes what it got for a whole chain.
#[test]
fn chains_cut_short_by_the_iterator_are_refused() {
    let mut d = Driver::raw();
    d.init_sized(F_VERSION_1, 8);
    let f = frame(200, 23);
    let at = d.stage(&f);
    // 0 -> 1 -> 0 -> ... in a queue of 8: the iterator stops after 8.
    d.write_desc(TX, 0, Buf(at, 40, false), D_NEXT, 1);
    d.write_desc(TX, 1, Buf(at + 40, 40, false), D_NEXT, 0);
    d.offer(TX, 0);
    // A next index beyond the queue: the iterator stops after the first.
    d.write_desc(TX, 3, Buf(at, 72, false), D_NEXT, 200);
    d.offer(TX, 3);
    d.notify(TX);
    assert_eq!(d.serve().moved, 2);
    assert_eq!(d.used(TX), vec![(0, 0), (3, 0)]);
    d.wire_silent();
    assert_eq!(d.counters().refused, 2);
}

#[test]
fn a_head_index_beyond_the_transmit_queue_is_skipped() {
    let mut d = Driver::new();
    d.stage(&frame(60, 24));
    d.offer(TX, QSIZE + 3);
    d.offer(TX, u16::MAX);
    d.notify(TX);
    let pass = d.serve();
    assert_eq!(pass.moved, 0, "nothing can be returned");
    assert!(d.used(TX).is_empty());
    d.wire_silent();
    assert_eq!(d.counters().refused, 2);
    d.still_works();
}

/// A receive-ring entry whose head index is beyond the queue cannot be
/// returned, but it should be skipped (and counted) like the transmit
/// side does, not block the ring.
#[test]
fn a_head_index_beyond_the_receive_queue_is_skipped() {
    let mut d = Driver::new();
    d.offer(RX, QSIZE + 3);
    let (h, at) = d.lend(2048);
    let inbound = frame(60, 25);
    d.peer_send(&inbound);
    d.serve();
    assert_eq!(d.counters().refused, 1);
    assert_eq!(d.counters().rx_dropped, 0);
    assert_eq!(d.used(RX), vec![(u32::from(h), 72)]);
    assert_eq!(d.guest_bytes(at + 12, 60), inbound);
}

#[test]
fn a_receive_buffer_too_small_drops_the_frame_and_stays_lent() {
    let mut d = Driver::new();
    // Room for a header and 60 bytes.
    let (head, at) = d.lend(72);
    d.peer_send(&frame(100, 26));
    let pass = d.serve();
    assert_eq!(pass.moved, 0);
    assert!(pass.wire_wanted, "the buffer is still lent");
    assert!(d.used(RX).is_empty());
    assert_eq!(d.guest_bytes(at, 72), vec![UNTOUCHED; 72]);
    assert_eq!(d.irq.take().unwrap(), 0);
    let c = d.counters();
    assert_eq!((c.rx_dropped, c.rx_frames, c.refused), (1, 0, 0));

    // Another too long, then one that fits exactly: the buffer takes it.
    let fits = frame(60, 27);
    d.peer_send(&frame(61, 28));
    d.peer_send(&fits);
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.used(RX), vec![(u32::from(head), 72)]);
    assert_eq!(d.guest_bytes(at, 12), RX_HDR);
    assert_eq!(d.guest_bytes(at + 12, 60), fits);
    let c = d.counters();
    assert_eq!((c.rx_dropped, c.rx_frames, c.refused), (2, 1, 0));

    // A buffer smaller than a header, split across descriptors.
    let a = d.slot(RX);
    d.fill_guest(a, &[UNTOUCHED; 16]);
    let h = d.post(RX, &[Buf(a, 4, true), Buf(a + 4, 4, true)]);
    d.peer_send(&frame(14, 29));
    assert_eq!(d.serve().moved, 0);
    assert_eq!(d.counters().rx_dropped, 3);
    assert_eq!(d.guest_bytes(a, 16), [UNTOUCHED; 16]);
    assert!(d.used(RX).is_empty());
    // A flood of frames at a ring of short buffers: the pass ends.
    for i in 0..40 {
        d.peer_send(&frame(1000, i));
    }
    let pass = d.serve();
    assert_eq!(pass.moved, 0);
    assert_eq!(d.counters().rx_dropped, 43);
    // The short buffer is still first in line.
    d.peer_send(&frame(14, 30));
    assert_eq!(d.serve().moved, 0);
    assert_eq!(d.counters().rx_dropped, 44);
    let _ = h;
}

#[test]
fn oversized_and_runt_datagrams_are_dropped() {
    let mut d = Driver::new();
    let (_, at) = d.lend(4000);
    d.peer_send(&frame(MAX_FRAME + 1, 31));
    d.peer_send(&vec![0x5a; 4000]);
    d.peer_send(&frame(13, 32));
    let pass = d.serve();
    assert_eq!(
        pass,
        Pass {
            moved: 0,
            wire_wanted: true,
            more: false
        }
    );
    let c = d.counters();
    assert_eq!((c.rx_dropped, c.rx_frames), (3, 0));
    assert!(
        d.guest_bytes(at, 4000) == vec![UNTOUCHED; 4000],
        "the buffer was written"
    );
    // An empty read is a closed wire, not a frame: the pass ends there,
    // nothing taken, and the thread would wait on the wire.
    d.peer_send(&[]);
    d.peer_send(&frame(60, 34));
    assert_eq!(
        d.serve(),
        Pass {
            moved: 0,
            wire_wanted: true,
            more: false
        }
    );
    assert_eq!(d.counters().rx_dropped, 3);
    // The frame after it is taken by the next pass.
    assert_eq!(d.serve().moved, 1);
    let _ = d.used(RX);
    // The longest allowed goes through.
    let (head, at) = d.lend(4000);
    let f = frame(MAX_FRAME, 33);
    d.peer_send(&f);
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.used(RX), vec![(u32::from(head), (12 + MAX_FRAME) as u32)]);
    assert_eq!(d.guest_bytes(at + 12, MAX_FRAME), f);
    assert_eq!(d.guest_bytes(at + 12 + MAX_FRAME as u64, 8), [UNTOUCHED; 8]);
}

#[test]
fn a_wire_that_refuses_frames_is_counted() {
    let mut d = Driver::new();
    // The network goes away: writes fail.
    let (_, other) = UnixDatagram::pair().unwrap();
    d.wire = other;
    let head = d.send(&frame(60, 34));
    d.notify(TX);
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.used(TX), vec![(u32::from(head), 0)]);
    let c = d.counters();
    assert_eq!((c.tx_errors, c.tx_frames, c.refused), (1, 0, 0));
}

#[test]
fn rings_outside_memory_need_a_reset() {
    for (what, q, reg, addr) in [
        ("descriptor table outside", TX, QUEUE_DESC_LOW, OUTSIDE),
        (
            "used ring straddling the end",
            RX,
            QUEUE_DEVICE_LOW,
            MEM_SIZE as u64 - 0x100,
        ),
        (
            "available ring straddling the end",
            TX,
            QUEUE_DRIVER_LOW,
            MEM_SIZE as u64 - 0x100,
        ),
    ] {
        let mut d = Driver::raw();
        assert!(d.negotiate(F_VERSION_1));
        d.setup_queue(RX, QSIZE);
        d.w32(QUEUE_SEL, q as u32);
        d.w32(QUEUE_READY, 0);
        d.w32(reg, addr as u32);
        d.w32(reg + 4, (addr >> 32) as u32);
        d.w32(QUEUE_READY, 1);
        if q == RX {
            d.setup_queue(TX, QSIZE);
        } else {
            // Keep queue 1 but for the bad address.
            d.w32(QUEUE_SEL, 1);
            d.w32(QUEUE_READY, 0);
            d.w32(QUEUE_NUM, u32::from(QSIZE));
            for (r, a) in [
                (QUEUE_DESC_LOW, QUEUE_BASE[TX]),
                (QUEUE_DRIVER_LOW, QUEUE_BASE[TX] + 0x1000),
                (QUEUE_DEVICE_LOW, QUEUE_BASE[TX] + 0x2000),
            ] {
                let a = if r == reg { addr } else { a };
                d.w32(r, a as u32);
                d.w32(r + 4, (a >> 32) as u32);
            }
            d.w32(QUEUE_READY, 1);
        }
        d.w32(STATUS, RUNNING);
        d.lend(2048);
        d.peer_send(&frame(60, 35));
        assert_eq!(d.serve(), Pass::default(), "{what}");
        assert_ne!(d.r32(STATUS) & S_NEEDS_RESET, 0, "{what}");
        assert_eq!(d.take_interrupt(), INT_CONFIG, "{what}");
        assert_eq!(d.counters().queue_errors, 1, "{what}");
        assert_eq!(d.counters().rx_frames, 0, "{what}");
        // The device stays stopped until reset.
        assert!(!d.dev().serving());
        assert_eq!(d.serve(), Pass::default());
        assert!(d.dev().enable_notification());
        assert_eq!(d.counters().queue_errors, 1, "{what}");
        d.init(F_VERSION_1);
        assert_eq!(d.r32(STATUS) & S_NEEDS_RESET, 0);
        // The frame waited on the wire.
        let (h, at) = d.lend(2048);
        assert_eq!(d.serve().moved, 1, "{what}");
        assert_eq!(d.used(RX), vec![(u32::from(h), 72)]);
        assert_eq!(d.guest_bytes(at + 12, 60), frame(60, 35));
        d.still_works();
    }
}

#[test]
fn rings_outside_the_dma_window_need_a_reset() {
    let mut d = Driver::new();
    // The transmit queue's used ring is left out.
    d.dev()
        .set_dma_ranges(&[0..QUEUE_BASE[TX] + 0x2000, RX_BUFS..MEM_SIZE as u64]);
    d.send(&frame(60, 36));
    d.notify(TX);
    assert_eq!(d.serve(), Pass::default());
    d.wire_silent();
    assert_ne!(d.r32(STATUS) & S_NEEDS_RESET, 0);
    assert_eq!(d.counters().queue_errors, 1);
    assert_eq!(d.take_interrupt(), INT_CONFIG);
    // An empty window leaves nothing, rings included.
    d.dev()
        .set_dma_ranges(&[0..RINGS_END, RX_BUFS..MEM_SIZE as u64]);
    d.init(F_VERSION_1);
    d.still_works();
    d.dev().set_dma_ranges(&[]);
    assert_eq!(d.serve(), Pass::default());
    assert_ne!(d.r32(STATUS) & S_NEEDS_RESET, 0);
    assert_eq!(d.counters().queue_errors, 2);
}

#[test]
fn a_corrupt_available_index_needs_a_reset() {
    for q in [TX, RX] {
        let mut d = Driver::new();
        let f = frame(60, 37);
        d.send(&f);
        // More than a ring's worth ahead of what the device has seen.
        let bogus = d.q[q].avail_idx.wrapping_add(QSIZE + 1);
        d.mem
            .write_obj(bogus, GuestAddress(d.q[q].avail() + 2))
            .unwrap();
        // The receive ring is only looked at with a frame to place.
        let g = frame(70, 38);
        if q == RX {
            d.peer_send(&g);
        }
        d.notify(q);
        assert_eq!(d.serve(), Pass::default(), "queue {q}");
        assert_ne!(d.r32(STATUS) & S_NEEDS_RESET, 0, "queue {q}");
        assert_eq!(d.take_interrupt(), INT_CONFIG, "queue {q}");
        assert_eq!(d.counters().queue_errors, 1, "queue {q}");
        assert!(d.used(RX).is_empty());
        if q == TX {
            assert!(d.used(TX).is_empty());
            d.wire_silent();
        } else {
            // The transmit ring is sound: its frame went out before the
            // receive ring was found broken.
            assert_eq!(d.used(TX).len(), 1);
            assert_eq!(d.peer_recv(), Some(f));
        }
        // Further notifications do nothing until the driver resets.
        d.notify(q);
        assert_eq!(d.serve(), Pass::default());
        assert_eq!(d.irq.take().unwrap(), 0);
        assert_eq!(d.counters().queue_errors, 1);
        d.init(F_VERSION_1);
        assert_eq!(d.r32(STATUS) & S_NEEDS_RESET, 0);
        if q == RX {
            // The frame read before the reset is delivered after it.
            let (h, at) = d.lend(2048);
            assert_eq!(d.serve().moved, 1);
            assert_eq!(d.used(RX), vec![(u32::from(h), 82)]);
            assert_eq!(d.guest_bytes(at + 12, 70), g);
        }
        d.still_works();
    }
}

#[test]
fn event_idx_asks_for_notifications_and_spares_interrupts() {
    let mut d = Driver::raw();
    d.init(F_VERSION_1 | F_EVENT_IDX);
    // avail_event: after each queue's used ring.
    let avail_event = |d: &Driver, q: usize| -> u16 {
        d.mem
            .read_obj(GuestAddress(d.q[q].used() + 4 + 8 * u64::from(QSIZE)))
            .unwrap()
    };
    for q in [RX, TX] {
        d.mem
            .write_obj(
                0x1234u16,
                GuestAddress(d.q[q].used() + 4 + 8 * u64::from(QSIZE)),
            )
            .unwrap();
    }
    // Nothing pending: it may sleep, having asked for the next buffer.
    assert!(d.dev().enable_notification());
    assert_eq!((avail_event(&d, RX), avail_event(&d, TX)), (0, 0));

    // A transmit chain the device has not seen: it must not sleep.
    let f = frame(60, 39);
    d.send(&f);
    assert!(!d.dev().enable_notification());
    d.dev().disable_notification();
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.peer_recv(), Some(f));
    assert!(d.dev().enable_notification());
    assert_eq!(avail_event(&d, TX), 1);
    // The first used buffer interrupts.
    assert_eq!(d.take_interrupt(), INT_VRING);

    // The driver asks to be interrupted only once the used index passes
    // used_event (after the transmit queue's available ring).
    let used_event = GuestAddress(d.q[TX].avail() + 4 + 2 * u64::from(QSIZE));
    d.mem.write_obj(2u16, used_event).unwrap();
    d.send(&frame(60, 40));
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.irq.take().unwrap(), 0, "used index 2, used_event 2");
    d.send(&frame(60, 41));
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.take_interrupt(), INT_VRING, "used index 3 passed 2");
    assert_eq!(d.counters().interrupts, 2);
    assert_eq!(d.counters().tx_frames, 3);
    while d.peer_recv().is_some() {}

    // A receive buffer lent and not yet used is no work: the thread waits
    // on the wire for the frames it will take.
    let (h, _) = d.lend(2048);
    assert!(d.dev().enable_notification());
    d.peer_send(&frame(60, 42));
    assert_eq!(d.serve().moved, 1);
    assert_eq!(d.used(RX), vec![(u32::from(h), 72)]);
    assert!(d.dev().enable_notification());
    assert_eq!(avail_event(&d, RX), 1);
    // A frame with no buffer to go in stays on the wire (not read), and
    // the device asks to be told of the next buffer: the notification
    // for it wakes the thread, which then reads the frame.
    d.peer_send(&frame(60, 43));
    assert_eq!(d.serve().moved, 0);
    assert!(d.dev().enable_notification(), "nothing lent yet");
    assert_eq!(avail_event(&d, RX), 1, "told of the next buffer");
    d.lend(2048);
    assert_eq!(d.serve().moved, 1);
}

/// The gate of a device no one else changes the memory of; counts how
/// often the thread entered it.
struct Plain(Arc<Mutex<VirtioNet>>, Arc<AtomicU64>);

impl Gate<VirtioNet> for Plain {
    fn enter(&mut self, f: &mut dyn FnMut(&mut VirtioNet)) {
        self.1.fetch_add(1, Ordering::Relaxed);
        f(&mut self.0.lock().unwrap())
    }
}

/// Spawns a thread for `d`'s device and hands the device its kick.
fn spawn(d: &Driver, entries: &Arc<AtomicU64>, moved: &Arc<AtomicU64>) -> NetThread {
    let m = moved.clone();
    let report: moat_devices::NetReport = Arc::new(move |n| {
        m.fetch_add(n, Ordering::Relaxed);
    });
    let fd = d.dev().tap_fd();
    let t = NetThread::spawn(
        "net0",
        Box::new(Plain(d.dev.clone(), entries.clone())),
        fd,
        None,
        Some(report),
    )
    .unwrap();
    d.dev().set_kick(Some(t.kick()));
    t
}

/// Drops `t` on another thread; fails if that does not return.
fn stop(t: NetThread) {
    let (done, stopped) = mpsc::channel();
    std::thread::spawn(move || {
        drop(t);
        let _ = done.send(());
    });
    stopped
        .recv_timeout(Duration::from_secs(5))
        .expect("the thread did not stop");
}

#[test]
fn a_net_thread_moves_frames_and_stops_when_dropped() {
    let mut d = Driver::new();
    let entries = Arc::new(AtomicU64::new(0));
    let moved = Arc::new(AtomicU64::new(0));
    let t = spawn(&d, &entries, &moved);
    assert!(format!("{t:?}").contains("NetThread"));

    // Frames in: lend buffers, notify, then the network sends.
    let (h1, a1) = d.lend(2048);
    let (h2, a2) = d.lend(2048);
    d.notify(RX);
    let (f1, f2) = (frame(60, 43), frame(1400, 44));
    d.peer_send(&f1);
    d.peer_send(&f2);
    let mut used = Vec::new();
    eventually("two frames received", || {
        used.extend(d.used(RX));
        used.len() == 2
    });
    assert_eq!(used, vec![(u32::from(h1), 72), (u32::from(h2), 1412)]);
    assert_eq!(d.guest_bytes(a1 + 12, 60), f1);
    assert_eq!(d.guest_bytes(a2 + 12, 1400), f2);

    // A frame waiting for a buffer goes once one is lent.
    let f3 = frame(100, 45);
    d.peer_send(&f3);
    std::thread::sleep(Duration::from_millis(20));
    let (h3, a3) = d.lend(2048);
    d.notify(RX);
    let mut used = Vec::new();
    eventually("the waiting frame", || {
        used.extend(d.used(RX));
        !used.is_empty()
    });
    assert_eq!(used, vec![(u32::from(h3), 112)]);
    assert_eq!(d.guest_bytes(a3 + 12, 100), f3);

    // Frames out.
    let out = frame(500, 46);
    let head = d.send(&out);
    d.notify(TX);
    let mut got = None;
    eventually("a frame on the wire", || {
        got = d.peer_recv();
        got.is_some()
    });
    assert_eq!(got, Some(out));
    let mut used = Vec::new();
    eventually("the transmit chain returned", || {
        used.extend(d.used(TX));
        !used.is_empty()
    });
    assert_eq!(used, vec![(u32::from(head), 0)]);
    eventually("the moves reported", || moved.load(Ordering::Relaxed) == 4);
    let c = d.counters();
    assert_eq!((c.rx_frames, c.tx_frames), (3, 1));

    // Stopped: nothing moves any more.
    stop(t);
    let before = entries.load(Ordering::Relaxed);
    d.lend(2048);
    d.notify(RX);
    d.peer_send(&frame(60, 47));
    d.send(&frame(60, 48));
    d.notify(TX);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(entries.load(Ordering::Relaxed), before);
    assert_eq!(d.counters().rx_frames, 3);
    d.wire_silent();
}

/// The thread is meant to sleep in `poll` (on its kick and the wire) once
/// idle, receive buffers lent or not. It enters the gate a few times per
/// second when asleep, thousands when it spins.
#[test]
fn an_idle_net_thread_sleeps_with_buffers_lent() {
    let mut d = Driver::raw();
    d.init(F_VERSION_1 | F_EVENT_IDX);
    let entries = Arc::new(AtomicU64::new(0));
    let moved = Arc::new(AtomicU64::new(0));
    let t = spawn(&d, &entries, &moved);
    // Idle without buffers: the thread sleeps (the measure works).
    std::thread::sleep(Duration::from_millis(100));
    let before = entries.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let idle_without = entries.load(Ordering::Relaxed) - before;
    // Idle with buffers lent.
    d.lend(2048);
    d.lend(2048);
    d.notify(RX);
    std::thread::sleep(Duration::from_millis(100));
    let before = entries.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let idle_with = entries.load(Ordering::Relaxed) - before;
    // It still receives.
    d.peer_send(&frame(60, 49));
    eventually("a frame received", || !d.used(RX).is_empty());
    stop(t);
    assert!(
        idle_without < 50,
        "{idle_without} gate entries without buffers"
    );
    assert!(
        idle_with < 50,
        "{idle_with} gate entries in 300 ms with buffers lent"
    );
}

/// A hostile driver and a hostile network at once: random chains on both
/// queues, random register writes, scribbled rings, random datagrams.
/// Nothing may panic or hang, and a reset always brings the device back.
#[test]
fn random_hostile_driver_and_network_do_not_break_the_device() {
    let mut d = Driver::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut resets = 0;
    for _ in 0..3000 {
        if d.r32(STATUS) != RUNNING || !d.dev().serving() {
            d.dev().set_dma_ranges(std::slice::from_ref(&(0..u64::MAX)));
            d.init(F_VERSION_1 | if rnd() % 2 == 0 { F_EVENT_IDX } else { 0 });
            resets += 1;
        }
        match rnd() % 16 {
            0..=8 => {
                let q = (rnd() % 2) as usize;
                let mut bufs = Vec::new();
                if rnd() % 4 != 0 {
                    // Plausible: a frame to send in one to three pieces,
                    // or a buffer large enough for any frame.
                    let at = [RX_BUFS, TX_BUFS][q] + SLOT * (rnd() % 16);
                    if q == TX {
                        let len = 26 + rnd() % 1505;
                        let cut = rnd() % len;
                        bufs.push(Buf(at, cut as u32, false));
                        bufs.push(Buf(at + cut, (len - cut) as u32, false));
                    } else {
                        bufs.push(Buf(at, 2048, true));
                    }
                }
                for _ in 0..rnd() % 3 {
                    let addr = match rnd() % 8 {
                        0 => OUTSIDE + rnd() % 0x1000,
                        1 => rnd(),
                        2 => MEM_SIZE as u64 - rnd() % 0x1000,
                        _ => [RX_BUFS, TX_BUFS][q] + rnd() % 0x10000,
                    };
                    let len = match rnd() % 4 {
                        0 => rnd() as u32,
                        _ => rnd() as u32 % 2000,
                    };
                    bufs.push(Buf(addr, len, (q == RX) != (rnd() % 8 == 0)));
                }
                if bufs.is_empty() {
                    bufs.push(Buf(rnd(), rnd() as u32, rnd() % 2 == 0));
                }
                let head = d.write_chain(q, &bufs);
                if rnd() % 8 == 0 {
                    // A loop, or out of the table, or indirect.
                    let last = head + bufs.len() as u16 - 1;
                    let flags = D_NEXT | if rnd() % 2 == 0 { 4 } else { 0 };
                    let target = (rnd() % u64::from(QSIZE + 8)) as u16;
                    d.write_desc(q, last, bufs[bufs.len() - 1], flags, target);
                }
                d.offer(q, if rnd() % 32 == 0 { rnd() as u16 } else { head });
                if rnd() % 2 == 0 {
                    d.notify(q);
                }
            }
            9 if rnd() % 8 == 0 => {
                // A driver that starts over.
                d.w32(STATUS, 0);
            }
            9 => {
                let off = (rnd() % 0x110) & !3;
                if off != STATUS || rnd() % 4 == 0 {
                    d.w32(off, rnd() as u32);
                }
            }
            10 if rnd() % 4 == 0 => {
                // An available index far ahead.
                let q = (rnd() % 2) as usize;
                let idx = d.q[q]
                    .avail_idx
                    .wrapping_add(QSIZE + 1 + rnd() as u16 % 1000);
                d.mem
                    .write_obj(idx, GuestAddress(d.q[q].avail() + 2))
                    .unwrap();
            }
            10 => {
                let at = QUEUE_BASE[0] + rnd() % (RINGS_END - QUEUE_BASE[0]);
                d.mem.write_obj(rnd() as u16, GuestAddress(at)).unwrap();
            }
            11 => {
                let start = rnd() % MEM_SIZE as u64;
                d.dev()
                    .set_dma_ranges(&[0..RINGS_END, start..start + rnd() % 0x40000]);
            }
            _ => {
                for _ in 0..rnd() % 4 {
                    let len = match rnd() % 4 {
                        0 => (rnd() % 4000) as usize,
                        _ => 14 + (rnd() % 1505) as usize,
                    };
                    // The socket's buffer may be full: the frame is lost.
                    let _ = d.wire.send(&frame(len, rnd() as u8));
                }
            }
        }
        d.serve();
        if rnd() % 4 == 0 {
            let _ = d.dev().enable_notification();
            d.dev().disable_notification();
        }
        while d.peer_recv().is_some() {}
        let _ = d.irq.take();
    }
    let c = d.counters();
    assert!(c.tx_frames > 20 && c.rx_frames > 20, "{c:?}");
    assert!(c.refused > 100 && c.rx_dropped > 10, "{c:?}");
    assert!(c.queue_errors > 0 && resets > 1, "{c:?}");

    d.dev().set_dma_ranges(std::slice::from_ref(&(0..u64::MAX)));
    d.init(F_VERSION_1);
    // Drain the wire, then check both ways work.
    d.lend(2048);
    while d.serve().moved > 0 {
        d.lend(2048);
    }
    let _ = d.irq.take();
    d.init(F_VERSION_1);
    d.still_works();
}
