//! The part of a [`VirtioBlk`](super::VirtioBlk) that executes requests:
//! one descriptor chain at a time, read through the DMA view of guest
//! memory (so a buffer outside guest memory or the window is refused like
//! a malformed chain), against the backing file.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{
    BlkCounters, ID_BYTES, MAX_CHAIN_DESCRIPTORS, MAX_REQUEST_BYTES, REQUEST_HEADER_SIZE,
    SECTOR_SIZE,
};
use crate::dma::DmaMemory;

/// The part of the device that executes requests.
pub(super) struct Backend {
    pub(super) file: File,
    pub(super) capacity_sectors: u64,
    pub(super) read_only: bool,
    pub(super) id: [u8; ID_BYTES],
    pub(super) counters: BlkCounters,
    pub(super) buf: Vec<u8>,
}

impl Backend {
    /// Executes one request; returns the number of bytes written into the
    /// chain's device-writable buffers (the used length).
    pub(super) fn execute(&mut self, dma: &DmaMemory, chain: DescriptorChain<&DmaMemory>) -> u32 {
        self.counters.requests += 1;

        // Bound the chain and find its status byte (the last byte of the
        // last device-writable descriptor), before anything else reads it.
        let mut count = 0;
        let mut status_at = None;
        for desc in chain.clone() {
            count += 1;
            if count > MAX_CHAIN_DESCRIPTORS {
                // Too long, or a loop: there is no last descriptor.
                return self.refuse(dma, None);
            }
            if desc.is_write_only() && desc.len() > 0 {
                status_at = desc.addr().checked_add(u64::from(desc.len()) - 1);
            }
        }
        let Some(status_at) = status_at else {
            return self.refuse(dma, None);
        };

        // Every buffer is mapped through the DMA view: one outside guest
        // memory or the window fails here.
        let Ok(mut reader) = Reader::new(dma, chain.clone()) else {
            return self.refuse(dma, Some(status_at));
        };
        let Ok(mut writer) = Writer::new(dma, chain) else {
            return self.refuse(dma, Some(status_at));
        };
        let writable = writer.available_bytes();
        if writable == 0 || reader.available_bytes() < REQUEST_HEADER_SIZE {
            return self.refuse(dma, Some(status_at));
        }
        let Ok(mut status) = writer.split_at(writable - 1) else {
            return self.refuse(dma, Some(status_at));
        };
        let mut header = [0u8; REQUEST_HEADER_SIZE];
        if reader.read_exact(&mut header).is_err() {
            return self.refuse(dma, Some(status_at));
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);

        let code = match kind {
            VIRTIO_BLK_T_IN => self.read(sector, &mut writer),
            VIRTIO_BLK_T_OUT => self.write(sector, &mut reader),
            VIRTIO_BLK_T_FLUSH => self.flush(),
            VIRTIO_BLK_T_GET_ID => self.get_id(&mut writer),
            _ => {
                self.counters.unsupported += 1;
                VIRTIO_BLK_S_UNSUPP
            }
        };
        if code == VIRTIO_BLK_S_IOERR {
            self.counters.io_errors += 1;
        }
        if status.write_all(&[code as u8]).is_err() {
            return self.refuse(dma, Some(status_at));
        }
        // At most MAX_REQUEST_BYTES + 1.
        u32::try_from(writer.bytes_written() + 1).unwrap_or(u32::MAX)
    }

    /// Counts a refused chain and sets its status to IOERR if possible.
    fn refuse(&mut self, dma: &DmaMemory, status_at: Option<GuestAddress>) -> u32 {
        self.counters.refused += 1;
        match status_at {
            Some(at) if dma.write_obj(VIRTIO_BLK_S_IOERR as u8, at).is_ok() => 1,
            _ => 0,
        }
    }

    /// The byte offset of a transfer of `len` bytes at `sector`, if the
    /// transfer is whole sectors, not too long, and inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        if len > MAX_REQUEST_BYTES || !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len as u64)?;
        (end <= self.capacity_sectors * SECTOR_SIZE).then_some(start)
    }

    fn read(&mut self, sector: u64, data: &mut Writer) -> u32 {
        let len = data.available_bytes();
        let Some(offset) = self.range(sector, len) else {
            return VIRTIO_BLK_S_IOERR;
        };
        self.buf.resize(len, 0);
        if self
            .file
            .read_exact_at(&mut self.buf[..len], offset)
            .is_err()
            || data.write_all(&self.buf[..len]).is_err()
        {
            return VIRTIO_BLK_S_IOERR;
        }
        self.counters.reads += 1;
        self.counters.bytes_read += len as u64;
        VIRTIO_BLK_S_OK
    }

    fn write(&mut self, sector: u64, data: &mut Reader) -> u32 {
        let len = data.available_bytes();
        let Some(offset) = self.range(sector, len) else {
            return VIRTIO_BLK_S_IOERR;
        };
        if self.read_only {
            return VIRTIO_BLK_S_IOERR;
        }
        self.buf.resize(len, 0);
        if data.read_exact(&mut self.buf[..len]).is_err()
            || self.file.write_all_at(&self.buf[..len], offset).is_err()
        {
            return VIRTIO_BLK_S_IOERR;
        }
        self.counters.writes += 1;
        self.counters.bytes_written += len as u64;
        VIRTIO_BLK_S_OK
    }

    fn flush(&mut self) -> u32 {
        if self.file.sync_data().is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        self.counters.flushes += 1;
        VIRTIO_BLK_S_OK
    }

    fn get_id(&mut self, data: &mut Writer) -> u32 {
        let n = data.available_bytes().min(ID_BYTES);
        if data.write_all(&self.id[..n]).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        self.counters.get_ids += 1;
        VIRTIO_BLK_S_OK
    }
}
