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
//! Reads and writes go through the non-blocking calls (`read_blocks_nb`,
//! `write_blocks_nb`): the driver submits one request, waits on the
//! device's interrupt event until the request is in the used ring, and
//! completes it. The flush is `VirtIOBlk::flush`, which polls the used ring.
//!
//! Exit codes: 0 success; 1 `check` read back different data; 2 bad
//! arguments (also: sectors beyond the capacity); 3 the device cannot be
//! opened or initialised, is not a virtio block device, or (for `check`) is
//! read-only; 4 a request failed or did not complete within 10 s.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;

use moat_libos::env::parse_u64;
use moat_libos::device::Interrupt;
use moat_libos::service::{serve_block, status, BlockDevice, Faults};
use moat_libos::{env, eprintln, print, println, process, time};
use moat_libos_virtio::virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use moat_libos_virtio::virtio_drivers::transport::mmio::MmioTransport;
use moat_libos_virtio::virtio_drivers::transport::{DeviceType, Transport};
use moat_libos_virtio::virtio_drivers::Error as VirtioError;
use moat_libos_virtio::MoatHal;

moat_libos::entry!(main);

const EXIT_MISMATCH: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_DEVICE: i32 = 3;
const EXIT_IO: i32 = 4;

/// How long one request may take.
const REQUEST_TIMEOUT_MICROS: u64 = 10_000_000;
/// Sectors per request in `check`.
const CHUNK_SECTORS: u64 = 64;
/// Sectors per `read-bench` read (4096 bytes).
const BENCH_SECTORS: u64 = 8;

const USAGE: &str = "usage: virtio-blk DEVICE serve SECTION [SEED:PER_MILLION:KINDS]\n       \
                     virtio-blk DEVICE check SECTORS SEED\n       \
                     virtio-blk DEVICE read-bench COUNT\n       \
                     virtio-blk DEVICE dump SECTOR";

enum Command {
    Serve { section: String, faults: Option<Faults> },
    Check { sectors: u64, seed: u64 },
    ReadBench { count: u64 },
    Dump { sector: u64 },
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
    let blk = match VirtIOBlk::<MoatHal, _>::new(dev.transport) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("virtio-blk: device `{name}`: initialisation failed: {e}");
            return EXIT_DEVICE;
        }
    };
    let mut disk = Disk {
        blk,
        irq: dev.interrupt,
        req: Box::default(),
        resp: Box::default(),
    };

    let r = match command {
        Command::Serve { section, faults } => {
            return match serve_block(&section, &mut disk, faults) {
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

fn io_failure(what: &str, sector: u64, e: VirtioError) -> Failure {
    failure(
        EXIT_IO,
        format_args!("{what} at sector {sector} failed: {e}"),
    )
}

/// End the picoprocess: used where a request may still be in the device's
/// hands, so its buffers must never be freed or reused.
fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    eprintln!("virtio-blk: {args}");
    process::exit(EXIT_IO)
}

type Blk = VirtIOBlk<MoatHal, MmioTransport<'static>>;

/// The block device, its interrupt, and the header and status buffers of
/// the one request in flight. Everything handed to the device (these, the
/// data buffers, the rings) lives in memory from DkVirtualMemoryAlloc (the
/// heap or DMA allocations), never on the stack.
struct Disk {
    blk: Blk,
    irq: Option<Interrupt>,
    req: Box<BlkReq>,
    resp: Box<BlkResp>,
}

/// The disk as a mediated block service (`serve`).
impl BlockDevice for Disk {
    fn geometry(&mut self) -> (u64, u32) {
        (self.capacity() * SECTOR_SIZE as u64, SECTOR_SIZE as u32)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), u8> {
        Disk::read(self, offset / SECTOR_SIZE as u64, buf).map_err(|_| status::IO_ERROR)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u8> {
        Disk::write(self, offset / SECTOR_SIZE as u64, data).map_err(|_| status::IO_ERROR)
    }

    fn flush(&mut self) -> Result<(), u8> {
        self.blk.flush().map_err(|_| status::IO_ERROR)
    }
}

impl Disk {
    fn capacity(&self) -> u64 {
        self.blk.capacity()
    }

    /// Read `buf.len() / 512` sectors starting at `sector`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Failure> {
        let (req, resp) = (&mut *self.req, &mut *self.resp);
        // SAFETY: `req`, `buf` and `resp` are not touched again until
        // `complete_read_blocks` below: `wait_for` returns only once the
        // device has used the request, and ends the picoprocess otherwise.
        let token = unsafe { self.blk.read_blocks_nb(sector as usize, req, buf, resp) }
            .map_err(|e| io_failure("read", sector, e))?;
        Self::wait_for(&mut self.blk, self.irq.as_ref(), token);
        // SAFETY: the same buffers as given to `read_blocks_nb`.
        let r = unsafe { self.blk.complete_read_blocks(token, req, buf, resp) };
        Self::completed(r).map_err(|e| io_failure("read", sector, e))
    }

    /// Write `buf.len() / 512` sectors starting at `sector`.
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), Failure> {
        let (req, resp) = (&mut *self.req, &mut *self.resp);
        // SAFETY: as in `read`.
        let token = unsafe { self.blk.write_blocks_nb(sector as usize, req, buf, resp) }
            .map_err(|e| io_failure("write", sector, e))?;
        Self::wait_for(&mut self.blk, self.irq.as_ref(), token);
        // SAFETY: the same buffers as given to `write_blocks_nb`.
        let r = unsafe { self.blk.complete_write_blocks(token, req, buf, resp) };
        Self::completed(r).map_err(|e| io_failure("write", sector, e))
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

    /// Wait until the request `token` is at the head of the used ring.
    ///
    /// Checks the used ring, and only if the request is not there waits on
    /// the interrupt event and acknowledges the interrupt before checking
    /// again, so a completion between the check and the wait is not missed
    /// (it raises the interrupt). Without an interrupt, polls. Ends the
    /// picoprocess if the request does not complete in time.
    fn wait_for(blk: &mut Blk, irq: Option<&Interrupt>, token: u16) {
        // The clock is read only once the request is not done at once.
        let mut start = None;
        loop {
            match blk.peek_used() {
                Some(t) if t == token => return,
                Some(t) => fatal(format_args!(
                    "the device completed request {t}, but only {token} was submitted"
                )),
                None => {}
            }
            let t0 = *start.get_or_insert_with(time::now_micros);
            let left = REQUEST_TIMEOUT_MICROS.saturating_sub(time::elapsed_micros(t0));
            if left == 0 {
                fatal(format_args!("a request did not complete within 10 s"));
            }
            match irq {
                Some(irq) => match irq.wait(left as i64) {
                    Ok(_) => {
                        blk.ack_interrupt();
                    }
                    Err(e) => fatal(format_args!(
                        "waiting for the interrupt failed: {}",
                        e.name()
                    )),
                },
                None => core::hint::spin_loop(),
            }
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
