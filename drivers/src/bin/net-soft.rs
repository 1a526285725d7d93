//! `net-soft SECTION WIRE_URI MAC [MTU] [FAULTS] [token=HEX]`: a software NIC serving the net
//! contract to the safe mediator, over the rings the mediator lays out in
//! the shared section `shm:SECTION`. Its wire is the stream WIRE_URI (a
//! `tcp.client:` or `pipe:` the host's device side listens on), carrying
//! each Ethernet frame as a 2-byte little-endian length and the frame.
//! With `token=HEX` it first sends `MOATWIRE` and HEX on the wire (the
//! device side turns away a connection that does not: anyone on the
//! host could connect to it otherwise).
//! MAC is six hex bytes with `:` between them (a unicast address); MTU is
//! 1500 by default. FAULTS (`SEED:PER_MILLION:KIND[,KIND...]`, see
//! `moat_libos::service::Faults`) makes it misbehave on purpose. Runs on
//! both hosts.
//!
//! Frames longer than the MTU allows in either direction are dropped, as
//! a NIC drops them; so are frames that come when the mediator has lent
//! no receive buffer and the wire's reassembly buffer is full.
//!
//! It serves until the mediator ends it. Exit codes: 2 bad arguments; 3
//! the wire cannot be opened; 4 the section cannot be opened or is broken.
#![no_std]
#![no_main]
extern crate alloc;

use alloc::vec::Vec;

use moat_libos::moat_pal::{access, create, open_option};
use moat_libos::service::net::{serve_net, NetDevice};
use moat_libos::service::{prepare, status, Faults};
use moat_libos::stream::Stream;
use moat_libos::sync::Event;
use moat_libos::{env, eprintln, Error};

moat_libos::entry!(main);

/// An Ethernet header plus a VLAN tag: what a frame carries beyond the
/// MTU.
const OVERHEAD: usize = 18;

struct Soft {
    wire: Stream,
    readable: Event,
    mac: [u8; 6],
    mtu: u16,
    /// Bytes read from the wire that are not a whole frame yet.
    pending: Vec<u8>,
    /// Bytes of a frame too long to take, still to be skipped.
    skip: usize,
}

impl Soft {
    fn max_frame(&self) -> usize {
        usize::from(self.mtu) + OVERHEAD
    }

    /// Reads what the wire has (never waits: the stream is non-blocking).
    fn fill(&mut self) {
        let room = 2 * (2 + self.max_frame());
        while self.pending.len() < room {
            let at = self.pending.len();
            self.pending.resize(room, 0);
            match self.wire.read(&mut self.pending[at..]) {
                Ok(n) => self.pending.truncate(at + n),
                Err(_) => {
                    self.pending.truncate(at);
                    return;
                }
            }
            if self.pending.len() == at {
                return;
            }
        }
    }
}

impl NetDevice for Soft {
    fn info(&self) -> ([u8; 6], u16) {
        (self.mac, self.mtu)
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), u8> {
        if frame.len() > self.max_frame() {
            return Err(status::INVALID);
        }
        let mut b = Vec::with_capacity(2 + frame.len());
        b.extend_from_slice(&(frame.len() as u16).to_le_bytes());
        b.extend_from_slice(frame);
        let mut at = 0;
        while at < b.len() {
            match self.wire.write(&b[at..]) {
                Ok(n) if n > 0 => at += n,
                // A full wire drops a frame only if none of it went: a
                // partial frame would break the framing, so it is
                // finished, waiting.
                Err(Error::WouldBlock) if at > 0 => moat_libos::thread::sleep_micros(50),
                _ => return Err(status::IO_ERROR),
            }
        }
        Ok(())
    }

    fn receive(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            if self.skip > 0 && !self.pending.is_empty() {
                let k = self.skip.min(self.pending.len());
                self.pending.drain(..k);
                self.skip -= k;
                continue;
            }
            if self.skip == 0 && self.pending.len() >= 2 {
                let n = usize::from(u16::from_le_bytes([self.pending[0], self.pending[1]]));
                if n > self.max_frame() || n > buf.len() {
                    // Too long to take: skipped as it comes, whatever its
                    // length (it may not fit the reassembly buffer).
                    self.pending.drain(..2);
                    self.skip = n;
                    continue;
                }
                if self.pending.len() >= 2 + n {
                    buf[..n].copy_from_slice(&self.pending[2..2 + n]);
                    self.pending.drain(..2 + n);
                    return Some(n);
                }
            }
            let before = self.pending.len();
            self.fill();
            if self.pending.len() == before {
                return None;
            }
        }
    }

    fn event(&self) -> u64 {
        self.readable.handle()
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    if parts.next().is_some() || mac == [0; 6] || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

fn main() -> i32 {
    let mut args = env::args();
    // The token, wherever it is.
    let token = args
        .iter()
        .position(|a| a.starts_with("token="))
        .map(|i| alloc::string::String::from(&args.remove(i)[6..]));
    if !(4..=6).contains(&args.len()) {
        eprintln!("usage: net-soft SECTION WIRE_URI MAC [MTU] [SEED:PER_MILLION:KINDS]");
        return 2;
    }
    // The last argument is the faults when it has their shape.
    let faults = match args.last().filter(|a| args.len() > 4 && a.contains(':')) {
        Some(s) => match Faults::parse(s) {
            Some(f) => {
                args.pop();
                Some(f)
            }
            None => {
                eprintln!("net-soft: bad fault spec `{s}`");
                return 2;
            }
        },
        None => None,
    };
    let Some(mac) = parse_mac(&args[3]) else {
        eprintln!(
            "net-soft: `{}` is not a unicast MAC address (six hex bytes with `:`)",
            args[3]
        );
        return 2;
    };
    let mtu = match args.get(4).map(|m| m.parse::<u16>()) {
        None => 1500,
        Some(Ok(m)) if (68..=9000).contains(&m) => m,
        Some(_) => {
            eprintln!("net-soft: the MTU must be from 68 to 9000");
            return 2;
        }
    };
    // Before the first open: a template carries it.
    prepare();
    let mut wire = match Stream::open(
        &args[2],
        access::READ | access::WRITE,
        create::OPEN_EXISTING,
        open_option::NONBLOCK,
    ) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("net-soft: cannot open the wire {}: {}", args[2], e.name());
            return 3;
        }
    };
    if let Some(t) = token {
        let mut p = Vec::from(&b"MOATWIRE"[..]);
        p.extend_from_slice(t.as_bytes());
        let mut at = 0;
        let mut tries = 0;
        while at < p.len() {
            match wire.write(&p[at..]) {
                Ok(n) if n > 0 => at += n,
                Err(Error::WouldBlock) if tries < 20_000 => {
                    tries += 1;
                    moat_libos::thread::sleep_micros(50);
                }
                _ => {
                    eprintln!("net-soft: cannot send the wire's token");
                    return 3;
                }
            }
        }
    }
    let readable = match wire.get_event() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("net-soft: the wire gives no event: {}", e.name());
            return 3;
        }
    };
    let mut dev = Soft {
        wire,
        readable,
        mac,
        mtu,
        pending: Vec::new(),
        skip: 0,
    };
    match serve_net(&args[1], &mut dev, faults) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("net-soft: the service section failed: {}", e.name());
            4
        }
    }
}
