//! One pass of a [`VirtioNet`](super::VirtioNet) over its queues: every
//! frame the driver queued for sending goes to the wire, then frames from
//! the wire fill the receive buffers the driver lent, until the wire is
//! empty or no buffer is left. Every chain is read through the DMA view of
//! guest memory, so a buffer outside the window is refused like a
//! malformed chain.

use std::fs::File;
use std::io::{self, Read, Write};

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};

use super::{NetDevCounters, VirtioNet, MAX_FRAME, MIN_FRAME, NET_HDR_SIZE, RX, TX};
use crate::dma::DmaMemory;

/// Most descriptors in one chain (a frame takes one or two).
const MAX_CHAIN_DESCRIPTORS: usize = 16;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Frames moved, either way (malformed chains returned included).
    pub moved: usize,
    /// Receive buffers are lent and the wire was read until empty: the
    /// serving thread should wake when the wire has a frame. False when
    /// no buffer is lent (a notification wakes it) or nothing runs.
    pub wire_wanted: bool,
}

/// Why a receive buffer did not take a frame.
enum Refusal {
    /// The chain is malformed or outside the window: returned empty.
    Bad,
    /// The chain is sound but shorter than the frame: kept for the next.
    Short,
}

impl VirtioNet {
    /// Serves both queues once (see the module docs) and raises the
    /// interrupt if a buffer was used and the driver did not turn
    /// interrupts off. Does nothing unless [`VirtioNet::serving`].
    pub fn serve(&mut self) -> Pass {
        if !self.serving() || !self.rings_ok() {
            return Pass::default();
        }
        let dma = DmaMemory::new(&self.mem, self.dma_ranges.as_deref());
        let [rxq, txq] = &mut self.queues;
        let sent = transmit(&dma, txq, &self.tap, &mut self.tx_frame, &mut self.counters);
        let received = receive(
            &dma,
            rxq,
            &self.tap,
            &mut self.rx_frame,
            &mut self.pending,
            &mut self.counters,
        );
        let (Ok(sent), Ok((received, wire_wanted))) = (sent, received) else {
            self.needs_reset();
            return Pass::default();
        };
        let mut notify = false;
        for (q, used) in [(RX, received), (TX, sent)] {
            if used > 0 {
                notify |= self.queues[q].needs_notification(&dma).unwrap_or(true);
            }
        }
        if notify {
            self.signal(VIRTIO_MMIO_INT_VRING);
        }
        Pass {
            moved: sent + received,
            wire_wanted,
        }
    }
}

impl VirtioNet {
    /// Before the serving thread sleeps: asks the driver to notify at its
    /// next buffer on either queue (with `EVENT_IDX`, `avail_event` set),
    /// then looks once more. True: nothing is waiting, it may sleep.
    pub fn enable_notification(&mut self) -> bool {
        if !self.serving() || !self.rings_ok() {
            return true;
        }
        let dma = DmaMemory::new(&self.mem, self.dma_ranges.as_deref());
        let mut idle = true;
        let mut broken = false;
        for q in &mut self.queues {
            match q.enable_notification(&dma) {
                Ok(pending) => idle &= !pending,
                Err(_) => broken = true,
            }
        }
        if broken {
            self.needs_reset();
            return true;
        }
        idle
    }

    /// After the serving thread woke: the driver need not notify while it
    /// polls.
    pub fn disable_notification(&mut self) {
        if !self.serving() || !self.rings_ok() {
            return;
        }
        let dma = DmaMemory::new(&self.mem, self.dma_ranges.as_deref());
        if self
            .queues
            .iter_mut()
            .any(|q| q.disable_notification(&dma).is_err())
        {
            self.needs_reset();
        }
    }
}

/// Sends every queued frame; returns how many chains were used. `Err`:
/// the ring is broken.
fn transmit(
    dma: &DmaMemory,
    q: &mut Queue,
    tap: &File,
    frame: &mut [u8; MAX_FRAME + 1],
    c: &mut NetDevCounters,
) -> Result<usize, ()> {
    // At most a ring's worth: `iter` refuses an index further ahead.
    let chains: Vec<DescriptorChain<&DmaMemory>> = q.iter(dma).map_err(|_| ())?.collect();
    let mut used = 0;
    for chain in chains {
        let head = chain.head_index();
        match read_frame(dma, chain, frame) {
            Some(len) => match (&*tap).write(&frame[..len]) {
                Ok(_) => {
                    c.tx_frames += 1;
                    c.tx_bytes += len as u64;
                }
                Err(_) => c.tx_errors += 1,
            },
            None => c.refused += 1,
        }
        if head < q.size() {
            q.add_used(dma, head, 0).map_err(|_| ())?;
            used += 1;
        }
    }
    Ok(used)
}

/// The frame in a transmit chain, copied into `frame`: its length, or
/// `None` if the chain is malformed.
fn read_frame(
    dma: &DmaMemory,
    chain: DescriptorChain<&DmaMemory>,
    frame: &mut [u8; MAX_FRAME + 1],
) -> Option<usize> {
    let mut count = 0;
    for d in chain.clone() {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS || d.is_write_only() {
            return None;
        }
    }
    let mut r = Reader::new(dma, chain).ok()?;
    let total = r.available_bytes();
    if !(NET_HDR_SIZE + MIN_FRAME..=NET_HDR_SIZE + MAX_FRAME).contains(&total) {
        return None;
    }
    let mut hdr = [0u8; NET_HDR_SIZE];
    r.read_exact(&mut hdr).ok()?;
    let len = total - NET_HDR_SIZE;
    r.read_exact(&mut frame[..len]).ok()?;
    Some(len)
}

/// Fills receive buffers from the wire; returns how many were used and
/// whether the wire was read until empty with buffers still lent. `Err`:
/// the ring is broken.
fn receive(
    dma: &DmaMemory,
    q: &mut Queue,
    tap: &File,
    frame: &mut [u8; MAX_FRAME + 1],
    pending: &mut Option<usize>,
    c: &mut NetDevCounters,
) -> Result<(usize, bool), ()> {
    let mut used = 0;
    // Bounded: each round uses a buffer, drops a frame or returns; at
    // most a ring's worth of short buffers are skipped before a frame is
    // dropped.
    let mut short = 0;
    loop {
        let len = match *pending {
            Some(len) => len,
            None => match (&*tap).read(&mut frame[..]) {
                Ok(n) if !(MIN_FRAME..=MAX_FRAME).contains(&n) => {
                    c.rx_dropped += 1;
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Empty (or failed: the thread waits for it to be readable
                // again rather than spin).
                Err(_) => return Ok((used, true)),
            },
        };
        *pending = Some(len);
        let Some(chain) = q.iter(dma).map_err(|_| ())?.next() else {
            // No buffer lent: the frame waits for one.
            return Ok((used, false));
        };
        let head = chain.head_index();
        match write_frame(dma, chain, &frame[..len]) {
            Ok(n) => {
                *pending = None;
                c.rx_frames += 1;
                c.rx_bytes += len as u64;
                q.add_used(dma, head, n).map_err(|_| ())?;
                used += 1;
            }
            Err(Refusal::Short) if short < usize::from(q.size()) => {
                // Leave the buffer lent (the driver may size buffers for
                // its own MTU) and drop the frame.
                short += 1;
                q.set_next_avail(q.next_avail().wrapping_sub(1));
                *pending = None;
                c.rx_dropped += 1;
                if short == usize::from(q.size()) {
                    return Ok((used, true));
                }
            }
            Err(_) => {
                c.refused += 1;
                if head < q.size() {
                    q.add_used(dma, head, 0).map_err(|_| ())?;
                    used += 1;
                }
            }
        }
    }
}

/// Writes the header and `frame` into a receive chain; the used length.
fn write_frame(
    dma: &DmaMemory,
    chain: DescriptorChain<&DmaMemory>,
    frame: &[u8],
) -> Result<u32, Refusal> {
    let mut count = 0;
    for d in chain.clone() {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS || !d.is_write_only() {
            return Err(Refusal::Bad);
        }
    }
    let mut w = Writer::new(dma, chain).map_err(|_| Refusal::Bad)?;
    if w.available_bytes() < NET_HDR_SIZE + frame.len() {
        return Err(Refusal::Short);
    }
    let mut hdr = [0u8; NET_HDR_SIZE];
    // num_buffers: the frame is in this one buffer.
    hdr[10] = 1;
    w.write_all(&hdr).map_err(|_| Refusal::Bad)?;
    w.write_all(frame).map_err(|_| Refusal::Bad)?;
    Ok((NET_HDR_SIZE + frame.len()) as u32)
}
