//! A serial line as a PTY (`moat serve --pty --host kvm`): the UART driver
//! picoprocess behind the mediator, its UART's line ending in the loopback
//! plug `moat serve` holds. Numbered lines typed into the PTY one at a
//! time come back out of it in order while the driver is killed every
//! 150 ms (at least 5 kills); a line whose echo was lost in a kill window
//! (bytes the dead driver or its UART held: the documented loss) is typed
//! again after a timeout, and a damaged line may hold only bytes of the
//! lines typed around it, in order. The counters at exit say every typed
//! byte was acknowledged and reached the plug. A driver that lies
//! (`--faults`) is caught and replaced while lines are typed. Bad input (a PTY on linux,
//! an unknown driver) is one line and exit 2. Needs /dev/kvm (CI sets
//! MOAT_REQUIRE_KVM, which turns a skip into a failure).
use moat_tests::typing::type_lines;
use moat_tests::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn kvm() -> bool {
    if !kvm_available() || !sandbox_available() {
        eprintln!("skipping: no /dev/kvm (set MOAT_REQUIRE_KVM=1 to fail instead)");
        return false;
    }
    true
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold anything but ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            v.push(p);
        }
    }
    v
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// A number after `label ` in `text`.
fn number(text: &str, label: &str) -> u64 {
    let at = text
        .find(&format!("{label} "))
        .unwrap_or_else(|| panic!("no `{label}` in {text:?}"));
    text[at + label.len() + 1..]
        .split_whitespace()
        .next()
        .and_then(|n| n.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("no number after `{label}` in {text:?}"))
}

/// What a `moat serve --pty` run printed at exit.
struct Served {
    /// Its counters (stderr).
    err: String,
    /// Bytes typed into the PTY, retyping included.
    bytes_typed: u64,
}

/// Starts `moat serve --pty --host kvm EXTRA...`, types numbered lines
/// into its PTY for at least `typing` (40 lines at least), checks what
/// came back, stops it with SIGTERM, and checks the counters it printed
/// and that its driver processes ended with it.
fn serve_and_type(extra: &[&str], typing: Duration) -> Served {
    let mut server = Reaped(
        Command::new(built("moat"))
            .args(["serve", "--pty", "--host", "kvm"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut path = String::new();
    out.read_line(&mut path).unwrap();
    let path = path.trim().to_string();
    assert!(path.starts_with("/dev/pts/"), "not a PTY path: {path:?}");
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .unwrap();
    // Reads come through a channel, so that a wait can time out.
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut reader = pty.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok(n) = reader.read(&mut b) {
            if n == 0 || tx.send(b[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut pending: Vec<u8> = Vec::new();
    let t0 = Instant::now();
    let mut typed = Vec::new();
    let mut lines = 0;
    while lines < 40 || t0.elapsed() < typing {
        let t = type_lines(
            20,
            // A line's echo lost with a killed driver is typed again.
            Duration::from_secs(3),
            // A lying driver may cut several tries' echoes short in a row.
            10,
            |b| pty.write_all(b).unwrap(),
            |buf, limit| {
                if pending.is_empty() {
                    if let Ok(b) = rx.recv_timeout(limit) {
                        pending = b;
                    }
                }
                let n = pending.len().min(buf.len());
                buf[..n].copy_from_slice(&pending[..n]);
                pending.drain(..n);
                n
            },
            |_| {},
        );
        typed.push(t);
        lines += 20;
        assert!(lines <= 4000, "typing never took {typing:?}");
    }
    let mut retyped = 0;
    let mut damaged = 0;
    for t in &typed {
        let v = t.check();
        retyped += t.retyped;
        damaged += v.damaged;
    }
    let kids = children(server.id());
    assert!(!kids.is_empty(), "no driver process under moat serve");
    let kill = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut err = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = server.wait().unwrap();
    eprintln!("{extra:?}: {lines} lines, {retyped} typed again, {damaged} damaged; {err}");
    assert_eq!(status.code(), Some(0), "{err}");
    let bytes_typed = typed.iter().map(|t| t.bytes_typed as u64).sum();
    assert_eq!(number(&err, "bytes typed"), bytes_typed, "{err}");
    assert_eq!(number(&err, "acknowledged"), bytes_typed, "{err}");
    // Every typed byte reached the plug; only re-issued ones twice.
    let at_plug = number(&err, "at the plug");
    let reissued = number(&err, "re-issued");
    assert!(at_plug >= bytes_typed, "{err}");
    assert!(at_plug <= bytes_typed + reissued, "{err}");
    // Nothing left behind: the driver processes ended with the server.
    let t = Instant::now();
    while kids.iter().any(|&k| alive(k)) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "moat serve left processes behind: {kids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Served { err, bytes_typed }
}

#[test]
fn typed_lines_come_back_in_order_across_driver_kills() {
    if !kvm() {
        return;
    }
    // Typing for 2 s at least: 5 kills and more at 150 ms after each
    // driver came up, even on a busy machine.
    // A deadline long enough that a busy machine's stalls are not taken
    // for a hung driver: kills are what is counted here.
    let s = serve_and_type(
        &["--kill-every", "150", "--deadline-ms", "10000"],
        Duration::from_millis(2000),
    );
    assert!(s.bytes_typed > 0);
    assert!(
        number(&s.err, "restarts") >= 5,
        "fewer than 5 kills: {}",
        s.err
    );
    assert_eq!(
        number(&s.err, "faults seen"),
        number(&s.err, "crash"),
        "kills are crashes, nothing else: {}",
        s.err
    );
}

#[test]
fn a_lying_driver_is_caught_while_lines_are_typed() {
    if !kvm() {
        return;
    }
    let s = serve_and_type(
        &[
            "--faults",
            "5:60000:double,wrong-id,bad-status,wrong-buf",
            "--max-failed-restarts",
            "20",
        ],
        Duration::from_millis(500),
    );
    let seen = number(&s.err, "faults seen");
    assert!(seen >= 3, "the lies were not caught: {}", s.err);
    assert_eq!(number(&s.err, "restarts"), seen, "{}", s.err);
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    for (args, says) in [
        (
            &["serve", "--pty"][..],
            "a PTY is served on --host kvm only: the UART exists only on the kvm host",
        ),
        (
            &["serve", "--pty", "--host", "linux"][..],
            "the UART exists only on the kvm host",
        ),
        (
            &["serve", "--pty", "--host", "kvm", "--driver", "virtio-blk"][..],
            "unknown serial driver `virtio-blk`; the serial driver is `uart-driver`",
        ),
        (
            &["serve", "--pty", "--host", "kvm", "--faults", "1:2:nope"][..],
            "unknown fault kind `nope`",
        ),
    ] {
        let out = moat(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert_eq!(out.stdout, "", "{args:?}: no PTY is made");
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {out:?}");
        assert!(out.stderr.starts_with("moat: "), "{args:?}: {out:?}");
        assert!(out.stderr.contains(says), "{args:?}: {out:?}");
    }
}

/// A client that writes and does not read: the echo backs up through the
/// PTY, the mediator and the UART to the plug, whose line then drops what
/// the UART sends (as a line without flow control does) instead of
/// blocking the driver's vCPU. No driver is taken for stalled, the server
/// stays up, and once the client reads again a typed line comes back.
#[test]
fn a_client_that_stops_reading_does_not_bring_the_line_down() {
    if !kvm() {
        return;
    }
    let mut server = Reaped(
        Command::new(built("moat"))
            .args(["serve", "--pty", "--host", "kvm"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut path = String::new();
    out.read_line(&mut path).unwrap();
    let pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path.trim())
        .unwrap();
    // 96 KiB written (or 10 s of trying), never reading: more than the
    // PTY, the client's queue and the line hold for the echo.
    let chunk = [b'x'; 4096];
    let t0 = Instant::now();
    let mut written = 0usize;
    while written < 96 << 10 && t0.elapsed() < Duration::from_secs(10) {
        match (&pty).write(&chunk) {
            Ok(n) => written += n,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    assert!(written > 64 << 10, "only {written} bytes went in");
    assert!(
        server.try_wait().unwrap().is_none(),
        "moat serve ended while its client did not read"
    );
    // Read again: a line typed comes back once the backlog of what was
    // typed has gone out (its echo may be dropped while the line is still
    // backed up: it is typed again every 5 s, as someone would).
    let mut buf = vec![0u8; 1 << 16];
    let mut tail: Vec<u8> = Vec::new();
    let t = Instant::now();
    let mut typed_at: Option<Instant> = None;
    while !tail.windows(11).any(|w| w == b"still here\n") {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the line did not come back: {:?}",
            String::from_utf8_lossy(&tail)
        );
        if typed_at.is_none_or(|at| at.elapsed() > Duration::from_secs(5))
            && (&pty).write(b"still here\n").ok() == Some(11)
        {
            typed_at = Some(Instant::now());
        }
        match (&pty).read(&mut buf) {
            Ok(n) => {
                // Only the last bytes are kept (and searched).
                tail.extend_from_slice(&buf[..n]);
                let cut = tail.len().saturating_sub(64);
                tail.drain(..cut);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let kill = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut err = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = server.wait().unwrap();
    eprintln!("{written} bytes written unread; {err}");
    assert_eq!(status.code(), Some(0), "{err}");
    assert_eq!(
        number(&err, "restarts"),
        0,
        "a driver was taken for stalled: {err}"
    );
    // The echo backed up to the plug, which dropped what the UART could
    // not take.
    assert!(
        err.contains("echo dropped at the plug"),
        "the line never backed up: {err}"
    );
}
