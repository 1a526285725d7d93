//! The service wire between the safe mediator (in the host) and a driver
//! picoprocess, over one stream (the driver listens on
//! `pipe.server:NAME`; the mediator connects).
//!
//! Every message is a 32-byte header, then `len` payload bytes:
//!
//! ```text
//! offset size  request (mediator -> driver)   response (driver -> mediator)
//!  0      4    magic "MSRQ"                   magic "MSRS"
//!  4      1    op                             status
//!  5      1    class (1 block, 2 char, 3 generic)
//!  6      2    0                              0
//!  8      8    id                             id of the request it completes
//! 16      8    offset (bytes)                 0
//! 24      4    len: request length            len: payload bytes that follow
//! 28      4    payload bytes that follow      0
//! ```
//!
//! A block read of `len` bytes is answered with `len` payload bytes; a
//! write carries its `len` bytes and is answered with none; flush and
//! discard carry and return none; INFO (id 0, sent first after a driver
//! starts) is answered with 16 bytes: capacity in bytes, then block size
//! (both u64). All numbers little-endian. Everything a driver sends is
//! hostile to the mediator, which checks it against the contract
//! (`moat-mediator`); this crate only encodes and decodes.
#![no_std]

/// Header size.
pub const HEADER: usize = 32;
pub const REQUEST_MAGIC: [u8; 4] = *b"MSRQ";
pub const RESPONSE_MAGIC: [u8; 4] = *b"MSRS";
/// The largest payload of one message (a 1 MiB request).
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// Service classes.
pub mod class {
    pub const BLOCK: u8 = 1;
    pub const CHAR: u8 = 2;
    pub const GENERIC: u8 = 3;
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
    /// Every kind above.
    pub const ALL: u32 = 0x1ff;

    /// Names (`all` stands for [`ALL`]).
    pub const NAMES: [(&str, u32); 10] = [
        ("crash", CRASH),
        ("panic", PANIC),
        ("hang", HANG),
        ("double", DOUBLE),
        ("wrong-id", WRONG_ID),
        ("wrong-len", WRONG_LEN),
        ("bad-status", BAD_STATUS),
        ("oom", OOM),
        ("flood", FLOOD),
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

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: u8,
    pub class: u8,
    pub id: u64,
    pub offset: u64,
    pub len: u32,
    /// Payload bytes that follow (a write's data).
    pub payload: u32,
}

/// A response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u8,
    pub class: u8,
    pub id: u64,
    /// Payload bytes that follow (a read's data, INFO's 16 bytes).
    pub len: u32,
}

/// Why a header does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    BadMagic([u8; 4]),
    /// A payload over [`MAX_PAYLOAD`].
    TooLong(u32),
    /// Reserved bytes that are not zero.
    Reserved,
}

fn u32_at(b: &[u8; HEADER], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8; HEADER], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

impl Request {
    pub fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..4].copy_from_slice(&REQUEST_MAGIC);
        b[4] = self.op;
        b[5] = self.class;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER]) -> Result<Request, DecodeError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        if b[6] != 0 || b[7] != 0 {
            return Err(DecodeError::Reserved);
        }
        let payload = u32_at(b, 28);
        if payload > MAX_PAYLOAD {
            return Err(DecodeError::TooLong(payload));
        }
        Ok(Request {
            op: b[4],
            class: b[5],
            id: u64_at(b, 8),
            offset: u64_at(b, 16),
            len: u32_at(b, 24),
            payload,
        })
    }
}

impl Response {
    pub fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..4].copy_from_slice(&RESPONSE_MAGIC);
        b[4] = self.status;
        b[5] = self.class;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER]) -> Result<Response, DecodeError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != RESPONSE_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        if b[6] != 0 || b[7] != 0 || b[16..24].iter().any(|&x| x != 0) || u32_at(b, 28) != 0 {
            return Err(DecodeError::Reserved);
        }
        let len = u32_at(b, 24);
        if len > MAX_PAYLOAD {
            return Err(DecodeError::TooLong(len));
        }
        Ok(Response {
            status: b[4],
            class: b[5],
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
            id: 7,
            offset: 4096,
            len: 512,
            payload: 512,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let s = Response {
            status: status::OK,
            class: class::BLOCK,
            id: 7,
            len: 0,
        };
        assert_eq!(Response::decode(&s.encode()), Ok(s));
        let mut b = s.encode();
        b[0] = b'X';
        assert!(matches!(
            Response::decode(&b),
            Err(DecodeError::BadMagic(_))
        ));
        let mut b = s.encode();
        b[24..28].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert_eq!(
            Response::decode(&b),
            Err(DecodeError::TooLong(MAX_PAYLOAD + 1))
        );
        let mut b = s.encode();
        b[20] = 1;
        assert_eq!(Response::decode(&b), Err(DecodeError::Reserved));
        // A request header is not a response.
        assert!(Response::decode(&r.encode()).is_err());
    }
}
