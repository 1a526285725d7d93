// Generates the x86-64 syscall name table used in sandbox-violation
// reports, from the kernel's UAPI header.
use std::fmt::Write;

fn main() {
    let hdr = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";
    println!("cargo:rerun-if-changed={hdr}");
    let text = std::fs::read_to_string(hdr).unwrap_or_default();
    let mut names: Vec<(u32, String)> = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some("#define"), Some(n), Some(v)) = (it.next(), it.next(), it.next()) {
            if let (Some(name), Ok(num)) = (n.strip_prefix("__NR_"), v.parse::<u32>()) {
                names.push((num, name.to_string()));
            }
        }
    }
    names.sort();
    let mut out = String::from(
        "/// x86-64 system call names by number.\npub static SYSCALL_NAMES: &[(u32, &str)] = &[\n",
    );
    for (n, s) in &names {
        writeln!(out, "    ({n}, {s:?}),").unwrap();
    }
    out.push_str("];\n");
    let dst = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("syscall_names.rs");
    std::fs::write(dst, out).unwrap();
}
