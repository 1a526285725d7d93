//! Image checks on arbitrary files: [`elf::parse`] (what the monitor and
//! every loader run before a byte of an image is mapped) under an
//! arbitrary memory limit, [`elf::inspect`] (`moat inspect`: every
//! problem, not only the first, with the system-call scan) and
//! [`elf::read_abi_marker`] (`moat images`, which reads only headers).
//!
//! The checks: nothing panics; an accepted image keeps the documented
//! invariants (at least one segment; each inside `MIN_VADDR..MAX_VADDR`,
//! its file bytes inside the file and at most its memory size,
//! page-congruent, never writable and executable; segments sorted and
//! page-disjoint; the span page-aligned and within the memory limit; the
//! entry point inside an executable segment; every system-call site in
//! an executable segment); `inspect`'s first problem is what `parse`
//! refuses with; and the marker the quick reader finds is the one `parse`
//! finds.
//!
//! The first eight bytes of the input pick the memory limit; the rest is
//! the file.
use moat_host_common::elf::{self, Image, ImageError, MAX_VADDR, MIN_VADDR};
use moat_pal::prot;
use std::fs::File;
use std::io::{Seek, Write};
use std::sync::{Mutex, OnceLock};

const PAGE: u64 = 4096;

/// The documented invariants of an accepted image.
fn check_image(img: &Image, bytes: &[u8], limit: u64) {
    assert!(!img.segments.is_empty(), "an image without segments");
    for s in &img.segments {
        let end = s.vaddr.checked_add(s.memsz).expect("segment wraps");
        assert!(s.memsz > 0, "an empty segment");
        assert!(
            s.vaddr >= MIN_VADDR && end <= MAX_VADDR,
            "segment {s:?} outside the address limits"
        );
        assert!(s.filesz <= s.memsz, "segment {s:?}: more file than memory");
        let fend = s.offset.checked_add(s.filesz).expect("file range wraps");
        assert!(fend <= bytes.len() as u64, "segment {s:?} past the file");
        assert_eq!(s.vaddr % PAGE, s.offset % PAGE, "segment {s:?} misaligned");
        assert!(
            s.prot & (prot::WRITE | prot::EXEC) != prot::WRITE | prot::EXEC,
            "segment {s:?} is writable and executable"
        );
        assert_eq!(
            s.prot & !(prot::READ | prot::WRITE | prot::EXEC),
            0,
            "segment {s:?}: unknown protection bits"
        );
    }
    for w in img.segments.windows(2) {
        let a_end = (w[0].vaddr + w[0].memsz).div_ceil(PAGE) * PAGE;
        assert!(
            w[1].vaddr / PAGE * PAGE >= a_end,
            "segments {:?} and {:?} share a page or are unsorted",
            w[0],
            w[1]
        );
    }
    let first = &img.segments[0];
    let last = img.segments.last().unwrap();
    assert_eq!(img.base, first.vaddr / PAGE * PAGE, "base");
    assert_eq!(
        img.end,
        (last.vaddr + last.memsz).div_ceil(PAGE) * PAGE,
        "end"
    );
    assert!(img.end - img.base <= limit, "span over the memory limit");
    let exec = |a: u64| {
        img.segments
            .iter()
            .any(|s| s.prot & prot::EXEC != 0 && a >= s.vaddr && a - s.vaddr < s.memsz)
    };
    assert!(exec(img.entry), "entry {:#x} not executable", img.entry);
    for &a in &img.syscall_sites {
        assert!(exec(a), "system call site {a:#x} outside the code");
    }
}

/// A file to hand `read_abi_marker`, one per process.
fn scratch() -> &'static Mutex<File> {
    static F: OnceLock<Mutex<File>> = OnceLock::new();
    F.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("moat-fuzz-elf-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        // The open descriptor is all that is needed.
        let _ = std::fs::remove_file(&path);
        Mutex::new(f)
    })
}

/// The memory limit an input asks for: small, around real images' spans,
/// or anything.
fn limit(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..b.len()].copy_from_slice(b);
    let v = u64::from_le_bytes(w);
    match v & 3 {
        0 => u64::MAX,
        1 => (v >> 2) % (64 << 20),
        2 => 1 << 30,
        _ => v >> 2,
    }
}

/// Run one input: the memory limit, then the file.
pub fn run(data: &[u8]) {
    let (head, bytes) = data.split_at(data.len().min(8));
    let limit = limit(head);
    let parsed = elf::parse(bytes, limit);
    if let Ok(img) = &parsed {
        check_image(img, bytes, limit);
    }
    // `inspect` reports what `parse` (without a limit) refuses with first.
    let unlimited = elf::parse(bytes, u64::MAX);
    match elf::inspect(bytes) {
        Ok(r) => {
            match (&unlimited, r.problems.first()) {
                (Ok(_), None) => {}
                (Err(e), Some(p)) => assert_eq!(e, p, "inspect and parse disagree"),
                // An ELF32 file is refused by parse before inspect's look.
                (Err(ImageError::Not64), _) => {}
                (a, b) => panic!("parse says {a:?}, inspect's first problem is {b:?}"),
            }
            for s in &r.syscalls {
                std::hint::black_box(s.kind.mnemonic());
            }
        }
        Err(e) => assert!(unlimited.is_err(), "inspect refused what parse took: {e}"),
    }
    if let Ok(img) = &unlimited {
        if parsed.is_err() {
            assert!(
                matches!(parsed, Err(ImageError::TooBig(..))),
                "{parsed:?}: a limit refused more than the span"
            );
        }
        // The quick marker reader agrees with the full parse.
        let mut f = scratch().lock().unwrap_or_else(|e| e.into_inner());
        f.set_len(0).unwrap();
        f.rewind().unwrap();
        f.write_all(bytes).unwrap();
        let quick = elf::read_abi_marker(&f);
        if let Some(v) = quick {
            assert_eq!(
                img.abi_version,
                Some(v),
                "read_abi_marker and parse disagree"
            );
        }
    }
}
