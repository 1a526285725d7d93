//! The driver images: `uart-driver` (a 16550 UART on I/O ports, in
//! `src/bin/`) and, built from its own workspace in `virtio/`, `virtio-blk`
//! (a virtio-mmio block device through the `virtio-drivers` crate). Each
//! image's protocol is documented at the top of its source.
#![no_std]
