//! The moat picoprocess ABI as Rust.
//!
//! - [`abi`] (generated from `abi-spec/abi.toml`): the function table
//!   [`PalTable`], the start-up block, errors, flags, the [`Pal`] trait and
//!   the adapters [`table_from`] (trait -> table) and [`TablePal`]
//!   (table -> trait). Hosts and layers plug in through these two.
//! - [`layer`] (generated): what a layer is written against (`Layer`,
//!   `Layered`); the layers themselves are in moat-layers.
//! - [`host`] and [`host_calls`] (generated): the typed host side a host
//!   implements (checked guest ranges in, `PalResult` out), one trait per
//!   call group, and the adapter that makes every such host a `Pal`.
//! - What every host shares: [`uri`] parsing, the [`handles`] table, the
//!   guest [`memory`] region map that every guest pointer is checked
//!   against, and argument [`validate`]ion.
//!
//! `no_std` + `alloc`, so the guest side (libos) uses the same types.
#![no_std]
extern crate alloc;

pub mod abi;
pub mod dispatch;
pub mod handles;
pub mod host;
pub mod host_calls;
pub mod layer;
pub mod layout;
pub mod memory;
pub mod table;
pub mod uri;
pub mod validate;

pub use abi::*;
pub use table::{Ctx, TablePal};

/// Result of an ABI call as Rust: `Ok(value)` or the error.
pub type PalResult<T = u64> = Result<T, Error>;

/// Turn an ABI return value into a `Result`: a non-negative value is
/// `Ok`, a negative one the [`Error`] whose [`Error::code`] it is
/// ([`Error::Io`] for a code the ABI does not define).
///
/// Hosts decode what a layer returns with it, and the guest side (libos)
/// every call's result.
#[inline]
pub fn decode(ret: i64) -> PalResult<u64> {
    if ret >= 0 {
        Ok(ret as u64)
    } else {
        Err(Error::from_code(ret).unwrap_or(Error::Io))
    }
}

/// Turn a `Result` into an ABI return value.
pub fn encode(r: PalResult<u64>) -> i64 {
    match r {
        Ok(v) => (v & (i64::MAX as u64)) as i64,
        Err(e) => e.code(),
    }
}

/// Host kinds reported in [`StartupBlock::host_kind`].
pub mod host_kind {
    pub const LINUX: u32 = 1;
    pub const KVM: u32 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_and_encode() {
        assert_eq!(decode(0), Ok(0));
        assert_eq!(decode(i64::MAX), Ok(i64::MAX as u64));
        for e in Error::ALL {
            assert_eq!(decode(e.code()), Err(e));
            assert_eq!(encode(Err(e)), e.code());
        }
        // A negative value the ABI does not define is an I/O error.
        assert_eq!(decode(-1_000_000), Err(Error::Io));
        assert_eq!(decode(i64::MIN), Err(Error::Io));
        assert_eq!(encode(Ok(5)), 5);
        assert_eq!(decode(encode(Ok(42))), Ok(42));
    }
}
