//! Picoprocess images: static ELF64 x86-64 executables, checked before a
//! byte of them is mapped. Shared by the loader (which maps the plan) and
//! `moat inspect` (which reports on it).
use goblin::elf::{header, program_header as ph, Elf};
use moat_pal::prot;

/// The most an image file may be.
pub const MAX_IMAGE_BYTES: usize = 256 << 20;
/// Lowest address an image may occupy.
pub const MIN_VADDR: u64 = 0x10000;
/// Highest address (exclusive) an image may occupy.
pub const MAX_VADDR: u64 = 0x0000_7000_0000_0000;
/// The marker section libos puts in every image.
pub const ABI_SECTION: &str = ".moat_abi";
pub const ABI_MAGIC: &[u8; 8] = b"MOATABI\0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    /// moat_pal::prot bits.
    pub prot: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub entry: u64,
    pub segments: Vec<Segment>,
    /// Page-aligned span of all segments.
    pub base: u64,
    pub end: u64,
    /// ABI version from the `.moat_abi` marker, if present.
    pub abi_version: Option<u32>,
    /// Addresses of `syscall`/`sysenter`/`int 0x80` byte patterns in
    /// executable segments (outside a PAL, an image must have none).
    pub syscall_sites: Vec<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("not an ELF file (bad magic); build a guest image with `cargo build` (crate moat-guests)")]
    NotElf,
    #[error("image is {0} bytes; the limit is {MAX_IMAGE_BYTES}")]
    TooLarge(usize),
    #[error("malformed ELF: {0}")]
    Malformed(String),
    #[error("ELF class is 32-bit; moat images are ELF64")]
    Not64,
    #[error("ELF machine is {0}, not x86-64")]
    WrongMachine(String),
    #[error("ELF type is {0}; moat images are static executables (ET_EXEC, link with -no-pie -static)")]
    WrongType(String),
    #[error("image asks for an interpreter ({0}); moat images are static, with no libc")]
    Interpreter(String),
    #[error("image has a dynamic section; moat images are static, with no libc")]
    Dynamic,
    #[error("image has thread-local storage (PT_TLS); moat images may not use TLS")]
    Tls,
    #[error("segment at {0:#x} is writable and executable; moat images must be W^X")]
    WriteExec(u64),
    #[error("segment at {vaddr:#x} (+{memsz:#x}) lies outside {MIN_VADDR:#x}..{MAX_VADDR:#x}")]
    OutOfRange { vaddr: u64, memsz: u64 },
    #[error("segment at {0:#x} has file bytes past the end of the file or larger than its memory size")]
    BadFileRange(u64),
    #[error("segment at {0:#x} is not page-congruent (vaddr and offset differ modulo 4096)")]
    Misaligned(u64),
    #[error("segments at {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
    #[error("image has no loadable segment")]
    NoSegments,
    #[error("entry point {0:#x} is not in an executable segment")]
    BadEntry(u64),
    #[error("image spans {0} bytes; the memory limit is {1}")]
    TooBig(u64, u64),
}

const PAGE: u64 = 4096;

fn page_down(x: u64) -> u64 {
    x & !(PAGE - 1)
}
fn page_up(x: u64) -> Option<u64> {
    x.checked_add(PAGE - 1).map(|v| v & !(PAGE - 1))
}

/// Parse and check an image. `mem_limit` bounds the span it may occupy.
pub fn parse(bytes: &[u8], mem_limit: u64) -> Result<Image, ImageError> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(ImageError::TooLarge(bytes.len()));
    }
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(ImageError::NotElf);
    }
    if bytes.len() > 4 && bytes[4] != header::ELFCLASS64 {
        return Err(ImageError::Not64);
    }
    let elf = Elf::parse(bytes).map_err(|e| ImageError::Malformed(e.to_string()))?;
    if elf.header.e_machine != header::EM_X86_64 {
        return Err(ImageError::WrongMachine(header::machine_to_str(elf.header.e_machine).to_string()));
    }
    if elf.header.e_type != header::ET_EXEC {
        return Err(ImageError::WrongType(header::et_to_str(elf.header.e_type).to_string()));
    }
    if let Some(i) = elf.interpreter {
        return Err(ImageError::Interpreter(i.to_string()));
    }
    let mut segments = Vec::new();
    for p in &elf.program_headers {
        match p.p_type {
            ph::PT_DYNAMIC => return Err(ImageError::Dynamic),
            ph::PT_TLS => return Err(ImageError::Tls),
            ph::PT_LOAD => {}
            _ => continue,
        }
        if p.p_memsz == 0 {
            continue;
        }
        let w = p.p_flags & ph::PF_W != 0;
        let x = p.p_flags & ph::PF_X != 0;
        if w && x {
            return Err(ImageError::WriteExec(p.p_vaddr));
        }
        let end = p.p_vaddr.checked_add(p.p_memsz);
        if p.p_vaddr < MIN_VADDR || end.is_none_or(|e| e > MAX_VADDR) {
            return Err(ImageError::OutOfRange { vaddr: p.p_vaddr, memsz: p.p_memsz });
        }
        let fend = p.p_offset.checked_add(p.p_filesz);
        if p.p_filesz > p.p_memsz || fend.is_none_or(|e| e > bytes.len() as u64) {
            return Err(ImageError::BadFileRange(p.p_vaddr));
        }
        if p.p_vaddr % PAGE != p.p_offset % PAGE {
            return Err(ImageError::Misaligned(p.p_vaddr));
        }
        let mut pr = 0;
        if p.p_flags & ph::PF_R != 0 {
            pr |= prot::READ;
        }
        if w {
            pr |= prot::WRITE | prot::READ;
        }
        if x {
            pr |= prot::EXEC | prot::READ;
        }
        segments.push(Segment { vaddr: p.p_vaddr, memsz: p.p_memsz, offset: p.p_offset, filesz: p.p_filesz, prot: pr });
    }
    if segments.is_empty() {
        return Err(ImageError::NoSegments);
    }
    segments.sort_by_key(|s| s.vaddr);
    // Segments may share a page only if neither is writable-and-the-other
    // executable; we map at page granularity, so require page-disjointness.
    for w in segments.windows(2) {
        let a_end = page_up(w[0].vaddr + w[0].memsz).unwrap();
        if page_down(w[1].vaddr) < a_end {
            return Err(ImageError::Overlap(w[0].vaddr, w[1].vaddr));
        }
    }
    let base = page_down(segments[0].vaddr);
    let last = segments.last().unwrap();
    let end = page_up(last.vaddr + last.memsz).unwrap();
    if end - base > mem_limit {
        return Err(ImageError::TooBig(end - base, mem_limit));
    }
    let entry = elf.entry;
    if !segments.iter().any(|s| s.prot & prot::EXEC != 0 && entry >= s.vaddr && entry < s.vaddr + s.memsz) {
        return Err(ImageError::BadEntry(entry));
    }
    let mut abi_version = None;
    for sh in &elf.section_headers {
        if elf.shdr_strtab.get_at(sh.sh_name) == Some(ABI_SECTION) && sh.sh_size >= 16 {
            let off = sh.sh_offset as usize;
            if let Some(b) = bytes.get(off..off + 16) {
                if &b[..8] == ABI_MAGIC {
                    abi_version = Some(u32::from_le_bytes(b[8..12].try_into().unwrap()));
                }
            }
        }
    }
    let mut syscall_sites = Vec::new();
    for s in segments.iter().filter(|s| s.prot & prot::EXEC != 0) {
        let code = &bytes[s.offset as usize..(s.offset + s.filesz) as usize];
        for (i, w) in code.windows(2).enumerate() {
            if matches!(w, [0x0f, 0x05] | [0x0f, 0x34] | [0xcd, 0x80]) {
                syscall_sites.push(s.vaddr + i as u64);
            }
        }
    }
    Ok(Image { entry, segments, base, end, abi_version, syscall_sites })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn rejects_garbage() {
        assert_eq!(parse(b"", 1 << 30), Err(ImageError::NotElf));
        assert_eq!(parse(b"#!/bin/sh\n", 1 << 30), Err(ImageError::NotElf));
        let mut h = b"\x7fELF\x01".to_vec();
        h.resize(64, 0);
        assert_eq!(parse(&h, 1 << 30), Err(ImageError::Not64));
        let mut h = b"\x7fELF\x02\x01\x01".to_vec();
        h.resize(20, 0);
        assert!(matches!(parse(&h, 1 << 30), Err(ImageError::Malformed(_))));
    }
    #[test]
    fn rejects_host_binaries() {
        // A dynamically linked PIE from the host is refused with a reason.
        let b = std::fs::read("/bin/true").unwrap();
        let e = parse(&b, 1 << 30).unwrap_err();
        assert!(matches!(e, ImageError::WrongType(_) | ImageError::Interpreter(_)), "{e}");
    }
}
