//! Checkpoint and restore (`moat run --checkpointable`, `moat checkpoint`,
//! `moat restore`): a running multi-threaded guest moved by checkpoints
//! many times prints exactly what an uninterrupted run prints and leaves
//! the same file; what cannot be checkpointed or restored says so in one
//! line with exit 2 and leaves nothing behind.
use moat_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `moat` whose standard output and error go to files.
fn start(args: &[&str], out: &Path) -> Child {
    Command::new(built("moat"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
        .spawn()
        .expect("cannot start moat")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Wait until `out` has at least `n` lines (or the child ended).
fn wait_lines(child: &mut Child, out: &Path, n: usize) {
    let t0 = Instant::now();
    while read(out).lines().count() < n {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} never reached {n} lines",
            out.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn finish(mut child: Child, out: &Path) -> i32 {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!(
                "moat did not end; its errors:\n{}",
                read(&out.with_extension("err"))
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ticks(n: u64) -> String {
    (0..n).map(|i| format!("tick {i}\n")).collect()
}

/// `counter N FILE` moved by ten checkpoints, each restored on the next
/// host of `route`: its output, joined, and its file are those of an
/// uninterrupted run.
fn hops(route: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let grant = file_uri(d.path());
    let ticks_file = d.path().join("ticks");
    let n: u64 = 220;
    let n_s = n.to_string();
    let file_arg = file_uri(&ticks_file);
    let mut outs: Vec<PathBuf> = Vec::new();
    let out0 = d.path().join("out0");
    let mut child = start(
        &[
            "run",
            "--host",
            route[0],
            "--checkpointable",
            "--allow",
            &grant,
            "counter",
            &n_s,
            &file_arg,
        ],
        &out0,
    );
    outs.push(out0);
    let mut seen = 0;
    for hop in 1..=10 {
        let out = outs.last().unwrap().clone();
        // A few ticks into this leg, then freeze it.
        wait_lines(&mut child, &out, 5);
        let ck = d.path().join(format!("hop{hop}.ckpt"));
        let r = moat(&["checkpoint", &child.id().to_string(), ck.to_str().unwrap()]);
        assert_eq!(
            r.code,
            0,
            "hop {hop}: checkpoint failed: {}\nthe run's errors:\n{}",
            r.stderr,
            read(&out.with_extension("err"))
        );
        assert_eq!(
            finish(child, &out),
            0,
            "hop {hop}: the checkpointed run's exit"
        );
        seen += read(&out).lines().count();
        assert!(
            (seen as u64) < n,
            "hop {hop}: the counter finished too early"
        );
        let host = route[hop % route.len()];
        let next = d.path().join(format!("out{hop}"));
        child = start(
            &[
                "restore",
                "--host",
                host,
                "--allow",
                &grant,
                ck.to_str().unwrap(),
            ],
            &next,
        );
        outs.push(next);
    }
    let last = outs.last().unwrap().clone();
    let code = finish(child, &last);
    assert_eq!(
        code,
        0,
        "the last leg: {}",
        read(&last.with_extension("err"))
    );
    let joined: String = outs.iter().map(|o| read(o)).collect();
    assert_eq!(joined, ticks(n), "the output of ten hops ({route:?})");
    assert_eq!(
        std::fs::read_to_string(&ticks_file).unwrap(),
        ticks(n),
        "the file the counter kept open"
    );
}

#[test]
fn a_counter_moved_ten_times_prints_what_an_uninterrupted_one_prints() {
    if !sandbox_available() {
        return;
    }
    hops(&["linux"]);
}

/// Linux, then kvm, then linux...: the migration the hosts' shared window
/// and ABI make possible.
#[test]
fn a_counter_moves_between_the_hosts_ten_times() {
    if !sandbox_available() || hosts().len() < 2 {
        return;
    }
    hops(&["linux", "kvm"]);
}

#[test]
fn a_counter_moved_ten_times_on_kvm() {
    if !sandbox_available() || hosts().len() < 2 {
        return;
    }
    hops(&["kvm"]);
}

#[test]
fn what_cannot_be_checkpointed_or_restored_is_bad_input() {
    if !sandbox_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("c.ckpt");
    // Not a moat run at all.
    let r = moat(&["checkpoint", "1", ck.to_str().unwrap()]);
    r.assert_code(2);
    assert!(
        r.stderr.contains("is not a `moat run --checkpointable`"),
        "{}",
        r.stderr
    );
    assert!(!ck.exists(), "a failed checkpoint leaves no file");
    // A run that is not checkpointable.
    let out = d.path().join("plain");
    let mut plain = start(&["run", "counter", "300"], &out);
    wait_lines(&mut plain, &out, 2);
    let r = moat(&["checkpoint", &plain.id().to_string(), ck.to_str().unwrap()]);
    r.assert_code(2);
    assert!(!ck.exists());
    assert_eq!(finish(plain, &out), 0, "the run goes on");
    // A file that cannot be written.
    let out = d.path().join("run");
    let mut run = start(&["run", "--checkpointable", "counter", "300"], &out);
    wait_lines(&mut run, &out, 2);
    let r = moat(&["checkpoint", &run.id().to_string(), "/proc/nope/c.ckpt"]);
    r.assert_code(2);
    assert!(r.stderr.contains("cannot write"), "{}", r.stderr);
    // --leave-running: the run goes on to its end, and the checkpoint
    // restores.
    let r = moat(&[
        "checkpoint",
        "--leave-running",
        &run.id().to_string(),
        ck.to_str().unwrap(),
    ]);
    r.assert_code(0);
    assert_eq!(finish(run, &out), 0);
    assert_eq!(
        read(&out),
        ticks(300),
        "a run left running is not disturbed"
    );
    let restored = moat(&["restore", ck.to_str().unwrap()]);
    restored.assert_code(0);
    assert!(
        restored.stdout.ends_with("tick 299\n"),
        "{}",
        restored.stdout
    );

    // Bad files: missing, garbage, truncated, damaged, another version.
    let bytes = std::fs::read(&ck).unwrap();
    let bad = d.path().join("bad.ckpt");
    let missing = moat(&["restore", d.path().join("none").to_str().unwrap()]);
    missing.assert_code(2);
    for (what, b, says) in [
        (
            "garbage",
            b"not a checkpoint at all, just text".to_vec(),
            "is not a moat checkpoint",
        ),
        (
            "truncated",
            bytes[..bytes.len() - 4096].to_vec(),
            "truncated",
        ),
        (
            "damaged",
            {
                let mut b = bytes.clone();
                let n = b.len();
                b[n - 4096 - 100] ^= 0x40;
                b
            },
            "damaged",
        ),
        (
            "another version",
            {
                let mut b = bytes.clone();
                b[8] = 9;
                b
            },
            "version 9",
        ),
    ] {
        std::fs::write(&bad, &b).unwrap();
        let r = moat(&["restore", bad.to_str().unwrap()]);
        r.assert_code(2);
        assert!(r.stderr.contains(says), "{what}: {}", r.stderr);
        assert_eq!(
            r.stderr.lines().count(),
            1,
            "{what}: one line: {}",
            r.stderr
        );
    }
}

#[test]
fn a_restore_needs_the_grants_and_the_files_it_had() {
    if !sandbox_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let grant = file_uri(d.path());
    let f = d.path().join("ticks");
    let ck = d.path().join("c.ckpt");
    let out = d.path().join("run");
    let mut run = start(
        &[
            "run",
            "--checkpointable",
            "--allow",
            &grant,
            "counter",
            "300",
            &file_uri(&f),
        ],
        &out,
    );
    wait_lines(&mut run, &out, 3);
    let r = moat(&["checkpoint", &run.id().to_string(), ck.to_str().unwrap()]);
    r.assert_code(0);
    assert_eq!(finish(run, &out), 0);
    // Without the grant: refused before anything runs.
    let r = moat(&["restore", ck.to_str().unwrap()]);
    r.assert_code(2);
    assert!(r.stderr.contains("not granted"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
    // The file changed since.
    std::fs::write(&f, b"something else").unwrap();
    let r = moat(&["restore", "--allow", &grant, ck.to_str().unwrap()]);
    r.assert_code(2);
    assert!(
        r.stderr.contains("changed since the checkpoint"),
        "{}",
        r.stderr
    );
    // The file is gone.
    std::fs::remove_file(&f).unwrap();
    let r = moat(&["restore", "--allow", &grant, ck.to_str().unwrap()]);
    r.assert_code(2);
    assert!(r.stderr.contains("is gone"), "{}", r.stderr);
}

/// Through the embedding API, on each host and across: a guest waiting
/// on its registered abort event is checkpointed mid-wait; the restored
/// one waits on (the wait made again), and the host's stop request still
/// reaches its abort event.
#[test]
fn the_abort_event_and_a_wait_in_progress_are_carried() {
    use moat_monitor::{CheckpointOptions, Host, Sandbox, Stdio};
    use std::io::{BufRead, BufReader};
    if !sandbox_available() {
        return;
    }
    let host = |h: &str| if h == "kvm" { Host::Kvm } else { Host::Linux };
    for from in hosts() {
        for to in hosts() {
            let d = tempfile::tempdir().unwrap();
            let ck = d.path().join("s.ckpt");
            let mut p = Sandbox::new(image("stoppable"))
                .host(host(from))
                .checkpointable()
                .stdout(Stdio::Piped)
                .spawn()
                .unwrap();
            let mut out = BufReader::new(p.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready");
            let f = std::fs::File::create(&ck).unwrap();
            p.checkpoint(&f, CheckpointOptions::default())
                .unwrap_or_else(|e| panic!("{from}: {e}"));
            assert_eq!(p.wait().unwrap().code, 0, "{from}: a checkpoint ends it");
            let mut q = Sandbox::restore(&ck)
                .host(host(to))
                .stdout(Stdio::Piped)
                .spawn()
                .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
            let mut out = BufReader::new(q.stdout.take().unwrap());
            // Still waiting: nothing printed yet.
            std::thread::sleep(Duration::from_millis(100));
            q.request_stop().unwrap();
            line.clear();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "stopping", "{from} -> {to}");
            assert_eq!(q.wait().unwrap().code, 7, "{from} -> {to}");
        }
    }
}

/// A checkpoint file forged with the right checksums (anyone can write
/// one): every forged field is refused with exit 2, or at worst ends its
/// own picoprocess with a fault report; nothing hangs, nothing of the
/// host's breaks, on either host.
#[test]
fn forged_checkpoints_end_their_own_picoprocess_at_worst() {
    use moat_checkpoint::{Checkpoint, Held, Regs, Restart};
    if !sandbox_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("real.ckpt");
    let out = d.path().join("run");
    let mut run = start(&["run", "--checkpointable", "counter", "40"], &out);
    wait_lines(&mut run, &out, 3);
    moat(&["checkpoint", &run.id().to_string(), ck.to_str().unwrap()]).assert_code(0);
    assert_eq!(finish(run, &out), 0);
    let bytes = std::fs::read(&ck).unwrap();
    let h = moat_checkpoint::parse_header(&bytes, bytes.len() as u64).unwrap();
    let meta = &bytes[h.meta_off as usize..(h.meta_off + h.meta_len) as usize];
    let real = moat_checkpoint::decode_meta(&h, meta).unwrap();
    let data = &bytes[h.data_off as usize..];
    let forge = |c: &Checkpoint| -> Vec<u8> {
        // Unchecked: the forger writes what it likes, with right sums.
        let meta = postcard::to_allocvec(c).unwrap();
        let hd = moat_checkpoint::Header {
            meta_off: 64,
            meta_len: meta.len() as u64,
            data_off: (64 + meta.len() as u64).next_multiple_of(4096),
            data_len: data.len() as u64,
            meta_crc: moat_fuzz_targets::checkpoint_file::crc(&meta),
            data_crc: h.data_crc,
        };
        let mut f = hd.encode().to_vec();
        f.extend_from_slice(&meta);
        f.resize(hd.data_off as usize, 0);
        f.extend_from_slice(data);
        f
    };
    let exec = *real
        .regions
        .iter()
        .find(|r| r.prot & moat_pal::prot::EXEC != 0)
        .unwrap();
    let data_region = *real
        .regions
        .iter()
        .find(|r| r.prot & moat_pal::prot::WRITE != 0)
        .unwrap();
    type Forgery = (&'static str, Box<dyn Fn(&mut Checkpoint)>);
    let forgeries: Vec<Forgery> = vec![
        (
            "rip in data",
            Box::new(move |c| c.threads[0].regs.0[Regs::RIP] = data_region.start),
        ),
        (
            "rip inside an instruction",
            Box::new(move |c| c.threads[0].regs.0[Regs::RIP] = exec.start + 1),
        ),
        (
            "no stack",
            Box::new(|c| {
                for t in &mut c.threads {
                    t.regs.0[Regs::RSP] = 8;
                }
            }),
        ),
        (
            "every flag",
            Box::new(|c| c.threads[0].regs.0[Regs::RFLAGS] = u64::MAX),
        ),
        (
            "vector state of ones",
            Box::new(|c| {
                for t in &mut c.threads {
                    t.fpu.iter_mut().for_each(|b| *b = 0xff);
                }
            }),
        ),
        (
            "restart process exit",
            Box::new(|c| {
                c.threads[0].restart = Some(Restart {
                    nr: moat_pal::nr::DK_PROCESS_EXIT,
                    args: [42, 0, 0, 0, 0, 0],
                })
            }),
        ),
        (
            "restart with a wild pointer",
            Box::new(|c| {
                c.threads[0].restart = Some(Restart {
                    nr: moat_pal::nr::DK_OBJECTS_WAIT_ANY,
                    args: [3, 0xdead_0000, 10, 0, 0, 0],
                })
            }),
        ),
        (
            "writable code",
            Box::new(|c| {
                for r in &mut c.regions {
                    if r.prot & moat_pal::prot::EXEC != 0 {
                        r.prot |= moat_pal::prot::WRITE;
                    }
                }
            }),
        ),
        (
            "a region past the window",
            Box::new(|c| c.regions[0].start = 3 << 30),
        ),
        (
            "a region over another",
            Box::new(|c| {
                let s = c.regions[0].start;
                c.regions[1].start = s;
            }),
        ),
        (
            "bytes past the file",
            Box::new(|c| c.regions[0].data = 1 << 40),
        ),
        (
            "a thread handle for the first thread",
            Box::new(|c| {
                c.handles.push(moat_checkpoint::Handle {
                    handle: 7 << 32 | 99,
                    refs: 1,
                    held: Held::Thread { thread: Some(0) },
                })
            }),
        ),
        (
            "a file never granted",
            Box::new(|c| {
                c.handles.push(moat_checkpoint::Handle {
                    handle: 7 << 32 | 99,
                    refs: 1,
                    held: Held::File {
                        uri: "file:/etc/shadow".into(),
                        access: 1,
                        options: 0,
                        directory: false,
                        size: 0,
                        mtime_ns: 0,
                    },
                })
            }),
        ),
        (
            "an oversized semaphore",
            Box::new(|c| {
                c.handles.push(moat_checkpoint::Handle {
                    handle: 7 << 32 | 99,
                    refs: 1,
                    held: Held::Semaphore { count: 9, max: 1 },
                })
            }),
        ),
        (
            "more threads than any limit",
            Box::new(|c| {
                let mut t = c.threads[0].clone();
                t.fpu.truncate(512);
                c.threads = vec![t; moat_checkpoint::MAX_THREADS + 1];
            }),
        ),
    ];
    let bad = d.path().join("forged.ckpt");
    for h in hosts() {
        for (what, f) in &forgeries {
            let mut c = real.clone();
            f(&mut c);
            std::fs::write(&bad, forge(&c)).unwrap();
            let t0 = Instant::now();
            let r = moat(&["restore", "--host", h, bad.to_str().unwrap()]);
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{h}: {what}: took {:?}",
                t0.elapsed()
            );
            // Refused (2), ended by its own fault or the host's report
            // (128+N, 134), or harmless (0; 1, the counter's answer to a
            // call that failed; the exit it forged: 42).
            assert!(
                [0, 1, 2, 42, 132, 133, 134, 135, 136, 139].contains(&r.code),
                "{h}: {what}: exit {}\n{}",
                r.code,
                r.stderr
            );
            assert!(!r.stderr.contains("panicked"), "{h}: {what}: {}", r.stderr);
        }
    }
}

/// The conformance suite with a hop halfway (its argument `hop`): state
/// of every kind a checkpoint carries is made, the picoprocess is
/// checkpointed and restored on the other host, the state is checked,
/// and the rest of the suite passes there; each way.
#[test]
fn conformance_passes_across_a_hop_each_way() {
    if !sandbox_available() {
        return;
    }
    let hs = hosts();
    let routes: Vec<(&str, &str)> = if hs.len() > 1 {
        vec![("linux", "kvm"), ("kvm", "linux")]
    } else {
        vec![("linux", "linux")]
    };
    for (from, to) in routes {
        let d = tempfile::tempdir().unwrap();
        let scratch = d.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let s = file_uri(&scratch);
        let (grants, guest_args) = conformance_args(&s, &s);
        let grants: Vec<&str> = grants.iter().map(String::as_str).collect();
        let conf = image("conformance").display().to_string();
        let out1 = d.path().join("before");
        let mut args = vec!["run", "--host", from, "--checkpointable"];
        args.extend_from_slice(&grants);
        args.extend_from_slice(&[&conf, "--"]);
        args.extend(guest_args.iter().map(String::as_str));
        args.push("hop");
        let mut run = start(&args, &out1);
        let t0 = Instant::now();
        while !read(&out1).lines().any(|l| l == "hop") {
            assert!(
                run.try_wait().unwrap().is_none(),
                "{from}: ended before the hop:\n{}",
                read(&out1)
            );
            assert!(t0.elapsed() < Duration::from_secs(60), "{from}: no hop");
            std::thread::sleep(Duration::from_millis(5));
        }
        let ck = d.path().join("c.ckpt");
        let r = moat(&["checkpoint", &run.id().to_string(), ck.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{from}: {}", r.stderr);
        assert_eq!(finish(run, &out1), 0);
        std::fs::write(scratch.join("hop-done"), b"").unwrap();
        let out2 = d.path().join("after");
        let mut args = vec!["restore", "--host", to];
        args.extend_from_slice(&grants);
        args.push(ck.to_str().unwrap());
        let rest = start(&args, &out2);
        let code = finish(rest, &out2);
        let all = read(&out1) + &read(&out2);
        let fails: Vec<&str> = all.lines().filter(|l| l.starts_with("FAIL")).collect();
        assert!(
            fails.is_empty() && code == 0,
            "{from} -> {to}: exit {code}, failing cases:\n{}\nerrors:\n{}",
            fails.join("\n"),
            read(&out2.with_extension("err"))
        );
        assert!(all.contains("\nok hop_state_carried\n"), "{from} -> {to}");
        assert!(
            all.lines().last().unwrap_or("").contains(" 0 failed"),
            "{from} -> {to}: {}",
            all.lines().last().unwrap_or("")
        );
    }
}

/// A picoprocess holding what cannot be carried (here a TCP connection):
/// the checkpoint fails naming it and the picoprocess goes on; with
/// `--close-uncarried` it is carried as closed and the restored one runs
/// to its end.
#[test]
fn what_cannot_be_carried_is_named_or_closed() {
    if !sandbox_available() {
        return;
    }
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let keep = std::thread::spawn(move || server.accept().map(|(c, _)| c));
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("c.ckpt");
    let out = d.path().join("run");
    let tcp = format!("tcp.client:127.0.0.1:{port}");
    let mut run = start(
        &[
            "run",
            "--checkpointable",
            "--allow",
            "tcp.client:127.0.0.1:",
            "counter",
            "60",
            "-",
            &tcp,
        ],
        &out,
    );
    wait_lines(&mut run, &out, 3);
    let _conn = keep.join().unwrap().unwrap();
    let r = moat(&["checkpoint", &run.id().to_string(), ck.to_str().unwrap()]);
    r.assert_code(2);
    assert!(
        r.stderr.contains(&tcp) && r.stderr.contains("cannot be carried"),
        "{}",
        r.stderr
    );
    assert!(!ck.exists(), "a failed checkpoint leaves no file");
    let r = moat(&[
        "checkpoint",
        "--close-uncarried",
        &run.id().to_string(),
        ck.to_str().unwrap(),
    ]);
    r.assert_code(0);
    assert_eq!(finish(run, &out), 0);
    let before = read(&out);
    let restored = moat(&["restore", ck.to_str().unwrap()]);
    restored.assert_code(0);
    assert_eq!(before + &restored.stdout, ticks(60));
}
