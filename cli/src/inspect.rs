//! `moat inspect`: check an image and report on it (`moat_host_common::elf`).
//!
//! Exit codes: 0 the image is fine, 1 it has problems (each one a line
//! `problem: ...`), 2 the file cannot be read or is not an ELF file at all.
use clap::Args;
use moat_host_common::elf::{self, AbiMarker, ImageError, Report};
use moat_pal::prot;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "\
Exit codes:
  0  the image is a valid moat image
  1  the image has problems (each printed as `problem: ...`)
  2  the file cannot be read or is not an ELF file")]
pub struct InspectArgs {
    /// The image file to check.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
}

/// Exit code when the image has problems.
pub const EXIT_PROBLEMS: i32 = 1;

pub fn main(args: InspectArgs) -> i32 {
    let path = &args.image;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return crate::bad_input(format_args!("cannot read `{}`: {e}", path.display())),
    };
    if !meta.is_file() {
        return crate::bad_input(format_args!("`{}` is not a file", path.display()));
    }
    if meta.len() > elf::MAX_IMAGE_BYTES as u64 {
        return crate::bad_input(format_args!(
            "`{}`: {}",
            path.display(),
            ImageError::TooLarge(meta.len() as usize)
        ));
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return crate::bad_input(format_args!("cannot read `{}`: {e}", path.display())),
    };
    match elf::inspect(&bytes) {
        Ok(report) => {
            let (text, problems) = render(&path.display().to_string(), &report);
            print!("{text}");
            if problems == 0 {
                0
            } else {
                EXIT_PROBLEMS
            }
        }
        Err(e) => crate::bad_input(format_args!("`{}`: {e}", path.display())),
    }
}

fn rwx(p: u32) -> String {
    let f = |bit, c| if p & bit != 0 { c } else { '-' };
    [f(prot::READ, 'r'), f(prot::WRITE, 'w'), f(prot::EXEC, 'x')]
        .iter()
        .collect()
}

fn size(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else if n < 1 << 20 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    }
}

fn version(v: u32) -> String {
    format!("{}.{}", v >> 16, v & 0xffff)
}

/// Whether an image built against ABI `image` runs on a host speaking
/// `host`: same major version, and the host's minor version at least the
/// image's (what moat-libos checks at start-up).
fn abi_problem(image: u32, host: u32) -> Option<String> {
    if image >> 16 != host >> 16 {
        Some(format!(
            "ABI {} is incompatible with this moat's ABI {} (the major versions differ); rebuild the image against this moat-libos",
            version(image),
            version(host)
        ))
    } else if image & 0xffff > host & 0xffff {
        Some(format!(
            "ABI {} is newer than this moat's ABI {}; the image would refuse to start: use a newer moat or rebuild the image",
            version(image),
            version(host)
        ))
    } else {
        None
    }
}

/// The symbol name for people: demangled, without the Rust hash.
fn symbol_name(raw: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(raw))
}

/// The report as text, and the number of problems in it.
pub fn render(path: &str, r: &Report) -> (String, usize) {
    let mut o = String::new();
    let mut problems: Vec<String> = r.problems.iter().map(ToString::to_string).collect();
    let _ = writeln!(o, "image:    {path}");
    let _ = writeln!(
        o,
        "ELF:      {}, machine {}, type {}",
        if r.is_64 { "ELF64" } else { "ELF32" },
        r.machine,
        r.elf_type
    );
    let _ = writeln!(o, "entry:    {:#x}", r.entry);
    let _ = writeln!(o, "segments: {}", r.segments.len());
    for s in &r.segments {
        let _ = writeln!(
            o,
            "  {:#010x}..{:#010x}  {}  {:>10}  (file {})",
            s.vaddr,
            s.vaddr.saturating_add(s.memsz),
            rwx(s.prot),
            size(s.memsz),
            size(s.filesz)
        );
    }
    let wx: Vec<_> = r
        .segments
        .iter()
        .filter(|s| s.prot & prot::WRITE != 0 && s.prot & prot::EXEC != 0)
        .collect();
    if wx.is_empty() {
        let _ = writeln!(
            o,
            "W^X:      ok (no segment is both writable and executable)"
        );
    } else {
        let at: Vec<String> = wx.iter().map(|s| format!("{:#x}", s.vaddr)).collect();
        let _ = writeln!(
            o,
            "W^X:      violated (writable and executable: {})",
            at.join(", ")
        );
    }
    let host = moat_pal::ABI_VERSION;
    match &r.abi {
        AbiMarker::Version(v) => match abi_problem(*v, host) {
            None => {
                let _ = writeln!(
                    o,
                    "ABI:      {} (this moat: {}): compatible",
                    version(*v),
                    version(host)
                );
            }
            Some(p) => {
                let _ = writeln!(
                    o,
                    "ABI:      {} (this moat: {}): incompatible",
                    version(*v),
                    version(host)
                );
                problems.push(p);
            }
        },
        AbiMarker::Missing => {
            let _ = writeln!(o, "ABI:      no marker");
            problems.push(
                "not a moat image (no .moat_abi section; images are built with moat-libos's entry! macro)".into(),
            );
        }
        AbiMarker::Malformed => {
            let _ = writeln!(o, "ABI:      malformed marker");
            problems.push(
                "the .moat_abi section does not hold the 16-byte MOATABI marker; images are built with moat-libos's entry! macro".into(),
            );
        }
    }
    if r.syscalls.is_empty() {
        let _ = writeln!(o, "system-call instructions: none");
    } else {
        let _ = writeln!(o, "system-call instructions: {}", r.syscalls.len());
    }
    for s in &r.syscalls {
        let place = match &s.symbol {
            Some((name, 0)) => format!(" in `{}`", symbol_name(name)),
            Some((name, off)) => format!(" in `{}` (+{off:#x})", symbol_name(name)),
            None => String::new(),
        };
        let _ = writeln!(o, "  {:#010x}  {}{place}", s.addr, s.kind.mnemonic());
        problems.push(format!(
            "`{}` instruction at {:#x}{place}: a picoprocess reaches its host only through the PAL function table; the sandbox kills it here",
            s.kind.mnemonic(),
            s.addr
        ));
    }
    for p in &problems {
        let _ = writeln!(o, "problem: {p}");
    }
    if problems.is_empty() {
        let _ = writeln!(o, "ok: a valid moat image");
    }
    (o, problems.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_versions() {
        assert_eq!(abi_problem(0x0001_0000, 0x0001_0000), None);
        assert_eq!(abi_problem(0x0001_0000, 0x0001_0002), None);
        // 1.0 images on a 1.1 host (shared sections) run; 1.1 images on a
        // 1.0 host would refuse to start.
        assert_eq!(abi_problem(0x0001_0000, 0x0001_0001), None);
        assert!(abi_problem(0x0001_0001, 0x0001_0000)
            .unwrap()
            .contains("newer"));
        assert!(abi_problem(0x0001_0003, 0x0001_0002)
            .unwrap()
            .contains("newer"));
        assert!(abi_problem(0x0002_0000, 0x0001_0000)
            .unwrap()
            .contains("incompatible"));
    }

    #[test]
    fn names_and_sizes() {
        assert_eq!(rwx(prot::READ | prot::EXEC), "r-x");
        assert_eq!(size(100), "100 B");
        assert_eq!(size(2048), "2.0 KiB");
        assert_eq!(
            symbol_name("_ZN4core3fmt5write17h0123456789abcdefE"),
            "core::fmt::write"
        );
    }
}
