//! Copies stdin to stdout until end of stream.
#![no_std]
#![no_main]

use moat_libos::io::{self, Write};

moat_libos::entry!(main);

fn main() -> i32 {
    let mut out = io::stdout();
    let r = io::copy(&mut io::stdin(), &mut out).and_then(|_| out.flush());
    match r {
        Ok(()) => 0,
        Err(e) => {
            moat_libos::eprintln!("echo: {}", e.name());
            1
        }
    }
}
