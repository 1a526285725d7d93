//! `virtio-net DEVICE serve SECTION [FAULTS]`: a NIC driver for the
//! virtio-mmio network device granted as `dev:DEVICE`, built on
//! `virtio_drivers`' `VirtIONet`, unmodified, through moat-libos-virtio's
//! Hal. It serves the net contract to the safe mediator over the rings in
//! the shared section `shm:SECTION` (see `moat_libos::service::net`):
//! INFO answers the device's MAC address and an MTU of 1500; each frame to
//! send goes to the device's transmit queue (`VirtIONet::send`, which
//! waits until the device used it); received frames are copied from the
//! driver's receive buffers into the mediator's and the buffer is given
//! back to the device. FAULTS (`SEED:PER_MILLION:KIND[,KIND...]`) makes it
//! misbehave on purpose.
//!
//! `virtio-net DEVICE info` prints `virtio-net: mac XX:XX:XX:XX:XX:XX`.
//!
//! **Exits.** The transport is wrapped in `moat_libos_virtio::EventIdx`
//! (`VIRTIO_RING_F_EVENT_IDX`): the driver notifies the device (an MMIO
//! write, a VM exit) only when the device said it is going to sleep, and
//! the device interrupts only when the driver asked, just before it waits
//! (a call). While frames flow, sending one and giving a receive buffer
//! back cost no exit.
//!
//! Exit codes: 2 bad arguments; 3 the device cannot be opened or
//! initialised, or is not a network device; 4 the section failed.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

use moat_libos::device::Interrupt;
use moat_libos::service::net::{serve_net, NetDevice};
use moat_libos::service::{status, Faults};
use moat_libos::{env, eprintln, println};
use moat_libos_virtio::virtio_drivers::device::net::VirtIONet;
use moat_libos_virtio::virtio_drivers::transport::mmio::MmioTransport;
use moat_libos_virtio::virtio_drivers::transport::{DeviceType, Transport};
use moat_libos_virtio::{EventIdx, MoatHal, Rings};

moat_libos::entry!(main);

const EXIT_USAGE: i32 = 2;
const EXIT_DEVICE: i32 = 3;
const EXIT_IO: i32 = 4;

/// Receive buffers the driver keeps in the device's queue.
const QUEUE: usize = 16;
/// Each receive buffer: the 12-byte header and the longest frame.
const BUF_LEN: usize = 2048;
/// The MTU reported (the device offers no `VIRTIO_NET_F_MTU`).
const MTU: u16 = 1500;

const USAGE: &str = "usage: virtio-net DEVICE serve SECTION [SEED:PER_MILLION:KINDS]\n       \
                     virtio-net DEVICE info";

type Net = VirtIONet<MoatHal, EventIdx<MmioTransport<'static>>, QUEUE>;

/// The receive queue's index.
const RX_QUEUE: u16 = 0;

struct Nic {
    net: Net,
    rings: alloc::rc::Rc<Rings>,
    mac: [u8; 6],
    irq: Interrupt,
}

impl NetDevice for Nic {
    fn info(&self) -> ([u8; 6], u16) {
        (self.mac, MTU)
    }

    fn send(&mut self, frame: &[u8]) -> core::result::Result<(), u8> {
        let mut tx = self.net.new_tx_buffer(frame.len());
        tx.packet_mut().copy_from_slice(frame);
        self.net.send(tx).map_err(|_| status::IO_ERROR)
    }

    fn receive(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            let rx = self.net.receive().ok()?;
            let packet = rx.packet();
            let n = packet.len();
            let fits = n <= buf.len();
            if fits {
                buf[..n].copy_from_slice(packet);
            }
            if self.net.recycle_rx_buffer(rx).is_err() {
                // The queue refused its own buffer back: the device is
                // broken; the mediator's deadline replaces this driver.
                eprintln!("virtio-net: a receive buffer could not be given back");
            }
            if fits {
                return Some(n);
            }
        }
    }

    fn event(&self) -> u64 {
        self.irq.handle()
    }

    fn may_sleep(&mut self) -> bool {
        self.rings.want_interrupt(RX_QUEUE);
        !self.net.can_recv()
    }
}

fn main() -> i32 {
    let args: Vec<String> = env::args().into_iter().skip(1).collect();
    let (name, serve) = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [name, "info"] => (name, None),
        [name, "serve", section] => (name, Some((section, None))),
        [name, "serve", section, faults] => match Faults::parse(faults) {
            Some(f) => (name, Some((section, Some(f)))),
            None => {
                eprintln!("{USAGE}");
                return EXIT_USAGE;
            }
        },
        _ => {
            eprintln!("{USAGE}");
            return EXIT_USAGE;
        }
    };
    if serve.is_some() {
        // Before the device is opened: a template carries it.
        moat_libos::service::prepare();
    }
    let dev = match moat_libos_virtio::open(name) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("virtio-net: device `{name}`: {e}");
            return EXIT_DEVICE;
        }
    };
    if dev.transport.device_type() != DeviceType::Network {
        eprintln!(
            "virtio-net: device `{name}` is a virtio {:?} device, not a network device",
            dev.transport.device_type()
        );
        return EXIT_DEVICE;
    }
    let Some(irq) = dev.interrupt else {
        eprintln!("virtio-net: device `{name}` gives no interrupt");
        return EXIT_DEVICE;
    };
    let transport = EventIdx::new(dev.transport);
    let rings = transport.rings();
    let net = match Net::new(transport, BUF_LEN) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("virtio-net: device `{name}`: initialisation failed: {e}");
            return EXIT_DEVICE;
        }
    };
    let mac: [u8; 6] = net.mac_address();
    let Some((section, faults)) = serve else {
        let m = mac;
        println!(
            "virtio-net: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
        return 0;
    };
    let mut nic = Nic {
        net,
        rings,
        mac,
        irq,
    };
    match serve_net(section, &mut nic, faults) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("virtio-net: the service section failed: {}", e.name());
            EXIT_IO
        }
    }
}
