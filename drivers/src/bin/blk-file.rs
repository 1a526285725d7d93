//! `blk-file [--read-only] SECTION FILE_URI [FAULTS]`: a block driver
//! serving a file as a disk of 512-byte blocks to the safe mediator, over
//! the rings the mediator lays out in the shared section `shm:SECTION`. The file must be granted read-write
//! (read-only with `--read-only`, when every write fails); its size,
//! rounded down to whole blocks, is the capacity (`moat serve` refuses a
//! file that is not a whole number of blocks). FAULTS
//! (`SEED:PER_MILLION:KIND[,KIND...]`, see `moat_libos::service::Faults`)
//! makes it misbehave on purpose. Runs on both hosts.
//!
//! It serves until the mediator ends it. Exit codes: 2 bad arguments; 3
//! the file cannot be opened; 4 the section cannot be opened or is broken.
#![no_std]
#![no_main]
extern crate alloc;

use moat_libos::moat_pal::{access, create};
use moat_libos::service::status;
use moat_libos::service::{prepare, serve_block, BlockDevice, Faults};
use moat_libos::stream::Stream;
use moat_libos::{env, eprintln};

moat_libos::entry!(main);

const BLOCK: u32 = 512;

struct FileDisk {
    f: Stream,
    capacity: u64,
    read_only: bool,
}

impl BlockDevice for FileDisk {
    fn geometry(&mut self) -> (u64, u32) {
        (self.capacity, BLOCK)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), u8> {
        let mut done = 0;
        while done < buf.len() {
            match self.f.read_at(offset + done as u64, &mut buf[done..]) {
                Ok(0) => {
                    // Past the end of a file that shrank: zeros.
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(_) => return Err(status::IO_ERROR),
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u8> {
        if self.read_only {
            return Err(status::IO_ERROR);
        }
        self.f
            .write_all_at(offset, data)
            .map_err(|_| status::IO_ERROR)
    }

    fn flush(&mut self) -> Result<(), u8> {
        self.f.flush().map_err(|_| status::IO_ERROR)
    }
}

fn main() -> i32 {
    let mut args = env::args();
    let read_only = args.get(1).is_some_and(|a| a == "--read-only");
    if read_only {
        args.remove(1);
    }
    if !(3..=4).contains(&args.len()) {
        eprintln!("usage: blk-file [--read-only] SECTION FILE_URI [SEED:PER_MILLION:KINDS]");
        return 2;
    }
    let faults = match args.get(3) {
        Some(s) => match Faults::parse(s) {
            Some(f) => Some(f),
            None => {
                eprintln!("blk-file: bad fault spec `{s}`");
                return 2;
            }
        },
        None => None,
    };
    // Before the first open: a template carries it.
    prepare();
    let acc = if read_only {
        access::READ
    } else {
        access::READ | access::WRITE
    };
    let f = match Stream::open(&args[2], acc, create::OPEN_EXISTING, 0) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("blk-file: cannot open {}: {}", args[2], e.name());
            return 3;
        }
    };
    let capacity = match f.attributes() {
        Ok(a) => a.size / BLOCK as u64 * BLOCK as u64,
        Err(_) => return 3,
    };
    let mut disk = FileDisk {
        f,
        capacity,
        read_only,
    };
    match serve_block(&args[1], &mut disk, faults) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("blk-file: the service section failed: {}", e.name());
            4
        }
    }
}
