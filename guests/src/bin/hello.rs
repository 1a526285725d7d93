//! Prints a greeting and its arguments (after the image name), one per line.
#![no_std]
#![no_main]

use moat_libos::println;

moat_libos::entry!(main);

fn main() -> i32 {
    println!("hello from a moat picoprocess");
    for a in moat_libos::env::args().iter().skip(1) {
        println!("{}", a);
    }
    0
}
