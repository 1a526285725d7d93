//! The I/O thread of a virtio-blk device: it serves the queue off the
//! vCPU thread, so that at steady state a request costs the driver no VM
//! exit.
//!
//! **The loop.** Serve the available ring; if it held anything, look
//! again at once. If it was empty, poll it again for up to
//! [`IoConfig::spin`] (yielding the core between looks after the first
//! microseconds); then ask the driver for a notification
//! ([`VirtioBlk::enable_notification`]), look once more, and sleep on the
//! kick eventfd until the driver notifies. On waking, notifications are
//! off again and the thread polls. A busy driver therefore never notifies,
//! and a completion interrupts the driver only when its `used_event` asked
//! (the device checks that after each pass).
//!
//! **The kick eventfd.** The thread sleeps in a blocking read of one
//! eventfd. Three things write to it: KVM itself, when the VMM registered
//! it as an ioeventfd for the `QueueNotify` register (the guest's write
//! then never leaves the kernel); the vCPU thread, when the write reached
//! the VMM instead ([`VirtioBlk::set_kick`]); and a stop. Writes made in
//! this process are counted as they are made, so what the eventfd adds up
//! beyond them is the number of notifications KVM answered in the kernel:
//! exits the VMM never saw, reported as [`IoEvent::KernelKicks`].
//!
//! **Guest memory.** Each pass runs inside the owner's [`Gate`], which
//! holds the device's lock and keeps the memory its DMA window allows from
//! changing under the pass (the VMM: the region map's read lock, the
//! window refreshed when the map changed). Between passes the thread holds
//! nothing, so the vCPU thread's register accesses and memory changes
//! wait at most one pass.
//!
//! Nothing the guest writes can stop the thread or make it loop without
//! bound inside a pass: a pass takes at most a ring's worth of chains, and
//! broken rings make the device need a reset, after which it sleeps until
//! the driver starts it again.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Kick, VirtioBlk};

/// How long an idle I/O thread polls with pause instructions only; after
/// that it yields the core between looks (on a machine with few cores the
/// driver's vCPU thread may be waiting for this one).
const YIELD_AFTER: Duration = Duration::from_micros(10);

/// How a serving thread reaches its device (a [`VirtioBlk`], a
/// [`VirtioNet`](crate::VirtioNet)): `enter` runs `f` on the device with
/// its lock held, its DMA window up to date, and the guest memory the
/// window allows held still until `f` returns.
pub trait Gate<D>: Send + 'static {
    /// Runs `f` on the device.
    fn enter(&mut self, f: &mut dyn FnMut(&mut D));
}

/// What an I/O thread reports as it goes (for statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEvent {
    /// A pass served this many chains.
    Served(u64),
    /// It found the queue empty for its whole spin, and sleeps.
    Slept,
    /// It raised this many used-buffer interrupts in a pass.
    Interrupts(u64),
    /// This many notifications reached it through the eventfd without
    /// being written in this process (an ioeventfd: VM exits handled by
    /// KVM).
    KernelKicks(u64),
}

/// How an I/O thread behaves.
#[derive(Clone)]
pub struct IoConfig {
    /// How long it polls an empty queue before it sleeps.
    pub spin: Duration,
    /// Called on the thread before it serves anything (the VMM confines
    /// the thread here).
    pub prologue: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Told what the thread does.
    pub report: Option<Arc<dyn Fn(IoEvent) + Send + Sync>>,
}

impl Default for IoConfig {
    fn default() -> IoConfig {
        IoConfig {
            spin: Duration::from_micros(200),
            prologue: None,
            report: None,
        }
    }
}

impl std::fmt::Debug for IoConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoConfig")
            .field("spin", &self.spin)
            .finish_non_exhaustive()
    }
}

/// The kick eventfd and the writes made to it in this process.
pub(crate) struct Kicker {
    pub(crate) fd: File,
    /// Writes made in this process (each adds 1 to the eventfd).
    ours: AtomicU64,
    pub(crate) stop: AtomicBool,
}

impl Kicker {
    /// A blocking eventfd (the thread sleeps in its read, or polls it).
    pub(crate) fn new() -> io::Result<Kicker> {
        // SAFETY: eventfd takes no pointers; it returns a new descriptor
        // or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Kicker {
            fd: File::from(fd),
            ours: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    pub(crate) fn kick(&self) {
        self.ours.fetch_add(1, Ordering::SeqCst);
        // A failure means the counter is saturated: the thread is woken
        // anyway.
        let _ = (&self.fd).write(&1u64.to_ne_bytes());
    }

    /// Blocks until the eventfd is non-zero; returns its value (and
    /// clears it).
    pub(crate) fn wait(&self) -> u64 {
        let mut buf = [0u8; 8];
        loop {
            match (&self.fd).read(&mut buf) {
                Ok(8) => return u64::from_ne_bytes(buf),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    // Not an eventfd any more? Do not spin on it.
                    std::thread::sleep(Duration::from_millis(1));
                    return 0;
                }
            }
        }
    }
}

/// A thread that serves one virtio-blk device's queue. Dropping it stops
/// the thread and waits for it.
pub struct IoThread {
    kicker: Arc<Kicker>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("kick_fd", &self.kicker.fd)
            .finish_non_exhaustive()
    }
}

impl IoThread {
    /// Starts the thread for the device behind `gate`. The caller hands
    /// the device [`IoThread::kick`] with [`VirtioBlk::set_kick`] (and may
    /// register [`IoThread::kick_fd`] as an ioeventfd).
    pub fn spawn(
        name: &str,
        mut gate: Box<dyn Gate<VirtioBlk>>,
        config: IoConfig,
    ) -> io::Result<IoThread> {
        let kicker = Arc::new(Kicker::new()?);
        let k = kicker.clone();
        let handle = std::thread::Builder::new()
            .name(format!("io-{name}"))
            .stack_size(256 << 10)
            .spawn(move || {
                if let Some(p) = &config.prologue {
                    p();
                }
                run(&mut *gate, &k, &config)
            })?;
        Ok(IoThread {
            kicker,
            handle: Some(handle),
        })
    }

    /// What wakes the thread: for [`VirtioBlk::set_kick`].
    pub fn kick(&self) -> Kick {
        let k = self.kicker.clone();
        Arc::new(move || k.kick())
    }

    /// The kick eventfd, to register as an ioeventfd for `QueueNotify`.
    pub fn kick_fd(&self) -> BorrowedFd<'_> {
        self.kicker.fd.as_fd()
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.kicker.stop.store(true, Ordering::SeqCst);
        self.kicker.kick();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The thread's loop (see the module docs).
fn run(gate: &mut dyn Gate<VirtioBlk>, kicker: &Kicker, config: &IoConfig) {
    let report = |e: IoEvent| {
        if let Some(r) = &config.report {
            r(e);
        }
    };
    // Our writes to the eventfd not yet matched by what a read returned.
    let mut ours_seen = 0u64;
    let mut idle_since: Option<Instant> = None;
    while !kicker.stop.load(Ordering::Relaxed) {
        let (mut served, mut serving, mut irqs) = (0, false, 0);
        gate.enter(&mut |dev| {
            let before = dev.counters().interrupts;
            served = dev.serve();
            serving = dev.serving();
            irqs = dev.counters().interrupts - before;
        });
        if irqs > 0 {
            report(IoEvent::Interrupts(irqs));
        }
        if served > 0 {
            report(IoEvent::Served(served as u64));
            idle_since = None;
            continue;
        }
        if serving {
            let since = *idle_since.get_or_insert_with(Instant::now);
            let idle = since.elapsed();
            if idle < config.spin {
                if idle < YIELD_AFTER {
                    for _ in 0..16 {
                        std::hint::spin_loop();
                    }
                } else {
                    // The driver's vCPU may be waiting for this core.
                    std::thread::yield_now();
                }
                continue;
            }
        }
        let mut may_sleep = true;
        gate.enter(&mut |dev| may_sleep = dev.enable_notification());
        if may_sleep {
            report(IoEvent::Slept);
            let value = kicker.wait();
            // Writes made here that this read saw, at most: the rest came
            // from KVM. A write counted but not yet made is seen by the
            // next read, so the sum over reads is exact.
            let ours = kicker.ours.load(Ordering::SeqCst);
            let mine = ours.wrapping_sub(ours_seen).min(value);
            ours_seen = ours_seen.wrapping_add(mine);
            let theirs = value - mine;
            if theirs > 0 {
                gate.enter(&mut |dev| dev.count_notifications(theirs));
                report(IoEvent::KernelKicks(theirs));
            }
        }
        gate.enter(&mut |dev| dev.disable_notification());
        idle_since = None;
    }
}
