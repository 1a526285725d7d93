//! The safe mediator: it sits between the clients of a service and the
//! driver picoprocess that implements it, treats the driver as an oracle
//! it does not trust, and makes a crashing or lying driver look, to the
//! clients, like a slow one.
//!
//! - [`contract`]: service contracts as state machines (block, char,
//!   generic request/response): every piece of control data the driver
//!   sends is checked against them;
//! - [`block`]: a mediated block device ([`block::MediatedBlock`]:
//!   `read_at`, `write_at`, `flush`), with driver restart and re-issue;
//! - [`net`]: a mediated network interface ([`net::MediatedNet`]: frames
//!   both ways), with driver restart;
//! - [`serial`]: a mediated serial line ([`serial::MediatedSerial`]:
//!   bytes both ways through a UART driver), with driver restart and
//!   writes re-issued;
//! - `pump`: what the net and serial engines share (their pump thread,
//!   the start of a driver with its template and handshake);
//! - [`campaign`]: seeded fault campaigns through the mediator;
//! - [`export`]: the block device as a file in a FUSE mount, which
//!   `losetup` makes a real block device.
pub mod block;
pub mod campaign;
pub mod contract;
pub mod export;
pub mod net;
mod pump;
pub mod serial;
