//! Hostile guest: bad pointers.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
moat_libos::entry!(main);

use moat_libos::moat_pal::{Error, PalTable, StreamAttributes};
use moat_libos::{pal, println, Pal};

fn main() -> i32 {
    let p = pal();
    // The PAL's own memory (its function table) is not the guest's.
    let table = p.table() as u64;
    let kernel = 0xffff_8000_0000_0000u64;
    let mut fails = 0;
    for addr in [0u64, 1, 0x1000, table, kernel, u64::MAX - 7] {
        let r = p.dk_random_bits_read(addr as *mut u8, 16);
        if r != Error::BadAddress.code() {
            println!("random bits into {addr:#x}: {r}");
            fails += 1;
        }
        let mut h = 0u64;
        let r = p.dk_stream_open(addr as *const u8, 7, 1, 0, 0, &mut h);
        if r != Error::BadAddress.code() {
            println!("uri at {addr:#x}: {r}");
            fails += 1;
        }
        let r = p.dk_notification_event_create(0, addr as *mut u64);
        if r != Error::BadAddress.code() {
            println!("handle out to {addr:#x}: {r}");
            fails += 1;
        }
        let r = p.dk_stream_attributes_query(
            c"null:".as_ptr() as *const u8,
            5,
            addr as *mut StreamAttributes,
        );
        if r != Error::BadAddress.code() {
            println!("attributes out to {addr:#x}: {r}");
            fails += 1;
        }
    }
    // A length that wraps the address space.
    let buf = [0u8; 8];
    let r = p.dk_debug_string_print(buf.as_ptr(), u64::MAX);
    if r >= 0 {
        fails += 1;
    }
    let _ = core::mem::size_of::<PalTable>();
    if fails > 0 {
        return common::escaped("a bad pointer was accepted");
    }
    println!("REFUSED bad pointers");
    0
}
