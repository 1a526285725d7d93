//! Start-up arguments and facts about the host.
use alloc::string::String;
use alloc::vec::Vec;

use crate::boot;

/// The raw argument bytes: NUL-terminated arguments, the image name first.
pub fn args_bytes() -> &'static [u8] {
    let p = boot::startup_ptr();
    if p.is_null() {
        return &[];
    }
    // SAFETY: the start-up block is valid for the process lifetime.
    let sb = unsafe { &*p };
    if sb.args == 0 || sb.args_len == 0 {
        return &[];
    }
    // SAFETY: the host provides `args_len` readable bytes at `args` for the
    // process lifetime.
    unsafe { core::slice::from_raw_parts(sb.args as usize as *const u8, sb.args_len as usize) }
}

/// The arguments, the image name first.
pub fn args() -> Vec<String> {
    let mut b = args_bytes();
    // A final NUL ends the last argument; it does not start an empty one.
    if let Some((&0, rest)) = b.split_last() {
        b = rest;
    }
    if b.is_empty() {
        return Vec::new();
    }
    b.split(|&c| c == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The host kind from the start-up block (`moat_pal::host_kind`).
pub fn host_kind() -> u32 {
    let p = boot::startup_ptr();
    if p.is_null() {
        0
    } else {
        // SAFETY: valid for the process lifetime.
        unsafe { (*p).host_kind }
    }
}

/// Parse a number argument: decimal, or hexadecimal after `0x`.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}
