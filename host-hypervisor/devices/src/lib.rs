//! Device models of moat's KVM host.
//!
//! A picoprocess on the hypervisor host may be granted devices, each one
//! declared in its manifest (`[[device]]`) or on the command line
//! (`--device NAME=KIND[:ARG]`, see [`DeviceSpec`]). This crate holds the
//! models the VMM instantiates for those grants:
//!
//! - [`Uart`]: a 16550 UART on 8 I/O ports (built on `vm-superio`);
//! - [`VirtioBlk`]: a virtio-mmio (version 2) block device backed by a host
//!   file, with a 0x1000-byte MMIO window (built on `virtio-queue`), served
//!   on the vCPU thread or by an [`IoThread`] of its own;
//! - [`VirtioNet`]: a virtio-mmio network device whose wire is a TAP
//!   descriptor, served by a [`NetThread`] of its own.
//!
//! The VMM assigns the resources (base port, MMIO base address) and forwards
//! every access that falls into a device's range to the [`Device`] methods,
//! as an offset relative to that range. A device raises its interrupt by
//! signalling its [`Irq`], an eventfd the VMM turns into the event the guest
//! driver waits on: there is no interrupt delivery into the guest, the driver
//! waits on the event and then reads the device's status registers.
//!
//! Every model treats the guest as hostile: accesses of the wrong size or to
//! unknown registers are ignored (reads return zeros), all guest memory
//! accesses are bounds-checked, and nothing a guest does can make a model
//! panic or loop without bound.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod dma;
mod irq;
mod uart;
mod virtio_blk;
mod virtio_mmio;
mod virtio_net;

pub use irq::Irq;
pub use moat_policy::device::{
    check_unique_names, DeviceKind, DeviceSpec, DeviceSpecError, ManifestDevice, NameProblem,
    SpecForm,
};
pub use uart::{Uart, UART_IO_PORTS};
pub use virtio_blk::{
    BlkCounters, Gate, IoConfig, IoEvent, IoThread, Kick, VirtioBlk, MAX_REQUEST_BYTES,
    QUEUE_MAX_SIZE, QUEUE_NOTIFY_OFFSET, SECTOR_SIZE, SEG_MAX, VIRTIO_BLK_MMIO_SIZE,
};
pub use virtio_net::{
    NetDevCounters, NetPrologue, NetReport, NetThread, Pass, VirtioNet, MAX_FRAME, NET_HDR_SIZE,
    NET_QUEUE_MAX_SIZE, VIRTIO_NET_MMIO_SIZE,
};
/// The `vm-memory` crate this crate's API uses (`GuestMemoryMmap`).
pub use vm_memory;

/// A device model, as the VMM sees it.
///
/// The VMM places the device somewhere in the guest's port and physical
/// address spaces; the methods receive offsets relative to the start of the
/// device's port range or MMIO window, never absolute addresses. `data` is
/// the access as the vCPU performed it: its length is the access width.
///
/// Implementations never panic on guest input: an access of a width the
/// register does not support, or at an offset where no register exists, is
/// ignored (a read fills `data` with zeros).
pub trait Device: Send {
    /// The device's name, as declared in its [`DeviceSpec`].
    fn name(&self) -> &str;
    /// Number of I/O ports (0 if none).
    fn io_ports(&self) -> u16;
    /// Size of the MMIO window in bytes (0 if none).
    fn mmio_size(&self) -> u64;
    /// A port read at `offset` from the device's base port.
    fn pio_read(&mut self, offset: u16, data: &mut [u8]);
    /// A port write at `offset` from the device's base port.
    fn pio_write(&mut self, offset: u16, data: &[u8]);
    /// An MMIO read at `offset` into the device's window.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    /// An MMIO write at `offset` into the device's window.
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}
