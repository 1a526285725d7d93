//! Hostile guest: network.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
moat_libos::entry!(main);

use common::*;

fn main() -> i32 {
    let port = arg(1);
    for u in [
        alloc::format!("tcp.client:127.0.0.1:{port}"),
        alloc::format!("tcp:127.0.0.1:{port}"),
        alloc::string::String::from("tcp.server:127.0.0.1:0"),
        alloc::string::String::from("tcp.client:[::1]:22"),
        alloc::string::String::from("pipe.client:someone-elses-pipe"),
    ] {
        if let Err(code) = expect_refused(&u, WR, OPEN) {
            return code;
        }
    }
    0
}
