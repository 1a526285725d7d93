//! Where a picoprocess's memory lies: the same window on both hosts, so
//! that a picoprocess frozen on one host can be rebuilt at the same
//! addresses on the other (`moat checkpoint`, `moat restore`).
//!
//! Guest memory is the window `[GUEST_BASE, end)`, `end` fixed by the
//! manifest's memory limit and thread limit: on kvm it is guest RAM below
//! the VMM's task-state area (identity-mapped in the VMM), on linux the
//! same range of the loader's address space (far below the loader's own
//! code, heap and libraries). Every region the guest gets, wherever the
//! host chooses the address, lies in it; an image must be linked inside
//! it.
//!
//! ```text
//! 0x0001_0000  GUEST_BASE: image, start-up block, stacks, allocations
//! end          = guest_ram(memory) - tss_area(threads)
//! ```

/// The lowest guest address (below: page 0 and, on kvm, the VMM area).
pub const GUEST_BASE: u64 = 0x10000;

/// Per thread on kvm, at the top of guest RAM: its task state and the
/// stack its exception stubs run on (out of the guest's reach).
pub const TSS_SLOT: u64 = 0x3000;

/// The guest RAM a memory limit of `memory_mib` gets (kvm's VM size): at
/// least 4 MiB, in 2 MiB steps.
pub const fn guest_ram(memory_mib: u64) -> u64 {
    let b = memory_mib << 20;
    let b = if b < 4 << 20 { 4 << 20 } else { b };
    b.next_multiple_of(2 << 20)
}

/// Bytes at the top of guest RAM that the task state of `threads` threads
/// takes (whole 2 MiB pages).
pub const fn tss_area(threads: u64) -> u64 {
    let bytes = threads * TSS_SLOT;
    let big = 2 << 20;
    bytes.div_ceil(big) * big
}

/// The guest window `[lo, hi)` of a picoprocess with these limits.
pub const fn window(memory_mib: u64, threads: u64) -> (u64, u64) {
    let threads = if threads == 0 { 1 } else { threads };
    (
        GUEST_BASE,
        guest_ram(memory_mib).saturating_sub(tss_area(threads)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_leaves_the_task_state_out() {
        assert_eq!(guest_ram(1), 4 << 20);
        assert_eq!(guest_ram(5), 6 << 20);
        assert_eq!(window(64, 8), (GUEST_BASE, (64 << 20) - (2 << 20)));
        assert_eq!(window(64, 0), window(64, 1));
        assert_eq!(tss_area(170), 2 << 20);
        assert_eq!(tss_area(171), 4 << 20);
    }
}
