//! Hostile guest: proc self.
#![no_std]
#![no_main]
extern crate alloc;
#[path = "../common.rs"]
#[allow(unused)]
mod common;
moat_libos::entry!(main);

use common::*;

fn main() -> i32 {
    let grant = arg(1);
    let mut uris = alloc::vec![
        alloc::string::String::from("file:/proc/self/mem"),
        "file:/proc/self/root/etc/passwd".into(),
        "file:/proc/1/environ".into(),
        "file:/proc/self/fd/3".into(),
        "file:/dev/kvm".into(),
    ];
    if !grant.is_empty() {
        // The test puts a symlink to /proc/self/root in the granted directory.
        uris.push(alloc::format!("{grant}/proclink/etc/passwd"));
        uris.push(alloc::format!("{grant}/proclink"));
    }
    for u in &uris {
        if let Err(code) = expect_refused(u, RD, OPEN) {
            return code;
        }
    }
    0
}
