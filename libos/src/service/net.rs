//! The server side of a mediated network interface: the net contract
//! (`moat_mediator::contract::NetContract`) over the same rings as block.
//! [`serve_net`] runs the loop for a [`NetDevice`]; the driver only moves
//! frames.
//!
//! The mediator sends INFO first (answered with the MAC address and the
//! MTU), then frames to send ([`op::NET_TX`], the frame in the request's
//! buffer; answered when it is on the wire) and receive buffers
//! ([`op::NET_RX`]; each kept until a frame comes, then answered with the
//! frame in it). Receive buffers are filled in the order they came. A
//! frame that comes when no buffer is lent stays with the device (which
//! may drop it: a network may). When there is nothing to do the loop
//! says it sleeps and waits on the section's doorbell and the device's
//! event together.
use alloc::collections::VecDeque;

use moat_service_proto::ring::Server;
use moat_service_proto::{class, op, status, Request, Response};

use super::{finish, Faults, Shared};
use crate::{Error, Result};

/// A network device a driver serves: it moves whole Ethernet frames.
pub trait NetDevice {
    /// Its MAC address and MTU (reported to the mediator once per driver).
    fn info(&self) -> ([u8; 6], u16);
    /// Put one frame on the wire; a status if it was not sent (a dropped
    /// frame is an answer, not a fault).
    fn send(&mut self, frame: &[u8]) -> core::result::Result<(), u8>;
    /// A frame received, copied into `buf` (its length), if one is ready;
    /// never waits. A frame longer than `buf` is dropped.
    fn receive(&mut self, buf: &mut [u8]) -> Option<usize>;
    /// A handle signalled while a frame may be ready (the loop waits on it
    /// with the doorbell).
    fn event(&self) -> u64;
    /// Called before the loop waits on [`NetDevice::event`]: a device
    /// that must ask for its interrupt does so here, then looks once
    /// more; `false` if a frame came meanwhile (the loop does not wait).
    fn may_sleep(&mut self) -> bool {
        true
    }
}

/// How long one wait lasts before the loop looks again anyway.
const WAIT_MICROS: i64 = 100_000;

/// Serve `dev` on the section `shm:NAME` until the driver is ended. With
/// `faults`, misbehave as they say (as [`super::serve_block`]). Returns
/// only on an error: the section cannot be opened or mapped, or the
/// mediator's side of it is broken.
pub fn serve_net(name: &str, dev: &mut dyn NetDevice, mut faults: Option<Faults>) -> Result<()> {
    let shared = Shared::open(name)?;
    let mut srv = shared.attach()?;
    let (mac, mtu) = dev.info();
    let depth = srv.layout().depth;
    let mut lent: VecDeque<Request> = VecDeque::new();
    loop {
        let mut answered = false;
        loop {
            let req = match srv.next_request() {
                Ok(None) => break,
                Ok(Some(Ok(r))) => r,
                // The host wrote a bad index or descriptor.
                Ok(Some(Err(_))) | Err(_) => return Err(Error::InvalidArgument),
            };
            match req.op {
                op::NET_RX => lent.push_back(req),
                _ => {
                    let (st, len) = start(&mut srv, dev, &req, mac, mtu);
                    finish(&mut srv, &shared, &mut faults, answer(&req, st, len), depth);
                    answered = true;
                }
            }
        }
        while let Some(req) = lent.front().copied() {
            let got = match srv.buf_mut(req.buf, req.len) {
                Some(buf) => dev.receive(buf).map(|n| (status::OK, n as u32)),
                None => Some((status::INVALID, 0)),
            };
            let Some((st, len)) = got else { break };
            finish(&mut srv, &shared, &mut faults, answer(&req, st, len), depth);
            lent.pop_front();
            answered = true;
        }
        if answered {
            if srv.publish() {
                shared.ring();
            }
            continue;
        }
        if srv.prepare_sleep() {
            if dev.may_sleep() {
                let handles = [shared.bell.handle(), dev.event()];
                match crate::sync::wait_any(&handles, WAIT_MICROS) {
                    Ok(_) | Err(Error::TimedOut) => {}
                    Err(e) => return Err(e),
                }
            }
            srv.awake();
        }
    }
}

/// Carries out a request that is answered at once: its status and
/// payload length.
fn start(
    srv: &mut Server,
    dev: &mut dyn NetDevice,
    req: &Request,
    mac: [u8; 6],
    mtu: u16,
) -> (u8, u32) {
    if req.class != class::NET {
        return (status::UNSUPPORTED, 0);
    }
    match req.op {
        op::INFO => match srv.buf_mut(req.buf, 8) {
            Some(b) => {
                b[..6].copy_from_slice(&mac);
                b[6..8].copy_from_slice(&mtu.to_le_bytes());
                (status::OK, 8)
            }
            None => (status::INVALID, 0),
        },
        op::NET_TX => match srv.buf_mut(req.buf, req.len) {
            Some(frame) => match dev.send(frame) {
                Ok(()) => (status::OK, 0),
                Err(st) => (st, 0),
            },
            None => (status::INVALID, 0),
        },
        _ => (status::UNSUPPORTED, 0),
    }
}

fn answer(req: &Request, st: u8, len: u32) -> Response {
    Response {
        status: st,
        class: class::NET,
        buf: req.buf,
        id: req.id,
        len,
    }
}
