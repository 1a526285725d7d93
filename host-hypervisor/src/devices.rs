//! The devices granted to a picoprocess, as the VMM sees them: `dev:`
//! streams, their MMIO windows and I/O ports, their interrupts as events.
use moat_host_linux::loader::pal::LinuxPal;
use moat_pal::Error;

/// The devices of one picoprocess (none yet).
#[derive(Default)]
pub struct DeviceSet {}

impl DeviceSet {
    /// DkStreamOpen of `dev:NAME`.
    pub fn open(
        &self,
        _lin: &LinuxPal,
        _name: &str,
        _access: u32,
        _create: u32,
        _options: u32,
        _out: u64,
    ) -> i64 {
        Error::NotFound.code()
    }

    /// Attributes of a device stream; None: not a device.
    pub fn attributes(&self, _lin: &LinuxPal, _stream: u64, _out: u64) -> Option<i64> {
        None
    }

    pub fn attributes_by_name(&self, _lin: &LinuxPal, _name: &str, _out: u64) -> i64 {
        Error::NotFound.code()
    }

    /// The interrupt event of a device stream; None: not a device.
    pub fn event(&self, _lin: &LinuxPal, _stream: u64, _out: u64) -> Option<i64> {
        None
    }

    /// Map a device's MMIO window; None: not a device.
    pub fn stream_map(
        &self,
        _lin: &LinuxPal,
        _stream: u64,
        _addr: u64,
        _prot: u32,
        _offset: u64,
        _size: u64,
    ) -> Option<i64> {
        None
    }

    pub fn pio_read(&self, _port: u16, _data: &mut [u8]) -> bool {
        false
    }

    pub fn pio_write(&self, _port: u16, _data: &[u8]) -> bool {
        false
    }

    pub fn mmio_read(&self, _addr: u64, _data: &mut [u8]) -> bool {
        false
    }

    pub fn mmio_write(&self, _addr: u64, _data: &[u8]) -> bool {
        false
    }
}
