//! The virtio-mmio (version 2, "modern") register file the virtio devices
//! share ([`VirtioBlk`](crate::VirtioBlk), [`VirtioNet`](crate::VirtioNet)):
//! identification, feature negotiation, the status machine, queue
//! selection and configuration, notifications, the interrupt status and
//! the read-only configuration space. A device supplies what differs
//! through [`MmioDevice`]: its ID, its features, its queues, its
//! configuration space, what a notification does.
//!
//! Every access is the guest's and may be hostile: accesses of the wrong
//! width or alignment, to unknown registers, to a queue that does not
//! exist, or that would change a queue while it is ready, are ignored
//! (reads return zero); a driver can only add status bits (clearing them
//! takes a reset) and never `DEVICE_NEEDS_RESET`, which is the device's;
//! `FEATURES_OK` is refused unless the driver accepted only what was
//! offered and `VIRTIO_F_VERSION_1`.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = u32::from_le_bytes(*b"moat");

/// The registers a virtio-mmio device keeps besides its queues.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Regs {
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_sel: u32,
    pub(crate) status: u32,
    pub(crate) interrupt_status: u32,
}

impl Regs {
    /// `FEATURES_OK` and `DRIVER_OK` set, and neither `NEEDS_RESET` nor
    /// `FAILED`.
    pub(crate) fn running(&self) -> bool {
        let need = VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        let stop = VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED;
        self.status & need == need && self.status & stop == 0
    }
}

/// What a virtio-mmio device supplies to the register file.
pub(crate) trait MmioDevice {
    /// `DeviceID`.
    const DEVICE_ID: u32;
    fn regs(&self) -> &Regs;
    fn regs_mut(&mut self) -> &mut Regs;
    /// Feature bits offered.
    fn device_features(&self) -> u64;
    fn queues(&self) -> &[Queue];
    fn queues_mut(&mut self) -> &mut [Queue];
    /// The configuration space (read-only to the driver).
    fn config_space(&self) -> Vec<u8>;
    /// A `QueueNotify` write for queue `queue` (an existing one).
    fn notify(&mut self, queue: usize);
    /// The device starts running, or a queue was made ready: whoever
    /// serves the queues should look.
    fn wake(&self);
}

/// The selected queue, if there is one.
fn selected<D: MmioDevice>(d: &D) -> Option<usize> {
    usize::try_from(d.regs().queue_sel)
        .ok()
        .filter(|&q| q < d.queues().len())
}

/// The selected queue, if its configuration may be written (not ready).
fn configurable<D: MmioDevice>(d: &mut D) -> Option<&mut Queue> {
    let q = selected(d)?;
    let queue = &mut d.queues_mut()[q];
    (!queue.ready()).then_some(queue)
}

/// A device reset: queues and registers as after power-on.
pub(crate) fn reset<D: MmioDevice>(d: &mut D) {
    for q in d.queues_mut() {
        q.reset();
    }
    *d.regs_mut() = Regs::default();
}

fn write_status<D: MmioDevice>(d: &mut D, v: u32) {
    if v == 0 {
        reset(d);
        return;
    }
    let r = *d.regs();
    // The driver only ever adds bits (clearing them takes a reset), and
    // DEVICE_NEEDS_RESET is the device's to set.
    let mut v = (v & !VIRTIO_CONFIG_S_NEEDS_RESET) | (r.status & VIRTIO_CONFIG_S_NEEDS_RESET);
    if r.status & !v != 0 {
        return;
    }
    if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && r.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
        let acceptable = r.driver_features & !d.device_features() == 0
            && r.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
        if !acceptable {
            // The driver reads Status back and sees FEATURES_OK missing.
            v &= !VIRTIO_CONFIG_S_FEATURES_OK;
        } else {
            let event_idx = r.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
            for q in d.queues_mut() {
                q.set_event_idx(event_idx);
            }
        }
    }
    let was_running = r.running();
    d.regs_mut().status = v;
    if !was_running && d.regs().running() {
        d.wake();
    }
}

fn read_reg<D: MmioDevice>(d: &D, offset: u32) -> u32 {
    let r = d.regs();
    let q = selected(d).map(|i| &d.queues()[i]);
    match offset {
        VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
        VIRTIO_MMIO_VERSION => MMIO_VERSION,
        VIRTIO_MMIO_DEVICE_ID => D::DEVICE_ID,
        VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
        VIRTIO_MMIO_DEVICE_FEATURES => match r.device_features_sel {
            0 => d.device_features() as u32,
            1 => (d.device_features() >> 32) as u32,
            _ => 0,
        },
        VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
        VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
        VIRTIO_MMIO_INTERRUPT_STATUS => r.interrupt_status,
        VIRTIO_MMIO_STATUS => r.status,
        // The configuration never changes.
        VIRTIO_MMIO_CONFIG_GENERATION => 0,
        _ => 0,
    }
}

fn write_reg<D: MmioDevice>(d: &mut D, offset: u32, v: u32) {
    match offset {
        VIRTIO_MMIO_DEVICE_FEATURES_SEL => d.regs_mut().device_features_sel = v,
        VIRTIO_MMIO_DRIVER_FEATURES_SEL => d.regs_mut().driver_features_sel = v,
        VIRTIO_MMIO_DRIVER_FEATURES => {
            let r = d.regs_mut();
            let negotiating = r.status & VIRTIO_CONFIG_S_DRIVER != 0
                && r.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
            if negotiating {
                let v = u64::from(v);
                match r.driver_features_sel {
                    0 => r.driver_features = (r.driver_features & !0xffff_ffff) | v,
                    1 => r.driver_features = (r.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
        }
        VIRTIO_MMIO_QUEUE_SEL => d.regs_mut().queue_sel = v,
        VIRTIO_MMIO_QUEUE_NUM => {
            // Sizes that are 0, over the maximum or not a power of two
            // are ignored by the queue.
            if let (Some(q), Ok(size)) = (configurable(d), u16::try_from(v)) {
                q.set_size(size);
            }
        }
        VIRTIO_MMIO_QUEUE_READY => {
            if let Some(i) = selected(d) {
                match v {
                    0 => d.queues_mut()[i].set_ready(false),
                    1 => {
                        d.queues_mut()[i].set_ready(true);
                        d.wake();
                    }
                    _ => {}
                }
            }
        }
        VIRTIO_MMIO_QUEUE_NOTIFY => {
            if let Ok(q) = usize::try_from(v) {
                if q < d.queues().len() {
                    d.notify(q);
                }
            }
        }
        VIRTIO_MMIO_INTERRUPT_ACK => d.regs_mut().interrupt_status &= !v,
        VIRTIO_MMIO_STATUS => write_status(d, v),
        // Misaligned ring addresses are ignored by the queue.
        VIRTIO_MMIO_QUEUE_DESC_LOW => {
            if let Some(q) = configurable(d) {
                q.set_desc_table_address(Some(v), None)
            }
        }
        VIRTIO_MMIO_QUEUE_DESC_HIGH => {
            if let Some(q) = configurable(d) {
                q.set_desc_table_address(None, Some(v))
            }
        }
        VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
            if let Some(q) = configurable(d) {
                q.set_avail_ring_address(Some(v), None)
            }
        }
        VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
            if let Some(q) = configurable(d) {
                q.set_avail_ring_address(None, Some(v))
            }
        }
        VIRTIO_MMIO_QUEUE_USED_LOW => {
            if let Some(q) = configurable(d) {
                q.set_used_ring_address(Some(v), None)
            }
        }
        VIRTIO_MMIO_QUEUE_USED_HIGH => {
            if let Some(q) = configurable(d) {
                q.set_used_ring_address(None, Some(v))
            }
        }
        _ => {}
    }
}

/// An MMIO read at `offset` into the window: the configuration space at
/// any natural width within it, the registers 32 bits wide and aligned.
pub(crate) fn mmio_read<D: MmioDevice>(d: &D, offset: u64, data: &mut [u8]) {
    data.fill(0);
    let config = u64::from(VIRTIO_MMIO_CONFIG);
    if offset >= config {
        let space = d.config_space();
        let start = offset - config;
        let len = data.len();
        if matches!(len, 1 | 2 | 4 | 8)
            && start
                .checked_add(len as u64)
                .is_some_and(|end| end <= space.len() as u64)
        {
            let start = start as usize;
            data.copy_from_slice(&space[start..start + len]);
        }
        return;
    }
    if let (Ok(bytes), 0) = (<&mut [u8; 4]>::try_from(data), offset % 4) {
        *bytes = read_reg(d, offset as u32).to_le_bytes();
    }
}

/// An MMIO write at `offset` into the window: registers only (the
/// configuration space is read-only), 32 bits wide and aligned.
pub(crate) fn mmio_write<D: MmioDevice>(d: &mut D, offset: u64, data: &[u8]) {
    if offset >= u64::from(VIRTIO_MMIO_CONFIG) || !offset.is_multiple_of(4) {
        return;
    }
    if let Ok(bytes) = <[u8; 4]>::try_from(data) {
        write_reg(d, offset as u32, u32::from_le_bytes(bytes));
    }
}
