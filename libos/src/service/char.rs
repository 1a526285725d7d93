//! The server side of a mediated character device: the char contract
//! (`moat_mediator::contract::CharContract`) over the same rings as block.
//! [`serve_char`] runs the loop for a [`CharDevice`]; the driver only
//! moves bytes.
//!
//! The mediator sends INFO first (answered with success and no bytes: the
//! driver is up), then writes ([`op::CHAR_WRITE`], the bytes in the
//! request's buffer; answered once the device has taken all of them) and
//! reads ([`op::CHAR_READ`]; each buffer is kept, lent, until bytes come,
//! then answered with what was ready, at least one byte). Reads are filled
//! in the order they came.
//!
//! Bytes are taken from the device only while a read buffer is lent: a
//! byte taken is the driver's to lose if it dies before answering, so the
//! loop never takes more than it can hand over at once, and a byte nobody
//! asked for stays in the device (whose FIFO and line hold it, as a UART
//! holds what the program has not read). When there is nothing to do the
//! loop says it sleeps and waits on the section's doorbell and the
//! device's event together.
use alloc::collections::VecDeque;

use moat_service_proto::ring::Server;
use moat_service_proto::{class, op, status, Request, Response};

use super::{finish, Faults, Shared};
use crate::{Error, Result};

/// A character device a driver serves: it moves bytes.
pub trait CharDevice {
    /// Send all of `bytes`; a status if it could not (the answer says so,
    /// it is not a fault).
    fn write(&mut self, bytes: &[u8]) -> core::result::Result<(), u8>;
    /// Take the bytes that are ready, at most `buf`'s length, into `buf`;
    /// how many (0: none ready). Never waits.
    fn read(&mut self, buf: &mut [u8]) -> usize;
    /// A handle signalled when bytes may be ready (the loop waits on it
    /// with the doorbell).
    fn event(&self) -> u64;
}

/// How long one wait lasts before the loop looks again anyway.
const WAIT_MICROS: i64 = 100_000;

/// Serve `dev` on the section `shm:NAME` until the driver is ended. With
/// `faults`, misbehave as they say (as [`super::serve_block`]). Returns
/// only on an error: the section cannot be opened or mapped, or the
/// mediator's side of it is broken.
pub fn serve_char(name: &str, dev: &mut dyn CharDevice, mut faults: Option<Faults>) -> Result<()> {
    let shared = Shared::open(name)?;
    let mut srv = shared.attach()?;
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
            if req.class == class::CHAR && req.op == op::CHAR_READ {
                lent.push_back(req);
                continue;
            }
            let st = start(&mut srv, dev, &req);
            finish(&mut srv, &shared, &mut faults, answer(&req, st, 0), depth);
            answered = true;
        }
        while let Some(req) = lent.front().copied() {
            let (st, len) = match srv.buf_mut(req.buf, req.len) {
                Some(buf) => match dev.read(buf) {
                    0 => break,
                    n => (status::OK, n.min(buf.len()) as u32),
                },
                None => (status::INVALID, 0),
            };
            finish(&mut srv, &shared, &mut faults, answer(&req, st, len), depth);
            lent.pop_front();
            answered = true;
            // Published at once: bytes taken from the device and not yet
            // published are what a kill loses.
            if srv.publish() {
                shared.ring();
            }
        }
        if answered {
            if srv.publish() {
                shared.ring();
            }
            continue;
        }
        if srv.prepare_sleep() {
            let handles = [shared.bell.handle(), dev.event()];
            match crate::sync::wait_any(&handles, WAIT_MICROS) {
                Ok(_) | Err(Error::TimedOut) => {}
                Err(e) => return Err(e),
            }
            srv.awake();
        }
    }
}

/// Carries out a request that is answered at once (INFO, a write, anything
/// unknown): its status. None carries bytes back.
fn start(srv: &mut Server, dev: &mut dyn CharDevice, req: &Request) -> u8 {
    if req.class != class::CHAR {
        return status::UNSUPPORTED;
    }
    match req.op {
        op::INFO => status::OK,
        op::CHAR_WRITE => match srv.buf_mut(req.buf, req.len) {
            Some(bytes) => match dev.write(bytes) {
                Ok(()) => status::OK,
                Err(st) => st,
            },
            None => status::INVALID,
        },
        _ => status::UNSUPPORTED,
    }
}

fn answer(req: &Request, st: u8, len: u32) -> Response {
    Response {
        status: st,
        class: class::CHAR,
        buf: req.buf,
        id: req.id,
        len,
    }
}
