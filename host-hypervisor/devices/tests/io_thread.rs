//! A `VirtioBlk` served by its `IoThread`, driven through its registers and
//! a split virtqueue laid out by hand, as a guest driver would with
//! `VIRTIO_RING_F_EVENT_IDX`: requests complete without a notification
//! while the thread polls, a notification wakes a sleeping thread,
//! interrupts come only when `used_event` asks, and a guest that scribbles
//! on its rings while the thread runs gets a device that needs a reset,
//! never a stuck or crashed thread.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_devices::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use moat_devices::{Device, Gate, IoConfig, IoEvent, IoThread, Irq, VirtioBlk};

const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;

const S_NEEDS_RESET: u32 = 64;
const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;
const T_IN: u32 = 0;

const QSIZE: u16 = 16;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const HEADERS: u64 = 0x8000;
const DATA: u64 = 0x10000;
const SECTORS: u64 = 64;

/// The gate of a device no one else changes the memory of.
struct Plain(Arc<Mutex<VirtioBlk>>);

impl Gate<VirtioBlk> for Plain {
    fn enter(&mut self, f: &mut dyn FnMut(&mut VirtioBlk)) {
        f(&mut self.0.lock().unwrap())
    }
}

#[derive(Default)]
struct Seen {
    served: AtomicU64,
    sleeps: AtomicU64,
}

struct Guest {
    dev: Arc<Mutex<VirtioBlk>>,
    mem: GuestMemoryMmap<()>,
    irq: Irq,
    seen: Arc<Seen>,
    io: Option<IoThread>,
    avail: u16,
    used_seen: u16,
    _dir: tempfile::TempDir,
}

impl Guest {
    /// A device over a disk whose sector `s` is filled with `s`, served
    /// by an I/O thread that sleeps after `spin` of polling.
    fn new(spin: Duration) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mut f = File::create(&path).unwrap();
        let content: Vec<u8> = (0..SECTORS * 512).map(|i| (i / 512) as u8).collect();
        f.write_all(&content).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Irq::new().unwrap();
        let mut blk = VirtioBlk::new(
            "blk0",
            File::options().read(true).write(true).open(&path).unwrap(),
            mem.clone(),
            irq.try_clone().unwrap(),
        )
        .unwrap();
        blk.set_event_idx(true);
        let dev = Arc::new(Mutex::new(blk));
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        let io = IoThread::spawn(
            "blk0",
            Box::new(Plain(dev.clone())),
            IoConfig {
                spin,
                prologue: None,
                report: Some(Arc::new(move |e| match e {
                    IoEvent::Served(n) => {
                        s.served.fetch_add(n, Ordering::SeqCst);
                    }
                    IoEvent::Slept => {
                        s.sleeps.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                })),
            },
        )
        .unwrap();
        dev.lock().unwrap().set_kick(Some(io.kick()));
        let mut g = Guest {
            dev,
            mem,
            irq,
            seen,
            io: Some(io),
            avail: 0,
            used_seen: 0,
            _dir: dir,
        };
        g.start();
        g
    }

    fn w32(&self, off: u64, v: u32) {
        self.dev.lock().unwrap().mmio_write(off, &v.to_le_bytes());
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.lock().unwrap().mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn start(&mut self) {
        self.w32(STATUS, 0);
        self.w32(STATUS, 1 | 2);
        self.w32(DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.r32(DEVICE_FEATURES));
        self.w32(DEVICE_FEATURES_SEL, 1);
        let hi = u64::from(self.r32(DEVICE_FEATURES));
        assert_ne!((hi << 32 | lo) & F_EVENT_IDX, 0, "EVENT_IDX offered");
        let want = F_VERSION_1 | F_EVENT_IDX;
        self.w32(DRIVER_FEATURES_SEL, 0);
        self.w32(DRIVER_FEATURES, want as u32);
        self.w32(DRIVER_FEATURES_SEL, 1);
        self.w32(DRIVER_FEATURES, (want >> 32) as u32);
        self.w32(STATUS, 1 | 2 | 8);
        assert_ne!(self.r32(STATUS) & 8, 0);
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(DESC_TABLE))
            .unwrap();
        self.w32(QUEUE_SEL, 0);
        self.w32(QUEUE_NUM, u32::from(QSIZE));
        self.w32(QUEUE_DESC_LOW, DESC_TABLE as u32);
        self.w32(QUEUE_DRIVER_LOW, AVAIL_RING as u32);
        self.w32(QUEUE_DEVICE_LOW, USED_RING as u32);
        self.w32(QUEUE_READY, 1);
        self.w32(STATUS, 1 | 2 | 8 | 4);
        self.avail = 0;
        self.used_seen = 0;
    }

    fn put<T: moat_devices::vm_memory::ByteValued>(&self, at: u64, v: T) {
        self.mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    fn get<T: moat_devices::vm_memory::ByteValued>(&self, at: u64) -> T {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Offers a one-sector read of `sector` in slot `slot` (descriptors
    /// 3·slot..3·slot+2) and publishes it; returns whether the driver must
    /// notify (vring_need_event against the device's avail_event).
    fn offer_read(&mut self, slot: u16, sector: u64) -> bool {
        let hdr = HEADERS + 32 * u64::from(slot);
        self.put(hdr, T_IN.to_le());
        self.put(hdr + 8, sector.to_le());
        self.put(hdr + 16, 0xeeu8);
        let d = 3 * slot;
        let bufs = [
            (hdr, 16u32, 0u16),
            (DATA + 512 * u64::from(slot), 512, D_WRITE),
            (hdr + 16, 1, D_WRITE),
        ];
        for (k, (addr, len, flags)) in bufs.iter().enumerate() {
            let i = d + k as u16;
            let at = DESC_TABLE + 16 * u64::from(i);
            let last = k == 2;
            self.put(at, addr.to_le());
            self.put(at + 8, len.to_le());
            self.put(at + 12, (flags | if last { 0 } else { D_NEXT }).to_le());
            self.put(at + 14, (if last { 0 } else { i + 1 }).to_le());
        }
        let old = self.avail;
        self.put(AVAIL_RING + 4 + 2 * u64::from(old % QSIZE), d.to_le());
        self.avail = old.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.put(AVAIL_RING + 2, self.avail.to_le());
        std::sync::atomic::fence(Ordering::SeqCst);
        let event: u16 = self.get(USED_RING + 4 + 8 * u64::from(QSIZE));
        self.avail.wrapping_sub(event).wrapping_sub(1) < self.avail.wrapping_sub(old)
    }

    /// Asks for an interrupt at the next used buffer (`used_event`).
    fn want_interrupt(&self) {
        self.put(
            AVAIL_RING + 4 + 2 * u64::from(QSIZE),
            self.used_seen.to_le(),
        );
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Never asks for an interrupt while polling (`used_event` far behind).
    fn no_interrupts(&self) {
        let far = self.used_seen.wrapping_sub(0x8000);
        self.put(AVAIL_RING + 4 + 2 * u64::from(QSIZE), far.to_le());
    }

    /// Polls the used ring until `n` more buffers are used (or 5 s).
    fn wait_used(&mut self, n: u16) -> Vec<u32> {
        let t = Instant::now();
        let mut heads = Vec::new();
        while heads.len() < usize::from(n) {
            let idx: u16 = self.get(USED_RING + 2);
            while self.used_seen != idx {
                let at = USED_RING + 4 + 8 * u64::from(self.used_seen % QSIZE);
                heads.push(self.get::<u32>(at));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "requests did not complete"
            );
            std::thread::yield_now();
        }
        heads
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Stops and joins the thread: it must not be stuck.
        drop(self.io.take());
    }
}

#[test]
fn a_polling_thread_serves_without_notifications_or_interrupts() {
    let mut g = Guest::new(Duration::from_secs(5));
    // No interrupts, from the first request on (set before it: a fresh
    // ring's used_event, 0, asks for one at the first completion, which
    // may come before this thread gets to write it).
    g.no_interrupts();
    // The first request: the fresh ring's avail_event (0) asks for it.
    assert!(g.offer_read(0, 1));
    g.w32(QUEUE_NOTIFY, 0);
    g.wait_used(1);
    // Whether the thread slept before that first notification depends on
    // which got there first; from here on it must not.
    let slept_before = g.seen.sleeps.load(Ordering::SeqCst);
    // Now the thread polls: no notification is asked for, and none is
    // needed.
    let mut notified = 0;
    for round in 0..50u64 {
        for slot in 0..5 {
            if g.offer_read(slot, (round + u64::from(slot)) % SECTORS) {
                notified += 1;
            }
        }
        let heads = g.wait_used(5);
        assert_eq!(heads.len(), 5);
        for slot in 0..5u64 {
            let status: u8 = g.get(HEADERS + 32 * slot + 16);
            assert_eq!(status, 0);
            let byte: u8 = g.get(DATA + 512 * slot + 100);
            assert_eq!(u64::from(byte), (round + slot) % SECTORS);
        }
    }
    assert_eq!(notified, 0, "a polling device asked for notifications");
    assert_eq!(g.irq.take().unwrap(), 0, "interrupts nobody asked for");
    assert_eq!(g.seen.served.load(Ordering::SeqCst), 251);
    assert_eq!(g.seen.sleeps.load(Ordering::SeqCst), slept_before);
}

#[test]
fn a_sleeping_thread_asks_for_a_notification_and_wakes_on_it() {
    let mut g = Guest::new(Duration::from_micros(100));
    for i in 0..20u64 {
        // Let the thread run out of spin and go to sleep: before it
        // sleeps it sets avail_event to the next index it will look at.
        let t = Instant::now();
        while g.get::<u16>(USED_RING + 4 + 8 * u64::from(QSIZE)) != g.avail {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the thread never slept"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        g.want_interrupt();
        assert!(
            g.offer_read(0, i),
            "a sleeping device must be notified (request {i})"
        );
        g.w32(QUEUE_NOTIFY, 0);
        g.wait_used(1);
        // It asked for the interrupt: it got one.
        let t = Instant::now();
        while g.irq.take().unwrap() == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "no interrupt");
            std::thread::yield_now();
        }
        let byte: u8 = g.get(DATA + 100);
        assert_eq!(u64::from(byte), i);
    }
    // Each time the thread asked for a notification; it slept on it
    // unless the request came between its asking and its sleep (then it
    // takes it without sleeping, as it should: on a loaded machine that
    // happens often). It slept at least once.
    assert!(g.seen.sleeps.load(Ordering::SeqCst) >= 1);
}

#[test]
fn scribbled_rings_make_the_device_need_a_reset_not_the_thread_stop() {
    let mut g = Guest::new(Duration::from_millis(1));
    assert!(g.offer_read(0, 2));
    g.w32(QUEUE_NOTIFY, 0);
    g.wait_used(1);
    // An available index a ring and more ahead, while the thread polls;
    // and a notification, for a thread that went to sleep meanwhile (its
    // spin is 1 ms: a busy machine can delay this test longer).
    g.put(AVAIL_RING + 2, g.avail.wrapping_add(QSIZE + 3).to_le());
    g.w32(QUEUE_NOTIFY, 0);
    let t = Instant::now();
    while g.r32(STATUS) & S_NEEDS_RESET == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "no NEEDS_RESET");
        std::thread::yield_now();
    }
    // Garbage everywhere; the driver resets and starts again.
    let junk: Vec<u8> = (0..0x3000u32).map(|i| (i * 37 + 11) as u8).collect();
    g.mem.write_slice(&junk, GuestAddress(DESC_TABLE)).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    g.start();
    assert!(g.offer_read(1, 7));
    g.w32(QUEUE_NOTIFY, 0);
    g.wait_used(1);
    let byte: u8 = g.get(DATA + 512 + 3);
    assert_eq!(byte, 7);
    // Descriptors pointing outside guest memory: refused, the thread
    // goes on.
    g.put(DESC_TABLE + 16 * 3, 0xffff_ffff_0000u64.to_le());
    g.put(
        AVAIL_RING + 4 + 2 * u64::from(g.avail % QSIZE),
        3u16.to_le(),
    );
    g.avail = g.avail.wrapping_add(1);
    g.put(AVAIL_RING + 2, g.avail.to_le());
    g.w32(QUEUE_NOTIFY, 0);
    g.wait_used(1);
    assert!(g.dev.lock().unwrap().counters().refused >= 1);
    assert!(g.offer_read(2, 9) || g.r32(STATUS) & S_NEEDS_RESET == 0);
    g.w32(QUEUE_NOTIFY, 0);
    g.wait_used(1);
    let byte: u8 = g.get(DATA + 1024);
    assert_eq!(byte, 9);
}
