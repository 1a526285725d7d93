//! `files OP URI [ARG]`: one file operation, its outcome printed as a line
//! (`ok ...` or `error NAME`), exit 0 either way (2 for bad usage). For
//! the tests of URI handling (the remap layer).
//!
//! - `read URI`: `ok <contents>`
//! - `write URI TEXT`: create or truncate, write TEXT
//! - `stat URI`: `ok <size>`
//! - `list URI`: `ok <names, sorted, comma-separated>`
//! - `rename URI NEW_URI`: open URI for reading, rename it
//! - `delete URI`: open URI for reading, delete it
//! - `run URI`: start URI as a child picoprocess, `ok <exit code>`
#![no_std]
#![no_main]
extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use moat_libos::stream::Stream;
use moat_libos::{fs, println, process};

moat_libos::entry!(main);

fn main() -> i32 {
    let args = moat_libos::env::args();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let (Some(op), Some(uri)) = (arg(1), arg(2)) else {
        println!("usage: files read|write|stat|list|rename|delete|run URI [ARG]");
        return 2;
    };
    let r: moat_libos::Result<String> = match (op, arg(3)) {
        ("read", None) => fs::read_to_vec(uri).map(|b| String::from_utf8_lossy(&b).into()),
        ("write", Some(text)) => fs::write(uri, text.as_bytes()).map(|_| String::new()),
        ("stat", None) => fs::attributes(uri).map(|a| alloc::format!("{}", a.size)),
        ("list", None) => fs::read_dir(uri).map(|mut v: Vec<String>| {
            v.sort();
            v.join(",")
        }),
        ("delete", None) => Stream::open_read(uri)
            .and_then(|s| s.remove())
            .map(|_| String::new()),
        ("rename", Some(to)) => Stream::open_read(uri)
            .and_then(|s| s.rename(to))
            .map(|_| String::new()),
        ("run", None) => process::spawn(uri, &[])
            .and_then(|p| p.wait())
            .map(|c| alloc::format!("{c}")),
        _ => {
            println!("usage: files read|write|stat|list|rename|delete|run URI [ARG]");
            return 2;
        }
    };
    match r {
        Ok(s) => println!("ok {s}"),
        Err(e) => println!("error {}", e.name()),
    }
    0
}
