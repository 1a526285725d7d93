//! Serves `pipe.server:NAME` (NAME: first argument): for each of N
//! clients (second argument, default 1), echoes what it reads until the
//! client closes.
#![no_std]
#![no_main]
use moat_libos::moat_pal::{access, create};
use moat_libos::stream::Stream;

moat_libos::entry!(main);

fn main() -> i32 {
    let args = moat_libos::env::args();
    let name = args.get(1).cloned().unwrap_or_else(|| "echo".into());
    let n: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let uri = alloc::format!("pipe.server:{name}");
    for _ in 0..n {
        let Ok(mut s) = Stream::open(&uri, access::READ | access::WRITE, create::OPEN_EXISTING, 0)
        else {
            return 1;
        };
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    if s.write_all(&buf[..k]).is_err() {
                        return 2;
                    }
                }
                Err(_) => return 3,
            }
        }
    }
    0
}

extern crate alloc;
