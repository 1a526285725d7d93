//! Code shared by the driver images in `src/bin/`: `uart-driver` (a 16550
//! UART on I/O ports) and `virtio-blk` (a virtio-mmio block device through
//! the `virtio-drivers` crate). Each image's protocol is documented at the
//! top of its source.
#![no_std]

/// Parse a number argument: decimal, or hexadecimal after `0x`.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}
