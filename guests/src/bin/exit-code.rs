//! Exits with the integer given as first argument (default 3).
#![no_std]
#![no_main]

moat_libos::entry!(main);

fn main() -> i32 {
    let args = moat_libos::env::args();
    match args.get(1) {
        None => 3,
        Some(a) => match a.trim().parse::<i32>() {
            Ok(n) => n,
            Err(_) => {
                moat_libos::eprintln!("exit-code: `{}` is not an integer", a);
                2
            }
        },
    }
}
