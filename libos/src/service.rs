//! The server side of a mediated service: a driver picoprocess listens on
//! `pipe.server:NAME`, the safe mediator in the host connects, and the
//! driver answers the mediator's requests (wire format:
//! `moat-service-proto`). [`serve_block`] runs the loop for a
//! [`BlockDevice`]; the driver only implements the device.
//!
//! [`Faults`] makes a driver misbehave on purpose, for the mediator's
//! tests and fault campaigns: a seeded, reproducible choice, per request,
//! of crashing, hanging, lying or flooding.
use alloc::vec;
use alloc::vec::Vec;

use moat_pal::{access, create};
pub use moat_service_proto::status;
use moat_service_proto::{class, op, Request, Response, HEADER, MAX_PAYLOAD};

use crate::stream::Stream;
use crate::{Error, Result};

/// A block device as a driver sees it. Offsets and lengths are checked
/// against the geometry before these are called. `Err` is a status code.
pub trait BlockDevice {
    /// Capacity in bytes and block size.
    fn geometry(&mut self) -> (u64, u32);
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> core::result::Result<(), u8>;
    fn write(&mut self, offset: u64, data: &[u8]) -> core::result::Result<(), u8>;
    fn flush(&mut self) -> core::result::Result<(), u8>;
    fn discard(&mut self, _offset: u64, _len: u64) -> core::result::Result<(), u8> {
        Err(status::UNSUPPORTED)
    }
}

pub use moat_service_proto::fault;

/// Seeded fault injection: before answering each request, with
/// probability `per_million / 1e6`, one of the enabled kinds.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub seed: u64,
    pub per_million: u32,
    pub kinds: u32,
}

impl Faults {
    /// Parse `SEED:PER_MILLION:KIND[,KIND...]` (KIND from
    /// [`fault::NAMES`], or `all`).
    pub fn parse(s: &str) -> Option<Faults> {
        let mut it = s.splitn(3, ':');
        let seed = crate::env::parse_u64(it.next()?)?;
        let per_million = crate::env::parse_u64(it.next()?)?.min(1_000_000) as u32;
        let kinds = fault::parse(it.next()?).ok()?;
        // Mixed, so that nearby seeds (one per driver incarnation) give
        // unrelated fault sequences.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let seed = z ^ (z >> 31);
        (kinds != 0).then_some(Faults {
            seed,
            per_million,
            kinds,
        })
    }

    fn rng(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.seed | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.seed = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// The fault to inject before this answer, if any.
    fn pick(&mut self) -> u32 {
        if self.rng() % 1_000_000 >= self.per_million as u64 {
            return 0;
        }
        let n = self.kinds.count_ones() as u64;
        let mut k = self.rng() % n;
        for bit in 0..32 {
            if self.kinds & (1 << bit) != 0 {
                if k == 0 {
                    return 1 << bit;
                }
                k -= 1;
            }
        }
        0
    }
}

fn read_exact(s: &mut Stream, mut buf: &mut [u8]) -> Result<()> {
    while !buf.is_empty() {
        let n = s.read(buf)?;
        if n == 0 {
            return Err(Error::BrokenPipe);
        }
        buf = &mut buf[n..];
    }
    Ok(())
}

fn send(s: &mut Stream, r: Response, payload: &[u8]) -> Result<()> {
    let mut msg = Vec::with_capacity(HEADER + payload.len());
    msg.extend_from_slice(&r.encode());
    msg.extend_from_slice(payload);
    s.write_all(&msg)
}

/// Serve `dev` to the mediator on `pipe.server:NAME` until the mediator
/// goes away (Ok) or the connection breaks. With `faults`, misbehave as
/// they say.
pub fn serve_block(
    name: &str,
    dev: &mut dyn BlockDevice,
    mut faults: Option<Faults>,
) -> Result<()> {
    let uri = alloc::format!("pipe.server:{name}");
    let mut s = Stream::open(&uri, access::READ | access::WRITE, create::OPEN_EXISTING, 0)?;
    let (capacity, block) = dev.geometry();
    let mut buf: Vec<u8> = vec![0u8; MAX_PAYLOAD as usize];
    loop {
        let mut h = [0u8; HEADER];
        if read_exact(&mut s, &mut h).is_err() {
            return Ok(());
        }
        let Ok(req) = Request::decode(&h) else {
            // The mediator sent garbage: nothing sensible to answer.
            return Err(Error::InvalidArgument);
        };
        let payload = &mut buf[..req.payload as usize];
        read_exact(&mut s, payload)?;
        let mut resp = Response {
            status: status::OK,
            class: class::BLOCK,
            id: req.id,
            len: 0,
        };
        let in_range = |off: u64, len: u64| {
            off.is_multiple_of(block as u64)
                && len.is_multiple_of(block as u64)
                && off.checked_add(len).is_some_and(|e| e <= capacity)
        };
        let mut out_len = 0usize;
        let result = match req.op {
            op::INFO => {
                buf[..8].copy_from_slice(&capacity.to_le_bytes());
                buf[8..16].copy_from_slice(&(block as u64).to_le_bytes());
                out_len = 16;
                Ok(())
            }
            op::READ if req.len <= MAX_PAYLOAD && in_range(req.offset, req.len as u64) => {
                let r = dev.read(req.offset, &mut buf[..req.len as usize]);
                if r.is_ok() {
                    out_len = req.len as usize;
                }
                r
            }
            op::WRITE if req.payload == req.len && in_range(req.offset, req.len as u64) => {
                dev.write(req.offset, &buf[..req.len as usize])
            }
            op::FLUSH => dev.flush(),
            op::DISCARD if in_range(req.offset, req.len as u64) => {
                dev.discard(req.offset, req.len as u64)
            }
            op::READ | op::WRITE | op::DISCARD => Err(status::INVALID),
            _ => Err(status::UNSUPPORTED),
        };
        if let Err(st) = result {
            resp.status = st;
        }
        resp.len = out_len as u32;
        let f = faults.as_mut().map_or(0, |f| f.pick());
        match f {
            fault::CRASH => crate::process::exit_now(1),
            fault::PANIC => panic!("injected fault: panic while serving request {}", req.id),
            fault::HANG => loop {
                let _ = crate::raw::thread_delay_execution(1_000_000);
            },
            fault::OOM => {
                let mut hog: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Each chunk touched, so the memory is really used.
                    hog.push(vec![0x5a; 1 << 20]);
                }
            }
            fault::DOUBLE => {
                send(&mut s, resp, &buf[..out_len])?;
                send(&mut s, resp, &buf[..out_len])?;
            }
            fault::WRONG_ID => {
                resp.id = resp.id.wrapping_add(1_000_003);
                send(&mut s, resp, &buf[..out_len])?;
            }
            fault::WRONG_LEN => {
                let n = if out_len > 0 { out_len - 1 } else { 512 };
                resp.len = n as u32;
                send(&mut s, resp, &buf[..n])?;
            }
            fault::BAD_STATUS => {
                resp.status = 0x7f;
                send(&mut s, resp, &buf[..out_len])?;
            }
            fault::FLOOD => {
                for i in 0..1000u64 {
                    let junk = Response {
                        status: status::OK,
                        class: class::BLOCK,
                        id: req.id ^ (i << 32) ^ 0xdead,
                        len: 0,
                    };
                    send(&mut s, junk, &[])?;
                }
            }
            _ => send(&mut s, resp, &buf[..out_len])?,
        }
    }
}
