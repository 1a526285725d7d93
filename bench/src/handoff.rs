//! A floor for any design that serves a request on another core: the
//! mediator's QD1 read, without the mediator. One thread of this process
//! plays the driver: it polls a request word, does the same positioned
//! read into its own buffer (the pool), and sets a done word; the client
//! polls for it and copies the data out of that buffer into its own, as
//! the mediator does. No process boundary, no ring, no contract, no PAL:
//! what remains is two cross-core hand-offs of a cache line and the 4 KiB
//! buffer moving from the driver's core to the client's.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

struct Slot {
    /// The offset to read plus one; 0 when there is none.
    request: AtomicU64,
    /// Set by the server when the buffer holds the answer.
    done: AtomicBool,
    stop: AtomicBool,
    pool: Mutex<Vec<u8>>,
}

/// Polled hand-off to a server thread.
pub struct Handoff {
    slot: Arc<Slot>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Handoff {
    /// A server thread reading `file` in `len`-byte requests.
    pub fn start(file: File, len: usize) -> Handoff {
        let slot = Arc::new(Slot {
            request: AtomicU64::new(0),
            done: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            pool: Mutex::new(vec![0; len]),
        });
        let s = slot.clone();
        let server = std::thread::spawn(move || loop {
            let r = s.request.swap(0, Ordering::Acquire);
            if r == 0 {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                std::hint::spin_loop();
                continue;
            }
            {
                let mut pool = s.pool.lock().unwrap();
                file.read_exact_at(&mut pool, r - 1).unwrap();
            }
            s.done.store(true, Ordering::Release);
        });
        Handoff {
            slot,
            server: Some(server),
        }
    }

    /// Reads `buf.len()` bytes at `offset` through the server thread.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) {
        self.slot.request.store(offset + 1, Ordering::Release);
        while !self.slot.done.swap(false, Ordering::Acquire) {
            std::hint::spin_loop();
        }
        buf.copy_from_slice(&self.slot.pool.lock().unwrap()[..buf.len()]);
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        self.slot.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}
