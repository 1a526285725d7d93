//! The seed inputs of every target, made from real values: each ABI call
//! with arguments a guest would pass, real loader requests, the driver's
//! answers, the README's manifest and device declarations, the built guest
//! images. `cargo run --manifest-path fuzz/Cargo.toml -p moat-fuzz-targets
//! --bin seeds` writes them into a corpus folder (README.md says how the
//! committed corpus was made from them).
use moat_abi_spec::LEN_TYPES;
use moat_host_common::protocol::{ReportKind, Request};
use moat_service_proto::{class, status, Response};
use std::path::Path;

/// A named seed.
pub type Seed = (String, Vec<u8>);

/// The largest image seed, and the `-max_len` of the elf_image target's
/// runs: larger inputs would make its corpus tens of megabytes.
pub const MAX_IMAGE_SEED: usize = 64 << 10;

// ---------------------------------------------------------------- hypercalls

/// A word that the target reads as a pointer `off` bytes into guest RAM.
fn ptr(off: u16) -> Vec<u8> {
    let mut v = vec![4];
    v.extend_from_slice(&off.to_le_bytes());
    v
}

/// A word that the target reads as `v` (a `u16`).
fn num(v: u16) -> Vec<u8> {
    let mut w = vec![2];
    w.extend_from_slice(&v.to_le_bytes());
    w
}

/// Guest RAM with four kinds of memory: read-write allocations (pages 0 to
/// 3), a read-write stack (4 to 7), a read-only image (8 to 11) and code
/// (12 to 15).
fn layout() -> Vec<u8> {
    let mut v = vec![4];
    for (first, b) in [(0u8, 3 | 1 << 3), (4, 3 | 2 << 3), (8, 1), (12, 5)] {
        v.extend_from_slice(&[first, 3, b]);
    }
    v.extend((0..32u8).map(|i| i.wrapping_mul(37)));
    v
}

/// One call with arguments a guest would pass: buffers in the read-write
/// pages, lengths that fit them, small scalars; the host answers `script`.
fn call_bytes(call: &moat_abi_spec::Call, script: u8) -> Vec<u8> {
    let mut v = vec![call.number as u8];
    let lens: Vec<&str> = call
        .args
        .iter()
        .filter(|a| LEN_TYPES.contains(&a.ty.as_str()))
        .filter_map(|a| a.len.as_deref())
        .collect();
    let mut buf = 0x100u16;
    for i in 0..6 {
        let w = match call.args.get(i) {
            None => num(0),
            Some(a) if lens.contains(&a.name.as_str()) => match a.doc.as_deref() {
                Some(d) if d.starts_with("at least") => num(256),
                Some(d) if d.contains("max_wait_handles") => num(3),
                _ => num(24),
            },
            Some(a) if a.ty.contains("_in") || a.ty.contains("_out") => {
                buf += 0x800;
                ptr(buf)
            }
            Some(_) => num(1),
        };
        v.extend(w);
    }
    v.push(script);
    v
}

pub fn hypercall_dispatch() -> Vec<Seed> {
    let spec = moat_abi_spec::spec();
    let mut out = Vec::new();
    for c in &spec.calls {
        for (tag, script) in [("ok", 1u8), ("err", 12)] {
            let mut v = layout();
            v.extend(call_bytes(c, script));
            out.push((format!("{}-{tag}", c.name), v));
        }
    }
    // Memory calls: allocate where the host chooses, protect, free.
    let mut v = layout();
    let page = |v: &mut Vec<u8>, nr: u8, addr: Vec<u8>, size: u16, p: u16| {
        v.push(nr);
        v.extend(addr);
        v.extend(num(size));
        v.extend(num(p));
        v.extend([num(0), num(0), num(0)].concat());
        v.push(1);
    };
    page(&mut v, 1, num(0), 0x2000, 3);
    page(&mut v, 3, ptr(0), 0x1000, 1);
    page(&mut v, 2, ptr(0), 0x1000, 0);
    out.push(("memory-calls".into(), v));
    out
}

// ------------------------------------------------------------------ monitor

/// A structured message: `sel` picks the request, then its fields.
fn msg(sel: u8, fields: &[&[u8]]) -> Vec<u8> {
    let mut v = vec![sel];
    for f in fields {
        v.extend_from_slice(f);
    }
    v
}

/// A URI from the target's vocabulary: base `b`, then `suffix`.
fn uri(b: u8, suffix: &str) -> Vec<u8> {
    let mut v = vec![b];
    v.extend_from_slice(&(suffix.len() as u16).to_le_bytes());
    v.extend_from_slice(suffix.as_bytes());
    v
}

/// A raw message: real request values, encoded as a loader encodes them.
fn raw(req: &Request) -> Vec<u8> {
    let bytes = postcard::to_allocvec(req).unwrap();
    let mut v = vec![0];
    v.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    v.extend(bytes);
    v
}

pub fn monitor_protocol() -> Vec<Seed> {
    let open =
        |u: Vec<u8>, access: u8, create: u8, options: u8| msg(1, &[&u, &[access, create, options]]);
    let text = |s: &str| {
        let mut v = (s.len() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("open-read", open(uri(0, "/file"), 1, 0, 0)),
        ("open-create", open(uri(0, "/new"), 3, 2, 0)),
        ("open-truncate", open(uri(0, "/file"), 2, 1, 0)),
        ("open-append", open(uri(0, "/sub/inner"), 6, 3, 0)),
        ("mkdir", open(uri(0, "/dir"), 1, 3, 1)),
        ("open-dir", open(uri(0, ""), 1, 0, 1)),
        ("escape-link", open(uri(6, "/secret"), 1, 0, 0)),
        ("abs-link", open(uri(7, ""), 1, 0, 0)),
        ("up-link", open(uri(8, ""), 3, 0, 0)),
        ("dotdot", open(uri(9, "/outside/secret"), 1, 0, 0)),
        ("ro-write", open(uri(10, "/file"), 2, 0, 0)),
        ("ro-read", open(uri(10, "/sub/inner"), 1, 0, 0)),
        ("sibling-prefix", open(uri(13, "/file"), 1, 0, 0)),
        ("device-link", open(uri(16, ""), 1, 0, 0)),
        ("null", open(uri(21, ""), 3, 0, 0)),
        ("console", msg(1, &[&[22, 1, 0, 0], &[2, 0, 0]])),
        ("stat", msg(9, &[&uri(0, "/file")])),
        ("stat-ro", msg(9, &[&uri(10, "")])),
        ("rename", msg(13, &[&uri(0, "/file"), &uri(0, "/moved")])),
        (
            "rename-out",
            msg(13, &[&uri(0, "/file"), &uri(12, "/stolen")]),
        ),
        (
            "rename-ro",
            msg(13, &[&uri(10, "/file"), &uri(0, "/taken")]),
        ),
        ("delete", msg(17, &[&uri(0, "/file")])),
        ("delete-dir", msg(17, &[&uri(0, "/sub/deeper")])),
        ("delete-grant", msg(17, &[&uri(0, "")])),
        ("delete-link-target", msg(17, &[&uri(6, "/secret")])),
        (
            "process-create",
            msg(21, &[&uri(0, "/file"), &[1], &text("arg")]),
        ),
        ("listen-pipe", msg(25, &[&uri(17, "svc")])),
        ("listen-tcp", msg(25, &[&uri(20, "0")])),
        ("debug", msg(29, &[&[0], &text("hello\nworld\x1b[2J")])),
        ("report", msg(29, &[&[1], &text("exception")])),
        (
            "raw-open",
            raw(&Request::Open {
                uri: "file:/etc/passwd".into(),
                access: 1,
                create: 0,
                options: 0,
            }),
        ),
        (
            "raw-rename",
            raw(&Request::Rename {
                from: "file:/tmp/a".into(),
                to: "file:/tmp/b".into(),
            }),
        ),
        (
            "raw-process",
            raw(&Request::ProcessCreate {
                uri: "file:/bin/true".into(),
                args: vec!["a".into(), "b".into()],
            }),
        ),
        (
            "raw-report",
            raw(&Request::Report {
                kind: ReportKind::Exception,
                text: "boom".into(),
            }),
        ),
        (
            "raw-debug",
            raw(&Request::Debug {
                text: "x".repeat(100),
            }),
        ),
    ];
    let mut out: Vec<Seed> = seeds.into_iter().map(|(n, v)| (n.into(), v)).collect();
    // A session's worth: create, write, rename, delete in one input.
    let mut v = open(uri(0, "/a"), 3, 2, 0);
    v.extend(msg(13, &[&uri(0, "/a"), &uri(0, "/sub/b")]));
    v.extend(msg(9, &[&uri(0, "/sub/b")]));
    v.extend(msg(17, &[&uri(0, "/sub/b")]));
    out.push(("sequence".into(), v));
    out
}

// ------------------------------------------------------------- service wire

/// A driver's answer as the target reads a raw header.
fn answer(r: Response) -> Vec<u8> {
    let mut v = vec![2, 0];
    v.extend_from_slice(&r.encode());
    v
}

pub fn service_wire() -> Vec<Seed> {
    let ok = |id: u64, len: u32| Response {
        status: status::OK,
        class: class::BLOCK,
        buf: 0,
        id,
        len,
    };
    // Default-like limits: 128 KiB, a deadline of 1000 ms, 8 in flight.
    let limits = [3u8, 2, 0xe8, 0x03, 8];
    // The handshake a real driver (libos's serve_block) answers: 1 MiB in
    // 512-byte blocks.
    let mut hs = vec![5];
    hs.extend(answer(ok(0, 16)));
    hs.push(0);
    hs.extend_from_slice(&(1u64 << 20).to_le_bytes());
    hs.extend_from_slice(&512u64.to_le_bytes());
    let read = |off: u16, blocks: u8| vec![0, 0, 1, off as u8, (off >> 8) as u8, blocks];
    let write = |off: u16, blocks: u8| vec![0, 1, 1, off as u8, (off >> 8) as u8, blocks];
    let mut out = Vec::new();
    let mut v = limits.to_vec();
    v.extend(&hs);
    v.extend(read(0, 1));
    v.extend(answer(ok(1, 512)));
    v.extend(write(8, 2));
    v.extend(answer(ok(2, 0)));
    v.extend([0, 2, 1, 0, 0, 0]); // flush
    v.extend(answer(ok(3, 0)));
    out.push(("driver-session".into(), v));
    // Restart with requests in flight: handshake again, re-issue, answer.
    let mut v = limits.to_vec();
    v.extend(&hs);
    v.extend(read(0, 1));
    v.extend(write(1, 1));
    v.extend(&hs);
    v.push(6);
    v.extend(answer(ok(2, 0)));
    v.extend(answer(ok(1, 512)));
    out.push(("restart-reissue".into(), v));
    // The faults the test driver injects: a double answer, a wrong id, a
    // wrong length, a bad status, a flood, and the circuit breaker.
    let mut v = limits.to_vec();
    v.extend(&hs);
    v.extend(read(0, 1));
    v.extend(answer(ok(1, 512)));
    v.extend(answer(ok(1, 512)));
    v.extend(read(0, 1));
    v.extend(answer(ok(2 + 1_000_003, 512)));
    v.extend(answer(ok(2, 511)));
    v.extend(answer(Response {
        status: 0x7f,
        ..ok(2, 512)
    }));
    v.extend(answer(ok(2 ^ (1 << 32) ^ 0xdead, 0)));
    v.extend([8, 3, 0x10, 0, 0, 0]); // time passes
    v.push(9);
    v.push(7);
    out.push(("driver-faults".into(), v));
    out
}

// ----------------------------------------------------------------- manifest

pub fn manifest(repo: &Path) -> Vec<Seed> {
    let mut out = Vec::new();
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap_or_default();
    let mut in_toml = false;
    let mut block = String::new();
    for line in readme.lines() {
        if line.trim_start().starts_with("```toml") {
            in_toml = true;
            block.clear();
        } else if in_toml && line.trim_start().starts_with("```") {
            in_toml = false;
            out.push((format!("readme-{}", out.len()), block.clone().into_bytes()));
        } else if in_toml {
            block.push_str(line);
            block.push('\n');
        }
    }
    let more: [(&str, &str); 6] = [
        ("empty", ""),
        (
            "grants",
            "[[grant]]\nuri = \"tcp:127.0.0.1:\"\naccess = \"rw\"\n[[grant]]\nuri = \"pipe.server:svc\"\n[[grant]]\nuri = \"file:/tmp/x/../y\"\n",
        ),
        (
            "devices",
            "[[device]]\nname = \"com1\"\nkind = \"uart\"\n[[device]]\nname = \"blk0\"\nkind = \"virtio-blk\"\nfile = \"disk.img\"\nread_only = true\n",
        ),
        ("limits", "[limits]\nmemory_mib = 64\nthreads = 1\nhandles = 16\nprocesses = 0\ncpu_seconds = 4294967296\n"),
        (
            "device-lines",
            "com1=uart\nblk0=virtio-blk:/path/disk.img\nblk0=virtio-blk,ro:disk.img\nx=virtio-blk:a:b\n",
        ),
        ("args", "image = \"hello\"\nargs = [\"a\", \"\", \"b c\"]\n"),
    ];
    out.extend(
        more.iter()
            .map(|(n, t)| (n.to_string(), t.as_bytes().to_vec())),
    );
    out
}

// ---------------------------------------------------------------- elf image

/// What a small made-up image has, for seeds that reach the checks a
/// kilobyte file can (real images are tens of kilobytes).
#[derive(Clone, Copy, Default)]
struct Tiny {
    /// A `.moat_abi` marker.
    marker: bool,
    /// The code segment is also writable.
    write_exec: bool,
    /// A PT_TLS and a PT_DYNAMIC header.
    tls_dynamic: bool,
    /// ET_DYN instead of ET_EXEC.
    pie: bool,
}

/// A static ELF64 x86-64 image of under a kilobyte: a code segment whose
/// one function holds a `syscall`, an `int 0x80` and a `0f 05` inside a
/// longer instruction; a data segment; a symbol table; a section table.
fn tiny_elf(t: Tiny) -> Vec<u8> {
    const TEXT_OFF: u64 = 0x200;
    const DATA_OFF: u64 = 0x300;
    const BASE: u64 = 0x40_0000;
    let code: &[u8] = &[
        0xb8, 0x0f, 0x05, 0x00, 0x00, // mov eax, 0x50f (no syscall)
        0x0f, 0x05, // syscall
        0xcd, 0x80, // int 0x80
        0xc3, // ret
    ];
    let mut f = vec![0u8; 0x400];
    let put = |f: &mut Vec<u8>, at: usize, b: &[u8]| f[at..at + b.len()].copy_from_slice(b);
    let mut phdrs: Vec<[u64; 7]> = vec![
        // type | flags << 32, offset, vaddr, paddr, filesz, memsz, align
        [
            1 | (if t.write_exec { 7 } else { 5 }) << 32,
            TEXT_OFF,
            BASE + TEXT_OFF,
            0,
            code.len() as u64,
            code.len() as u64,
            0x1000,
        ],
        [
            1 | 6 << 32,
            DATA_OFF,
            BASE + 0x1000 + DATA_OFF,
            0,
            16,
            0x2000,
            0x1000,
        ],
    ];
    if t.tls_dynamic {
        phdrs.push([7 | 4 << 32, DATA_OFF, BASE + 0x1000 + DATA_OFF, 0, 8, 8, 8]);
        phdrs.push([
            2 | 6 << 32,
            DATA_OFF,
            BASE + 0x1000 + DATA_OFF,
            0,
            16,
            16,
            8,
        ]);
    }
    // Sections: null, .text, .moat_abi, .symtab, .strtab, .shstrtab.
    let shstr = b"\0.text\0.moat_abi\0.symtab\0.strtab\0.shstrtab\0";
    let (n_text, n_abi, n_sym, n_str, n_shstr) = (1u32, 7, 17, 25, 33);
    let strtab = b"\0f\0";
    let abi_off = 0x340usize;
    let sym_off = 0x360usize;
    let str_off = 0x390usize;
    let shstr_off = 0x3a0usize;
    let shoff = 0x400usize;
    put(&mut f, TEXT_OFF as usize, code);
    put(&mut f, DATA_OFF as usize, b"data of the tiny");
    if t.marker {
        put(&mut f, abi_off, b"MOATABI\0");
        put(&mut f, abi_off + 8, &0x0001_0000u32.to_le_bytes());
    }
    // Symbol 1: FUNC `f` over the code, in section 1.
    let mut sym = [0u8; 24];
    sym[0..4].copy_from_slice(&1u32.to_le_bytes());
    sym[4] = 0x12; // global, FUNC
    sym[6..8].copy_from_slice(&1u16.to_le_bytes());
    sym[8..16].copy_from_slice(&(BASE + TEXT_OFF).to_le_bytes());
    sym[16..24].copy_from_slice(&(code.len() as u64).to_le_bytes());
    put(&mut f, sym_off + 24, &sym);
    put(&mut f, str_off, strtab);
    put(&mut f, shstr_off, shstr);
    let mut sh = |name: u32,
                  ty: u32,
                  flags: u64,
                  addr: u64,
                  off: usize,
                  size: usize,
                  link: u32,
                  info: u32,
                  entsize: u64| {
        let mut h = [0u8; 64];
        h[0..4].copy_from_slice(&name.to_le_bytes());
        h[4..8].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&flags.to_le_bytes());
        h[16..24].copy_from_slice(&addr.to_le_bytes());
        h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
        h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
        h[40..44].copy_from_slice(&link.to_le_bytes());
        h[44..48].copy_from_slice(&info.to_le_bytes());
        h[48..56].copy_from_slice(&1u64.to_le_bytes());
        h[56..64].copy_from_slice(&entsize.to_le_bytes());
        f.extend_from_slice(&h);
    };
    sh(0, 0, 0, 0, 0, 0, 0, 0, 0);
    sh(
        n_text,
        1,
        6,
        BASE + TEXT_OFF,
        TEXT_OFF as usize,
        code.len(),
        0,
        0,
        0,
    );
    sh(n_abi, 1, 2, 0, abi_off, 16, 0, 0, 0);
    sh(n_sym, 2, 0, 0, sym_off, 48, 4, 1, 24);
    sh(n_str, 3, 0, 0, str_off, strtab.len(), 0, 0, 0);
    sh(n_shstr, 3, 0, 0, shstr_off, shstr.len(), 0, 0, 0);
    // The ELF header.
    let mut h = [0u8; 64];
    h[0..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // ELFCLASS64
    h[5] = 1; // little-endian
    h[6] = 1; // version
    h[16..18].copy_from_slice(&(if t.pie { 3u16 } else { 2 }).to_le_bytes());
    h[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h[24..32].copy_from_slice(&(BASE + TEXT_OFF).to_le_bytes()); // entry
    h[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    h[40..48].copy_from_slice(&(shoff as u64).to_le_bytes());
    h[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    h[54..56].copy_from_slice(&56u16.to_le_bytes());
    h[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    h[58..60].copy_from_slice(&64u16.to_le_bytes());
    h[60..62].copy_from_slice(&6u16.to_le_bytes());
    h[62..64].copy_from_slice(&5u16.to_le_bytes()); // shstrndx
    put(&mut f, 0, &h);
    for (i, p) in phdrs.iter().enumerate() {
        let at = 64 + i * 56;
        put(&mut f, at, &(p[0] as u32).to_le_bytes());
        put(&mut f, at + 4, &((p[0] >> 32) as u32).to_le_bytes());
        for (k, v) in p[1..].iter().enumerate() {
            put(&mut f, at + 8 + k * 8, &v.to_le_bytes());
        }
    }
    f
}

/// The image seeds: made-up small images, then every built image of at
/// most `max` bytes directly in `dir` (a target folder's `debug`); each
/// with an unlimited memory limit in front.
pub fn elf_image(dir: &Path, max: usize) -> Vec<Seed> {
    let tiny = Tiny::default();
    let made = [
        ("tiny", tiny),
        (
            "tiny-marker",
            Tiny {
                marker: true,
                ..tiny
            },
        ),
        (
            "tiny-wx",
            Tiny {
                write_exec: true,
                ..tiny
            },
        ),
        (
            "tiny-tls-dynamic",
            Tiny {
                tls_dynamic: true,
                ..tiny
            },
        ),
        ("tiny-pie", Tiny { pie: true, ..tiny }),
    ];
    let with_limit = |bytes: Vec<u8>| {
        let mut v = vec![0u8; 8];
        v.extend(bytes);
        v
    };
    let mut out: Vec<Seed> = made
        .iter()
        .map(|(n, t)| (n.to_string(), with_limit(tiny_elf(*t))))
        .collect();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut files: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    for p in files {
        let Ok(bytes) = std::fs::read(&p) else {
            continue;
        };
        if !bytes.starts_with(b"\x7fELF") || bytes.len() + 8 > max {
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        out.push((name, with_limit(bytes)));
    }
    out
}

// ---------------------------------------------------------------- checkpoints

/// A checkpoint as `moat checkpoint` writes one: two threads (one carried
/// as about to wait again), an image, a heap, a stack with its guard page,
/// the start-up page, a file, the console, events, a semaphore.
fn checkpoint_sample() -> moat_checkpoint::Checkpoint {
    use moat_checkpoint::*;
    use moat_pal::prot;
    let region = |start: u64, len: u64, prot: u32, kind, data| Region {
        start,
        len,
        prot,
        kind,
        data,
    };
    let thread = |rip: u64, restart| Thread {
        param: 0,
        regs: Regs({
            let mut r = [0; 18];
            r[Regs::RIP] = rip;
            r[Regs::RSP] = 0x40_0000;
            r
        }),
        fpu: vec![0; 832],
        restart,
    };
    Checkpoint {
        args: vec!["counter".into(), "100".into()],
        memory_mib: 64,
        threads_limit: 64,
        handles_limit: 1024,
        startup: 0x30_0000,
        regions: vec![
            region(
                0x1_0000,
                0x2000,
                prot::READ | prot::EXEC,
                RegionKind::Image,
                0,
            ),
            region(
                0x1_2000,
                0x1000,
                prot::READ | prot::WRITE,
                RegionKind::Image,
                0x2000,
            ),
            region(0x20_0000, 0x1000, 0, RegionKind::Stack, 0x3000),
            region(
                0x20_1000,
                0x2000,
                prot::READ | prot::WRITE,
                RegionKind::Stack,
                0x4000,
            ),
            region(
                0x30_0000,
                0x1000,
                prot::READ | prot::WRITE,
                RegionKind::Host,
                0x6000,
            ),
            region(
                0x40_0000,
                0x4000,
                prot::READ | prot::WRITE,
                RegionKind::Alloc,
                0x7000,
            ),
        ],
        handles: vec![
            Handle {
                handle: 1 << 32 | 1,
                refs: 1,
                held: Held::Console {
                    uri: "stdout:".into(),
                    access: 2,
                },
            },
            Handle {
                handle: 1 << 32 | 2,
                refs: 2,
                held: Held::File {
                    uri: "file:/tmp/ticks".into(),
                    access: 3,
                    options: 0,
                    directory: false,
                    size: 70,
                    mtime_ns: 1_700_000_000_000_000_000,
                },
            },
            Handle {
                handle: 1 << 32 | 3,
                refs: 1,
                held: Held::SynchronizationEvent { set: false },
            },
            Handle {
                handle: 1 << 32 | 4,
                refs: 1,
                held: Held::Semaphore { count: 0, max: 1 },
            },
            Handle {
                handle: 2 << 32 | 5,
                refs: 1,
                held: Held::Thread { thread: Some(1) },
            },
            Handle {
                handle: 1 << 32 | 6,
                refs: 1,
                held: Held::NotificationEvent { set: true },
            },
        ],
        threads: vec![
            thread(0x1_0100, None),
            thread(
                0x1_0200,
                Some(Restart {
                    nr: moat_pal::nr::DK_OBJECTS_WAIT_ANY,
                    args: [1, 0x20_2000, u64::MAX, 0, 0, 0],
                }),
            ),
        ],
        abort_events: vec![1 << 32 | 6],
    }
}

/// Seeds of `checkpoint_file`: the sample as a whole file (data of
/// zeros), and as a meta section for the target's framed mode.
pub fn checkpoint_file() -> Vec<Seed> {
    let c = checkpoint_sample();
    let data_len: u64 = c.regions.iter().map(|r| r.len).sum();
    let data = vec![0u8; data_len as usize];
    let mut file = vec![0u8];
    file.extend(
        moat_checkpoint::encode_front(&c, data_len, moat_checkpoint::data_crc(&data)).unwrap(),
    );
    file.extend_from_slice(&data);
    let meta = postcard::to_allocvec(&c).unwrap();
    let mut framed = vec![1u8];
    framed.extend_from_slice(&data_len.to_le_bytes());
    framed.extend_from_slice(&meta);
    vec![("file".into(), file), ("meta".into(), framed)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_host_common::elf;

    #[test]
    fn tiny_images_are_what_they_say() {
        let t = Tiny::default();
        let img = elf::parse(&tiny_elf(t), u64::MAX).unwrap();
        // `syscall` and `int 0x80`, not the `0f 05` inside the `mov`.
        assert_eq!(img.syscall_sites, vec![0x40_0205, 0x40_0207]);
        assert_eq!(img.abi_version, None);
        let marked = elf::parse(&tiny_elf(Tiny { marker: true, ..t }), u64::MAX).unwrap();
        assert_eq!(marked.abi_version, Some(0x0001_0000));
        let refused = |t: Tiny| elf::parse(&tiny_elf(t), u64::MAX).unwrap_err();
        assert!(matches!(
            refused(Tiny {
                write_exec: true,
                ..t
            }),
            elf::ImageError::WriteExec(_)
        ));
        assert!(matches!(
            refused(Tiny {
                tls_dynamic: true,
                ..t
            }),
            elf::ImageError::Tls
        ));
        assert!(matches!(
            refused(Tiny { pie: true, ..t }),
            elf::ImageError::WrongType(_)
        ));
    }

    #[test]
    fn checkpoint_seeds_are_accepted_not_refused_early() {
        let seeds = super::checkpoint_file();
        let file = &seeds[0].1[1..];
        let h = moat_checkpoint::parse_header(file, file.len() as u64).unwrap();
        let meta = &file[h.meta_off as usize..(h.meta_off + h.meta_len) as usize];
        moat_checkpoint::decode_meta(&h, meta).unwrap();
        crate::checkpoint_file::run(&seeds[1].1);
    }
}
