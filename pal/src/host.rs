//! The host side of the ABI, typed: what a host implements instead of the
//! raw [`Pal`](crate::Pal) trait.
//!
//! The raw trait takes guest addresses as integers and raw pointers and
//! returns `i64` codes, as the function table does. A host implements the
//! generated [`PalHost`](crate::host_calls::PalHost) traits instead (one per
//! call group: [`MemoryCalls`](crate::host_calls::MemoryCalls),
//! [`ThreadCalls`](crate::host_calls::ThreadCalls), ...), whose methods take
//! guest ranges already checked ([`GuestIn`], [`GuestOut`]), handle arrays
//! already copied in, and return a [`PalResult`] with the call's result and
//! out-values. The generated adapter (every `PalHost` is a `Pal`) does the
//! rest the same way for every host:
//!
//! 1. **Lengths, then pointers, first.** A buffer's length outside the
//!    bounds the spec gives it is `InvalidArgument`; then every pointer
//!    argument is checked against the host's [`GuestMemory`], in argument
//!    order, before the call runs: a call with a bad pointer fails with
//!    `BadAddress` whatever else is wrong with it, and an out-pointer is
//!    checked writable before the call, so a call whose result could not be
//!    delivered is not made. An empty buffer is valid at any address (no
//!    byte of it is touched), as C's `(NULL, 0)` is.
//! 2. **Copy once.** Handle arrays and in-out values are copied in once;
//!    byte ranges are handed over as checked ranges, which the host copies
//!    (strings it parses: copy them in once, then parse) or uses in place
//!    (payload it only moves).
//! 3. **Results out.** Out-values are written after a successful call; the
//!    result is encoded as the ABI's `i64` ([`encode`](crate::encode)).
//!
//! A guest can still change or unmap its memory between the check and the
//! host's use of a range (another guest thread): a host's `GuestMemory`
//! says how such a race ends (on host-linux, a fault inside the PAL's copy
//! is caught and reported as the guest's fault).
use crate::PalResult;

/// A range of guest memory the adapter checked readable: `len` bytes at
/// guest address `addr`. Only [`GuestIn::checked`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestIn {
    addr: u64,
    len: u64,
}

impl GuestIn {
    /// `[addr, addr + len)`, checked readable in `mem` (an empty range is
    /// valid at any address).
    pub fn checked<M: GuestMemory + ?Sized>(mem: &M, addr: u64, len: u64) -> PalResult<GuestIn> {
        if len != 0 {
            mem.check_guest(addr, len, crate::prot::READ)?;
        }
        Ok(GuestIn { addr, len })
    }

    /// The guest address of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A range of guest memory the adapter checked writable (and readable:
/// x86 has no write-only memory, and the region map asks for both): `len`
/// bytes at guest address `addr`. Only [`GuestOut::checked`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestOut {
    addr: u64,
    len: u64,
}

impl GuestOut {
    /// `[addr, addr + len)`, checked readable and writable in `mem` (an
    /// empty range is valid at any address).
    pub fn checked<M: GuestMemory + ?Sized>(mem: &M, addr: u64, len: u64) -> PalResult<GuestOut> {
        if len != 0 {
            mem.check_guest(addr, len, crate::prot::READ | crate::prot::WRITE)?;
        }
        Ok(GuestOut { addr, len })
    }

    /// The guest address of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `len` bytes of the range (at most its length).
    pub fn prefix(&self, len: u64) -> GuestOut {
        GuestOut {
            addr: self.addr,
            len: len.min(self.len),
        }
    }
}

/// The picoprocess's memory as its host sees it: where the adapter checks
/// pointers, and how it reads and writes the plain values that cross.
pub trait GuestMemory {
    /// Whether `[addr, addr + len)` is guest memory with `prot` access
    /// (`prot::READ`, `prot::WRITE`, or both): `Ok`, or `BadAddress` (also
    /// for a range that wraps around).
    fn check_guest(&self, addr: u64, len: u64, prot: u32) -> PalResult<()>;

    /// Read a plain value from guest memory the caller checked readable.
    fn read_value<T: Copy>(&self, addr: u64) -> T;

    /// Write a plain value to guest memory the caller checked writable.
    fn write_value<T: Copy>(&self, addr: u64, value: T);
}
