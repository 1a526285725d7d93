//! tcp.server: / tcp.client: between two threads.
use alloc::format;

use moat_libos::moat_pal::{access, create, Error};
use moat_libos::Pal;

use super::streams::server_client;
use super::{p, skip, Case, Ctx, R};

pub const CASES: &[Case] = &[("stream_tcp_roundtrip", stream_tcp_roundtrip)];

fn stream_tcp_roundtrip(_: &Ctx) -> R {
    let port = 20000 + super::rand32() % 30000;
    let client = format!("tcp.client:127.0.0.1:{}", port);
    // Ask first whether TCP is granted at all: a denied client open is
    // answered without a server.
    let mut h = 0u64;
    let r = p().dk_stream_open(
        client.as_ptr(),
        client.len() as u64,
        access::READ | access::WRITE,
        create::OPEN_EXISTING,
        0,
        &mut h,
    );
    if r >= 0 {
        let _ = p().dk_object_close(h);
        skip!("something already listens on port {}", port);
    }
    if r == Error::PermissionDenied.code() {
        skip!("tcp not granted (PermissionDenied)");
    }
    if r == Error::NotSupported.code() {
        skip!("tcp not supported on this host");
    }
    server_client(format!("tcp.server:127.0.0.1:{}", port), &client)
}
