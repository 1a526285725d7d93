//! `hostile-dma [DEVICE=blk0]`: a hostile virtio-blk driver. It drives the
//! device's virtio-mmio registers by hand and asks it to read sector 0
//! into memory that is not the picoprocess's: beyond guest RAM, in the
//! device-window area, in guest RAM it never allocated, and over the
//! VMM's own low area. Then it makes one honest request, to show the
//! device still works. The device serves its queue on a thread of its
//! own, so after each notification the driver waits (up to a second) for
//! the request to come back in the used ring before it judges it.
//!
//! Prints one line per attempt: `REFUSED <what> (status S)` when the
//! device refused, `ESCAPED <what>` when it claims success; then
//! `OK honest request` or `FAIL honest request`. Exit 0 when it could run
//! the attempts, 2 when the device is missing.
#![no_std]
#![no_main]
extern crate alloc;

use moat_libos::device::Device;
use moat_libos::{eprintln, pal, println, Pal};

moat_libos::entry!(main);

const STATUS: usize = 0x70;
const QUEUE_SEL: usize = 0x30;
const QUEUE_NUM: usize = 0x38;
const QUEUE_READY: usize = 0x44;
const QUEUE_NOTIFY: usize = 0x50;
const DRIVER_FEATURES: usize = 0x20;
const DRIVER_FEATURES_SEL: usize = 0x24;
const DESC: usize = 0x80;
const DRIVER: usize = 0x90;
const DEVICE: usize = 0xa0;
const QSIZE: u16 = 8;

struct Queue {
    mem: u64,
    next: u16,
}

impl Queue {
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = (self.mem + i as u64 * 16) as *mut u8;
        // SAFETY: `mem` is a page this driver allocated; descriptor i < 8
        // lies in its first 128 bytes.
        unsafe {
            (d as *mut u64).write_volatile(addr);
            (d.add(8) as *mut u32).write_volatile(len);
            (d.add(12) as *mut u16).write_volatile(flags);
            (d.add(14) as *mut u16).write_volatile(next);
        }
    }

    fn avail(&self) -> *mut u16 {
        (self.mem + 0x1000) as *mut u16
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: the used ring is the third page of `mem`.
        unsafe { ((self.mem + 0x2000 + 2) as *const u16).read_volatile() }
    }
}

fn main() -> i32 {
    let args = moat_libos::env::args();
    let name = args.get(1).map_or("blk0", |s| s.as_str());
    let dev = match Device::open(name) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("hostile-dma: cannot open `{name}`: {}", e.name());
            return 2;
        }
    };
    let Ok(m) = dev.map_mmio() else {
        eprintln!("hostile-dma: `{name}` has no MMIO window");
        return 2;
    };
    if m.read32(0) != 0x7472_6976 || m.read32(8) != 2 {
        eprintln!("hostile-dma: `{name}` is not a virtio block device");
        return 2;
    }
    m.write32(STATUS, 0);
    m.write32(STATUS, 1 | 2);
    m.write32(DRIVER_FEATURES_SEL, 1);
    m.write32(DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    m.write32(DRIVER_FEATURES_SEL, 0);
    m.write32(DRIVER_FEATURES, 0);
    m.write32(STATUS, 1 | 2 | 8);
    let p = pal();
    let mem = p.dk_virtual_memory_alloc(0, 0x4000, 3);
    if mem <= 0 {
        return 3;
    }
    let q = Queue {
        mem: mem as u64,
        next: 0,
    };
    m.write32(QUEUE_SEL, 0);
    m.write32(QUEUE_NUM, QSIZE as u32);
    let set = |off: usize, v: u64| {
        m.write32(off, v as u32);
        m.write32(off + 4, (v >> 32) as u32);
    };
    set(DESC, q.mem);
    set(DRIVER, q.mem + 0x1000);
    set(DEVICE, q.mem + 0x2000);
    m.write32(QUEUE_READY, 1);
    m.write32(STATUS, 1 | 2 | 4 | 8);

    // Header (type IN = 0, sector 0) and status byte in our last page.
    let hdr = q.mem + 0x3000;
    let status = hdr + 0x100;
    let buffer = hdr + 0x200;
    // SAFETY: all inside the 16 KiB this driver allocated.
    unsafe { core::ptr::write_bytes(hdr as *mut u8, 0, 16) };
    let targets: [(&str, u64); 5] = [
        ("beyond guest RAM (256 GiB)", 0x40_0000_0000),
        ("the device-window area", 0xc000_0000),
        ("guest RAM never allocated", 0x3000_0000),
        ("the VMM's low area (page tables)", 0x1000),
        ("our own memory (honest request)", buffer),
    ];
    let mut q = q;
    for (what, addr) in targets {
        // SAFETY: the status byte is ours; 0xff marks "not written".
        unsafe { (status as *mut u8).write_volatile(0xff) };
        let head = (q.next * 3) % QSIZE;
        q.desc(head, hdr, 16, 1, head + 1);
        q.desc(head + 1, addr, 512, 1 | 2, head + 2);
        q.desc(head + 2, status, 1, 2, 0);
        let before = q.used_idx();
        // SAFETY: the avail ring is the second page of our memory.
        unsafe {
            let a = q.avail();
            let idx = a.add(1).read_volatile();
            a.add(2 + (idx % QSIZE) as usize).write_volatile(head);
            a.add(1).write_volatile(idx.wrapping_add(1));
        }
        q.next += 1;
        m.write32(QUEUE_NOTIFY, 0);
        let t0 = moat_libos::time::now_micros();
        while q.used_idx() == before && moat_libos::time::elapsed_micros(t0) < 1_000_000 {
            core::hint::spin_loop();
        }
        let done = q.used_idx() != before;
        // SAFETY: our status byte.
        let s = unsafe { (status as *const u8).read_volatile() };
        let honest = addr == buffer;
        match (honest, done, s) {
            (true, true, 0) => println!("OK honest request"),
            (true, _, _) => println!("FAIL honest request (done {done}, status {s})"),
            (false, _, 0) => println!("ESCAPED {what}"),
            (false, _, _) => println!("REFUSED {what} (status {s})"),
        }
        if m.read32(STATUS) & 0x40 != 0 {
            // DEVICE_NEEDS_RESET: start over for the next attempt.
            println!("device asked for a reset");
            break;
        }
    }
    0
}
