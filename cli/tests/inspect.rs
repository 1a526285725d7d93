//! `moat inspect`, `moat images` and `moat abi` on synthetic ELF files
//! (no guest build needed), and `moat_host_common::elf` on the same bytes.
use moat_host_common::elf;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn moat_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moat"));
    c.args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn moat(args: &[&str]) -> Output {
    moat_env(args, &[])
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh directory for this test.
fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moat-inspect-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const TEXT_VADDR: u64 = 0x201000;
const TEXT_OFF: u64 = 0x1000;

/// A minimal static ELF64 x86-64 executable, laid out as lld lays out
/// guest images: a read-only segment (headers and `.moat_abi`) and an
/// executable segment holding exactly `.text`, whose functions are in
/// `.symtab`.
struct Synth {
    code: Vec<u8>,
    /// (name, offset in code, size)
    funcs: Vec<(&'static str, u64, u64)>,
    abi: Option<u32>,
    /// Leave out every section header (a stripped-to-the-bone file).
    no_sections: bool,
    /// Make the code segment writable too.
    wx: bool,
}

impl Synth {
    fn new(code: &[u8], funcs: &[(&'static str, u64, u64)]) -> Self {
        Synth {
            code: code.to_vec(),
            funcs: funcs.to_vec(),
            abi: Some(moat_pal::ABI_VERSION),
            no_sections: false,
            wx: false,
        }
    }

    fn build(&self) -> Vec<u8> {
        fn put(b: &mut Vec<u8>, at: usize, v: &[u8]) {
            if b.len() < at + v.len() {
                b.resize(at + v.len(), 0);
            }
            b[at..at + v.len()].copy_from_slice(v);
        }
        let mut b = vec![0u8; TEXT_OFF as usize];
        // Program headers: R (headers + marker), R-X (text).
        let phoff = 64usize;
        let ph = |i: usize, flags: u32, off: u64, vaddr: u64, size: u64, b: &mut Vec<u8>| {
            let at = phoff + 56 * i;
            put(b, at, &1u32.to_le_bytes()); // PT_LOAD
            put(b, at + 4, &flags.to_le_bytes());
            put(b, at + 8, &off.to_le_bytes());
            put(b, at + 16, &vaddr.to_le_bytes());
            put(b, at + 24, &vaddr.to_le_bytes());
            put(b, at + 32, &size.to_le_bytes());
            put(b, at + 40, &size.to_le_bytes());
            put(b, at + 48, &0x1000u64.to_le_bytes());
        };
        ph(0, 4, 0, 0x200000, 0x210, &mut b);
        let x = if self.wx { 7 } else { 5 };
        ph(1, x, TEXT_OFF, TEXT_VADDR, self.code.len() as u64, &mut b);
        // The marker at 0x200.
        let marker_off = 0x200usize;
        if let Some(v) = self.abi {
            put(&mut b, marker_off, b"MOATABI\0");
            put(&mut b, marker_off + 8, &v.to_le_bytes());
        }
        put(&mut b, TEXT_OFF as usize, &self.code);
        // .symtab, .strtab, .shstrtab, then the section headers.
        let mut strtab = vec![0u8];
        let mut symtab = vec![0u8; 24];
        for (name, off, size) in &self.funcs {
            let mut s = vec![0u8; 24];
            s[..4].copy_from_slice(&(strtab.len() as u32).to_le_bytes());
            s[4] = 0x12; // STB_GLOBAL, STT_FUNC
            s[6..8].copy_from_slice(&1u16.to_le_bytes()); // in .text
            s[8..16].copy_from_slice(&(TEXT_VADDR + off).to_le_bytes());
            s[16..24].copy_from_slice(&size.to_le_bytes());
            symtab.extend_from_slice(&s);
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
        }
        let mut shstrtab = vec![0u8];
        let mut name = |n: &str| {
            let at = shstrtab.len() as u32;
            shstrtab.extend_from_slice(n.as_bytes());
            shstrtab.push(0);
            at
        };
        let names = [
            name(".text"),
            name(".moat_abi"),
            name(".symtab"),
            name(".strtab"),
            name(".shstrtab"),
        ];
        let align = |b: &mut Vec<u8>| b.resize(b.len().div_ceil(8) * 8, 0);
        align(&mut b);
        let symtab_off = b.len();
        b.extend_from_slice(&symtab);
        let strtab_off = b.len();
        b.extend_from_slice(&strtab);
        let shstrtab_off = b.len();
        b.extend_from_slice(&shstrtab);
        align(&mut b);
        let shoff = b.len();
        // (name, type, flags, addr, offset, size, link, info, entsize)
        type Sh = (u32, u32, u64, u64, u64, u64, u32, u32, u64);
        let shdrs: [Sh; 6] = [
            (0, 0, 0, 0, 0, 0, 0, 0, 0),
            (
                names[0],
                1,
                6,
                TEXT_VADDR,
                TEXT_OFF,
                self.code.len() as u64,
                0,
                0,
                0,
            ),
            (names[1], 1, 2, 0x200200, marker_off as u64, 16, 0, 0, 0),
            (
                names[2],
                2,
                0,
                0,
                symtab_off as u64,
                symtab.len() as u64,
                4,
                1,
                24,
            ),
            (
                names[3],
                3,
                0,
                0,
                strtab_off as u64,
                strtab.len() as u64,
                0,
                0,
                0,
            ),
            (
                names[4],
                3,
                0,
                0,
                shstrtab_off as u64,
                shstrtab.len() as u64,
                0,
                0,
                0,
            ),
        ];
        for s in shdrs {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&s.0.to_le_bytes());
            h[4..8].copy_from_slice(&s.1.to_le_bytes());
            h[8..16].copy_from_slice(&s.2.to_le_bytes());
            h[16..24].copy_from_slice(&s.3.to_le_bytes());
            h[24..32].copy_from_slice(&s.4.to_le_bytes());
            h[32..40].copy_from_slice(&s.5.to_le_bytes());
            h[40..44].copy_from_slice(&s.6.to_le_bytes());
            h[44..48].copy_from_slice(&s.7.to_le_bytes());
            h[56..64].copy_from_slice(&s.8.to_le_bytes());
            b.extend_from_slice(&h);
        }
        // The ELF header.
        let mut h = vec![0u8; 64];
        h[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        h[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        h[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        h[20..24].copy_from_slice(&1u32.to_le_bytes());
        h[24..32].copy_from_slice(&TEXT_VADDR.to_le_bytes()); // entry
        h[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        if !self.no_sections {
            h[40..48].copy_from_slice(&(shoff as u64).to_le_bytes());
        }
        h[52..54].copy_from_slice(&64u16.to_le_bytes());
        h[54..56].copy_from_slice(&56u16.to_le_bytes());
        h[56..58].copy_from_slice(&2u16.to_le_bytes());
        h[58..60].copy_from_slice(&64u16.to_le_bytes());
        if !self.no_sections {
            h[60..62].copy_from_slice(&6u16.to_le_bytes());
            h[62..64].copy_from_slice(&5u16.to_le_bytes());
        }
        put(&mut b, 0, &h);
        if self.no_sections {
            b.truncate(symtab_off);
        }
        b
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.build()).unwrap();
        p
    }
}

/// Code whose bytes hold every system-call opcode pair, but only inside
/// longer instructions: `mov eax, 0x050f; lea rax, [rip+0x340f];
/// mov ecx, 0x80cd; ret`.
const DECOY: &[u8] = &[
    0xb8, 0x0f, 0x05, 0x00, 0x00, // mov eax, 0x50f
    0x48, 0x8d, 0x05, 0x0f, 0x34, 0x00, 0x00, // lea rax, [rip+0x340f]
    0xb9, 0xcd, 0x80, 0x00, 0x00, // mov ecx, 0x80cd
    0xc3, // ret
];

/// `mov eax, 39; syscall; int 0x80; sysenter; ret`
const EVIL: &[u8] = &[
    0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0xcd, 0x80, 0x0f, 0x34, 0xc3,
];

fn decoy_and_evil() -> Synth {
    let mut code = DECOY.to_vec();
    code.extend_from_slice(EVIL);
    Synth::new(
        &code,
        &[
            ("decoy", 0, DECOY.len() as u64),
            (
                "_ZN4evil3run17h0123456789abcdefE",
                DECOY.len() as u64,
                EVIL.len() as u64,
            ),
        ],
    )
}

#[test]
fn opcode_pairs_inside_instructions_are_not_system_calls() {
    let d = tempdir("decoy");
    let s = Synth::new(DECOY, &[("decoy", 0, DECOY.len() as u64)]);
    let img = elf::parse(&s.build(), 1 << 30).unwrap();
    assert_eq!(img.syscall_sites, Vec::<u64>::new());
    assert_eq!(img.abi_version, Some(moat_pal::ABI_VERSION));
    let p = s.write(&d, "decoy");
    let o = moat(&["inspect", p.to_str().unwrap()]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
    assert!(
        out.contains("W^X:      ok") && out.contains("compatible"),
        "{out}"
    );
    assert!(!out.contains("problem:"), "{out}");
}

#[test]
fn every_system_call_instruction_is_named_with_its_symbol() {
    let d = tempdir("evil");
    let s = decoy_and_evil();
    let at = TEXT_VADDR + DECOY.len() as u64;
    let img = elf::parse(&s.build(), 1 << 30).unwrap();
    assert_eq!(img.syscall_sites, vec![at + 5, at + 7, at + 9]);
    let r = elf::inspect(&s.build()).unwrap();
    assert_eq!(
        r.syscalls.iter().map(|s| s.kind).collect::<Vec<_>>(),
        [
            elf::SyscallKind::Syscall,
            elf::SyscallKind::Int80,
            elf::SyscallKind::Sysenter
        ]
    );
    assert_eq!(
        r.syscalls[0].symbol,
        Some(("_ZN4evil3run17h0123456789abcdefE".into(), 5))
    );
    let p = s.write(&d, "evil");
    let o = moat(&["inspect", p.to_str().unwrap()]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let problems: Vec<&str> = out.lines().filter(|l| l.starts_with("problem: ")).collect();
    assert_eq!(problems.len(), 3, "{out}");
    assert!(
        problems[0].contains(&format!(
            "`syscall` instruction at {:#x} in `evil::run` (+0x5)",
            at + 5
        )),
        "{out}"
    );
    assert!(
        problems[1].contains("`int 0x80`") && problems[2].contains("`sysenter`"),
        "{out}"
    );
}

#[test]
fn without_section_headers_the_executable_segment_is_decoded() {
    let d = tempdir("nosections");
    let mut s = decoy_and_evil();
    s.no_sections = true;
    let r = elf::inspect(&s.build()).unwrap();
    assert_eq!(r.syscalls.len(), 3, "{r:?}");
    assert_eq!(r.abi, elf::AbiMarker::Missing);
    let p = s.write(&d, "bare");
    let o = moat(&["inspect", p.to_str().unwrap()]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("problem: not a moat image (no .moat_abi section; images are built with moat-libos's entry! macro)"), "{out}");
}

#[test]
fn writable_code_and_foreign_abi_are_problems() {
    let d = tempdir("wx");
    let mut s = Synth::new(DECOY, &[]);
    s.wx = true;
    s.abi = Some(0x0002_0000);
    assert_eq!(
        elf::parse(&s.build(), 1 << 30),
        Err(elf::ImageError::WriteExec(TEXT_VADDR))
    );
    let p = s.write(&d, "wx");
    let o = moat(&["inspect", p.to_str().unwrap()]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("W^X:      violated"), "{out}");
    assert!(
        out.contains("problem: segment at 0x201000 is writable and executable"),
        "{out}"
    );
    assert!(out.contains("problem: ABI 2.0 is incompatible"), "{out}");
}

#[test]
fn unreadable_or_not_elf_is_one_line_and_exit_2() {
    let d = tempdir("garbage");
    let mut truncated = decoy_and_evil().build();
    truncated.truncate(40);
    for (name, bytes) in [
        ("empty", &b""[..]),
        ("script", &b"#!/bin/sh\necho hi\n"[..]),
        ("truncated", &truncated[..]),
        ("random", &[0x7f, b'E', b'L', b'F', 2, 1, 1, 0xff, 0xff][..]),
    ] {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        let o = moat(&["inspect", p.to_str().unwrap()]);
        let e = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {e}");
        assert_eq!(e.lines().count(), 1, "{name}: {e}");
        assert!(e.starts_with("moat: ") && e.contains("ELF"), "{name}: {e}");
        assert!(o.stdout.is_empty(), "{name}");
    }
    let o = moat(&["inspect", "/nonexistent/image"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).starts_with("moat: cannot read `/nonexistent/image`"));
}

#[test]
fn images_lists_marked_elf_files_first_directory_first() {
    let a = tempdir("images-a");
    let b = tempdir("images-b");
    let good = Synth::new(DECOY, &[]);
    let mut unmarked = Synth::new(DECOY, &[]);
    unmarked.abi = None;
    good.write(&a, "zz-synth-one");
    good.write(&b, "zz-synth-one"); // shadowed by a's
    good.write(&b, "zz-synth-two");
    unmarked.write(&a, "zz-synth-unmarked");
    std::fs::write(a.join("zz-synth-text"), "MOATABI\0 not an ELF file").unwrap();
    std::fs::create_dir_all(a.join("zz-synth-dir")).unwrap();
    let path = std::env::join_paths([&a, &b]).unwrap();
    let o = moat_env(&["images"], &[("MOAT_IMAGE_PATH", Path::new(&path))]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let ours: Vec<&str> = out.lines().filter(|l| l.starts_with("zz-synth")).collect();
    assert_eq!(ours.len(), 2, "{out}");
    let kib = good.build().len().div_ceil(1024);
    let (major, minor) = (moat_pal::ABI_VERSION >> 16, moat_pal::ABI_VERSION & 0xffff);
    let want = |dir: &Path, name: &str| {
        format!(
            "{}  (abi {major}.{minor}, {kib} KiB)",
            dir.join(name).display()
        )
    };
    assert!(
        ours[0].starts_with("zz-synth-one ") && ours[0].ends_with(&want(&a, "zz-synth-one")),
        "{out}"
    );
    assert!(
        ours[1].starts_with("zz-synth-two ") && ours[1].ends_with(&want(&b, "zz-synth-two")),
        "{out}"
    );
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}

#[test]
fn abi_formats() {
    for (f, needle) in [
        ("md", "DkStreamOpen"),
        ("json", "\"DkStreamOpen\""),
        ("c", "moat_pal_table"),
    ] {
        let o = moat(&["abi", "--format", f]);
        assert_eq!(o.status.code(), Some(0));
        assert!(text(&o.stdout).contains(needle), "{f}");
    }
    let o = moat(&["abi"]);
    assert_eq!(text(&o.stdout), moat_abi_spec::render("md").unwrap());
    let o = moat(&["abi", "--format", "yaml"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        text(&o.stderr),
        "moat: unknown format `yaml` (use md, json or c)\n"
    );
}
