//! DkDebugStringPrint: messages to the host's log.
use core::fmt;

use moat_pal::limits;

use crate::raw;

/// Print `s` to the host's log (split into pieces the ABI accepts).
pub fn print(s: &str) {
    print_bytes(s.as_bytes());
}

/// Print bytes to the host's log.
pub fn print_bytes(mut b: &[u8]) {
    let max = limits::MAX_DEBUG_STRING_LEN as usize;
    while !b.is_empty() {
        let n = b.len().min(max);
        let _ = raw::debug_string_print(&b[..n]);
        b = &b[n..];
    }
}

/// A fixed buffer that formats without allocating, then prints itself.
struct StackBuf {
    buf: [u8; 512],
    len: usize,
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &c in s.as_bytes() {
            if self.len == self.buf.len() {
                print_bytes(&self.buf);
                self.len = 0;
            }
            self.buf[self.len] = c;
            self.len += 1;
        }
        Ok(())
    }
}

/// Format and print to the host's log without allocating.
pub fn print_fmt(args: fmt::Arguments<'_>) {
    let mut b = StackBuf {
        buf: [0; 512],
        len: 0,
    };
    let _ = fmt::write(&mut b, args);
    print_bytes(&b.buf[..b.len]);
}
