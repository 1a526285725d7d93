//! Cryptographically secure random bytes from the host.
use moat_pal::limits;

use crate::{raw, Result};

/// Fill `buf` with random bytes.
pub fn fill(buf: &mut [u8]) -> Result<()> {
    for chunk in buf.chunks_mut(limits::MAX_IO_LEN as usize) {
        raw::random_bits_read(chunk)?;
    }
    Ok(())
}

/// A random u64.
pub fn u64() -> Result<u64> {
    let mut b = [0u8; 8];
    fill(&mut b)?;
    Ok(u64::from_le_bytes(b))
}
