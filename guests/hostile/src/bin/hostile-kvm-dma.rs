//! `hostile-kvm-dma DIR TARGET...`: a hostile virtio-blk driver on the kvm
//! host that points the granted device `blk0` at memory it may not reach.
//! DIR is `in` (a disk read: the device writes TARGET), `out` (a disk
//! write: the device reads TARGET and would put it on the disk) or `ring`
//! (the queue's rings themselves at TARGET). TARGET is an address in hex
//! or a name: `readonly` (a page this driver made read-only), `text` (its
//! own code), `straddle` (512 bytes that start in its memory and end in a
//! page it never had).
//!
//! The device serves its queue on a thread of its own, so after each
//! notification the driver waits (up to a second) for the request to come
//! back in the used ring, or for the device to say it needs a reset,
//! before it judges the attempt.
//!
//! Prints `REFUSED <target> ...` for each attempt the device refused and
//! `ESCAPED <target>` for one it carried out; then one honest request
//! (`OK honest request`). Exit 0 when it could run the attempts, 2 when
//! the device is missing. Memory the device was refused must read as
//! before (`ESCAPED ... changed` otherwise).
#![no_std]
#![no_main]
extern crate alloc;

#[path = "../common.rs"]
mod common;

use moat_libos::device::Device;
use moat_libos::moat_pal::prot;
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
const NEEDS_RESET: u32 = 0x40;
const PAGE: u64 = 4096;
/// How long the device may take to serve a request.
const SERVE_MICROS: u64 = 1_000_000;

/// Polls `done` until it holds or [`SERVE_MICROS`] have passed.
fn wait_until(done: impl Fn() -> bool) -> bool {
    let t0 = moat_libos::time::now_micros();
    while !done() {
        if moat_libos::time::elapsed_micros(t0) > SERVE_MICROS {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn rd(a: u64) -> u8 {
    // SAFETY: the caller passes memory this driver may read.
    unsafe { (a as *const u8).read_volatile() }
}

fn wr(a: u64, v: u8) {
    // SAFETY: the caller passes memory this driver owns read-write.
    unsafe { (a as *mut u8).write_volatile(v) }
}

fn main() -> i32 {
    let dir = common::arg(1);
    let dev = match Device::open("blk0") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("hostile-kvm-dma: cannot open blk0: {}", e.name());
            return 2;
        }
    };
    let Ok(m) = dev.map_mmio() else {
        return 2;
    };
    if m.read32(0) != 0x7472_6976 || m.read32(8) != 2 {
        return 2;
    }
    let p = pal();
    let mem = p.dk_virtual_memory_alloc(0, 0x6000, common::RW);
    if mem <= 0 {
        return 3;
    }
    let mem = mem as u64;
    // The last page is read-only (with a known byte), the one before it
    // is freed again: the straddling buffer ends there.
    wr(mem + 0x5000, 0xa5);
    let _ = p.dk_virtual_memory_protect(mem + 0x5000, PAGE, prot::READ);
    let _ = p.dk_virtual_memory_free(mem + 0x4000, PAGE);
    // Reset the device and start it with its rings at `rings` (fresh
    // rings when they are ours).
    let start = |rings: u64| {
        m.write32(STATUS, 0);
        if rings == mem {
            // SAFETY: the three ring pages are ours.
            unsafe { core::ptr::write_bytes(mem as *mut u8, 0, 0x3000) };
        }
        m.write32(STATUS, 1 | 2);
        m.write32(DRIVER_FEATURES_SEL, 1);
        m.write32(DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        m.write32(DRIVER_FEATURES_SEL, 0);
        m.write32(DRIVER_FEATURES, 0);
        m.write32(STATUS, 1 | 2 | 8);
        m.write32(QUEUE_SEL, 0);
        m.write32(QUEUE_NUM, QSIZE as u32);
        let set = |off: usize, v: u64| {
            m.write32(off, v as u32);
            m.write32(off + 4, (v >> 32) as u32);
        };
        set(DESC, rings);
        set(DRIVER, rings + 0x1000);
        set(DEVICE, rings + 0x2000);
        m.write32(QUEUE_READY, 1);
        m.write32(STATUS, 1 | 2 | 4 | 8);
    };
    let hdr = mem + 0x3000;
    let status = hdr + 0x100;
    let buffer = hdr + 0x200;
    // One request of `kind` (0 read, 1 write) on `addr`, as the first of
    // fresh rings; whether it completed, and the status byte.
    let request = |rings: u64, kind: u8, addr: u64| -> (bool, u8) {
        for i in 0..16 {
            wr(hdr + i, 0);
        }
        wr(hdr, kind);
        wr(status, 0xff);
        let head = 0u16;
        let desc = |i: u16, a: u64, len: u32, flags: u16, nx: u16| {
            let d = (rings + i as u64 * 16) as *mut u8;
            // SAFETY: the descriptor table is our page (honest rings).
            unsafe {
                (d as *mut u64).write_volatile(a);
                (d.add(8) as *mut u32).write_volatile(len);
                (d.add(12) as *mut u16).write_volatile(flags);
                (d.add(14) as *mut u16).write_volatile(nx);
            }
        };
        let data_flags = if kind == 0 { 1 | 2 } else { 1 };
        desc(head, hdr, 16, 1, head + 1);
        desc(head + 1, addr, 512, data_flags, head + 2);
        desc(head + 2, status, 1, 2, 0);
        // SAFETY: the avail ring is the second page of our rings.
        let before = unsafe {
            let a = (rings + 0x1000) as *mut u16;
            let idx = a.add(1).read_volatile();
            a.add(2 + (idx % QSIZE) as usize).write_volatile(head);
            a.add(1).write_volatile(idx.wrapping_add(1));
            ((rings + 0x2002) as *const u16).read_volatile()
        };
        m.write32(QUEUE_NOTIFY, 0);
        // SAFETY: the used ring is the third page of our rings.
        let used = || unsafe { ((rings + 0x2002) as *const u16).read_volatile() };
        let done = wait_until(|| used() != before);
        (done, rd(status))
    };
    let mut refused_all = true;
    for t in moat_libos::env::args().iter().skip(2) {
        let addr = match t.as_str() {
            "readonly" => mem + 0x5000,
            "text" => main as *const () as u64,
            "straddle" => mem + 0x4000 - 256,
            h => u64::from_str_radix(h.trim_start_matches("0x"), 16).unwrap_or(0),
        };
        let readable = matches!(t.as_str(), "readonly" | "text");
        let before = if readable { rd(addr) } else { 0 };
        if dir == "ring" {
            start(addr);
            m.write32(QUEUE_NOTIFY, 0);
            if wait_until(|| m.read32(STATUS) & NEEDS_RESET != 0) {
                println!("REFUSED {t} (rings: the device needs a reset)");
            } else {
                refused_all = false;
                println!("ESCAPED {t} (the device took rings there)");
            }
            continue;
        }
        start(mem);
        let (done, s) = request(mem, u8::from(dir == "out"), addr);
        if s == 0 {
            refused_all = false;
            println!("ESCAPED {t} ({dir}, done {done})");
        } else if readable && rd(addr) != before {
            refused_all = false;
            println!("ESCAPED {t} changed ({dir})");
        } else {
            println!("REFUSED {t} ({dir}, status {s})");
        }
    }
    start(mem);
    match request(mem, 0, buffer) {
        (true, 0) => println!("OK honest request"),
        (done, s) => println!("FAIL honest request (done {done}, status {s})"),
    }
    if refused_all {
        0
    } else {
        common::ESCAPED
    }
}
