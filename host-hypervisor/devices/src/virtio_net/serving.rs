//! The thread that serves a [`VirtioNet`]'s queues: it makes a pass over
//! both (frames out to the wire, frames in to the lent buffers), and goes
//! on polling while passes keep finding work and for [`SPIN`] after the
//! last (yielding the core after [`YIELD_AFTER`]: on a machine with few
//! cores the driver's vCPU may be waiting for it). Then it asks the
//! driver to notify (`avail_event`, with `EVENT_IDX`), looks once more,
//! and sleeps in `poll` on its kick eventfd (written on a `QueueNotify`)
//! and, if receive buffers are lent, on the wire. A busy driver therefore
//! sends and lends buffers without a VM exit.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::VirtioNet;
use crate::virtio_blk::{Gate, Kick, Kicker};

/// Runs before the loop, on the thread (the VMM confines it there).
pub type NetPrologue = Arc<dyn Fn() + Send + Sync>;
/// Told the frames each pass moved (for statistics).
pub type NetReport = Arc<dyn Fn(u64) + Send + Sync>;

/// How long one `poll` lasts at most (the stop flag is looked at between).
const POLL_MILLIS: i32 = 1000;
/// How long the thread polls the rings after the last pass that moved a
/// frame before it sleeps.
pub const SPIN: std::time::Duration = std::time::Duration::from_micros(200);
/// How long it polls with pause instructions only, before it yields the
/// core between looks.
pub const YIELD_AFTER: std::time::Duration = std::time::Duration::from_micros(10);

/// A thread serving one virtio-net device. Dropping it stops the thread
/// and waits for it.
pub struct NetThread {
    kicker: Arc<Kicker>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NetThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetThread")
            .field("kick_fd", &self.kicker.fd)
            .finish_non_exhaustive()
    }
}

impl NetThread {
    /// Starts the thread for the device behind `gate`, whose wire is
    /// `tap` (the device's own descriptor: the device outlives the
    /// thread). The caller hands the device [`NetThread::kick`].
    pub fn spawn(
        name: &str,
        mut gate: Box<dyn Gate<VirtioNet>>,
        tap: std::os::fd::RawFd,
        prologue: Option<NetPrologue>,
        report: Option<NetReport>,
    ) -> io::Result<NetThread> {
        let kicker = Arc::new(Kicker::new()?);
        let k = kicker.clone();
        let handle = std::thread::Builder::new()
            .name(format!("net-{name}"))
            .stack_size(256 << 10)
            .spawn(move || {
                if let Some(p) = &prologue {
                    p();
                }
                run(&mut *gate, &k, tap, report.as_deref())
            })?;
        Ok(NetThread {
            kicker,
            handle: Some(handle),
        })
    }

    /// What wakes the thread: for [`VirtioNet::set_kick`].
    pub fn kick(&self) -> Kick {
        let k = self.kicker.clone();
        Arc::new(move || k.kick())
    }

    /// The kick eventfd, to register as an ioeventfd for `QueueNotify`.
    pub fn kick_fd(&self) -> BorrowedFd<'_> {
        self.kicker.fd.as_fd()
    }
}

impl Drop for NetThread {
    fn drop(&mut self) {
        self.kicker.stop.store(true, Ordering::SeqCst);
        self.kicker.kick();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(
    gate: &mut dyn Gate<VirtioNet>,
    kicker: &Kicker,
    tap: std::os::fd::RawFd,
    report: Option<&(dyn Fn(u64) + Send + Sync)>,
) {
    let mut idle_since: Option<std::time::Instant> = None;
    while !kicker.stop.load(Ordering::Relaxed) {
        let mut pass = super::Pass::default();
        let mut serving = false;
        gate.enter(&mut |dev| {
            pass = dev.serve();
            serving = dev.serving();
        });
        if pass.moved > 0 {
            if let Some(r) = report {
                r(pass.moved as u64);
            }
            idle_since = None;
            continue;
        }
        if serving {
            let idle = idle_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed();
            if idle < SPIN {
                if idle < YIELD_AFTER {
                    for _ in 0..16 {
                        std::hint::spin_loop();
                    }
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
        }
        idle_since = None;
        let mut may_sleep = true;
        gate.enter(&mut |dev| may_sleep = dev.enable_notification());
        if !may_sleep {
            continue;
        }
        let mut fds = [
            libc::pollfd {
                fd: kicker.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if pass.wire_wanted { tap } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the length
        // given; a negative fd is ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, POLL_MILLIS) };
        if n > 0 && fds[0].revents & libc::POLLIN != 0 {
            // Readable: the read returns at once and clears it.
            kicker.wait();
        }
        if n > 0 && fds[1].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            // A broken wire: look again only when kicked or a while later.
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        gate.enter(&mut |dev| dev.disable_notification());
    }
}
