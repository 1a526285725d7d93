//! Hostile guests against shared sections (`shm:NAME`, ABI 1.1): mapping
//! past a section or executable, sizing it again while a peer has it
//! mapped, opening one not granted or with a name outside the rules,
//! mapping it writable under a read-only grant, more sections than a
//! session may have, more open at once than a picoprocess may hold, a
//! section larger than the memory limit, and a peer that scribbles over
//! the bytes another side reads (a picoprocess, or the host through
//! `HostSection`). Each asserts the exact errors (`REFUSED what: Error`
//! lines from `guests/hostile/src/shm.rs`) and exit code on both hosts,
//! and that the host still runs `hello` afterwards.
use moat_monitor::{HostSection, LogSink, Sandbox, Stdio};
use moat_tests::*;
use std::io::Read;
use std::time::{Duration, Instant};

fn path(name: &str) -> String {
    image(name).display().to_string()
}

/// The host still starts and runs a picoprocess.
fn host_intact(host: &str) {
    run_on(host, &[&path("hello")]).assert_code(0);
}

/// `out` ended with exit 0, escaped nothing, and printed each of `lines`.
fn refused_all(out: &Output, lines: &[&str]) {
    assert!(
        !out.stdout.contains("ESCAPED"),
        "escaped:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    out.assert_code(0);
    for l in lines {
        assert!(
            out.stdout.lines().any(|x| x == *l),
            "no line `{l}`:\n{}",
            out.stdout
        );
    }
}

/// `moat run --host HOST EXTRA... IMAGE -- ARGS...`
fn run(host: &str, extra: &[&str], image: &str, args: &[&str]) -> Output {
    let img = path(image);
    let mut a: Vec<&str> = extra.to_vec();
    a.push(&img);
    a.push("--");
    a.extend_from_slice(args);
    run_on(host, &a)
}

#[test]
fn mapping_past_the_section_or_executable_is_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let out = run(h, &["--allow", "shm:"], "hostile-shm-map", &[]);
        refused_all(
            &out,
            &[
                "REFUSED map across the end: InvalidArgument",
                "REFUSED map at the end: InvalidArgument",
                "REFUSED map twice the size: InvalidArgument",
                "REFUSED map at an offset that overflows: InvalidArgument",
                "REFUSED map far past the end: InvalidArgument",
                "REFUSED map read-execute: PermissionDenied",
                "REFUSED map execute-only: PermissionDenied",
                "REFUSED map writable and executable: InvalidArgument",
                "REFUSED make the mapping executable: BadAddress",
                "REFUSED free the mapping as memory: BadAddress",
            ],
        );
        host_intact(h);
    }
}

#[test]
fn sizing_again_while_a_peer_has_it_mapped_is_refused() {
    if !sandbox_available() {
        return;
    }
    let me = file_uri(&image("hostile-shm-resize"));
    for h in hosts() {
        let out = run(
            h,
            &["--allow", "shm:", "--allow-ro", &me],
            "hostile-shm-resize",
            &[&me],
        );
        let mut lines = Vec::new();
        for side in ["creator", "peer"] {
            for what in ["grow", "shrink", "the same size", "zero"] {
                lines.push(format!(
                    "REFUSED {side}: size again ({what}) while the peer has it mapped: PermissionDenied"
                ));
            }
        }
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        refused_all(&out, &lines);
        assert!(
            out.stdout.contains("the peer's view stayed whole"),
            "{}",
            out.stdout
        );
        host_intact(h);
    }
}

#[test]
fn a_scribbling_peer_cannot_fault_the_reader() {
    if !sandbox_available() {
        return;
    }
    let me = file_uri(&image("hostile-shm-scribble"));
    for h in hosts() {
        let out = run(
            h,
            &["--allow", "shm:", "--allow-ro", &me],
            "hostile-shm-scribble",
            &[&me],
        );
        refused_all(
            &out,
            &["REFUSED scribbler: size the section again: PermissionDenied"],
        );
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("REFUSED scribbling peer: the reader read")),
            "{}",
            out.stdout
        );
        host_intact(h);
    }
}

#[test]
fn a_scribbling_picoprocess_cannot_fault_the_host() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let section = HostSection::new(64 << 10).unwrap();
        let mut p = Sandbox::new(image("hostile-shm-scribble"))
            .host(h.parse().unwrap())
            .arg("host")
            .allow("shm:host")
            .unwrap()
            .section("host", &section)
            .unwrap()
            .stdout(Stdio::Piped)
            .spawn()
            .unwrap();
        let mut stdout = p.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        // Read everything, through copies and atomics, while it scribbles;
        // count the rings it sends meanwhile.
        let mut buf = vec![0u8; section.len() as usize];
        let (mut passes, mut rings) = (0u64, 0u64);
        let t0 = Instant::now();
        while !reader.is_finished() && t0.elapsed() < Duration::from_secs(60) {
            section.read(0, &mut buf).unwrap();
            let words: u64 = (0..section.len())
                .step_by(8)
                .map(|o| {
                    section
                        .atomic_u64(o)
                        .unwrap()
                        .load(std::sync::atomic::Ordering::Relaxed)
                })
                .fold(0, u64::wrapping_add);
            std::hint::black_box(words);
            passes += 1;
            if section.wait(Some(Duration::ZERO)) {
                rings += 1;
            }
        }
        let out = reader.join().unwrap();
        let exit = p.wait().unwrap();
        assert_eq!(exit.code, 0, "host {h}: {out}");
        assert!(!out.contains("ESCAPED"), "{out}");
        assert!(out.contains("scribbled"), "{out}");
        assert!(
            passes > 0 && rings > 0,
            "host {h}: {passes} reads, {rings} rings"
        );
        // The host's view is still there after the picoprocess ended.
        section.read(0, &mut buf).unwrap();
        host_intact(h);
    }
}

#[test]
fn sections_not_granted_are_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let out = run(
            h,
            &["--allow", "shm:granted"],
            "hostile-shm-grant",
            &["denied"],
        );
        refused_all(
            &out,
            &[
                "REFUSED open shm:secret: PermissionDenied",
                "REFUSED open shm:granted2: PermissionDenied",
                "REFUSED attributes of shm:secret: PermissionDenied",
            ],
        );
        assert_eq!(
            out.stdout.matches("REFUSED open").count(),
            9,
            "{}",
            out.stdout
        );
        assert!(
            out.stderr.contains(
                "moat: refused shm:secret (not granted; grant it with --allow-ro shm:secret)"
            ),
            "{}",
            out.stderr
        );
        host_intact(h);
    }
}

#[test]
fn names_outside_the_rules_are_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let out = run(h, &["--allow", "shm:"], "hostile-shm-grant", &["names"]);
        refused_all(
            &out,
            &[
                "REFUSED open shm:: InvalidUri",
                "REFUSED open shm:a/b: InvalidUri",
                "REFUSED open shm:../x: InvalidUri",
                "REFUSED open SHM:x: InvalidUri",
            ],
        );
        assert_eq!(out.stdout.matches("REFUSED").count(), 18, "{}", out.stdout);
        host_intact(h);
    }
}

#[test]
fn a_read_only_grant_maps_read_only() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let section = HostSection::new(16 << 10).unwrap();
        section.write(0, b"HOST").unwrap();
        let (log, lines) = LogSink::buffer();
        let mut p = Sandbox::new(image("hostile-shm-grant"))
            .host(h.parse().unwrap())
            .arg("readonly")
            .allow_ro("shm:ro")
            .unwrap()
            .section("ro", &section)
            .unwrap()
            .log(log)
            .stdout(Stdio::Piped)
            .spawn()
            .unwrap();
        let mut out = String::new();
        p.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let exit = p.wait().unwrap();
        let log = lines.lock().unwrap().join("\n");
        let o = Output {
            code: exit.code,
            stdout: out,
            stderr: log,
        };
        refused_all(
            &o,
            &[
                "REFUSED open shm:ro: PermissionDenied",
                "REFUSED open shm:ro2: PermissionDenied",
                "REFUSED map shm:ro writable: PermissionDenied",
                "REFUSED size shm:ro: PermissionDenied",
                "REFUSED make the read-only mapping writable: BadAddress",
            ],
        );
        assert!(
            o.stderr
                .contains("not granted for writing; grant it with --allow shm:ro"),
            "{}",
            o.stderr
        );
        // It rang the host; the host's bytes are as it wrote them.
        assert!(section.wait(Some(Duration::from_secs(5))), "no ring");
        let mut b = [0u8; 4];
        section.read(0, &mut b).unwrap();
        assert_eq!(&b, b"HOST");
        host_intact(h);
    }
}

#[test]
fn more_sections_than_allowed_are_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let out = run(h, &["--allow", "shm:"], "hostile-shm-limits", &["count"]);
        refused_all(
            &out,
            &[
                "REFUSED open shm:c64: LimitExceeded",
                "REFUSED open shm:c65: LimitExceeded",
            ],
        );
        let out = run(h, &["--allow", "shm:"], "hostile-shm-limits", &["open"]);
        refused_all(
            &out,
            &[
                "REFUSED open shm:o: LimitExceeded",
                "REFUSED open shm:o2: LimitExceeded",
            ],
        );
        host_intact(h);
    }
}

#[test]
fn a_section_larger_than_the_memory_limit_is_refused() {
    if !sandbox_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("m.toml");
    std::fs::write(&m, "[limits]\nmemory_mib = 64\n").unwrap();
    let m = m.display().to_string();
    for h in hosts() {
        let out = run(
            h,
            &["--allow", "shm:", "--manifest", &m],
            "hostile-shm-limits",
            &["size"],
        );
        refused_all(
            &out,
            &[
                "REFUSED size one page over the memory limit: NoMemory",
                "REFUSED size 1 TiB: NoMemory",
                "REFUSED size 2^64 - 4096: NoMemory",
                "REFUSED map it whole beside the image: NoMemory",
            ],
        );
        assert!(
            out.stderr.contains("more than the memory limit, 64 MiB"),
            "{}",
            out.stderr
        );
        host_intact(h);
    }
}
