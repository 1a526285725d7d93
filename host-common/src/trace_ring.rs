//! The trace ring on the confined side: the shared memory the monitor
//! made for the trace layers (`moat_layers::ring`), mapped once for the
//! life of the process.
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;

/// Map the ring of `records` records from `fd` and check its header.
pub fn map(fd: OwnedFd, records: u64) -> Result<&'static moat_layers::ring::Producer, String> {
    moat_layers::ring::check_records(records)?;
    let len = moat_layers::ring::ring_bytes(records);
    let addr = crate::sys::mmap_fd(
        0,
        len,
        moat_pal::prot::READ | moat_pal::prot::WRITE,
        fd.as_raw_fd(),
        0,
        true,
    )
    .map_err(|e| {
        format!(
            "cannot map the trace ring: {}",
            std::io::Error::from_raw_os_error(e)
        )
    })?;
    // SAFETY: `addr` is a fresh page-aligned shared mapping of `len` bytes
    // that is never unmapped, so it lives for 'static; AtomicU64 has u64's
    // size and alignment, and every access to the ring from this process
    // goes through these atomics (the monitor's side uses atomics too).
    let words = unsafe { std::slice::from_raw_parts(addr as *const AtomicU64, (len / 8) as usize) };
    Ok(Box::leak(Box::new(moat_layers::ring::Producer::new(
        words,
    )?)))
}
