//! `uart-driver [DEVICE]`: drives the 16550 UART granted as `dev:DEVICE`
//! (default `com1`; 8 I/O ports and an interrupt), interrupt-driven.
//!
//! 1. Initialises it: interrupts off, divisor 1 (115200 baud), 8N1, FIFOs on
//!    and cleared, DTR|RTS|OUT2 in MCR, then the "received data available"
//!    interrupt on in IER.
//! 2. Writes `uart-driver ready\n` to the UART.
//! 3. Receives: after each interrupt it reads RBR while LSR reports data
//!    ready. A line ends at `\n` (a `\r` just before it is dropped; bytes
//!    past 4096 in one line are dropped). For each line it writes
//!    `echo: LINE\n` with LINE in ASCII upper case, except for the line
//!    `quit`, which ends the driver. Every byte written waits for LSR's
//!    "transmitter holding register empty".
//!
//! `uart-driver [DEVICE] serve SECTION [FAULTS]`: serves the UART to the
//! safe mediator instead, as a character device (the char contract, over
//! the rings the mediator lays out in the shared section `shm:SECTION`;
//! see `moat_libos::service::char`). After the same initialisation
//! (without the greeting) it sends the bytes of each write to THR one by
//! one, each after THRE, and answers once all are sent; it reads RBR only
//! while the mediator has lent it a read buffer, and answers that read as
//! soon as it has drained what LSR says is ready, so a killed driver loses
//! at most the bytes of one answer besides what the UART's FIFO holds
//! (which dies with its VMM). FAULTS
//! (`SEED:PER_MILLION:KIND[,KIND...]`, see `moat_libos::service::Faults`)
//! makes it misbehave on purpose. It serves until the mediator ends it.
//!
//! Output goes only to the UART (which the host wires to the console, or
//! to the line an embedder handed the device); errors go to stderr. Before
//! exiting after initialisation it turns the UART's interrupts off again.
//!
//! Exit codes: 0 after `quit`; 1 bad arguments; 2 the device cannot be
//! opened or has no usable 16550 (fewer than 8 ports, no interrupt, LSR
//! reads 0xff); 3 no interrupt within 10 s (echo mode); 4 the host or the
//! UART failed (waiting on the interrupt failed, the transmitter stays
//! busy for 1 s), or the service section cannot be opened or is broken.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use moat_libos::device::{Device, Interrupt, Ports};
use moat_libos::service::char::{serve_char, CharDevice};
use moat_libos::service::{prepare, status, Faults};
use moat_libos::{env, eprintln, time};

moat_libos::entry!(main);

// Registers (offsets from the first port).
const RBR: u16 = 0; // receive buffer (read, DLAB=0)
const THR: u16 = 0; // transmit holding (write, DLAB=0)
const DLL: u16 = 0; // divisor low (DLAB=1)
const IER: u16 = 1; // interrupt enable (DLAB=0)
const DLM: u16 = 1; // divisor high (DLAB=1)
const FCR: u16 = 2; // FIFO control (write)
const LCR: u16 = 3; // line control
const MCR: u16 = 4; // modem control
const LSR: u16 = 5; // line status

const IER_RDA: u8 = 0x01; // received data available
const FCR_ENABLE_CLEAR: u8 = 0x07; // FIFOs on, both cleared, trigger at 1 byte
const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
const MCR_DTR_RTS_OUT2: u8 = 0x0b;
const LSR_DR: u8 = 0x01; // data ready
const LSR_THRE: u8 = 0x20; // transmitter holding register empty

/// How long to wait for input before giving up (exit 3).
const IDLE_TIMEOUT_MICROS: i64 = 10_000_000;
/// How long the transmitter may stay busy before giving up (exit 4).
const THRE_TIMEOUT_MICROS: u64 = 1_000_000;
const MAX_LINE: usize = 4096;

const EXIT_BAD_ARGS: i32 = 1;
const EXIT_NO_DEVICE: i32 = 2;
const EXIT_IDLE: i32 = 3;
const EXIT_FAILED: i32 = 4;

/// What the arguments ask for.
enum Mode<'a> {
    Echo,
    /// Serve the section, with these faults.
    Serve(&'a str, Option<Faults>),
}

const USAGE: &str = "usage: uart-driver [DEVICE] [serve SECTION [SEED:PER_MILLION:KINDS]]";

/// The device's name and the mode, or why the arguments are wrong.
fn parse(args: &[alloc::string::String]) -> Result<(&str, Mode<'_>), &'static str> {
    let rest = &args[1.min(args.len())..];
    let (name, rest) = match rest.first().map(|s| s.as_str()) {
        Some(first) if first != "serve" => (first, &rest[1..]),
        _ => ("com1", rest),
    };
    match rest {
        [] => Ok((name, Mode::Echo)),
        [serve, section] if serve == "serve" => Ok((name, Mode::Serve(section, None))),
        [serve, section, spec] if serve == "serve" => match Faults::parse(spec) {
            Some(f) => Ok((name, Mode::Serve(section, Some(f)))),
            None => Err("uart-driver: bad fault spec (SEED:PER_MILLION:KIND[,KIND...])"),
        },
        _ => Err(USAGE),
    }
}

fn main() -> i32 {
    let args = env::args();
    let (name, mode) = match parse(&args) {
        Ok(v) => v,
        Err(why) => {
            eprintln!("{why}");
            return EXIT_BAD_ARGS;
        }
    };
    if matches!(mode, Mode::Serve(..)) {
        // Before the first open: a template carries it.
        prepare();
    }

    let device = match Device::open(name) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("uart-driver: cannot open device `{name}`: {}", e.name());
            return EXIT_NO_DEVICE;
        }
    };
    let ports = match device.io_ports() {
        Some(p) if p.count() >= 8 => p,
        _ => {
            eprintln!("uart-driver: device `{name}` does not have the 8 I/O ports of a 16550");
            return EXIT_NO_DEVICE;
        }
    };
    let irq = match device.interrupt() {
        Ok(i) => i,
        Err(e) => {
            eprintln!(
                "uart-driver: device `{name}` gives no interrupt: {}",
                e.name()
            );
            return EXIT_NO_DEVICE;
        }
    };

    let uart = Uart { ports };
    if !uart.init() {
        eprintln!("uart-driver: no 16550 answers at port {:#x}", ports.base());
        return EXIT_NO_DEVICE;
    }
    if let Mode::Serve(section, faults) = mode {
        let mut dev = Served {
            uart: &uart,
            irq: &irq,
        };
        let code = match serve_char(section, &mut dev, faults) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("uart-driver: the service section failed: {}", e.name());
                EXIT_FAILED
            }
        };
        uart.ports.outb(IER, 0);
        return code;
    }
    let code = match run(&uart, &irq) {
        Ok(()) => 0,
        Err(Stop::Idle) => {
            eprintln!("uart-driver: no input for 10 s");
            EXIT_IDLE
        }
        Err(Stop::WaitFailed(e)) => {
            eprintln!(
                "uart-driver: waiting for the interrupt failed: {}",
                e.name()
            );
            EXIT_FAILED
        }
        Err(Stop::TransmitterStuck) => {
            eprintln!("uart-driver: the transmitter stays busy");
            EXIT_FAILED
        }
    };
    uart.ports.outb(IER, 0);
    code
}

/// Why the receive loop ended other than by `quit`.
enum Stop {
    Idle,
    WaitFailed(moat_libos::Error),
    TransmitterStuck,
}

struct Uart {
    ports: Ports,
}

impl Uart {
    /// Program the UART; `false` if nothing answers (LSR reads all ones).
    fn init(&self) -> bool {
        let p = &self.ports;
        p.outb(IER, 0);
        p.outb(LCR, LCR_DLAB);
        p.outb(DLL, 1);
        p.outb(DLM, 0);
        p.outb(LCR, LCR_8N1);
        p.outb(FCR, FCR_ENABLE_CLEAR);
        p.outb(MCR, MCR_DTR_RTS_OUT2);
        if p.inb(LSR) == 0xff {
            return false;
        }
        p.outb(IER, IER_RDA);
        true
    }

    fn write_byte(&self, b: u8) -> Result<(), Stop> {
        let mut start = None;
        let mut polls = 0u32;
        while self.ports.inb(LSR) & LSR_THRE == 0 {
            polls += 1;
            // Look at the clock now and then only: it is a host call.
            if polls.is_multiple_of(64) {
                let t0 = *start.get_or_insert_with(time::now_micros);
                if time::elapsed_micros(t0) > THRE_TIMEOUT_MICROS {
                    return Err(Stop::TransmitterStuck);
                }
            }
            core::hint::spin_loop();
        }
        self.ports.outb(THR, b);
        Ok(())
    }

    fn write_all(&self, bytes: &[u8]) -> Result<(), Stop> {
        bytes.iter().try_for_each(|&b| self.write_byte(b))
    }
}

/// Announce readiness, then echo lines until `quit`.
fn run(uart: &Uart, irq: &Interrupt) -> Result<(), Stop> {
    uart.write_all(b"uart-driver ready\n")?;
    let mut line = Vec::with_capacity(128);
    loop {
        // Drain first: input may have arrived before the interrupt was on,
        // and bytes that arrive after this drain raise the interrupt.
        while uart.ports.inb(LSR) & LSR_DR != 0 {
            let b = uart.ports.inb(RBR);
            if b != b'\n' {
                if line.len() < MAX_LINE {
                    line.push(b);
                }
                continue;
            }
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line == b"quit" {
                return Ok(());
            }
            line.make_ascii_uppercase();
            uart.write_all(b"echo: ")?;
            uart.write_all(&line)?;
            uart.write_all(b"\n")?;
            line.clear();
        }
        match irq.wait(IDLE_TIMEOUT_MICROS) {
            Ok(true) => {}
            Ok(false) => return Err(Stop::Idle),
            Err(e) => return Err(Stop::WaitFailed(e)),
        }
    }
}

/// The UART as the mediator's character device.
struct Served<'a> {
    uart: &'a Uart,
    irq: &'a Interrupt,
}

impl CharDevice for Served<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), u8> {
        self.uart.write_all(bytes).map_err(|_| status::IO_ERROR)
    }

    fn read(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() && self.uart.ports.inb(LSR) & LSR_DR != 0 {
            buf[n] = self.uart.ports.inb(RBR);
            n += 1;
        }
        n
    }

    fn event(&self) -> u64 {
        self.irq.handle()
    }
}
