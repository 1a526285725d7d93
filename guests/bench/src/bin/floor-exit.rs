//! The raw floor of the spawn benchmark: a static binary with no moat at
//! all, whose first instruction exits (fork + exec + wait of it is what
//! starting any program costs). Not a moat image.
#![no_std]
#![no_main]
use moat_libos as _;

/// # Safety
/// Process entry point; never returns.
#[no_mangle]
pub unsafe extern "C" fn _start() -> ! {
    // SAFETY: exit_group(0); this binary runs outside any sandbox.
    unsafe { core::arch::asm!("syscall", in("rax") 231, in("rdi") 0, options(noreturn)) }
}
