//! Panics on purpose (the libos reports it and exits 101).
#![no_std]
#![no_main]

moat_libos::entry!(main);

fn main() -> i32 {
    panic!("deliberate panic");
}
