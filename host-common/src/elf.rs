//! Picoprocess images: static ELF64 x86-64 executables, checked before a
//! byte of them is mapped. Shared by the loader (which maps the plan) and
//! `moat inspect` (which reports on it with [`inspect`]) and `moat images`
//! (which finds images with [`read_abi_marker`]).
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
    /// Addresses of the `syscall`/`sysenter`/`int 0x80` instructions in
    /// the image's code (outside a PAL, an image must have none; see
    /// [`inspect`] for the full report).
    pub syscall_sites: Vec<u64>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error(
        "not an ELF file (bad magic); build a guest image with `cargo build` (crate moat-guests)"
    )]
    NotElf,
    #[error("image is {0} bytes; the limit is {MAX_IMAGE_BYTES}")]
    TooLarge(usize),
    #[error("malformed ELF: {0}")]
    Malformed(String),
    #[error("ELF class is 32-bit; moat images are ELF64")]
    Not64,
    #[error("ELF machine is {0}, not x86-64")]
    WrongMachine(String),
    #[error(
        "ELF type is {0}; moat images are static executables (ET_EXEC, link with -no-pie -static)"
    )]
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
    #[error(
        "segment at {0:#x} has file bytes past the end of the file or larger than its memory size"
    )]
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

/// A `syscall`, `sysenter` or `int 0x80` instruction in an image's code.
/// A picoprocess reaches its host only through the PAL function table, so
/// an image must have none (the sandbox kills the picoprocess at one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyscallSite {
    /// Address of the instruction (its first byte, prefixes included).
    pub addr: u64,
    pub kind: SyscallKind,
    /// The symbol whose code holds the instruction (as in the symbol
    /// table, not demangled) and the instruction's offset in it.
    pub symbol: Option<(String, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallKind {
    Syscall,
    Sysenter,
    Int80,
}

impl SyscallKind {
    /// The instruction as written in assembly.
    pub fn mnemonic(self) -> &'static str {
        match self {
            SyscallKind::Syscall => "syscall",
            SyscallKind::Sysenter => "sysenter",
            SyscallKind::Int80 => "int 0x80",
        }
    }
}

/// What the `.moat_abi` marker section says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbiMarker {
    /// No `.moat_abi` section: not built with moat-libos's `entry!` macro.
    Missing,
    /// A `.moat_abi` section without the 16-byte `MOATABI\0` marker.
    Malformed,
    /// The ABI version the image was built against (`major << 16 | minor`).
    Version(u32),
}

/// Everything `moat inspect` reports about an ELF file: what it is, and
/// every reason [`parse`] would refuse it (not only the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// ELF64 (true) or ELF32.
    pub is_64: bool,
    /// `e_machine`, e.g. `X86_64`.
    pub machine: &'static str,
    /// `e_type`, e.g. `EXEC`, `DYN`.
    pub elf_type: &'static str,
    pub entry: u64,
    /// Every non-empty `PT_LOAD` segment, sorted by address.
    pub segments: Vec<Segment>,
    pub abi: AbiMarker,
    /// Every system-call instruction in the code (x86-64 images only).
    pub syscalls: Vec<SyscallSite>,
    /// Every reason the image cannot be loaded, in the order [`parse`]
    /// checks them (so `problems[0]` is what `parse` returns).
    pub problems: Vec<ImageError>,
}

/// Parse and check an image. `mem_limit` bounds the span it may occupy.
pub fn parse(bytes: &[u8], mem_limit: u64) -> Result<Image, ImageError> {
    if bytes.len() > 4 && bytes.starts_with(b"\x7fELF") && bytes[4] != header::ELFCLASS64 {
        return Err(ImageError::Not64);
    }
    let (report, valid) = analyse(bytes, mem_limit)?;
    if let Some(e) = report.problems.into_iter().next() {
        return Err(e);
    }
    let base = page_down(valid[0].vaddr);
    let last = valid.last().unwrap();
    let end = page_up(last.vaddr + last.memsz).unwrap();
    Ok(Image {
        entry: report.entry,
        segments: valid,
        base,
        end,
        abi_version: match report.abi {
            AbiMarker::Version(v) => Some(v),
            _ => None,
        },
        syscall_sites: report.syscalls.iter().map(|s| s.addr).collect(),
    })
}

/// Check an ELF file as [`parse`] does, but collect every problem instead
/// of stopping at the first, with no memory limit. Fails only when the
/// file is not an ELF file that can be read at all.
pub fn inspect(bytes: &[u8]) -> Result<Report, ImageError> {
    analyse(bytes, u64::MAX).map(|(r, _)| r)
}

/// The report, and the segments that passed their own checks.
fn analyse(bytes: &[u8], mem_limit: u64) -> Result<(Report, Vec<Segment>), ImageError> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(ImageError::TooLarge(bytes.len()));
    }
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(ImageError::NotElf);
    }
    let elf = Elf::parse(bytes).map_err(|e| {
        if bytes.get(4).is_some_and(|&c| c != header::ELFCLASS64) {
            ImageError::Not64
        } else {
            ImageError::Malformed(e.to_string())
        }
    })?;
    let mut problems = Vec::new();
    if !elf.is_64 {
        problems.push(ImageError::Not64);
    }
    let x86_64 = elf.is_64 && elf.header.e_machine == header::EM_X86_64;
    if elf.header.e_machine != header::EM_X86_64 {
        problems.push(ImageError::WrongMachine(
            header::machine_to_str(elf.header.e_machine).to_string(),
        ));
    }
    if elf.header.e_type != header::ET_EXEC {
        problems.push(ImageError::WrongType(
            header::et_to_str(elf.header.e_type).to_string(),
        ));
    }
    if let Some(i) = elf.interpreter {
        problems.push(ImageError::Interpreter(i.to_string()));
    }
    let mut segments = Vec::new();
    // Segments that passed their own checks: in range, file bytes inside
    // the file, page-congruent.
    let mut valid = Vec::new();
    let (mut dynamic, mut tls) = (false, false);
    for p in &elf.program_headers {
        match p.p_type {
            ph::PT_DYNAMIC if !dynamic => {
                dynamic = true;
                problems.push(ImageError::Dynamic);
                continue;
            }
            ph::PT_TLS if !tls => {
                tls = true;
                problems.push(ImageError::Tls);
                continue;
            }
            ph::PT_LOAD => {}
            _ => continue,
        }
        if p.p_memsz == 0 {
            continue;
        }
        let w = p.p_flags & ph::PF_W != 0;
        let x = p.p_flags & ph::PF_X != 0;
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
        let seg = Segment {
            vaddr: p.p_vaddr,
            memsz: p.p_memsz,
            offset: p.p_offset,
            filesz: p.p_filesz,
            prot: pr,
        };
        segments.push(seg.clone());
        if w && x {
            problems.push(ImageError::WriteExec(p.p_vaddr));
        }
        let end = p.p_vaddr.checked_add(p.p_memsz);
        if p.p_vaddr < MIN_VADDR || end.is_none_or(|e| e > MAX_VADDR) {
            // A position-independent file's addresses are offsets: the
            // wrong type (reported above) says it all.
            if elf.header.e_type != header::ET_DYN {
                problems.push(ImageError::OutOfRange {
                    vaddr: p.p_vaddr,
                    memsz: p.p_memsz,
                });
            }
            continue;
        }
        let fend = p.p_offset.checked_add(p.p_filesz);
        if p.p_filesz > p.p_memsz || fend.is_none_or(|e| e > bytes.len() as u64) {
            problems.push(ImageError::BadFileRange(p.p_vaddr));
            continue;
        }
        if p.p_vaddr % PAGE != p.p_offset % PAGE {
            problems.push(ImageError::Misaligned(p.p_vaddr));
            continue;
        }
        valid.push(seg);
    }
    segments.sort_by_key(|s| s.vaddr);
    valid.sort_by_key(|s| s.vaddr);
    if valid.is_empty() {
        if segments.is_empty() {
            problems.push(ImageError::NoSegments);
        }
    } else {
        // Segments may share a page only if neither is writable-and-the-other
        // executable; we map at page granularity, so require page-disjointness.
        for w in valid.windows(2) {
            let a_end = page_up(w[0].vaddr + w[0].memsz).unwrap();
            if page_down(w[1].vaddr) < a_end {
                problems.push(ImageError::Overlap(w[0].vaddr, w[1].vaddr));
            }
        }
        let base = page_down(valid[0].vaddr);
        let last = valid.last().unwrap();
        let end = page_up(last.vaddr + last.memsz).unwrap();
        if end - base > mem_limit {
            problems.push(ImageError::TooBig(end - base, mem_limit));
        }
    }
    let entry = elf.entry;
    if !segments
        .iter()
        .any(|s| s.prot & prot::EXEC != 0 && entry >= s.vaddr && entry - s.vaddr < s.memsz)
    {
        problems.push(ImageError::BadEntry(entry));
    }
    let abi = abi_marker(&elf, bytes);
    let syscalls = if x86_64 {
        syscall_instructions(&elf, bytes, &valid)
    } else {
        Vec::new()
    };
    let report = Report {
        is_64: elf.is_64,
        machine: header::machine_to_str(elf.header.e_machine),
        elf_type: header::et_to_str(elf.header.e_type),
        entry,
        segments,
        abi,
        syscalls,
        problems,
    };
    Ok((report, valid))
}

fn abi_marker(elf: &Elf, bytes: &[u8]) -> AbiMarker {
    let mut found = AbiMarker::Missing;
    for sh in &elf.section_headers {
        if elf.shdr_strtab.get_at(sh.sh_name) != Some(ABI_SECTION) {
            continue;
        }
        found = AbiMarker::Malformed;
        if sh.sh_size < 16 || sh.sh_type == goblin::elf::section_header::SHT_NOBITS {
            continue;
        }
        if let Some(v) = marker_version(
            usize::try_from(sh.sh_offset)
                .ok()
                .and_then(|o| bytes.get(o..o.checked_add(16)?)),
        ) {
            return AbiMarker::Version(v);
        }
    }
    found
}

fn marker_version(b: Option<&[u8]>) -> Option<u32> {
    let b = b?;
    if b.len() < 12 || &b[..8] != ABI_MAGIC {
        return None;
    }
    Some(u32::from_le_bytes(b[8..12].try_into().ok()?))
}

/// The code of an image: the executable sections (`SHF_EXECINSTR`) clipped
/// to the executable segments, plus any bytes of an executable segment no
/// such section covers (all of them when the section headers are gone).
/// Each range is `(vaddr, file offset, length)`.
fn code_ranges(elf: &Elf, bytes: &[u8], segments: &[Segment]) -> Vec<(u64, usize, usize)> {
    use goblin::elf::section_header::{SHF_ALLOC, SHF_EXECINSTR, SHT_NOBITS};
    let mut out = Vec::new();
    for s in segments.iter().filter(|s| s.prot & prot::EXEC != 0) {
        let (lo, hi) = (s.vaddr, s.vaddr + s.filesz);
        // Executable sections inside this segment, as address ranges.
        let mut secs: Vec<(u64, u64)> = elf
            .section_headers
            .iter()
            .filter(|sh| {
                sh.sh_flags & u64::from(SHF_EXECINSTR | SHF_ALLOC)
                    == u64::from(SHF_EXECINSTR | SHF_ALLOC)
                    && sh.sh_type != SHT_NOBITS
            })
            .filter_map(|sh| {
                let a = sh.sh_addr.max(lo);
                let b = sh.sh_addr.checked_add(sh.sh_size)?.min(hi);
                (a < b).then_some((a, b))
            })
            .collect();
        secs.sort_unstable();
        let mut at = lo;
        let mut push = |a: u64, b: u64| {
            if a < b {
                out.push((a, (s.offset + (a - s.vaddr)) as usize, (b - a) as usize));
            }
        };
        for (a, b) in secs {
            let a = a.max(at);
            if a >= b {
                continue;
            }
            push(at, a); // a gap no executable section covers
            push(a, b);
            at = b;
        }
        push(at, hi);
    }
    // Every range lies inside a segment whose file bytes are in the file.
    out.retain(|&(_, off, len)| off.checked_add(len).is_some_and(|e| e <= bytes.len()));
    out
}

/// Every `syscall`, `sysenter` and `int 0x80` instruction in the code.
///
/// Exact for compiler output: a byte scan finds the candidates (the opcode
/// pairs `0F 05`, `0F 34`, `CD 80`, which a real instruction always
/// contains), then the function holding each candidate (from the symbol
/// table; the whole code range where there is none) is decoded from its
/// start, so that pairs inside longer instructions or in data are not
/// reported. Only functions with candidates are decoded, which keeps this
/// cheap enough for every load. (A hostile image can hide code from any
/// static scan by jumping into the middle of an instruction; the sandbox's
/// seccomp filter is what enforces, this is the diagnosis.)
fn syscall_instructions(elf: &Elf, bytes: &[u8], segments: &[Segment]) -> Vec<SyscallSite> {
    use goblin::elf::sym::{STT_FUNC, STT_NOTYPE, STT_SECTION};
    // (start, end, name) of the function symbols with a size, sorted.
    let mut funcs: Vec<(u64, u64, &str)> = Vec::new();
    // (addr, name) of every named code symbol, for naming sites.
    let mut labels: Vec<(u64, &str)> = Vec::new();
    for sym in elf.syms.iter() {
        let t = sym.st_type();
        if sym.st_shndx == 0 || !(t == STT_FUNC || t == STT_NOTYPE) || t == STT_SECTION {
            continue;
        }
        let Some(name) = elf.strtab.get_at(sym.st_name).filter(|n| !n.is_empty()) else {
            continue;
        };
        if t == STT_FUNC && sym.st_size > 0 {
            if let Some(end) = sym.st_value.checked_add(sym.st_size) {
                funcs.push((sym.st_value, end, name));
            }
        }
        labels.push((sym.st_value, name));
    }
    funcs.sort_unstable();
    labels.sort_unstable();
    let mut sites = std::collections::BTreeMap::new();
    for (vaddr, off, len) in code_ranges(elf, bytes, segments) {
        let code = &bytes[off..off + len];
        let end = vaddr + len as u64;
        // Candidates come in address order; everything below this has
        // been decoded already.
        let mut covered = vaddr;
        for i in 0..len.saturating_sub(1) {
            if !matches!(code[i..i + 2], [0x0f, 0x05] | [0x0f, 0x34] | [0xcd, 0x80]) {
                continue;
            }
            let at = vaddr + i as u64;
            if at < covered {
                continue;
            }
            // The function holding the candidate, if it lies within this
            // code range; else the whole range.
            let (a, b) = containing(&funcs, at)
                .filter(|f| f.0 >= vaddr && f.1 <= end)
                .map_or((vaddr, end), |f| (f.0, f.1));
            covered = covered.max(b);
            let slice = &code[(a - vaddr) as usize..(b - vaddr) as usize];
            for (addr, kind) in decode_syscalls(slice, a) {
                sites.entry(addr).or_insert(kind);
            }
        }
    }
    sites
        .into_iter()
        .map(|(addr, kind)| {
            // Prefer a sized function that holds the address; else the
            // nearest label at or below it.
            let idx = labels.partition_point(|l| l.0 <= addr);
            let symbol = containing(&funcs, addr)
                .map(|f| (f.2.to_string(), addr - f.0))
                .or_else(|| {
                    idx.checked_sub(1)
                        .map(|i| (labels[i].1.to_string(), addr - labels[i].0))
                });
            SyscallSite { addr, kind, symbol }
        })
        .collect()
}

/// The innermost of the sorted `(start, end, name)` functions holding
/// `addr`. Looks at a bounded number of the functions starting at or below
/// `addr`, so a hostile symbol table cannot make this quadratic.
fn containing<'a, 'n>(
    funcs: &'a [(u64, u64, &'n str)],
    addr: u64,
) -> Option<&'a (u64, u64, &'n str)> {
    let idx = funcs.partition_point(|f| f.0 <= addr);
    funcs[..idx].iter().rev().take(64).find(|f| addr < f.1)
}

/// Linear-sweep decode of `code` (loaded at `ip`): the system-call
/// instructions in it.
fn decode_syscalls(code: &[u8], ip: u64) -> Vec<(u64, SyscallKind)> {
    use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};
    let mut out = Vec::new();
    let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    while d.can_decode() {
        d.decode_out(&mut ins);
        let kind = match ins.mnemonic() {
            Mnemonic::Syscall => SyscallKind::Syscall,
            Mnemonic::Sysenter => SyscallKind::Sysenter,
            Mnemonic::Int if ins.immediate8() == 0x80 => SyscallKind::Int80,
            _ => continue,
        };
        out.push((ins.ip(), kind));
    }
    out
}

/// The ABI version in the `.moat_abi` marker of the ELF file `f`, reading
/// only the ELF header, the section headers, their names and the marker
/// (not the whole file). `None` if `f` is not an ELF64 little-endian file
/// or has no valid marker. For listing images quickly; it checks nothing
/// else ([`parse`] does).
pub fn read_abi_marker(f: &std::fs::File) -> Option<u32> {
    use std::os::unix::fs::FileExt;
    let read = |off: u64, len: usize| -> Option<Vec<u8>> {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, off).ok()?;
        Some(b)
    };
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let h = read(0, 64)?;
    if &h[..4] != b"\x7fELF" || h[4] != header::ELFCLASS64 || h[5] != header::ELFDATA2LSB {
        return None;
    }
    let shoff = u64_at(&h, 0x28);
    let shentsize = usize::from(u16_at(&h, 0x3a));
    let mut shnum = usize::from(u16_at(&h, 0x3c));
    let mut shstrndx = usize::from(u16_at(&h, 0x3e));
    if shoff == 0 || shentsize < 64 {
        return None;
    }
    if shnum == 0 || shstrndx == 0xffff {
        // Extended numbering: the counts live in section header 0.
        let s0 = read(shoff, 64)?;
        if shnum == 0 {
            shnum = usize::try_from(u64_at(&s0, 0x20)).ok()?;
        }
        if shstrndx == 0xffff {
            shstrndx = u32_at(&s0, 0x28) as usize;
        }
    }
    if shnum == 0 || shnum > 1 << 16 || shstrndx >= shnum {
        return None;
    }
    let shdrs = read(shoff, shnum.checked_mul(shentsize)?)?;
    let sh = |i: usize| &shdrs[i * shentsize..i * shentsize + 64];
    let strtab = sh(shstrndx);
    let (str_off, str_size) = (u64_at(strtab, 0x18), u64_at(strtab, 0x20));
    let names = read(str_off, usize::try_from(str_size.min(1 << 20)).ok()?)?;
    let want = ABI_SECTION.as_bytes();
    for i in 0..shnum {
        let s = sh(i);
        let name = u32_at(s, 0) as usize;
        let is_marker = names
            .get(name..)
            .is_some_and(|n| n.starts_with(want) && n.get(want.len()) == Some(&0));
        if !is_marker
            || u32_at(s, 4) == goblin::elf::section_header::SHT_NOBITS
            || u64_at(s, 0x20) < 16
        {
            continue;
        }
        if let Some(v) = marker_version(read(u64_at(s, 0x18), 16).as_deref()) {
            return Some(v);
        }
    }
    None
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
        assert!(
            matches!(e, ImageError::WrongType(_) | ImageError::Interpreter(_)),
            "{e}"
        );
    }
}
