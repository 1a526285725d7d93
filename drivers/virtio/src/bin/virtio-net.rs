//! `virtio-net DEVICE serve SECTION [FAULTS]`: a NIC driver for the
//! virtio-mmio network device granted as `dev:DEVICE`, built on
//! `virtio_drivers`' `VirtIONetRaw`, unmodified, through moat-libos-virtio's
//! Hal. It serves the net contract to the safe mediator over the rings in
//! the shared section `shm:SECTION` (see `moat_libos::service::net`):
//! INFO answers the device's MAC address and an MTU of 1500; each frame to
//! send is copied into one of the driver's transmit buffers and queued to
//! the device (answered once queued, as a NIC's transmit is: up to the
//! queue's size in flight, a wait only when all are with the device);
//! received frames are copied from the driver's receive buffers into the
//! mediator's and the buffer is lent to the device again. The driver
//! lends the device no receive buffer before the mediator lends it one,
//! so the device reads nothing from the wire before then: a standby
//! driver, restored ahead of need, leaves the wire to the one serving. FAULTS (`SEED:PER_MILLION:KIND[,KIND...]`) makes it
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

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use moat_libos::device::Interrupt;
use moat_libos::service::net::{serve_net, NetDevice};
use moat_libos::service::{status, Faults};
use moat_libos::{env, eprintln, println, time};
use moat_libos_virtio::virtio_drivers::device::net::VirtIONetRaw;
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

type Net = VirtIONetRaw<MoatHal, EventIdx<MmioTransport<'static>>, QUEUE>;

/// The receive queue's index.
const RX_QUEUE: u16 = 0;
/// How long a send waits for a transmit buffer to come back when all
/// [`QUEUE`] are with the device.
const TX_TIMEOUT_MICROS: u64 = 1_000_000;

/// A buffer handed to the device: header and frame. Boxed, so it stays
/// where the device was told it is while the device has it.
type Buf = Box<[u8; BUF_LEN]>;

struct Nic {
    net: Net,
    rings: alloc::rc::Rc<Rings>,
    mac: [u8; 6],
    irq: Interrupt,
    /// Receive buffers with the device, by token.
    rx: Vec<Option<Buf>>,
    /// Transmit buffers with the device, by token, and the length handed.
    tx: Vec<Option<(Buf, usize)>>,
    /// Transmit buffers back from the device.
    tx_free: Vec<Buf>,
}

impl Nic {
    fn new(net: Net, rings: alloc::rc::Rc<Rings>, irq: Interrupt) -> Nic {
        let mac = net.mac_address();
        Nic {
            net,
            rings,
            mac,
            irq,
            rx: Vec::new(),
            tx: (0..QUEUE).map(|_| None).collect(),
            tx_free: (0..QUEUE).map(|_| -> Buf { Box::new([0; BUF_LEN]) }).collect(),
        }
    }

    /// Lends the device its receive buffers, the first time the mediator
    /// lends the driver one: until then the device reads nothing from
    /// the wire (a standby driver, made ahead of need, must not take
    /// frames from the driver serving).
    fn start_receiving(&mut self) {
        if !self.rx.is_empty() {
            return;
        }
        self.rx = (0..QUEUE).map(|_| None).collect();
        for _ in 0..QUEUE {
            let mut buf: Buf = Box::new([0; BUF_LEN]);
            // SAFETY: the buffer is boxed and kept in `rx` under its token
            // until the device gives it back (`receive_complete`), so it
            // stays valid and unmoved while the device may write it.
            let token = match unsafe { self.net.receive_begin(&mut buf[..]) } {
                Ok(t) => t,
                Err(_) => fatal("cannot lend a receive buffer"),
            };
            match self.rx.get_mut(usize::from(token)) {
                Some(slot) => *slot = Some(buf),
                None => fatal("the device's queue gave a token out of range"),
            }
        }
    }

    /// Takes back every transmit buffer the device is done with.
    fn reclaim(&mut self) {
        while let Some(token) = self.net.poll_transmit() {
            let Some((buf, len)) = self.tx.get_mut(usize::from(token)).and_then(Option::take)
            else {
                fatal("the device completed a transmit buffer it was not given");
            };
            // SAFETY: `buf[..len]` is the slice handed to `transmit_begin`
            // for this token.
            if unsafe { self.net.transmit_complete(token, &buf[..len]) }.is_err() {
                fatal("the transmit queue refused its own buffer back");
            }
            self.tx_free.push(buf);
        }
    }
}

/// End the picoprocess: a buffer may still be in the device's hands, so
/// none may be reused.
fn fatal(what: &str) -> ! {
    eprintln!("virtio-net: {what}");
    moat_libos::process::exit(EXIT_IO)
}

impl NetDevice for Nic {
    fn info(&self) -> ([u8; 6], u16) {
        (self.mac, MTU)
    }

    /// Queues the frame to the device and answers at once (the device
    /// owns a copy); waits only while every transmit buffer is with it.
    fn send(&mut self, frame: &[u8]) -> core::result::Result<(), u8> {
        self.reclaim();
        if self.tx_free.is_empty() {
            let t0 = time::now_micros();
            while self.tx_free.is_empty() {
                if time::elapsed_micros(t0) > TX_TIMEOUT_MICROS {
                    return Err(status::IO_ERROR);
                }
                core::hint::spin_loop();
                self.reclaim();
            }
        }
        let mut buf = self.tx_free.pop().ok_or(status::IO_ERROR)?;
        let hdr = match self.net.fill_buffer_header(&mut buf[..]) {
            Ok(h) if h + frame.len() <= BUF_LEN => h,
            _ => {
                self.tx_free.push(buf);
                return Err(status::INVALID);
            }
        };
        buf[hdr..hdr + frame.len()].copy_from_slice(frame);
        let len = hdr + frame.len();
        // SAFETY: the buffer is boxed and kept in `tx` under its token
        // until the device gives it back (`reclaim`).
        match unsafe { self.net.transmit_begin(&buf[..len]) } {
            Ok(token) => match self.tx.get_mut(usize::from(token)) {
                Some(slot) => {
                    *slot = Some((buf, len));
                    Ok(())
                }
                None => fatal("the device's queue gave a token out of range"),
            },
            Err(_) => {
                self.tx_free.push(buf);
                Err(status::IO_ERROR)
            }
        }
    }

    fn receive(&mut self, out: &mut [u8]) -> Option<usize> {
        self.start_receiving();
        loop {
            let token = self.net.poll_receive()?;
            let Some(mut buf) = self.rx.get_mut(usize::from(token)).and_then(Option::take) else {
                fatal("the device completed a receive buffer it was not lent");
            };
            // SAFETY: `buf` is the buffer lent with this token.
            let got = unsafe { self.net.receive_complete(token, &mut buf[..]) };
            let frame = got.ok().and_then(|(hdr, len)| buf.get(hdr..hdr + len));
            let n = frame.map(|f| {
                let fits = f.len() <= out.len();
                if fits {
                    out[..f.len()].copy_from_slice(f);
                }
                (f.len(), fits)
            });
            // SAFETY: as in `Nic::new`: kept in `rx` until given back.
            let again = unsafe { self.net.receive_begin(&mut buf[..]) };
            match again.ok().and_then(|t| self.rx.get_mut(usize::from(t))) {
                Some(slot) => *slot = Some(buf),
                None => fatal("a receive buffer could not be lent again"),
            }
            if let Some((n, true)) = n {
                return Some(n);
            }
        }
    }

    fn event(&self) -> u64 {
        self.irq.handle()
    }

    fn busy(&mut self) -> bool {
        self.reclaim();
        self.tx_free.len() < QUEUE
    }

    fn may_sleep(&mut self) -> bool {
        self.reclaim();
        self.rings.want_interrupt(RX_QUEUE);
        self.net.poll_receive().is_none()
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
    let net = match Net::new(transport) {
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
    let mut nic = Nic::new(net, rings, irq);
    match serve_net(section, &mut nic, faults) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("virtio-net: the service section failed: {}", e.name());
            EXIT_IO
        }
    }
}
