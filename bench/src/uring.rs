//! What an asynchronous back end could give the `blk-file` driver here:
//! the floor's 4 KiB random reads of the same warm file made through
//! io_uring with 32 in flight, against `pread` one after the other. The
//! driver serves one request at a time with positioned reads; if io_uring
//! at depth does not beat that on this machine, an io_uring back end in
//! the driver cannot lift `mediator.read4k.qd32` (a page-cache read is a
//! copy the kernel does at submission, and the two cores are both busy).
use io_uring::{opcode, types, IoUring};
use std::os::fd::AsRawFd;

/// ns per 4 KiB read of `file` at the offsets `next` gives, through
/// io_uring, `depth` in flight, `n` reads; `Err` if io_uring cannot be
/// set up here.
pub(crate) fn reads(
    file: &std::fs::File,
    mut next: impl FnMut() -> u64,
    depth: usize,
    n: u64,
) -> Result<f64, String> {
    let mut ring = IoUring::new(2 * depth as u32).map_err(|e| format!("io_uring: {e}"))?;
    let mut bufs = vec![vec![0u8; 4096]; depth];
    let fd = types::Fd(file.as_raw_fd());
    let mut submitted = 0u64;
    let mut done = 0u64;
    let mut free: Vec<usize> = (0..depth).collect();
    let t = std::time::Instant::now();
    while done < n {
        while submitted < n {
            let Some(i) = free.pop() else { break };
            let off = next();
            let e = opcode::Read::new(fd, bufs[i].as_mut_ptr(), 4096)
                .offset(off)
                .build()
                .user_data(i as u64);
            // SAFETY: the buffer outlives the read (it is only reused
            // after its completion is taken), and the ring has room (as
            // many entries as twice the reads in flight).
            unsafe { ring.submission().push(&e) }.map_err(|e| format!("push: {e}"))?;
            submitted += 1;
        }
        ring.submit_and_wait(1)
            .map_err(|e| format!("submit: {e}"))?;
        for c in ring.completion() {
            if c.result() != 4096 {
                return Err(format!("a read returned {}", c.result()));
            }
            free.push(c.user_data() as usize);
            done += 1;
        }
    }
    Ok(t.elapsed().as_nanos() as f64 / n as f64)
}
