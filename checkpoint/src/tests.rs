use super::*;
use moat_pal::prot;

fn sample() -> Checkpoint {
    Checkpoint {
        args: vec!["counter".into(), "5".into()],
        memory_mib: 64,
        threads_limit: 8,
        handles_limit: 64,
        startup: 0x20000,
        regions: vec![
            Region {
                start: 0x10000,
                len: 0x1000,
                prot: prot::READ | prot::EXEC,
                kind: RegionKind::Image,
                data: 0,
            },
            Region {
                start: 0x20000,
                len: 0x1000,
                prot: prot::READ | prot::WRITE,
                kind: RegionKind::Host,
                data: 0x1000,
            },
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
                refs: 1,
                held: Held::NotificationEvent { set: true },
            },
        ],
        threads: vec![Thread {
            param: 0,
            regs: Regs({
                let mut r = [0; 18];
                r[Regs::RIP] = 0x10010;
                r
            }),
            fpu: vec![0; 832],
            restart: None,
        }],
        abort_events: vec![1 << 32 | 2],
    }
}

fn file(c: &Checkpoint) -> Vec<u8> {
    let data = vec![7u8; 0x2000];
    let mut f = encode_front(c, data.len() as u64, data_crc(&data)).unwrap();
    f.extend_from_slice(&data);
    f
}

fn read(f: &[u8]) -> Result<Checkpoint, String> {
    let h = parse_header(f, f.len() as u64)?;
    let meta = f
        .get(h.meta_off as usize..(h.meta_off + h.meta_len) as usize)
        .ok_or("short")?;
    let c = decode_meta(&h, meta)?;
    let data = &f[h.data_off as usize..];
    if data_crc(data) != h.data_crc {
        return Err("data checksum".into());
    }
    Ok(c)
}

#[test]
fn a_checkpoint_reads_back_as_written() {
    let c = sample();
    assert_eq!(read(&file(&c)).unwrap(), c);
}

#[test]
fn damaged_files_are_refused_with_what_is_wrong() {
    let f = file(&sample());
    assert!(read(&f[..f.len() - 1]).unwrap_err().contains("truncated"));
    assert!(read(b"MOATTRC1 and more")
        .unwrap_err()
        .contains("not a moat checkpoint"));
    let mut g = f.clone();
    g[8] = 2;
    assert!(read(&g).unwrap_err().contains("version 2"));
    let mut g = f.clone();
    g[HEADER + 3] ^= 1;
    assert!(read(&g).unwrap_err().contains("checksum"));
    let mut g = f.clone();
    let n = g.len();
    g[n - 1] ^= 1;
    assert_eq!(read(&g).unwrap_err(), "data checksum");
    let mut g = f.clone();
    g[24..32].copy_from_slice(&(MAX_META + 1).to_le_bytes());
    assert!(read(&g).unwrap_err().contains("meta section"));
}

#[test]
fn forged_contents_are_refused() {
    let bad = |f: &dyn Fn(&mut Checkpoint), what: &str| {
        let mut c = sample();
        f(&mut c);
        let e = c.check(0x2000).unwrap_err();
        assert!(e.contains(what), "{e}");
    };
    bad(&|c| c.regions[1].start = 0x10000, "overlaps");
    bad(&|c| c.regions[1].start = 0x8000, "outside the guest window");
    bad(&|c| c.regions[1].start = 0x7fff_f000_0000, "outside");
    bad(&|c| c.regions[1].data = 0x2000, "outside the file");
    bad(&|c| c.regions[1].data = 0, "share bytes");
    bad(
        &|c| c.regions[0].prot = prot::WRITE | prot::EXEC,
        "writable and executable",
    );
    bad(&|c| c.regions[1].len = u64::MAX - 0xfff, "region");
    bad(
        &|c| c.threads[0].regs.0[Regs::RIP] = 0x20000,
        "outside executable",
    );
    bad(&|c| c.threads[0].fpu.clear(), "vector state");
    bad(
        &|c| {
            c.threads[0].restart = Some(Restart {
                nr: 999,
                args: [0; 6],
            })
        },
        "no such call",
    );
    bad(&|c| c.handles[1].handle = c.handles[0].handle, "twice");
    bad(&|c| c.handles[0].handle = 5, "no host gives");
    bad(
        &|c| {
            c.handles[0].held = Held::Console {
                uri: "file:/etc/passwd".into(),
                access: 1,
            }
        },
        "not well formed",
    );
    bad(
        &|c| c.handles[0].held = Held::Thread { thread: Some(0) },
        "not well formed",
    );
    bad(&|c| c.abort_events = vec![1 << 32 | 1], "abort event");
    bad(&|c| c.startup = 0x30000, "start-up block");
    bad(&|c| c.threads_limit = 0, "limits");
    bad(&|c| c.args.clear(), "arguments");
}
