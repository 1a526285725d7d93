//! The service protocol between the safe mediator (in the host) and a
//! driver picoprocess serving a block (or char, or generic) service: what a
//! request and an answer say ([`Request`], [`Response`]), and the
//! shared-memory rings that carry them ([`ring`]).
//!
//! The mediator creates a shared section (ABI 1.1, `shm:NAME`) per driver
//! incarnation and lays it out as [`ring::Layout`] says: a header, a
//! submission ring of requests (mediator to driver), a completion ring of
//! answers (driver to mediator), and a pool of buffers that carry the
//! bytes (a write's data, a read's answer). Each ring slot is a 32-byte
//! descriptor:
//!
//! ```text
//! offset size  request (mediator -> driver)   answer (driver -> mediator)
//!  0      1    op                             status
//!  1      1    class (1 block, 2 char, 3 generic, 4 net)
//!  2      2    0                              0
//!  4      4    buf: the pool buffer of the request (index)
//!  8      8    id                             id of the request it completes
//! 16      8    offset (bytes)                 0
//! 24      4    len: request length            len: bytes in the buffer
//! 28      4    0                              0
//! ```
//!
//! A block read of `len` bytes is answered with `len` bytes in its buffer;
//! a write's `len` bytes are in its buffer and the answer has none; flush
//! and discard carry and return none; INFO (id 0, sent first after a
//! driver starts) is answered with 16 bytes: capacity in bytes, then block
//! size (both u64). All numbers little-endian. Everything a driver writes
//! is hostile to the mediator, which copies each answer out of the shared
//! section once and checks the copy against the contract
//! (`moat-mediator`); this crate encodes, decodes and moves descriptors.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod ring;

/// Descriptor size.
pub const DESCRIPTOR: usize = 32;
/// The largest buffer of one request (1 MiB).
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// Service classes.
pub mod class {
    pub const BLOCK: u8 = 1;
    pub const CHAR: u8 = 2;
    pub const GENERIC: u8 = 3;
    /// A network interface: Ethernet frames both ways.
    pub const NET: u8 = 4;
}

/// Block operations.
pub mod op {
    pub const INFO: u8 = 0;
    pub const READ: u8 = 1;
    pub const WRITE: u8 = 2;
    pub const FLUSH: u8 = 3;
    pub const DISCARD: u8 = 4;
    /// Char: bytes from the client to the device / from the device.
    pub const CHAR_WRITE: u8 = 5;
    pub const CHAR_READ: u8 = 6;
    /// Generic: one opaque request, one opaque response.
    pub const CALL: u8 = 7;
    /// Net: a frame to send (`len` bytes in the buffer; answered with
    /// none), and a receive buffer of `len` bytes lent to the driver
    /// (answered with the frame received into it). Net's INFO answer is 8
    /// bytes: the MAC address (6), then the MTU (u16).
    pub const NET_TX: u8 = 8;
    pub const NET_RX: u8 = 9;
}

/// Response status.
pub mod status {
    pub const OK: u8 = 0;
    pub const IO_ERROR: u8 = 1;
    pub const UNSUPPORTED: u8 = 2;
    pub const INVALID: u8 = 3;
    /// The highest status a driver may send.
    pub const MAX: u8 = INVALID;
}

/// Ways a driver can be told to misbehave (fault injection for tests and
/// campaigns): bit flags, and their names for `SEED:PER_MILLION:KINDS`.
pub mod fault {
    /// End the process at once (exit 1).
    pub const CRASH: u32 = 1 << 0;
    /// Panic (exit 101).
    pub const PANIC: u32 = 1 << 1;
    /// Stop answering (sleep for ever).
    pub const HANG: u32 = 1 << 2;
    /// Answer a request twice.
    pub const DOUBLE: u32 = 1 << 3;
    /// Answer with another request's id.
    pub const WRONG_ID: u32 = 1 << 4;
    /// Answer a read with the wrong length.
    pub const WRONG_LEN: u32 = 1 << 5;
    /// Answer with a status that does not exist.
    pub const BAD_STATUS: u32 = 1 << 6;
    /// Allocate until memory runs out.
    pub const OOM: u32 = 1 << 7;
    /// Send a flood of unsolicited completions.
    pub const FLOOD: u32 = 1 << 8;
    /// Move the completion ring's producer index past what the ring holds.
    pub const BAD_INDEX: u32 = 1 << 9;
    /// Answer naming a buffer outside the pool.
    pub const OUTSIDE_POOL: u32 = 1 << 10;
    /// Answer naming another request's buffer.
    pub const WRONG_BUF: u32 = 1 << 11;
    /// Publish an answer before writing it (the mediator sees what the
    /// slot held before).
    pub const TORN: u32 = 1 << 12;
    /// Every kind above.
    pub const ALL: u32 = 0x1fff;

    /// Names (`all` stands for [`ALL`]).
    pub const NAMES: [(&str, u32); 14] = [
        ("crash", CRASH),
        ("panic", PANIC),
        ("hang", HANG),
        ("double", DOUBLE),
        ("wrong-id", WRONG_ID),
        ("wrong-len", WRONG_LEN),
        ("bad-status", BAD_STATUS),
        ("oom", OOM),
        ("flood", FLOOD),
        ("bad-index", BAD_INDEX),
        ("outside-pool", OUTSIDE_POOL),
        ("wrong-buf", WRONG_BUF),
        ("torn", TORN),
        ("all", ALL),
    ];

    /// The flags of a comma-separated list of names, or the first name
    /// that is not one.
    pub fn parse(kinds: &str) -> Result<u32, &str> {
        let mut bits = 0;
        for k in kinds.split(',') {
            bits |= NAMES.iter().find(|(n, _)| *n == k).ok_or(k)?.1;
        }
        Ok(bits)
    }
}

/// A request descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: u8,
    pub class: u8,
    /// The pool buffer that carries its bytes (a write's data, a read's
    /// answer).
    pub buf: u32,
    pub id: u64,
    pub offset: u64,
    pub len: u32,
}

/// An answer descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u8,
    pub class: u8,
    /// The pool buffer its bytes are in (the request's own).
    pub buf: u32,
    pub id: u64,
    /// Bytes in the buffer (a read's data, INFO's 16 bytes).
    pub len: u32,
}

/// Why a descriptor does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// A length over [`MAX_PAYLOAD`].
    TooLong(u32),
    /// Reserved bytes that are not zero.
    Reserved,
}

fn u32_at(b: &[u8; DESCRIPTOR], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8; DESCRIPTOR], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

impl Request {
    pub fn encode(&self) -> [u8; DESCRIPTOR] {
        let mut b = [0u8; DESCRIPTOR];
        b[0] = self.op;
        b[1] = self.class;
        b[4..8].copy_from_slice(&self.buf.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; DESCRIPTOR]) -> Result<Request, DecodeError> {
        if b[2] != 0 || b[3] != 0 || u32_at(b, 28) != 0 {
            return Err(DecodeError::Reserved);
        }
        let len = u32_at(b, 24);
        if len > MAX_PAYLOAD {
            return Err(DecodeError::TooLong(len));
        }
        Ok(Request {
            op: b[0],
            class: b[1],
            buf: u32_at(b, 4),
            id: u64_at(b, 8),
            offset: u64_at(b, 16),
            len,
        })
    }
}

impl Response {
    pub fn encode(&self) -> [u8; DESCRIPTOR] {
        let mut b = [0u8; DESCRIPTOR];
        b[0] = self.status;
        b[1] = self.class;
        b[4..8].copy_from_slice(&self.buf.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; DESCRIPTOR]) -> Result<Response, DecodeError> {
        if b[2] != 0 || b[3] != 0 || b[16..24].iter().any(|&x| x != 0) || u32_at(b, 28) != 0 {
            return Err(DecodeError::Reserved);
        }
        let len = u32_at(b, 24);
        if len > MAX_PAYLOAD {
            return Err(DecodeError::TooLong(len));
        }
        Ok(Response {
            status: b[0],
            class: b[1],
            buf: u32_at(b, 4),
            id: u64_at(b, 8),
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_refusals() {
        let r = Request {
            op: op::WRITE,
            class: class::BLOCK,
            buf: 3,
            id: 7,
            offset: 4096,
            len: 512,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let s = Response {
            status: status::OK,
            class: class::BLOCK,
            buf: 3,
            id: 7,
            len: 0,
        };
        assert_eq!(Response::decode(&s.encode()), Ok(s));
        let mut b = s.encode();
        b[24..28].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert_eq!(
            Response::decode(&b),
            Err(DecodeError::TooLong(MAX_PAYLOAD + 1))
        );
        for i in [2, 3, 16, 23, 28, 31] {
            let mut b = s.encode();
            b[i] = 1;
            assert_eq!(Response::decode(&b), Err(DecodeError::Reserved), "byte {i}");
        }
        let mut b = r.encode();
        b[29] = 1;
        assert_eq!(Request::decode(&b), Err(DecodeError::Reserved));
    }
}
