//! The raw floor of the spawn benchmark: a static binary with no moat at
//! all, whose first system call writes one byte to stdout (the host times
//! its arrival) and whose second exits. Not a moat image.
#![no_std]
#![no_main]
use moat_libos as _;

/// # Safety
/// Process entry point; never returns.
#[no_mangle]
pub unsafe extern "C" fn _start() -> ! {
    let b = b"x";
    // SAFETY: write(1, "x", 1) then exit_group(0); this binary runs outside any sandbox.
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") 1usize => _, in("rdi") 1, in("rsi") b.as_ptr(), in("rdx") 1,
                         lateout("rcx") _, lateout("r11") _, options(nostack));
        core::arch::asm!("syscall", in("rax") 231, in("rdi") 0, options(noreturn))
    }
}
