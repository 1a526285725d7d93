//! A 16550 UART on 8 I/O ports, on top of `vm-superio`.

use std::io::{self, Write};

use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::{Serial, Trigger};

use crate::{Device, Irq};

/// Number of I/O ports a [`Uart`] occupies (registers at offsets 0 to 7).
pub const UART_IO_PORTS: u16 = 8;

/// The interrupt of a [`Uart`], as `vm-superio` wants it.
struct IrqTrigger(Irq);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// The output sink of a [`Uart`].
type Output = Box<dyn Write + Send>;

/// A 16550A UART (with 64-byte FIFOs) on 8 I/O ports.
///
/// Bytes the guest writes to THR go to the output writer; bytes from the
/// host go in with [`Uart::enqueue_input`] and are read by the guest from
/// RBR. The interrupt is signalled the way `vm-superio` models it: when
/// received data arrives (or is pending) while IER enables the
/// received-data interrupt, and when THR empties while IER enables the
/// THR-empty interrupt. The guest then reads IIR/LSR to see why.
pub struct Uart {
    name: String,
    serial: Serial<IrqTrigger, NoEvents, Output>,
    lost_output: u64,
    irq_errors: u64,
}

impl Uart {
    /// A UART named `name` that signals `irq` and writes what the guest
    /// transmits to `output` (flushed after every byte).
    pub fn new(name: impl Into<String>, irq: Irq, output: Box<dyn Write + Send>) -> Uart {
        Uart {
            name: name.into(),
            serial: Serial::new(IrqTrigger(irq), output),
            lost_output: 0,
            irq_errors: 0,
        }
    }

    /// Feeds bytes received from the host side into the receive FIFO.
    ///
    /// Takes as many bytes as the FIFO has room for and returns how many
    /// that was (0 when the FIFO is full, or when the UART is in loopback
    /// mode and ignores the line). Raises the received-data interrupt if IER
    /// enables it. An error means the interrupt could not be signalled; the
    /// bytes may have been queued regardless.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => Ok(n),
            Err(SerialError::FullFifo) => Ok(0),
            Err(SerialError::Trigger(e)) | Err(SerialError::IOError(e)) => {
                self.irq_errors += 1;
                Err(e)
            }
        }
    }

    /// Room left in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// The interrupt this UART signals.
    pub fn irq(&self) -> &Irq {
        &self.serial.interrupt_evt().0
    }

    /// Bytes the guest transmitted that the output writer refused.
    pub fn lost_output_bytes(&self) -> u64 {
        self.lost_output
    }

    /// Times the interrupt eventfd could not be signalled.
    pub fn irq_errors(&self) -> u64 {
        self.irq_errors
    }
}

impl Device for Uart {
    fn name(&self) -> &str {
        &self.name
    }

    fn io_ports(&self) -> u16 {
        UART_IO_PORTS
    }

    fn mmio_size(&self) -> u64 {
        0
    }

    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let ([byte], Ok(offset @ 0..8)) = (data, u8::try_from(offset)) {
            *byte = self.serial.read(offset);
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        let (&[byte], Ok(offset @ 0..8)) = (data, u8::try_from(offset)) else {
            return;
        };
        match self.serial.write(offset, byte) {
            Ok(()) => {}
            Err(SerialError::IOError(_)) => self.lost_output += 1,
            Err(SerialError::Trigger(_)) => self.irq_errors += 1,
            Err(SerialError::FullFifo) => {}
        }
    }

    fn mmio_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn mmio_write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const RBR_THR: u16 = 0;
    const IER: u16 = 1;
    const IIR: u16 = 2;
    const LCR: u16 = 3;
    const LSR: u16 = 5;
    const SCR: u16 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DR: u8 = 0x01;
    const LSR_THRE: u8 = 0x20;
    const IIR_RDA: u8 = 0x04;

    /// A writer whose contents the test can read.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Uart, Irq, Shared) {
        let irq = Irq::new().unwrap();
        let watch = irq.try_clone().unwrap();
        let out = Shared::default();
        (Uart::new("com1", irq, Box::new(out.clone())), watch, out)
    }

    fn inb(u: &mut Uart, port: u16) -> u8 {
        let mut b = [0xAA];
        u.pio_read(port, &mut b);
        b[0]
    }

    fn outb(u: &mut Uart, port: u16, v: u8) {
        u.pio_write(port, &[v]);
    }

    #[test]
    fn geometry() {
        let (u, _, _) = uart();
        assert_eq!(u.name(), "com1");
        assert_eq!(u.io_ports(), 8);
        assert_eq!(u.mmio_size(), 0);
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let (mut u, irq, out) = uart();
        for &b in b"hello\n" {
            assert_ne!(inb(&mut u, LSR) & LSR_THRE, 0);
            outb(&mut u, RBR_THR, b);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\n");
        // THR-empty interrupt not enabled: nothing signalled.
        assert_eq!(irq.take().unwrap(), 0);
        outb(&mut u, IER, IER_THRE);
        assert!(irq.take().unwrap() > 0);
    }

    #[test]
    fn input_raises_irq_when_enabled_and_reads_back() {
        let (mut u, irq, _) = uart();
        // Not enabled yet: queued, no interrupt.
        assert_eq!(u.enqueue_input(b"ab").unwrap(), 2);
        assert_eq!(irq.take().unwrap(), 0);
        assert_ne!(inb(&mut u, LSR) & LSR_DR, 0);
        // Enabling the RDA interrupt with data pending raises it.
        outb(&mut u, IER, IER_RDA);
        assert_eq!(irq.take().unwrap(), 1);
        assert_eq!(inb(&mut u, IIR) & 0x0f, IIR_RDA);
        assert_eq!(inb(&mut u, RBR_THR), b'a');
        assert_eq!(inb(&mut u, RBR_THR), b'b');
        assert_eq!(inb(&mut u, LSR) & LSR_DR, 0);
        // New input while enabled raises it again.
        assert_eq!(u.enqueue_input(b"z").unwrap(), 1);
        assert_eq!(irq.take().unwrap(), 1);
        assert_ne!(inb(&mut u, LSR) & LSR_DR, 0);
        assert_eq!(inb(&mut u, RBR_THR), b'z');
    }

    #[test]
    fn fifo_capacity_is_respected() {
        let (mut u, _, _) = uart();
        assert_eq!(u.fifo_capacity(), 64);
        let big = [b'x'; 100];
        assert_eq!(u.enqueue_input(&big).unwrap(), 64);
        assert_eq!(u.fifo_capacity(), 0);
        assert_eq!(u.enqueue_input(b"more").unwrap(), 0);
        assert_eq!(u.enqueue_input(b"").unwrap(), 0);
        inb(&mut u, RBR_THR);
        assert_eq!(u.enqueue_input(b"yz").unwrap(), 1);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut u, _, out) = uart();
        outb(&mut u, SCR, 0x5a);
        assert_eq!(inb(&mut u, SCR), 0x5a);
        // Out of range offsets and wide accesses do nothing and read zero.
        outb(&mut u, 8, b'!');
        u.pio_write(RBR_THR, b"!!");
        u.pio_write(u16::MAX, b"!");
        u.pio_write(RBR_THR, &[]);
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(inb(&mut u, 8), 0);
        let mut wide = [0xffu8; 2];
        u.pio_read(SCR, &mut wide);
        assert_eq!(wide, [0, 0]);
        let mut w = [0xffu8; 4];
        u.mmio_read(0, &mut w);
        assert_eq!(w, [0; 4]);
        u.mmio_write(0, &[1]);
        // Divisor latch is reachable through LCR.DLAB.
        outb(&mut u, LCR, 0x80);
        outb(&mut u, RBR_THR, 0x01);
        assert_eq!(inb(&mut u, RBR_THR), 0x01);
        outb(&mut u, LCR, 0x03);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn broken_output_is_counted_not_fatal() {
        let irq = Irq::new().unwrap();
        let mut u = Uart::new("com2", irq, Box::new(Broken));
        outb(&mut u, RBR_THR, b'x');
        outb(&mut u, RBR_THR, b'y');
        assert_eq!(u.lost_output_bytes(), 2);
        assert_eq!(u.irq_errors(), 0);
        assert_eq!(u.irq().take().unwrap(), 0);
    }
}
