//! `virtio-blk DEVICE COMMAND ...`: a virtio-blk driver for the virtio-mmio
//! device granted as `dev:DEVICE`, built on `virtio_drivers`' `VirtIOBlk`
//! through moat-libos-virtio's Hal. Sectors are 512 bytes.
//!
//! Commands (numbers are decimal, or hexadecimal after `0x`):
//!
//! - `serve SECTION [FAULTS]`: serve the disk to the safe mediator over
//!   the rings in the shared section `shm:SECTION` (see
//!   `moat_libos::service`); FAULTS makes it misbehave on purpose.
//! - `check SECTORS SEED`: writes sectors `0..SECTORS` with the pattern of
//!   [`fill_pattern`] for SEED, flushes, reads them back and compares. Prints
//!   `virtio-blk: capacity N sectors, wrote S sectors, read back S sectors,
//!   all match`; on a difference prints the first differing sector on stderr
//!   and exits 1.
//! - `read-bench COUNT`: reads COUNT blocks of 4096 bytes (8 sectors) at
//!   pseudo-random 4096-byte-aligned offsets inside the capacity (the same
//!   offsets every run), timed with the host clock. Prints
//!   `virtio-blk: COUNT reads of 4096 bytes in T us`.
//! - `dump SECTOR`: prints one sector as 32 lines `OOO: XX XX ...`: the byte
//!   offset (3 hex digits) and 16 bytes in two-digit lowercase hex.
//!
//! **Requests in flight.** Reads and writes go through the non-blocking
//! calls (`read_blocks_nb`, `write_blocks_nb`): `serve` keeps up to
//! [`SLOTS`] requests in the device's queue at once (virtio-drivers' block
//! queue has 16 descriptors, and a read or write takes three), each in the
//! request's own buffer of the shared section, so the device reads and
//! writes the mediator's buffers in place. The other commands run one
//! request at a time through the same path. The flush is
//! `VirtIOBlk::flush`, which polls the used ring; it starts only once
//! nothing else is in flight.
//!
//! **No exits at steady state.** The transport is wrapped in
//! `moat_libos_virtio::EventIdx`, which negotiates
//! `VIRTIO_RING_F_EVENT_IDX`: the driver notifies the device (an MMIO
//! write, a VM exit) only when the device said it is going to sleep, and
//! the device raises no interrupt unless the driver asked before waiting.
//! While requests are in flight the driver polls the used ring; it waits
//! on the interrupt event (a call, an exit) only after the device has been
//! quiet for the spin bound, asking for the interrupt first and looking
//! once more. The interrupt is an event here, not a level: the driver does
//! not acknowledge it in `InterruptStatus` (two more exits per wait).
//!
//! Exit codes: 0 success; 1 `check` read back different data; 2 bad
//! arguments (also: sectors beyond the capacity); 3 the device cannot be
//! opened or initialised, is not a virtio block device, or (for `check`) is
//! read-only; 4 a request failed or did not complete within 10 s.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::ptr::NonNull;

use moat_libos::device::Interrupt;
use moat_libos::env::parse_u64;
use moat_libos::service::{op, serve_queued, status, BlockRequest, Faults, QueuedBlockDevice};
use moat_libos::{env, eprintln, print, println, process, time};
use moat_libos_virtio::virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use moat_libos_virtio::virtio_drivers::transport::mmio::MmioTransport;
use moat_libos_virtio::virtio_drivers::transport::{DeviceType, Transport};
use moat_libos_virtio::virtio_drivers::Error as VirtioError;
use moat_libos_virtio::{EventIdx, MoatHal, Rings};

moat_libos::entry!(main);

const EXIT_MISMATCH: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_DEVICE: i32 = 3;
const EXIT_IO: i32 = 4;

/// How long the device may go without completing anything while
/// requests are in flight.
const REQUEST_TIMEOUT_MICROS: u64 = 10_000_000;
/// Requests in the device's queue at once.
const SLOTS: usize = 5;
/// How long `check`, `read-bench` and `dump` poll for a request before
/// they wait for the interrupt.
const POLL_MICROS: u64 = 50;
/// Sectors per request in `check`.
const CHUNK_SECTORS: u64 = 64;
/// Sectors per `read-bench` read (4096 bytes).
const BENCH_SECTORS: u64 = 8;

const USAGE: &str = "usage: virtio-blk DEVICE serve SECTION [SEED:PER_MILLION:KINDS]\n       \
                     virtio-blk DEVICE check SECTORS SEED\n       \
                     virtio-blk DEVICE read-bench COUNT\n       \
                     virtio-blk DEVICE dump SECTOR";

enum Command {
    Serve {
        section: String,
        faults: Option<Faults>,
    },
    Check {
        sectors: u64,
        seed: u64,
    },
    ReadBench {
        count: u64,
    },
    Dump {
        sector: u64,
    },
}

fn parse(args: &[String]) -> Option<(&str, Command)> {
    let arg = |i: usize| args.get(i).and_then(|s| parse_u64(s));
    let (dev, cmd) = (args.first()?, args.get(1)?.as_str());
    let command = match (cmd, args.len()) {
        ("check", 4) => Command::Check {
            sectors: arg(2).filter(|&n| n > 0)?,
            seed: arg(3)?,
        },
        ("read-bench", 3) => Command::ReadBench { count: arg(2)? },
        ("dump", 3) => Command::Dump { sector: arg(2)? },
        ("serve", 3) | ("serve", 4) => Command::Serve {
            section: args[2].clone(),
            faults: match args.get(3) {
                Some(f) => Some(Faults::parse(f)?),
                None => None,
            },
        },
        _ => return None,
    };
    Some((dev.as_str(), command))
}

fn main() -> i32 {
    let args: Vec<String> = env::args().into_iter().skip(1).collect();
    let Some((name, command)) = parse(&args) else {
        eprintln!("{USAGE}");
        return EXIT_USAGE;
    };
    if matches!(command, Command::Serve { .. }) {
        // Before the device is opened: a template carries it.
        moat_libos::service::prepare();
    }

    let dev = match moat_libos_virtio::open(name) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("virtio-blk: device `{name}`: {e}");
            return EXIT_DEVICE;
        }
    };
    if dev.transport.device_type() != DeviceType::Block {
        eprintln!(
            "virtio-blk: device `{name}` is a virtio {:?} device, not a block device",
            dev.transport.device_type()
        );
        return EXIT_DEVICE;
    }
    let transport = EventIdx::new(dev.transport);
    let rings = transport.rings();
    let blk = match VirtIOBlk::<MoatHal, _>::new(transport) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("virtio-blk: device `{name}`: initialisation failed: {e}");
            return EXIT_DEVICE;
        }
    };
    let mut disk = Disk {
        blk,
        rings,
        irq: dev.interrupt,
        reqs: Box::default(),
        resps: Box::default(),
        slots: [None; SLOTS],
        finished: Vec::new(),
        stalled: 0,
    };

    let r = match command {
        Command::Serve { section, faults } => {
            return match serve_queued(&section, &mut disk, faults) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("virtio-blk: the service section failed: {}", e.name());
                    EXIT_IO
                }
            }
        }
        Command::Check { sectors, seed } => check(&mut disk, sectors, seed),
        Command::ReadBench { count } => read_bench(&mut disk, count),
        Command::Dump { sector } => dump(&mut disk, sector),
    };
    match r {
        Ok(()) => 0,
        Err(Failure(code, msg)) => {
            eprintln!("virtio-blk: {msg}");
            code
        }
    }
}

/// An exit code and what went wrong.
struct Failure(i32, String);

fn failure(code: i32, args: core::fmt::Arguments<'_>) -> Failure {
    let mut s = String::new();
    let _ = s.write_fmt(args);
    Failure(code, s)
}

/// End the picoprocess: used where a request may still be in the device's
/// hands, so its buffers must never be freed or reused.
fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    eprintln!("virtio-blk: {args}");
    process::exit(EXIT_IO)
}

type Blk = VirtIOBlk<MoatHal, EventIdx<MmioTransport<'static>>>;

/// A request in the device's queue.
#[derive(Clone, Copy)]
struct Pending {
    /// virtio-drivers' token (the head descriptor).
    token: u16,
    /// The service loop's tag.
    tag: u32,
    write: bool,
    buf: NonNull<[u8]>,
}

/// The block device, its rings and interrupt, and the requests in its
/// queue: each slot's header and status buffers (handed to the device, so
/// they live in memory from DkVirtualMemoryAlloc, never on the stack) and
/// what the slot's request is.
struct Disk {
    blk: Blk,
    rings: Rc<Rings>,
    irq: Option<Interrupt>,
    reqs: Box<[BlkReq; SLOTS]>,
    resps: Box<[BlkResp; SLOTS]>,
    slots: [Option<Pending>; SLOTS],
    /// Requests done without the queue (a flush), not yet reported.
    finished: Vec<(u32, Result<(), u8>)>,
    /// Microseconds waited for the interrupt in vain since a request last
    /// completed.
    stalled: u64,
}

/// The disk as a mediated block service (`serve`).
impl QueuedBlockDevice for Disk {
    fn geometry(&mut self) -> (u64, u32) {
        (self.capacity() * SECTOR_SIZE as u64, SECTOR_SIZE as u32)
    }

    fn can_start(&self, op: u8) -> bool {
        match op {
            // virtio-drivers' flush waits for its own request at the head
            // of the used ring: nothing else may be in flight.
            op::FLUSH => self.in_flight() == 0,
            _ => self.slots.iter().any(Option::is_none),
        }
    }

    unsafe fn start(&mut self, tag: u32, r: &BlockRequest) -> Result<(), u8> {
        match r.op {
            op::READ | op::WRITE => {
                // SAFETY: the caller lends the buffer until `complete`
                // reports `tag`.
                unsafe { self.submit(tag, r.op == op::WRITE, r.offset, r.buf) }
            }
            op::FLUSH => {
                let done = self.blk.flush().map_err(|_| status::IO_ERROR);
                self.finished.push((tag, done));
                Ok(())
            }
            _ => Err(status::UNSUPPORTED),
        }
    }

    fn complete(&mut self, done: &mut dyn FnMut(u32, Result<(), u8>)) -> usize {
        let mut n = 0;
        for (tag, r) in self.finished.drain(..) {
            done(tag, r);
            n += 1;
        }
        while let Some(token) = self.blk.peek_used() {
            let Some(i) = self
                .slots
                .iter()
                .position(|s| s.is_some_and(|p| p.token == token))
            else {
                fatal(format_args!(
                    "the device completed request {token}, which is not in its queue"
                ))
            };
            let Some(p) = self.slots[i].take() else {
                unreachable!("slot {i} was just found full")
            };
            let (req, resp) = (&mut self.reqs[i], &mut self.resps[i]);
            // SAFETY: the same buffers as given to `read_blocks_nb` /
            // `write_blocks_nb` for this token; the loop lent `p.buf`
            // until this report.
            let r = unsafe {
                if p.write {
                    self.blk
                        .complete_write_blocks(token, req, p.buf.as_ref(), resp)
                } else {
                    self.blk
                        .complete_read_blocks(token, req, &mut *p.buf.as_ptr(), resp)
                }
            };
            let r = Self::completed(r).map_err(|_| status::IO_ERROR);
            self.stalled = 0;
            done(p.tag, r);
            n += 1;
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count() + self.finished.len()
    }

    /// Asks for the interrupt, looks at the used ring once more, and
    /// waits. Without an interrupt, returns at once (the loop polls).
    /// Ends the picoprocess once the device has completed nothing for
    /// [`REQUEST_TIMEOUT_MICROS`] (its buffers may still be in the
    /// device's hands: they must never be reused).
    fn wait(&mut self, micros: u64) {
        let Some(irq) = self.irq.as_ref() else {
            return;
        };
        self.rings.want_interrupt(0);
        if self.blk.peek_used().is_some() {
            return;
        }
        // No clock reads here: on kvm each is a VM exit. The time waited
        // in vain is counted in timeouts.
        let micros = micros.min(REQUEST_TIMEOUT_MICROS);
        match irq.wait(micros as i64) {
            Ok(true) => {}
            Ok(false) => {
                self.stalled += micros;
                if self.stalled >= REQUEST_TIMEOUT_MICROS {
                    fatal(format_args!("a request did not complete within 10 s"));
                }
            }
            Err(e) => fatal(format_args!(
                "waiting for the interrupt failed: {}",
                e.name()
            )),
        }
    }
}

impl Disk {
    fn capacity(&self) -> u64 {
        self.blk.capacity()
    }

    /// Puts a read (or write) of `buf` at byte `offset` in a free slot.
    ///
    /// # Safety
    ///
    /// `buf` stays valid, and nothing else uses it, until `complete`
    /// reports `tag`.
    unsafe fn submit(
        &mut self,
        tag: u32,
        write: bool,
        offset: u64,
        buf: NonNull<[u8]>,
    ) -> Result<(), u8> {
        if buf.is_empty() || !buf.len().is_multiple_of(SECTOR_SIZE) {
            return Err(status::INVALID);
        }
        let Some(i) = self.slots.iter().position(Option::is_none) else {
            return Err(status::IO_ERROR);
        };
        let sector = (offset / SECTOR_SIZE as u64) as usize;
        let (req, resp) = (&mut self.reqs[i], &mut self.resps[i]);
        // SAFETY: `req` and `resp` belong to slot `i`, which stays full
        // (and so untouched) until the device hands the request back;
        // the caller keeps `buf` for it until then.
        let token = unsafe {
            if write {
                self.blk.write_blocks_nb(sector, req, buf.as_ref(), resp)
            } else {
                self.blk
                    .read_blocks_nb(sector, req, &mut *buf.as_ptr(), resp)
            }
        };
        let token = token.map_err(|_| status::IO_ERROR)?;
        self.slots[i] = Some(Pending {
            token,
            tag,
            write,
            buf,
        });
        Ok(())
    }

    /// Runs one read or write of `buf` at `sector` to its end.
    fn run_one(&mut self, write: bool, sector: u64, buf: &mut [u8]) -> Result<(), Failure> {
        let what = if write { "write" } else { "read" };
        let ptr = NonNull::from(&mut *buf);
        // SAFETY: `buf` is borrowed for this whole function, which returns
        // only once the request is reported (or ends the picoprocess).
        if unsafe { self.submit(0, write, sector * SECTOR_SIZE as u64, ptr) }.is_err() {
            return Err(failure(
                EXIT_IO,
                format_args!("{what} at sector {sector} could not be submitted"),
            ));
        }
        let mut result = None;
        let spin = POLL_MICROS * time::spins_per_micro();
        let mut quiet = 0;
        while result.is_none() {
            if self.complete(&mut |_, r| result = Some(r)) > 0 {
                continue;
            }
            quiet += 1;
            if quiet < spin {
                core::hint::spin_loop();
            } else {
                quiet = 0;
                self.wait(REQUEST_TIMEOUT_MICROS);
            }
        }
        match result {
            Some(Ok(())) => Ok(()),
            _ => Err(failure(
                EXIT_IO,
                format_args!("{what} at sector {sector} failed"),
            )),
        }
    }

    /// Read `buf.len() / 512` sectors starting at `sector`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Failure> {
        self.run_one(false, sector, buf)
    }

    /// Write `buf.len() / 512` sectors starting at `sector`.
    fn write(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Failure> {
        self.run_one(true, sector, buf)
    }

    /// The outcome of a completion. If the request could not be taken off
    /// the used ring, the device still holds its buffers: end at once.
    fn completed(r: Result<(), VirtioError>) -> Result<(), VirtioError> {
        match r {
            Err(e @ (VirtioError::NotReady | VirtioError::WrongToken)) => {
                fatal(format_args!("the device broke the used ring: {e}"))
            }
            r => r,
        }
    }
}

/// Fill one sector of the `check` pattern: sector `sector` for `seed`.
///
/// ```text
/// x = seed * 31 + sector * 7 + 0x9e37_79b9_7f4a_7c15     (u64, wrapping)
/// for i in 0..512:
///     x ^= x << 13;  x ^= x >> 7;  x ^= x << 17          (xorshift64)
///     byte[i] = (x + i) mod 256
/// ```
fn fill_pattern(seed: u64, sector: u64, out: &mut [u8]) {
    let mut x = seed
        .wrapping_mul(31)
        .wrapping_add(sector.wrapping_mul(7))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    for (i, b) in out[..SECTOR_SIZE].iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x.wrapping_add(i as u64) as u8;
    }
}

fn check(disk: &mut Disk, sectors: u64, seed: u64) -> Result<(), Failure> {
    let capacity = disk.capacity();
    if sectors > capacity {
        return Err(failure(
            EXIT_USAGE,
            format_args!("{sectors} sectors asked, the device has {capacity}"),
        ));
    }
    if disk.blk.readonly() {
        return Err(failure(
            EXIT_DEVICE,
            format_args!("the device is read-only"),
        ));
    }
    let mut buf = vec![0u8; (CHUNK_SECTORS as usize) * SECTOR_SIZE];
    let mut expect = [0u8; SECTOR_SIZE];

    let mut s = 0;
    while s < sectors {
        let n = CHUNK_SECTORS.min(sectors - s);
        let chunk = &mut buf[..n as usize * SECTOR_SIZE];
        for (k, sector) in chunk.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            fill_pattern(seed, s + k as u64, sector);
        }
        disk.write(s, chunk)?;
        s += n;
    }
    disk.blk
        .flush()
        .map_err(|e| failure(EXIT_IO, format_args!("flush failed: {e}")))?;

    let mut s = 0;
    while s < sectors {
        let n = CHUNK_SECTORS.min(sectors - s);
        let chunk = &mut buf[..n as usize * SECTOR_SIZE];
        chunk.fill(0);
        disk.read(s, chunk)?;
        for (k, got) in chunk.chunks_exact(SECTOR_SIZE).enumerate() {
            let sector = s + k as u64;
            fill_pattern(seed, sector, &mut expect);
            if let Some(i) = (0..SECTOR_SIZE).find(|&i| got[i] != expect[i]) {
                return Err(failure(
                    EXIT_MISMATCH,
                    format_args!(
                        "sector {sector} differs: byte {i} was written {:#04x}, read back {:#04x}",
                        expect[i], got[i]
                    ),
                ));
            }
        }
        s += n;
    }
    println!(
        "virtio-blk: capacity {capacity} sectors, wrote {sectors} sectors, read back {sectors} sectors, all match"
    );
    Ok(())
}

fn read_bench(disk: &mut Disk, count: u64) -> Result<(), Failure> {
    let blocks = disk.capacity() / BENCH_SECTORS;
    if blocks == 0 {
        return Err(failure(
            EXIT_USAGE,
            format_args!("the device is smaller than 4096 bytes"),
        ));
    }
    let mut buf = vec![0u8; BENCH_SECTORS as usize * SECTOR_SIZE];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let start = time::now_micros();
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        disk.read((x % blocks) * BENCH_SECTORS, &mut buf)?;
    }
    let us = time::elapsed_micros(start);
    println!("virtio-blk: {count} reads of 4096 bytes in {us} us");
    Ok(())
}

fn dump(disk: &mut Disk, sector: u64) -> Result<(), Failure> {
    let capacity = disk.capacity();
    if sector >= capacity {
        return Err(failure(
            EXIT_USAGE,
            format_args!("sector {sector} is beyond the device's {capacity} sectors"),
        ));
    }
    let mut buf = vec![0u8; SECTOR_SIZE];
    disk.read(sector, &mut buf)?;
    for (row, bytes) in buf.chunks_exact(16).enumerate() {
        print!("{:03x}:", row * 16);
        for b in bytes {
            print!(" {b:02x}");
        }
        println!();
    }
    Ok(())
}
