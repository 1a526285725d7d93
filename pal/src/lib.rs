//! The moat picoprocess ABI as Rust.
//!
//! - [`abi`] (generated from `abi-spec/abi.toml`): the function table
//!   [`PalTable`], the start-up block, errors, flags, the [`Pal`] trait and
//!   the adapters [`table_from`] (trait -> table) and [`TablePal`]
//!   (table -> trait). Hosts and layers plug in through these two.
//! - [`trace`] (generated): a tracing layer, `TracePal`, over any `Pal`.
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
pub mod memory;
pub mod trace;
pub mod uri;
pub mod validate;

pub use abi::*;

/// Result of an ABI call as Rust: `Ok(value)` or the error.
pub type PalResult<T = u64> = Result<T, Error>;

/// Turn an ABI return value into a `Result`.
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
