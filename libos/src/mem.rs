//! The few symbols a libc would provide that compiled Rust code calls:
//! `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`, and the (never used,
//! panics abort) `rust_eh_personality` that the prebuilt `alloc` refers to.
//!
//! The copies use `rep movsb`/`rep stosb` so the compiler cannot turn them
//! back into calls to themselves.
use core::arch::asm;

/// # Safety
/// As C's `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// # Safety
/// As C's `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if n == 0 {
        return dest;
    }
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src, or the ranges do not overlap: copy forwards.
        // SAFETY: forward copy is safe for these overlaps.
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") n => _,
                inout("rdi") dest => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags)
            );
        }
    } else {
        // dest overlaps above src: copy backwards from the last byte.
        // SAFETY: the caller guarantees both ranges are valid; the direction
        // flag is restored before returning.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dest.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
    }
    dest
}

/// # Safety
/// As C's `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(s: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") s => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    s
}

/// # Safety
/// As C's `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As C's `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// Referred to by the prebuilt `alloc` (built for unwinding); never called,
/// since images are built with panic=abort.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Referred to by the prebuilt `alloc`'s landing pads; never reached with
/// panic=abort. Faults if it ever is.
#[no_mangle]
#[allow(non_snake_case)]
pub extern "C" fn _Unwind_Resume() -> ! {
    loop {
        // SAFETY: raises an illegal-instruction exception and nothing else.
        unsafe { asm!("ud2", options(nomem, nostack)) };
    }
}
