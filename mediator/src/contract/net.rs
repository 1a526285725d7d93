//! The net contract: a network interface's Ethernet frames both ways,
//! after an INFO handshake that fixes its MAC address and MTU.
//!
//! - Sending: the client's frame (an Ethernet header at least, the MTU
//!   plus header and a VLAN tag at most) goes to the driver in its buffer
//!   ([`op::NET_TX`]); the answer carries no bytes. A send has a deadline
//!   like any request: a driver that stops sending is restarted.
//! - Receiving: the mediator lends the driver receive buffers of
//!   [`NetInfo::max_frame`] bytes ([`op::NET_RX`]); the driver completes
//!   one with the frame it received into it (a header at least, at most
//!   the buffer). A receive buffer has no deadline: a quiet network is not
//!   a fault. A completion for a buffer the driver was not lent, or a
//!   second one for the same buffer, is a violation (the ids say which
//!   buffer an answer is for: the in-flight set knows every lent one).
//! - Restarts: a network may lose frames, but never duplicate one the
//!   contract can see. Sends in flight when a driver is replaced are
//!   dropped (the old driver may have put them on the wire; sending them
//!   again could duplicate them), and their clients told so; receive
//!   buffers are lent again to the new driver under the same ids. A
//!   restarted driver must report the same MAC address and MTU: the link
//!   stays up for the client side.

use std::time::Instant;

use moat_service_proto::{class, op, status, Request, Response};

use super::inflight::{check_header, exact_len};
use super::{ClassOp, ClientError, Contract, ContractLimits, Requests, Violation};

/// An Ethernet header: destination, source, type.
pub const ETH_HEADER: u32 = 14;
/// What a frame may carry beyond the MTU: the header and one VLAN tag.
pub const FRAME_OVERHEAD: u32 = ETH_HEADER + 4;
/// The smallest MTU (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// The largest MTU (a jumbo frame).
pub const MAX_MTU: u16 = 9000;
/// Bytes of net INFO's answer: the MAC address, then the MTU (u16 LE).
pub const NET_INFO_LEN: u32 = 8;

/// What a net contract remembers of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetOp {
    /// [`op::NET_TX`] or [`op::NET_RX`].
    pub op: u8,
    /// The frame's length (a send) or the buffer's (a receive).
    pub len: u32,
}

impl ClassOp for NetOp {
    const CLASS: u8 = class::NET;

    fn request(&self, id: u64) -> Request {
        Request {
            op: self.op,
            class: class::NET,
            id,
            offset: 0,
            len: self.len,
            buf: 0,
        }
    }
}

/// The interface a net driver reports in its INFO answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetInfo {
    pub mac: [u8; 6],
    pub mtu: u16,
}

impl NetInfo {
    /// The longest frame: the MTU plus the header and a VLAN tag.
    pub fn max_frame(&self) -> u32 {
        u32::from(self.mtu) + FRAME_OVERHEAD
    }

    /// The answer's bytes, checked: a unicast MAC address that is not all
    /// zeros, an MTU from [`MIN_MTU`] to [`MAX_MTU`].
    pub fn parse(b: &[u8; NET_INFO_LEN as usize]) -> Result<NetInfo, NetInfoProblem> {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[..6]);
        let mtu = u16::from_le_bytes([b[6], b[7]]);
        if mac == [0; 6] || mac[0] & 1 != 0 {
            return Err(NetInfoProblem::Mac(mac));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(NetInfoProblem::Mtu(mtu));
        }
        Ok(NetInfo { mac, mtu })
    }

    /// The bytes of an INFO answer that reports this interface.
    pub fn encode(&self) -> [u8; NET_INFO_LEN as usize] {
        let mut b = [0u8; NET_INFO_LEN as usize];
        b[..6].copy_from_slice(&self.mac);
        b[6..].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }
}

impl std::fmt::Display for NetInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.mac;
        write!(
            f,
            "MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, MTU {}",
            m[0], m[1], m[2], m[3], m[4], m[5], self.mtu
        )
    }
}

/// What is wrong with a net INFO answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetInfoProblem {
    /// A failure status instead of the interface.
    #[error("the driver reports failure (status {0}) instead of the interface")]
    Failed(u8),
    /// The payload handed over is not the 8 bytes the answer needs.
    #[error("the answer carries {got} payload bytes where 8 are needed")]
    Payload {
        /// Bytes handed over.
        got: usize,
    },
    /// A MAC address that is all zeros or a multicast one.
    #[error("MAC address {0:02x?} is not a unicast address")]
    Mac([u8; 6]),
    /// An MTU out of range.
    #[error("MTU {0} is not from 68 to 9000")]
    Mtu(u16),
}

/// An accepted answer to a net request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetCompletion {
    /// The request's id.
    pub id: u64,
    /// [`op::NET_TX`] or [`op::NET_RX`].
    pub op: u8,
    /// The driver's status ([`status::OK`] to [`status::MAX`]).
    pub status: u8,
    /// The frame received (a successful receive), else 0.
    pub frame: u32,
}

/// What replacing a net driver does to the requests in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRestart {
    /// Sends dropped: their clients learn that the frames were lost.
    pub dropped: Vec<u64>,
    /// Receive buffers to lend the new driver, same ids, in issue order.
    pub relent: Vec<Request>,
}

/// The contract of a network interface (see the module docs).
#[derive(Debug, Clone)]
pub struct NetContract {
    /// INFO sent to a (new) driver, its answer awaited.
    handshake: bool,
    /// What every driver of this interface must report.
    expected: Option<NetInfo>,
    /// What the current driver reported (frames flow while it is set).
    current: Option<NetInfo>,
    /// What the last accepted handshake did to the requests in flight,
    /// until [`NetContract::restart`] hands it over.
    restarted: Option<NetRestart>,
    requests: Requests<NetOp>,
}

impl NetContract {
    /// A contract with no driver yet.
    pub fn new(limits: ContractLimits) -> NetContract {
        NetContract {
            handshake: false,
            expected: None,
            current: None,
            restarted: None,
            requests: Requests::new(limits),
        }
    }

    /// The interface, once a driver reported it.
    pub fn info(&self) -> Option<NetInfo> {
        self.current.or(self.expected)
    }

    /// Whether frames may flow.
    pub fn is_ready(&self) -> bool {
        self.current.is_some()
    }

    /// Starts the handshake with a new driver: the INFO request (id 0).
    /// Until [`NetContract::check_info`] accepts its answer, frames are
    /// refused ([`ClientError::NotReady`]) and any other answer is
    /// [`Violation::Unsolicited`].
    pub fn info_request(&mut self) -> Request {
        self.handshake = true;
        self.current = None;
        Self::INFO
    }

    /// The INFO request (id 0), as [`NetContract::info_request`] sends
    /// it: for a driver whose handshake is checked later (a standby).
    pub const INFO: Request = Request {
        op: op::INFO,
        class: class::NET,
        id: 0,
        offset: 0,
        len: 0,
        buf: 0,
    };

    /// Checks the driver's answer to INFO and the payload bytes that came
    /// with it; the first accepted one fixes the interface for good.
    pub fn check_info(&mut self, resp: &Response, payload: &[u8]) -> Result<NetInfo, Violation> {
        let id = resp.id;
        if !self.handshake || id != 0 {
            return Err(Violation::Unsolicited { id });
        }
        let st = check_header(resp, class::NET)?;
        if st != status::OK {
            return Err(Violation::BadNetInfo(NetInfoProblem::Failed(st)));
        }
        exact_len(id, NET_INFO_LEN, resp.len)?;
        let bytes: &[u8; NET_INFO_LEN as usize] = payload
            .try_into()
            .map_err(|_| Violation::BadNetInfo(NetInfoProblem::Payload { got: payload.len() }))?;
        let got = NetInfo::parse(bytes).map_err(Violation::BadNetInfo)?;
        if got.max_frame() > self.requests.limits().max_io {
            // No receive buffer of this service could hold its frames.
            return Err(Violation::BadNetInfo(NetInfoProblem::Mtu(got.mtu)));
        }
        if let Some(expected) = self.expected {
            if expected != got {
                return Err(Violation::NetInfoChanged { expected, got });
            }
        }
        self.expected = Some(got);
        self.current = Some(got);
        self.handshake = false;
        // The old driver's sends go now, before anything new is issued:
        // nothing sent to the new driver can be taken for one of them.
        let dropped = self.requests.drop_where(|o| o.op == op::NET_TX);
        let relent = self
            .requests
            .pending()
            .iter()
            .map(|p| p.request.request(p.id))
            .collect();
        let earlier = self.restarted.take();
        let mut r = NetRestart { dropped, relent };
        if let Some(e) = earlier {
            // Two handshakes without a restart between: keep both drops.
            let mut d = e.dropped;
            d.extend(r.dropped);
            r.dropped = d;
        }
        self.restarted = Some(r);
        Ok(got)
    }

    fn ready(&self) -> Result<NetInfo, ClientError> {
        self.current.ok_or(ClientError::NotReady)
    }

    /// Checks a frame of `len` bytes to send without issuing it.
    pub fn check_frame(&self, len: u32) -> Result<(), ClientError> {
        let info = self.ready()?;
        let max = info.max_frame();
        if !(ETH_HEADER..=max).contains(&len) {
            return Err(ClientError::BadFrame {
                len,
                min: ETH_HEADER,
                max,
            });
        }
        self.requests.check_max_io(len)
    }

    /// Issues a send of a `len`-byte frame at `now` (its bytes follow the
    /// request, in its buffer).
    pub fn transmit(&mut self, len: u32, now: Instant) -> Result<Request, ClientError> {
        self.check_frame(len)?;
        self.requests.issue(
            NetOp {
                op: op::NET_TX,
                len,
            },
            now,
        )
    }

    /// Lends the driver a receive buffer of [`NetInfo::max_frame`] bytes
    /// at `now`; no deadline applies to it. The last slot in flight is
    /// kept for sends: receive buffers never starve them.
    pub fn lend_receive(&mut self, now: Instant) -> Result<Request, ClientError> {
        let len = self.ready()?.max_frame();
        self.requests.check_max_io(len)?;
        if self.requests.len() + 1 >= self.requests.limits().max_in_flight {
            return Err(ClientError::Busy);
        }
        self.requests.issue_untimed(
            NetOp {
                op: op::NET_RX,
                len,
            },
            now,
        )
    }

    /// What the accepted handshake of a new driver did: the sends in
    /// flight it dropped (as it was accepted), and the receive buffers to
    /// lend the new driver (same ids, their deadlines, none, unchanged).
    /// Call it after [`NetContract::check_info`], instead of
    /// [`Contract::reissue`], which gives the receive buffers only. Empty
    /// if no handshake was accepted since the last call.
    pub fn restart(&mut self, now: Instant) -> NetRestart {
        self.requests.flight.rearm(now);
        self.restarted.take().unwrap_or(NetRestart {
            dropped: Vec::new(),
            relent: Vec::new(),
        })
    }
}

impl Contract for NetContract {
    type Op = NetOp;
    type Completion = NetCompletion;

    fn requests(&self) -> &Requests<NetOp> {
        &self.requests
    }

    fn requests_mut(&mut self) -> &mut Requests<NetOp> {
        &mut self.requests
    }

    /// Checks a driver's answer: a send's carries no bytes; a successful
    /// receive's carries a frame of a header to the buffer's length, a
    /// failed one none. Nothing is accepted during a handshake.
    fn check_response(
        &mut self,
        resp: &Response,
        now: Instant,
    ) -> Result<NetCompletion, Violation> {
        if self.handshake {
            return Err(Violation::Unsolicited { id: resp.id });
        }
        self.requests.answer(resp, now, |p, st| {
            let c = p.request;
            let frame = if st == status::OK && c.op == op::NET_RX {
                if resp.len < ETH_HEADER {
                    return Err(Violation::ShortFrame {
                        id: p.id,
                        min: ETH_HEADER,
                        got: resp.len,
                    });
                }
                super::inflight::at_most_len(p.id, c.len, resp.len)?;
                resp.len
            } else {
                exact_len(p.id, 0, resp.len)?;
                0
            };
            Ok(NetCompletion {
                id: p.id,
                op: c.op,
                status: st,
                frame,
            })
        })
    }

    /// See [`NetContract::restart`].
    fn reissue(&mut self, now: Instant) -> Vec<Request> {
        self.restart(now).relent
    }

    /// Nothing is late outside the ready phase: during a handshake the
    /// deadlines are the old driver's.
    fn expired(&self, now: Instant) -> Option<u64> {
        self.is_ready()
            .then(|| self.requests.expired(now))
            .flatten()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.is_ready()
            .then(|| self.requests.next_deadline())
            .flatten()
    }
}
