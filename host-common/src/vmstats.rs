//! The statistics page of a VMM: counters a `moat-vmm` keeps for the host,
//! in one page of shared memory the monitor makes for each kvm
//! picoprocess and hands over with its configuration ([`Config::stats`]).
//!
//! The VMM adds to the counters (relaxed atomic adds of little-endian u64
//! words at [`Counter`]'s offsets); the monitor reads them whenever asked
//! (`Picoprocess::vm_stats`). They are what the VMM says: a VMM is a
//! confined process, so the figures are for measurement, never for a
//! decision. Reading a page the VMM scribbles on gives wrong numbers, not
//! a fault.
//!
//! What is counted: every VM exit the VMM handles, by reason, and the
//! exits KVM handles for it without returning to the VMM (a `QueueNotify`
//! write matched by an ioeventfd), plus what the virtio-blk I/O thread did.
//!
//! [`Config::stats`]: crate::protocol::Config::stats

/// The size of the page.
pub const SIZE: u64 = 4096;

/// A counter of the page; its value is the index of its u64 word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// `out` to the hypercall port: an ABI call.
    ExitHypercall = 0,
    /// Other port reads and writes (a device's ports, the VMM's own ports
    /// for exceptions and the end of an upcall).
    ExitPio = 1,
    /// MMIO reads (a device register, or a fault on memory not mapped).
    ExitMmioRead = 2,
    /// MMIO writes that reached the VMM.
    ExitMmioWrite = 3,
    /// `QueueNotify` writes KVM answered through an ioeventfd: exits that
    /// never reach the VMM, counted by the I/O thread that woke for them.
    ExitNotifyInKernel = 4,
    /// KVM_RUN interrupted by a signal (the watchdog, a stop).
    ExitInterrupted = 5,
    /// Every other exit (halts, shutdowns, failed entries, faults).
    ExitOther = 6,
    /// Descriptor chains the virtio-blk I/O threads served.
    IoRequests = 7,
    /// Times an I/O thread found its queue empty for its whole spin and
    /// slept, waiting for a notification.
    IoSleeps = 8,
    /// Interrupts the I/O threads raised (the driver asked for them).
    IoInterrupts = 9,
    /// Frames the virtio-net threads moved, either way.
    NetFrames = 10,
}

/// The number of counters.
pub const COUNTERS: usize = 11;

/// A copy of the page's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmStats {
    /// The counters, indexed by [`Counter`].
    pub counts: [u64; COUNTERS],
}

impl VmStats {
    /// One counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.counts[c as usize]
    }

    /// Every VM exit: those the VMM handled and those KVM handled for it.
    pub fn exits(&self) -> u64 {
        self.counts[..=Counter::ExitOther as usize]
            .iter()
            .fold(0u64, |a, &b| a.wrapping_add(b))
    }

    /// The counts since `earlier` (wrapping, like the counters).
    pub fn since(&self, earlier: &VmStats) -> VmStats {
        let mut counts = [0u64; COUNTERS];
        for (i, c) in counts.iter_mut().enumerate() {
            *c = self.counts[i].wrapping_sub(earlier.counts[i]);
        }
        VmStats { counts }
    }

    /// Adds `other`'s counts to these (wrapping).
    pub fn add(&mut self, other: &VmStats) {
        for (i, c) in self.counts.iter_mut().enumerate() {
            *c = c.wrapping_add(other.counts[i]);
        }
    }
}
