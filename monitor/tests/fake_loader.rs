//! The monitor against loaders that misbehave: stand-in shell scripts run
//! as `moat-loader` (through MOAT_LOADER) in the real namespaces. One test
//! function, because MOAT_LOADER is process-wide.
use moat_monitor::{LogSink, ReportKind, Sandbox, Stdio, EXIT_SANDBOX_VIOLATION};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn run_with(loader: &Path, img: &Path) -> (moat_monitor::Exit, Vec<String>) {
    // Process-wide, but this is the only test of this binary. Fresh
    // namespaces per loader: the zygote is the real loader binary.
    std::env::set_var("MOAT_NO_ZYGOTE", "1");
    std::env::set_var("MOAT_LOADER", loader);
    let (sink, lines) = LogSink::buffer();
    let mut p = Sandbox::new(img)
        .stdin(Stdio::Null)
        .stdout(Stdio::Null)
        .log(sink)
        .spawn()
        .unwrap();
    let exit = p.wait().unwrap();
    let l = lines.lock().unwrap().clone();
    (exit, l)
}

fn sandbox_available() -> bool {
    let ok = std::process::Command::new("unshare")
        .args(["-U", "-p", "-n", "--fork", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(true);
    if !ok {
        if std::env::var_os("MOAT_REQUIRE_SANDBOX").is_some() {
            panic!("user namespaces are not available and MOAT_REQUIRE_SANDBOX is set");
        }
        eprintln!("SKIP: user namespaces are not available here");
    }
    ok
}

#[test]
fn misbehaving_loaders() {
    if !sandbox_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("moat-fake-loader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Loaders run as `nobody` outside their namespace: they write here.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let img = dir.join("tiny");
    std::fs::write(&img, tiny_elf()).unwrap();

    // Plain exit code.
    let (exit, _) = run_with(&script(&dir, "exit3", "exit 3"), &img);
    assert_eq!(exit.code, 3);
    assert_eq!(exit.report, None);

    // Garbage on the wire: the picoprocess ends, with a report.
    let (exit, _) = run_with(
        &script(
            &dir,
            "garbage",
            "printf '\\377\\377\\377\\377\\377\\377' >&3\nexec /bin/sleep 30",
        ),
        &img,
    );
    assert_eq!(exit.code, EXIT_SANDBOX_VIOLATION, "{exit:?}");
    let (kind, text) = exit.report.unwrap();
    assert_eq!(kind, ReportKind::Violation);
    assert!(text.starts_with("protocol violation: "), "{text}");

    // Debug lines (postcard: variant 6, string) and a report (variant 7,
    // kind 0 = Violation, string) just before the end.
    let (exit, lines) = run_with(
        &script(
            &dir,
            "report",
            "printf '\\006\\002hi' >&3\nprintf '\\007\\000\\005nope!' >&3\nexit 1",
        ),
        &img,
    );
    assert_eq!(
        lines,
        vec!["[picoprocess tiny] hi".to_string()],
        "exit: {exit:?}"
    );
    assert_eq!(
        exit.report,
        Some((ReportKind::Violation, "nope!".to_string()))
    );
    assert_eq!(exit.code, EXIT_SANDBOX_VIOLATION);

    // request_stop: SIGTERM reaches the loader (pid 1 of its namespace,
    // so only because it handles the signal).
    std::env::set_var(
        "MOAT_LOADER",
        script(
            &dir,
            "term",
            "trap 'exit 42' TERM\nwhile :; do /bin/sleep 0.05; done",
        ),
    );
    let mut p = Sandbox::new(&img).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    p.request_stop().unwrap();
    let t = Instant::now();
    assert_eq!(p.wait().unwrap().code, 42);
    assert!(t.elapsed() < Duration::from_secs(5));

    // The loader's environment and descriptors are only what moat gives.
    let out = dir.join("env.out");
    let body = format!(
        "{{ /usr/bin/env; echo uid=$(/usr/bin/id -u); echo uid_map=$(cat /proc/self/uid_map); ls /proc/self/fd; echo pid=$$; cat /proc/self/limits; }} > {} 2>&1",
        out.display()
    );
    let (exit, _) = run_with(&script(&dir, "env", &body), &img);
    assert_eq!(exit.code, 0);
    let got = std::fs::read_to_string(&out).unwrap();
    assert!(got.contains("MALLOC_ARENA_MAX=1"), "{got}");
    assert!(!got.contains("MOAT_LOADER"), "environment leaked: {got}");
    assert!(got.contains("pid=1"), "not in a new pid namespace: {got}");
    // uid 0 inside a new user namespace (so it may make its own mount
    // namespace after exec), `nobody` outside when the host is root.
    assert!(got.contains("uid=0\n"), "not uid 0 in its namespace: {got}");
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let outside = if uid == 0 { 65534 } else { uid };
    let map = got
        .lines()
        .find_map(|l| l.strip_prefix("uid_map="))
        .unwrap_or_default();
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", &outside.to_string(), "1"],
        "not mapped to an unprivileged id outside: {got}"
    );
    let limits_line = got
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    // The default 1024 handles, plus what the loader holds itself.
    let want = 1024 + moat_host_common::child::FD_OVERHEAD;
    assert!(
        limits_line.split_whitespace().nth(3) == Some(&want.to_string()),
        "{limits_line} (wanted {want})"
    );
    let core = got
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");

    // A child started by ProcessCreate (postcard: variant 5, the URI, no
    // args) is killed when the root's wait returns.
    let uri = format!("file:{}", img.display());
    assert!(uri.len() < 128);
    let body = format!(
        "if mkdir {d}/root-ran 2>/dev/null; then\n  printf '\\005\\{len:03o}{uri}\\000' >&3\n  /bin/sleep 0.5\n  exit 0\nfi\ntouch {d}/child-ran\nwhile :; do /bin/sleep 1; done",
        d = dir.display(),
        len = uri.len(),
    );
    let spawner = script(&dir, "spawner", &body);
    std::env::set_var("MOAT_LOADER", &spawner);
    let mut p = Sandbox::new(&img).allow_ro(&uri).unwrap().spawn().unwrap();
    assert_eq!(p.wait().unwrap().code, 0);
    assert!(dir.join("child-ran").exists(), "the child never ran");
    let t = Instant::now();
    while running(&spawner) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!running(&spawner), "the child outlived the root's wait");

    // A loader that cannot be executed: the error says which step failed.
    let noexec = dir.join("noexec");
    std::fs::write(&noexec, "#!/bin/sh\nexit 0\n").unwrap();
    std::env::set_var("MOAT_LOADER", &noexec);
    let e = Sandbox::new(&img).spawn().unwrap_err();
    assert!(e.to_string().contains("cannot execute the loader"), "{e}");
    assert!(e.to_string().contains("ermission denied"), "{e}");
    assert_eq!(e.exit_code(), moat_monitor::EXIT_HOST_FAILURE);

    // No loader at all.
    std::env::set_var("MOAT_LOADER", dir.join("missing"));
    let e = Sandbox::new(&img).spawn().unwrap_err();
    assert!(e.to_string().contains("MOAT_LOADER"), "{e}");
    assert_eq!(e.exit_code(), moat_monitor::EXIT_HOST_FAILURE);

    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether a live process runs `script`.
fn running(script: &Path) -> bool {
    let needle = script.to_str().unwrap().as_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let p = e.path();
        let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
        let zombie = std::fs::read_to_string(p.join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        !zombie && cmd.windows(needle.len()).any(|w| w == needle)
    })
}

/// The smallest image `elf::parse` accepts: one R+X page at 0x400000.
fn tiny_elf() -> Vec<u8> {
    let mut v = vec![0u8; 0x1000];
    v[..4].copy_from_slice(b"\x7fELF");
    v[4] = 2;
    v[5] = 1;
    v[6] = 1;
    let put16 = |v: &mut Vec<u8>, o: usize, x: u16| v[o..o + 2].copy_from_slice(&x.to_le_bytes());
    let put32 = |v: &mut Vec<u8>, o: usize, x: u32| v[o..o + 4].copy_from_slice(&x.to_le_bytes());
    let put64 = |v: &mut Vec<u8>, o: usize, x: u64| v[o..o + 8].copy_from_slice(&x.to_le_bytes());
    put16(&mut v, 16, 2);
    put16(&mut v, 18, 62);
    put32(&mut v, 20, 1);
    put64(&mut v, 24, 0x400100);
    put64(&mut v, 32, 64);
    put16(&mut v, 52, 64);
    put16(&mut v, 54, 56);
    put16(&mut v, 56, 1);
    put16(&mut v, 58, 64);
    put32(&mut v, 64, 1);
    put32(&mut v, 68, 5);
    put64(&mut v, 80, 0x400000);
    put64(&mut v, 88, 0x400000);
    put64(&mut v, 96, 0x1000);
    put64(&mut v, 104, 0x1000);
    put64(&mut v, 112, 0x1000);
    v[0x100] = 0xf4;
    v
}
