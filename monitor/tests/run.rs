//! End-to-end: the real loader, real guest images, real namespaces and
//! seccomp. Needs the images built (`cargo build`): without them the tests
//! skip, saying so, unless MOAT_REQUIRE_SANDBOX is set (CI), where they fail.
use moat_monitor::{LogSink, Sandbox, Stdio};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The built image `name` (target/debug/NAME, next to the test's deps/ dir).
fn image(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent()?.parent()?;
    let p = dir.join(name);
    let loader = dir.join("moat-loader");
    if p.is_file() && loader.is_file() {
        return Some(p);
    }
    if std::env::var_os("MOAT_REQUIRE_SANDBOX").is_some() {
        panic!("image {} or the loader is missing and MOAT_REQUIRE_SANDBOX is set; run `cargo build` first", p.display());
    }
    eprintln!(
        "SKIP: image {} or moat-loader not built; run `cargo build --workspace` first",
        p.display()
    );
    None
}

#[test]
fn hello_writes_to_piped_stdout() {
    let Some(img) = image("hello") else { return };
    let mut p = Sandbox::new(img).stdout(Stdio::Piped).spawn().unwrap();
    let mut out = String::new();
    // The pipe ends when the picoprocess does: the monitor drops its end.
    p.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let exit = p.wait().unwrap();
    assert_eq!(exit.code, 0, "{exit:?}");
    assert_eq!(exit.report, None);
    assert!(out.contains("hello from a moat picoprocess"), "{out:?}");
}

#[test]
fn echo_round_trip() {
    let Some(img) = image("echo") else { return };
    let mut p = Sandbox::new(img)
        .stdin(Stdio::Piped)
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    let mut stdin = p.stdin.take().unwrap();
    stdin.write_all(b"one line\n").unwrap();
    drop(stdin);
    let mut out = String::new();
    p.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(out, "one line\n");
    assert_eq!(p.wait().unwrap().code, 0);
}

#[test]
fn exit_codes_come_through() {
    let Some(img) = image("exit-code") else {
        return;
    };
    for code in [0, 7, 200] {
        let mut p = Sandbox::new(&img)
            .arg(code.to_string())
            .stdout(Stdio::Null)
            .spawn()
            .unwrap();
        assert_eq!(p.wait().unwrap().code, code);
    }
}

#[test]
fn kill_and_drop_end_a_picoprocess() {
    let Some(img) = image("echo") else { return };
    // echo waits for its input forever: the pipe is never closed here.
    let mut p = Sandbox::new(&img)
        .stdin(Stdio::Piped)
        .stdout(Stdio::Null)
        .spawn()
        .unwrap();
    let keep = p.stdin.take();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    p.kill().unwrap();
    let exit = p.wait().unwrap();
    assert_eq!(exit.code, 128 + 9, "{exit:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(keep);
    // Dropping an un-waited picoprocess kills it too.
    let p = Sandbox::new(&img).stdin(Stdio::Piped).spawn().unwrap();
    let pid = p.id();
    let born = start_time(pid).expect("the picoprocess runs");
    drop(p);
    // Gone (or a zombie, or its pid already reused by another process).
    let t = Instant::now();
    while start_time(pid) == Some(born) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(
        start_time(pid),
        Some(born),
        "picoprocess {pid} still runs after drop"
    );
}

/// The start time of a live (not zombie) process, from /proc/PID/stat.
fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`: state is the 1st, starttime the 20th.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.first() == Some(&"Z") {
        return None;
    }
    f.get(19)?.parse().ok()
}

#[test]
fn bad_images_fail_early() {
    let Some(_) = image("hello") else { return };
    let e = Sandbox::new("/etc/passwd").spawn().unwrap_err();
    assert_eq!(e.exit_code(), moat_monitor::EXIT_BAD_INPUT);
    assert!(e.to_string().contains("not an ELF file"), "{e}");
    let e = Sandbox::new("/nonexistent/image").spawn().unwrap_err();
    assert_eq!(e.exit_code(), moat_monitor::EXIT_BAD_INPUT);
    assert!(Sandbox::new("/x").allow("nope:").is_err());
}

#[test]
fn log_sink_gets_trace_lines() {
    let Some(img) = image("hello") else { return };
    let (sink, lines) = LogSink::buffer();
    let mut p = Sandbox::new(img)
        .stdout(Stdio::Null)
        .log(sink)
        .trace(true)
        .spawn()
        .unwrap();
    assert_eq!(p.wait().unwrap().code, 0);
    let lines = lines.lock().unwrap();
    assert!(
        lines.iter().any(|l| l.contains("open stdout:")),
        "{lines:?}"
    );
}
