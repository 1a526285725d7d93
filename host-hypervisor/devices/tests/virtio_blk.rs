//! Drives a `VirtioBlk` through its MMIO registers the way a guest driver
//! would, with the split virtqueue laid out by hand in real guest memory and
//! a real backing file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use moat_devices::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use moat_devices::{
    Device, Irq, VirtioBlk, MAX_REQUEST_BYTES, QUEUE_MAX_SIZE, SEG_MAX, VIRTIO_BLK_MMIO_SIZE,
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

// Feature bits.
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_VERSION_1: u64 = 1 << 32;

// Descriptor flags.
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;
const D_INDIRECT: u16 = 4;

// Request types and status codes.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// What the driver puts in the status byte before submitting, to see
/// whether the device wrote it.
const S_UNTOUCHED: u8 = 0xee;

// Guest memory layout.
const MEM_SIZE: usize = 4 << 20;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const INDIRECT_TABLE: u64 = 0x5000;
const HEADER: u64 = 0x8000;
const STATUS_BYTE: u64 = 0x8100;
const DATA: u64 = 0x10000;
const OUTSIDE: u64 = 0x1_0000_0000;

const DISK_SECTORS: u64 = 128;
const QSIZE: u16 = 256;

/// A descriptor: guest address, length, device-writable.
#[derive(Clone, Copy)]
struct Buf(u64, u32, bool);

struct Driver {
    dev: VirtioBlk,
    mem: GuestMemoryMmap<()>,
    irq: Irq,
    disk: File,
    _dir: tempfile::TempDir,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    /// A device over a fresh 64 KiB disk, not yet initialised.
    fn raw() -> Driver {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mut disk = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let content: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i / 512) as u8).collect();
        disk.write_all(&content).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Irq::new().unwrap();
        let dev = VirtioBlk::new(
            "blk0",
            File::options().read(true).write(true).open(&path).unwrap(),
            mem.clone(),
            irq.try_clone().unwrap(),
        )
        .unwrap();
        Driver {
            dev,
            mem,
            irq,
            disk,
            _dir: dir,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// A device the driver has set up and started.
    fn new() -> Driver {
        let mut d = Driver::raw();
        d.init(F_VERSION_1 | F_FLUSH | F_BLK_SIZE | F_SEG_MAX);
        d
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0xffu8; 4];
        self.dev.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.dev.mmio_write(off, &v.to_le_bytes());
    }

    fn config64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dev.mmio_read(CONFIG + off, &mut b);
        u64::from_le_bytes(b)
    }

    fn features(&mut self) -> u64 {
        self.w32(DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(DEVICE_FEATURES);
        self.w32(DEVICE_FEATURES_SEL, 1);
        let hi = self.r32(DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Negotiates `features`; true if the device accepted them.
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

    fn setup_queue(&mut self, size: u16) {
        self.w32(QUEUE_SEL, 0);
        assert_eq!(self.r32(QUEUE_READY), 0);
        assert_eq!(self.r32(QUEUE_NUM_MAX), u32::from(QUEUE_MAX_SIZE));
        self.w32(QUEUE_NUM, u32::from(size));
        self.w32(QUEUE_DESC_LOW, DESC_TABLE as u32);
        self.w32(QUEUE_DESC_HIGH, (DESC_TABLE >> 32) as u32);
        self.w32(QUEUE_DRIVER_LOW, AVAIL_RING as u32);
        self.w32(QUEUE_DRIVER_HIGH, (AVAIL_RING >> 32) as u32);
        self.w32(QUEUE_DEVICE_LOW, USED_RING as u32);
        self.w32(QUEUE_DEVICE_HIGH, (USED_RING >> 32) as u32);
        // Clear the rings.
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(AVAIL_RING))
            .unwrap();
        self.w32(QUEUE_READY, 1);
        assert_eq!(self.r32(QUEUE_READY), 1);
        self.avail_idx = 0;
        self.used_seen = 0;
    }

    fn init(&mut self, features: u64) {
        assert!(self.negotiate(features));
        self.setup_queue(QSIZE);
        self.w32(
            STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        assert_eq!(
            self.r32(STATUS),
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
    }

    fn write_desc(&self, table: u64, i: u16, b: Buf, flags: u16, next: u16) {
        let at = table + 16 * u64::from(i);
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

    /// Writes `bufs` as a chain at descriptor `first` onwards.
    fn write_chain(&self, table: u64, first: u16, bufs: &[Buf]) {
        for (k, b) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let last = k + 1 == bufs.len();
            let flags = if last { 0 } else { D_NEXT };
            self.write_desc(table, i, *b, flags, if last { 0 } else { i + 1 });
        }
    }

    /// Offers the chain starting at descriptor `head`.
    fn offer(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    fn notify(&mut self) {
        self.w32(QUEUE_NOTIFY, 0);
    }

    /// New used-ring entries: (id, len).
    fn used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % QSIZE);
            let at = USED_RING + 4 + 8 * slot;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Waits (here: checks) for the interrupt, then acknowledges it.
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

    fn header(&self, kind: u32, sector: u64) {
        self.mem
            .write_obj(kind.to_le(), GuestAddress(HEADER))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(HEADER + 8))
            .unwrap();
        self.mem
            .write_obj(S_UNTOUCHED, GuestAddress(STATUS_BYTE))
            .unwrap();
    }

    /// Submits header + `data` + status as one chain at descriptor 0,
    /// notifies, and returns (status byte, used length).
    fn request(&mut self, kind: u32, sector: u64, data: &[Buf]) -> (u8, u32) {
        self.header(kind, sector);
        let mut bufs = vec![Buf(HEADER, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push(Buf(STATUS_BYTE, 1, true));
        self.submit(&bufs)
    }

    /// Submits an arbitrary chain at descriptor 0 and completes it.
    fn submit(&mut self, bufs: &[Buf]) -> (u8, u32) {
        self.write_chain(DESC_TABLE, 0, bufs);
        self.offer(0);
        self.notify();
        assert_eq!(self.take_interrupt() & 1, 1);
        let used = self.used();
        assert_eq!(used.len(), 1, "one completion expected");
        assert_eq!(used[0].0, 0);
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS_BYTE)).unwrap();
        (status, used[0].1)
    }

    fn disk_bytes(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.disk.seek(SeekFrom::Start(offset)).unwrap();
        self.disk.read_exact(&mut v).unwrap();
        v
    }

    fn guest_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn fill_guest(&self, at: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
    }

    /// A plain one-sector read that must succeed: the device still works.
    fn still_works(&mut self) {
        let (status, len) = self.request(T_IN, 3, &[Buf(DATA, 512, true)]);
        assert_eq!((status, len), (S_OK, 513));
        assert_eq!(self.guest_bytes(DATA, 512), vec![3u8; 512]);
    }
}

#[test]
fn registers_identify_a_virtio_mmio_v2_block_device() {
    let mut d = Driver::raw();
    assert_eq!(d.dev.name(), "blk0");
    assert_eq!(d.dev.mmio_size(), VIRTIO_BLK_MMIO_SIZE);
    assert_eq!(d.dev.io_ports(), 0);
    assert_eq!(d.r32(MAGIC), 0x7472_6976);
    assert_eq!(d.r32(VERSION), 2);
    assert_eq!(d.r32(DEVICE_ID), 2);
    assert_eq!(d.r32(VENDOR_ID), u32::from_le_bytes(*b"moat"));
    assert_eq!(d.r32(CONFIG_GENERATION), 0);
    let f = d.features();
    assert_eq!(f, F_VERSION_1 | F_FLUSH | F_BLK_SIZE | F_SEG_MAX);
    assert_eq!(f & F_RO, 0);
    d.w32(DEVICE_FEATURES_SEL, 2);
    assert_eq!(d.r32(DEVICE_FEATURES), 0);

    // Config space: capacity (u64, also as two u32 halves), seg_max, blk_size.
    assert_eq!(d.config64(0), DISK_SECTORS);
    assert_eq!(d.dev.capacity_sectors(), DISK_SECTORS);
    assert_eq!(d.r32(CONFIG), DISK_SECTORS as u32);
    assert_eq!(d.r32(CONFIG + 4), 0);
    assert_eq!(d.r32(CONFIG + 0x0c), SEG_MAX);
    assert_eq!(d.r32(CONFIG + 0x14), 512);
    let mut b = [0u8; 1];
    d.dev.mmio_read(CONFIG, &mut b);
    assert_eq!(b[0], DISK_SECTORS as u8);
    let mut w = [0u8; 2];
    d.dev.mmio_read(CONFIG + 0x14, &mut w);
    assert_eq!(u16::from_le_bytes(w), 512);
    // Past the config structure, or odd widths: zeros.
    assert_eq!(d.r32(CONFIG + 0x40), 0);
    assert_eq!(d.r32(VIRTIO_BLK_MMIO_SIZE - 4), 0);
    assert_eq!(d.r32(u64::MAX - 1), 0);
    let mut odd = [0xffu8; 3];
    d.dev.mmio_read(CONFIG, &mut odd);
    assert_eq!(odd, [0; 3]);
    // Config space is read-only.
    d.w32(CONFIG, 0);
    assert_eq!(d.config64(0), DISK_SECTORS);

    // Registers: wrong widths and misaligned accesses read zero, writes do nothing.
    let mut narrow = [0xffu8; 2];
    d.dev.mmio_read(MAGIC, &mut narrow);
    assert_eq!(narrow, [0, 0]);
    let mut wide = [0xffu8; 8];
    d.dev.mmio_read(MAGIC, &mut wide);
    assert_eq!(wide, [0; 8]);
    assert_eq!(d.r32(MAGIC + 1), 0);
    d.dev.mmio_write(STATUS, &[S_ACKNOWLEDGE as u8]);
    assert_eq!(d.r32(STATUS), 0);
    d.dev.mmio_write(STATUS + 2, &1u32.to_le_bytes());
    assert_eq!(d.r32(STATUS), 0);
    // Unknown registers.
    assert_eq!(d.r32(0x0c0), 0);
    d.w32(0x0c0, 1);
    d.w32(0x028, 4096);
    // No I/O ports.
    let mut p = [0xffu8; 1];
    d.dev.pio_read(0, &mut p);
    assert_eq!(p, [0]);
    d.dev.pio_write(0, &[1]);
}

#[test]
fn feature_negotiation_refuses_what_was_not_offered() {
    let mut d = Driver::raw();
    assert!(!d.negotiate(F_VERSION_1 | F_INDIRECT_DESC));
    assert_eq!(d.r32(STATUS), S_ACKNOWLEDGE | S_DRIVER);
    assert!(!d.negotiate(F_FLUSH), "VERSION_1 is required");
    assert!(d.negotiate(F_VERSION_1));
    assert_eq!(d.dev.driver_features(), F_VERSION_1);
    // Features are frozen once accepted.
    d.w32(DRIVER_FEATURES_SEL, 0);
    d.w32(DRIVER_FEATURES, F_FLUSH as u32);
    assert_eq!(d.dev.driver_features(), F_VERSION_1);
    // Clearing status bits without a reset is ignored.
    d.w32(STATUS, S_ACKNOWLEDGE);
    assert_eq!(d.r32(STATUS), S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    // The driver cannot set NEEDS_RESET.
    d.w32(
        STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_NEEDS_RESET,
    );
    assert_eq!(d.r32(STATUS) & S_NEEDS_RESET, 0);
    // Reset.
    d.w32(STATUS, 0);
    assert_eq!(d.r32(STATUS), 0);
    assert_eq!(d.dev.driver_features(), 0);
}

#[test]
fn write_then_read_back_and_backing_file_changes() {
    let mut d = Driver::new();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 1) as u8).collect();
    d.fill_guest(DATA, &pattern);
    let (status, len) = d.request(T_OUT, 10, &[Buf(DATA, 1024, false)]);
    assert_eq!((status, len), (S_OK, 1));
    assert_eq!(d.disk_bytes(10 * 512, 1024), pattern);
    // Neighbouring sectors untouched.
    assert_eq!(d.disk_bytes(9 * 512, 512), vec![9u8; 512]);
    assert_eq!(d.disk_bytes(12 * 512, 512), vec![12u8; 512]);

    d.fill_guest(DATA + 0x10000, &[0u8; 1024]);
    let (status, len) = d.request(T_IN, 10, &[Buf(DATA + 0x10000, 1024, true)]);
    assert_eq!((status, len), (S_OK, 1025));
    assert_eq!(d.guest_bytes(DATA + 0x10000, 1024), pattern);

    let c = d.dev.counters();
    assert_eq!(c.requests, 2);
    assert_eq!(c.writes, 1);
    assert_eq!(c.reads, 1);
    assert_eq!(c.bytes_written, 1024);
    assert_eq!(c.bytes_read, 1024);
    assert_eq!(c.refused, 0);
    assert_eq!(c.io_errors, 0);
    assert_eq!(c.notifications, 2);
}

#[test]
fn requests_split_across_many_descriptors() {
    let mut d = Driver::new();
    // Header split in two, data in three uneven pieces, status alone.
    d.header(T_OUT, 20);
    let data: Vec<u8> = (0..1536u32).map(|i| (i % 251) as u8).collect();
    d.fill_guest(DATA, &data[..100]);
    d.fill_guest(DATA + 0x1000, &data[100..1000]);
    d.fill_guest(DATA + 0x2000, &data[1000..]);
    let (status, len) = d.submit(&[
        Buf(HEADER, 5, false),
        Buf(HEADER + 5, 11, false),
        Buf(DATA, 100, false),
        Buf(DATA + 0x1000, 900, false),
        Buf(DATA + 0x2000, 536, false),
        Buf(STATUS_BYTE, 1, true),
    ]);
    assert_eq!((status, len), (S_OK, 1));
    assert_eq!(d.disk_bytes(20 * 512, 1536), data);

    // Read it back into two buffers, the second one also holding the status
    // byte at its end.
    d.header(T_IN, 20);
    let (status, len) = d.submit(&[
        Buf(HEADER, 16, false),
        Buf(DATA + 0x4000, 1000, true),
        Buf(DATA + 0x5000, 537, true),
    ]);
    assert_eq!(len, 1537);
    assert_eq!(
        status, S_UNTOUCHED,
        "the status byte is the chain's last byte"
    );
    assert_eq!(d.guest_bytes(DATA + 0x5000 + 536, 1), vec![S_OK]);
    let mut back = d.guest_bytes(DATA + 0x4000, 1000);
    back.extend(d.guest_bytes(DATA + 0x5000, 536));
    assert_eq!(back, data);
}

#[test]
fn several_chains_per_notification() {
    let mut d = Driver::new();
    for (i, sector) in [(0u16, 1u64), (3, 2), (6, 5)] {
        let hdr = HEADER + 0x20 * u64::from(i);
        d.mem.write_obj(T_IN, GuestAddress(hdr)).unwrap();
        d.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        d.fill_guest(STATUS_BYTE + u64::from(i), &[S_UNTOUCHED]);
        d.write_chain(
            DESC_TABLE,
            i,
            &[
                Buf(hdr, 16, false),
                Buf(DATA + 0x1000 * u64::from(i), 512, true),
                Buf(STATUS_BYTE + u64::from(i), 1, true),
            ],
        );
        d.offer(i);
    }
    d.notify();
    assert_eq!(d.irq.take().unwrap(), 1, "one interrupt for the batch");
    let used = d.used();
    assert_eq!(used, vec![(0, 513), (3, 513), (6, 513)]);
    for (i, sector) in [(0u16, 1u8), (3, 2), (6, 5)] {
        assert_eq!(
            d.guest_bytes(DATA + 0x1000 * u64::from(i), 512),
            vec![sector; 512]
        );
        assert_eq!(d.guest_bytes(STATUS_BYTE + u64::from(i), 1), vec![S_OK]);
    }
    assert_eq!(d.dev.interrupt_status(), 1);
}

#[test]
fn flush_get_id_and_unsupported() {
    let mut d = Driver::new();
    let (status, len) = d.request(T_FLUSH, 0, &[]);
    assert_eq!((status, len), (S_OK, 1));
    assert_eq!(d.dev.counters().flushes, 1);

    let (status, len) = d.request(T_GET_ID, 0, &[Buf(DATA, 20, true)]);
    assert_eq!((status, len), (S_OK, 21));
    let mut want = [0u8; 20];
    want[..9].copy_from_slice(b"moat-blk0");
    assert_eq!(d.guest_bytes(DATA, 20), want);
    assert_eq!(d.dev.id(), want);

    let (status, len) = d.request(T_DISCARD, 0, &[Buf(DATA, 16, false)]);
    assert_eq!((status, len), (S_UNSUPP, 1));
    assert_eq!(d.dev.counters().unsupported, 1);
}

#[test]
fn out_of_range_and_malformed_transfers_fail_with_ioerr() {
    let mut d = Driver::new();
    // The last sector is fine, one past it is not.
    let (status, _) = d.request(T_IN, DISK_SECTORS - 1, &[Buf(DATA, 512, true)]);
    assert_eq!(status, S_OK);
    assert_eq!(
        d.guest_bytes(DATA, 512),
        vec![(DISK_SECTORS - 1) as u8; 512]
    );
    let (status, len) = d.request(T_IN, DISK_SECTORS, &[Buf(DATA, 512, true)]);
    assert_eq!((status, len), (S_IOERR, 1));
    let (status, _) = d.request(T_IN, DISK_SECTORS - 1, &[Buf(DATA, 1024, true)]);
    assert_eq!(status, S_IOERR);
    d.fill_guest(DATA, &[0xaa; 1024]);
    let (status, _) = d.request(T_OUT, DISK_SECTORS - 1, &[Buf(DATA, 1024, false)]);
    assert_eq!(status, S_IOERR);
    assert_eq!(
        d.disk_bytes((DISK_SECTORS - 1) * 512, 512),
        vec![127u8; 512]
    );
    // Offsets that overflow.
    let (status, _) = d.request(T_IN, u64::MAX, &[Buf(DATA, 512, true)]);
    assert_eq!(status, S_IOERR);
    let (status, _) = d.request(T_OUT, u64::MAX / 512, &[Buf(DATA, 512, false)]);
    assert_eq!(status, S_IOERR);
    // Not whole sectors.
    let (status, _) = d.request(T_IN, 0, &[Buf(DATA, 100, true)]);
    assert_eq!(status, S_IOERR);
    // Over the per-request limit (the disk is too small anyway, but the
    // limit is checked first, before any buffer is allocated).
    let (status, _) = d.request(
        T_IN,
        0,
        &[Buf(DATA, (MAX_REQUEST_BYTES + 512) as u32, true)],
    );
    assert_eq!(status, S_IOERR);
    let c = d.dev.counters();
    assert_eq!(c.io_errors, 7);
    assert_eq!(c.refused, 0);
    d.still_works();
}

#[test]
fn larger_disk_allows_a_full_size_request() {
    let mut d = Driver::raw();
    // Grow the disk to 2 MiB before the device reads its size.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.img");
    let f = File::create(&path).unwrap();
    f.set_len(2 << 20).unwrap();
    let mut dev = VirtioBlk::new(
        "big",
        File::options().read(true).write(true).open(&path).unwrap(),
        d.mem.clone(),
        d.irq.try_clone().unwrap(),
    )
    .unwrap();
    std::mem::swap(&mut d.dev, &mut dev);
    d.init(F_VERSION_1);
    assert_eq!(d.config64(0), 4096);
    d.fill_guest(DATA, &vec![0x5a; MAX_REQUEST_BYTES]);
    let (status, _) = d.request(T_OUT, 100, &[Buf(DATA, MAX_REQUEST_BYTES as u32, false)]);
    assert_eq!(status, S_OK);
    let (status, len) = d.request(
        T_IN,
        100,
        &[Buf(
            DATA + MAX_REQUEST_BYTES as u64,
            MAX_REQUEST_BYTES as u32,
            true,
        )],
    );
    assert_eq!((status, len), (S_OK, MAX_REQUEST_BYTES as u32 + 1));
    assert_eq!(
        d.guest_bytes(DATA + MAX_REQUEST_BYTES as u64, MAX_REQUEST_BYTES),
        vec![0x5a; MAX_REQUEST_BYTES]
    );
}

#[test]
fn read_only_device_refuses_writes() {
    let mut d = Driver::raw();
    d.dev.set_read_only(true);
    assert_ne!(d.features() & F_RO, 0);
    d.init(F_VERSION_1 | F_RO);
    d.fill_guest(DATA, &[1; 512]);
    let (status, _) = d.request(T_OUT, 0, &[Buf(DATA, 512, false)]);
    assert_eq!(status, S_IOERR);
    assert_eq!(d.disk_bytes(0, 512), vec![0u8; 512]);
    d.still_works();
}

#[test]
fn buffer_outside_guest_memory_is_refused() {
    let mut d = Driver::new();
    let (status, len) = d.request(T_IN, 0, &[Buf(OUTSIDE, 512, true)]);
    // The status byte is separate and valid: it reports the failure.
    assert_eq!((status, len), (S_IOERR, 1));
    let (status, _) = d.request(T_OUT, 0, &[Buf(OUTSIDE, 512, false)]);
    assert_eq!(status, S_IOERR);
    // Straddling the end of memory.
    let (status, _) = d.request(T_OUT, 0, &[Buf(MEM_SIZE as u64 - 256, 512, false)]);
    assert_eq!(status, S_IOERR);
    // Address that wraps around.
    let (status, _) = d.request(T_IN, 0, &[Buf(u64::MAX - 100, 512, true)]);
    assert_eq!(status, S_IOERR);
    // Header outside memory.
    let (status, _) = d.submit(&[
        Buf(OUTSIDE, 16, false),
        Buf(DATA, 512, true),
        Buf(STATUS_BYTE, 1, true),
    ]);
    assert_eq!(status, S_IOERR);
    assert_eq!(d.dev.counters().refused, 5);
    assert_eq!(d.disk_bytes(0, 512), vec![0u8; 512]);
    d.still_works();
}

#[test]
fn status_outside_memory_drops_the_chain() {
    let mut d = Driver::new();
    d.header(T_IN, 0);
    d.write_chain(
        DESC_TABLE,
        0,
        &[
            Buf(HEADER, 16, false),
            Buf(DATA, 512, true),
            Buf(OUTSIDE, 1, true),
        ],
    );
    d.offer(0);
    d.notify();
    d.take_interrupt();
    // Returned with nothing written.
    assert_eq!(d.used(), vec![(0, 0)]);
    // No device-writable buffer at all, and no header.
    let (status, len) = d.submit(&[Buf(HEADER, 16, false)]);
    assert_eq!((status, len), (S_UNTOUCHED, 0));
    let (status, len) = d.submit(&[Buf(HEADER, 8, false), Buf(STATUS_BYTE, 1, true)]);
    assert_eq!((status, len), (S_IOERR, 1));
    assert_eq!(d.dev.counters().refused, 3);
    d.still_works();
}

#[test]
fn descriptor_loops_and_long_chains_are_bounded() {
    let mut d = Driver::new();
    d.header(T_IN, 0);
    // 0 -> 1 -> 0 -> ...
    d.write_desc(DESC_TABLE, 0, Buf(HEADER, 16, false), D_NEXT, 1);
    d.write_desc(DESC_TABLE, 1, Buf(DATA, 512, true), D_NEXT, 0);
    d.offer(0);
    // A descriptor pointing at itself.
    d.write_desc(DESC_TABLE, 5, Buf(STATUS_BYTE, 1, true), D_NEXT, 5);
    d.offer(5);
    // A chain with a next index beyond the queue.
    d.write_desc(DESC_TABLE, 7, Buf(HEADER, 16, false), D_NEXT, 4000);
    d.offer(7);
    d.notify();
    d.take_interrupt();
    let used = d.used();
    assert_eq!(used.len(), 3);
    assert_eq!(used[0], (0, 0));
    assert_eq!(used[1], (5, 0));
    assert_eq!(used[2], (7, 0));

    // A well-formed chain longer than SEG_MAX + 2 descriptors.
    let n = SEG_MAX as usize + 3;
    let mut bufs = vec![Buf(HEADER, 16, false)];
    bufs.extend((0..n - 2).map(|i| Buf(DATA + 512 * i as u64, 512, true)));
    bufs.push(Buf(STATUS_BYTE, 1, true));
    d.header(T_IN, 1);
    let (status, len) = d.submit(&bufs);
    assert_eq!((status, len), (S_UNTOUCHED, 0));
    // SEG_MAX data segments are accepted (this request is one sector too
    // long for the disk, though).
    bufs.remove(1);
    d.header(T_IN, 1);
    let (status, len) = d.submit(&bufs);
    assert_eq!((status, len), (S_IOERR, 1), "disk is only 128 sectors");
    bufs.truncate(1 + 64);
    bufs.push(Buf(STATUS_BYTE, 1, true));
    d.header(T_IN, 1);
    let (status, len) = d.submit(&bufs);
    assert_eq!((status, len), (S_OK, 64 * 512 + 1));
    assert_eq!(d.dev.counters().refused, 4);
    d.still_works();
}

#[test]
fn bad_head_index_and_corrupt_avail_index() {
    let mut d = Driver::new();
    // A head index beyond the queue: skipped, nothing returned.
    d.offer(QSIZE + 3);
    d.notify();
    assert!(d.used().is_empty());
    assert_eq!(d.dev.counters().refused, 1);
    d.still_works();

    // An available index more than a ring ahead: the device gives up on the
    // queue and asks for a reset, without touching anything.
    d.mem
        .write_obj(
            d.avail_idx.wrapping_add(QSIZE + 1),
            GuestAddress(AVAIL_RING + 2),
        )
        .unwrap();
    d.notify();
    assert_eq!(d.take_interrupt(), 2, "configuration interrupt");
    assert_ne!(d.r32(STATUS) & S_NEEDS_RESET, 0);
    assert_eq!(d.dev.counters().queue_errors, 1);
    // Further notifications are ignored until the driver resets the device.
    d.notify();
    assert_eq!(d.irq.take().unwrap(), 0);
    d.init(F_VERSION_1);
    assert_eq!(d.r32(STATUS) & S_NEEDS_RESET, 0);
    d.still_works();
}

#[test]
fn rings_outside_memory_need_a_reset() {
    let mut d = Driver::raw();
    assert!(d.negotiate(F_VERSION_1));
    d.w32(QUEUE_NUM, u32::from(QSIZE));
    d.w32(QUEUE_DESC_LOW, 0);
    d.w32(QUEUE_DESC_HIGH, 1);
    d.w32(QUEUE_DRIVER_LOW, AVAIL_RING as u32);
    d.w32(QUEUE_DEVICE_LOW, (MEM_SIZE - 0x100) as u32);
    d.w32(QUEUE_READY, 1);
    d.w32(
        STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    d.notify();
    assert_eq!(d.take_interrupt(), 2);
    assert_ne!(d.dev.device_status() & S_NEEDS_RESET, 0);
}

#[test]
fn queue_configuration_is_frozen_while_ready() {
    let mut d = Driver::new();
    d.w32(QUEUE_NUM, 16);
    d.w32(QUEUE_DESC_LOW, 0x9000);
    d.w32(QUEUE_DEVICE_LOW, 0x9000);
    d.still_works();
    // Other queue indices do not exist.
    d.w32(QUEUE_SEL, 1);
    assert_eq!(d.r32(QUEUE_NUM_MAX), 0);
    assert_eq!(d.r32(QUEUE_READY), 0);
    d.w32(QUEUE_READY, 0);
    d.w32(QUEUE_NOTIFY, 1);
    d.w32(QUEUE_SEL, 0);
    assert_eq!(d.r32(QUEUE_READY), 1);
    d.still_works();
    // Invalid sizes are ignored: a queue of 256 stays.
    d.w32(QUEUE_READY, 0);
    d.w32(QUEUE_NUM, 100);
    d.w32(QUEUE_NUM, 0);
    d.w32(QUEUE_NUM, 1 << 20);
    d.w32(QUEUE_READY, 1);
    d.still_works();
}

#[test]
fn notifications_before_driver_ok_are_ignored() {
    let mut d = Driver::raw();
    assert!(d.negotiate(F_VERSION_1));
    d.setup_queue(QSIZE);
    d.header(T_IN, 0);
    d.write_chain(
        DESC_TABLE,
        0,
        &[
            Buf(HEADER, 16, false),
            Buf(DATA, 512, true),
            Buf(STATUS_BYTE, 1, true),
        ],
    );
    d.offer(0);
    d.notify();
    assert!(d.used().is_empty());
    assert_eq!(d.irq.take().unwrap(), 0);
    d.w32(
        STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    d.notify();
    assert_eq!(d.used(), vec![(0, 513)]);
}

#[test]
fn dma_window_refuses_everything_outside() {
    let mut d = Driver::new();
    // Window: rings, header, status and the first data page only.
    d.dev.set_dma_window(0, DATA + 0x1000);
    d.still_works();
    let (status, _) = d.request(T_IN, 0, &[Buf(DATA + 0x1000, 512, true)]);
    assert_eq!(status, S_IOERR);
    // Straddling the end of the window.
    let (status, _) = d.request(T_IN, 0, &[Buf(DATA + 0x1000 - 256, 512, true)]);
    assert_eq!(status, S_IOERR);
    assert_eq!(d.guest_bytes(DATA + 0x1000 - 256, 256), vec![0u8; 256]);
    d.fill_guest(DATA + 0x2000, &[9; 512]);
    let (status, _) = d.request(T_OUT, 0, &[Buf(DATA + 0x2000, 512, false)]);
    assert_eq!(status, S_IOERR);
    assert_eq!(d.disk_bytes(0, 512), vec![0u8; 512]);
    assert_eq!(d.dev.counters().refused, 3);

    // Several ranges.
    d.dev
        .set_dma_ranges(&[0..DATA, DATA + 0x2000..DATA + 0x3000]);
    let (status, _) = d.request(T_OUT, 0, &[Buf(DATA + 0x2000, 512, false)]);
    assert_eq!(status, S_OK);
    assert_eq!(d.disk_bytes(0, 512), vec![9u8; 512]);

    // Lifting it.
    d.dev.clear_dma_window();
    let (status, _) = d.request(T_IN, 0, &[Buf(DATA + 0x100000, 512, true)]);
    assert_eq!(status, S_OK);

    // A window that excludes the rings stops the queue.
    d.dev.set_dma_window(DATA, MEM_SIZE as u64);
    d.header(T_IN, 0);
    d.write_chain(
        DESC_TABLE,
        0,
        &[
            Buf(HEADER, 16, false),
            Buf(DATA, 512, true),
            Buf(STATUS_BYTE, 1, true),
        ],
    );
    d.offer(0);
    d.notify();
    assert_eq!(d.take_interrupt(), 2);
    assert!(d.used().is_empty());
    assert_ne!(d.r32(STATUS) & S_NEEDS_RESET, 0);
}

#[test]
fn indirect_tables_obey_the_dma_window() {
    let mut d = Driver::new();
    // The device does not offer VIRTIO_F_INDIRECT_DESC, but a hostile
    // driver may use the flag anyway: the table is still read through the
    // same checked, windowed memory.
    d.header(T_IN, 4);
    d.write_chain(
        INDIRECT_TABLE,
        0,
        &[
            Buf(HEADER, 16, false),
            Buf(DATA, 512, true),
            Buf(STATUS_BYTE, 1, true),
        ],
    );
    d.write_desc(DESC_TABLE, 0, Buf(INDIRECT_TABLE, 48, false), D_INDIRECT, 0);
    d.offer(0);
    d.notify();
    d.take_interrupt();
    assert_eq!(d.used(), vec![(0, 513)]);
    assert_eq!(d.guest_bytes(DATA, 512), vec![4u8; 512]);

    // Same request with the indirect table outside the window.
    d.dev
        .set_dma_ranges(&[0..INDIRECT_TABLE, INDIRECT_TABLE + 0x1000..MEM_SIZE as u64]);
    d.header(T_IN, 5);
    d.offer(0);
    d.notify();
    d.take_interrupt();
    assert_eq!(d.used(), vec![(0, 0)]);
    assert_eq!(d.guest_bytes(DATA, 512), vec![4u8; 512]);
    assert_eq!(d.guest_bytes(STATUS_BYTE, 1), vec![S_UNTOUCHED]);
    assert_eq!(d.dev.counters().refused, 1);

    // An indirect table pointing outside guest memory.
    d.dev.clear_dma_window();
    d.write_desc(DESC_TABLE, 0, Buf(OUTSIDE, 48, false), D_INDIRECT, 0);
    d.offer(0);
    d.notify();
    d.take_interrupt();
    assert_eq!(d.used(), vec![(0, 0)]);
    assert_eq!(d.dev.counters().refused, 2);
}

#[test]
fn reset_clears_the_queue() {
    let mut d = Driver::new();
    d.still_works();
    d.w32(STATUS, 0);
    assert_eq!(d.r32(STATUS), 0);
    assert_eq!(d.r32(QUEUE_READY), 0);
    assert_eq!(d.r32(INTERRUPT_STATUS), 0);
    d.init(F_VERSION_1 | F_FLUSH);
    d.still_works();
}

/// A hostile driver: random requests with random flaws, random register
/// writes, random ring and descriptor contents, a moving DMA window.
/// Nothing may panic or hang, and a reset always brings the device back.
#[test]
fn random_hostile_driver_does_not_break_the_device() {
    let mut d = Driver::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut resets = 0;
    for _ in 0..5000 {
        let running = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
        if d.r32(STATUS) != running || d.r32(QUEUE_READY) != 1 {
            d.dev.clear_dma_window();
            d.init(F_VERSION_1 | F_FLUSH);
            resets += 1;
        }
        match rnd() % 16 {
            0..=7 => {
                // A request, most of it plausible, some of it not.
                let kind =
                    [T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, rnd() as u32][(rnd() % 6) as usize];
                let sector = match rnd() % 4 {
                    0 => rnd(),
                    _ => rnd() % (DISK_SECTORS + 4),
                };
                d.header(kind, sector);
                let mut bufs = vec![Buf(HEADER, 16, false)];
                for _ in 0..rnd() % 4 {
                    let addr = match rnd() % 8 {
                        0 => OUTSIDE + rnd() % 0x1000,
                        1 => rnd(),
                        2 => MEM_SIZE as u64 - rnd() % 0x1000,
                        _ => DATA + (rnd() % 0x100) * 0x200,
                    };
                    let len = match rnd() % 4 {
                        0 => rnd() as u32 % 0x3000,
                        _ => 512 * (rnd() as u32 % 8),
                    };
                    bufs.push(Buf(addr, len, rnd() % 4 != 0));
                }
                if rnd() % 8 != 0 {
                    bufs.push(Buf(STATUS_BYTE, 1, true));
                }
                let first = (rnd() % 64) as u16;
                if rnd() % 4 == 0 {
                    d.write_chain(INDIRECT_TABLE, 0, &bufs);
                    let len = 16 * bufs.len() as u32 + if rnd() % 8 == 0 { 3 } else { 0 };
                    d.write_desc(
                        DESC_TABLE,
                        first,
                        Buf(INDIRECT_TABLE, len, false),
                        D_INDIRECT,
                        0,
                    );
                } else {
                    d.write_chain(DESC_TABLE, first, &bufs);
                }
                if rnd() % 8 == 0 {
                    // Make it a loop or send it out of the table.
                    let last = first + bufs.len() as u16 - 1;
                    let target = (rnd() % u64::from(QSIZE + 8)) as u16;
                    d.write_desc(DESC_TABLE, last, bufs[bufs.len() - 1], D_NEXT, target);
                }
                d.offer(first);
                d.notify();
            }
            8 => {
                let off = (rnd() % 0x110) & !3;
                if off != STATUS || rnd() % 4 == 0 {
                    d.w32(off, rnd() as u32);
                }
            }
            9 => {
                // Scribble on the descriptor table or the rings.
                let at = DESC_TABLE + rnd() % 0x3000;
                d.mem.write_obj(rnd() as u16, GuestAddress(at)).unwrap();
            }
            10 => {
                let i = (rnd() % u64::from(QSIZE)) as u16;
                let b = Buf(rnd(), rnd() as u32, false);
                d.write_desc(DESC_TABLE, i, b, (rnd() % 8) as u16, rnd() as u16);
                d.offer(i);
            }
            11 => {
                let start = rnd() % MEM_SIZE as u64;
                match rnd() % 3 {
                    0 => d.dev.set_dma_window(start, start + rnd() % 0x100000),
                    1 => d.dev.set_dma_window(0, DATA + rnd() % 0x20000),
                    _ => d.dev.clear_dma_window(),
                }
            }
            _ => d.notify(),
        }
        let _ = d.irq.take();
    }
    let c = d.dev.counters();
    assert!(c.requests > 1000, "{c:?}");
    assert!(c.refused > 100, "{c:?}");
    assert!(c.reads > 10 && c.writes > 10 && c.io_errors > 10, "{c:?}");
    assert!(
        c.unsupported > 10 && c.get_ids > 10 && c.flushes > 10,
        "{c:?}"
    );
    assert!(c.queue_errors > 0 && resets > 1, "{c:?}");

    d.dev.clear_dma_window();
    d.init(F_VERSION_1);
    let (status, len) = d.request(T_IN, 3, &[Buf(DATA, 512, true)]);
    assert_eq!((status, len), (S_OK, 513));
}
