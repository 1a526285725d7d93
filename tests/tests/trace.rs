//! The tracer (`layers/src/tracer.rs` writes a binary record per call
//! into a ring the monitor drains, `monitor/src/trace/` decodes): lines
//! that read like strace on both hosts, nothing lost silently (lossless
//! mode loses nothing; the default counts what it drops and says where),
//! saved traces decoded by `moat trace`, filters.
use moat_tests::*;

fn trace_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| l.split_once("] trace: ").map(|(_, t)| t))
        .collect()
}

#[test]
fn trace_lines_read_like_strace_on_both_hosts() {
    if !sandbox_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("x");
    let uri = file_uri(&f);
    for h in hosts() {
        let out = run_on(
            h,
            &[
                "--trace",
                "--allow",
                &file_uri(d.path()),
                image("files").to_str().unwrap(),
                "--",
                "write",
                &uri,
                "hello",
            ],
        );
        out.assert_code(0);
        let t = trace_lines(&out.stderr);
        // The URI as a string, access by name, the new handle.
        let open = t
            .iter()
            .find(|l| l.contains(&format!("DkStreamOpen(\"{uri}\", access=WRITE")))
            .unwrap_or_else(|| panic!("{h}: no open of {uri}:\n{}", out.stderr));
        let handle = open
            .split(", stream=")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .unwrap_or_else(|| panic!("{h}: no handle in {open}"));
        assert!(
            open.contains("create=CREATE_ALWAYS") && open.ends_with("us>"),
            "{open}"
        );
        // The write names the handle by what it was opened as, the bytes
        // as a string.
        assert!(
            t.iter().any(|l| l.contains(&format!(
                "DkStreamWrite(stream={handle}<\"{uri}\">, offset=0, \"hello\") = 5"
            ))),
            "{h}:\n{}",
            out.stderr
        );
        assert!(t.last().unwrap().contains("DkProcessExit(code=0)"), "{h}");
        // An error by name.
        let out = run_on(
            h,
            &[
                "--trace",
                image("files").to_str().unwrap(),
                "--",
                "read",
                "file:/etc/passwd",
            ],
        );
        assert!(
            trace_lines(&out.stderr)
                .iter()
                .any(|l| l.contains("DkStreamOpen(\"file:/etc/passwd\"")
                    && l.contains("= -5 PermissionDenied")),
            "{h}:\n{}",
            out.stderr
        );
    }
}

/// `bench-calls N` makes N + N/10 + 6 DkSystemTimeQuery calls.
fn time_queries(n: u64) -> usize {
    (n + n / 10 + 6) as usize
}

#[test]
fn lossless_tracing_loses_nothing_on_both_hosts() {
    if !sandbox_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for h in hosts() {
        let n: u64 = if h == "kvm" { 20_000 } else { 200_000 };
        let file = d.path().join(format!("{h}.trace"));
        let spec = format!("--trace=lossless,{}", file.display());
        // A ring far smaller than the calls: the guest waits for the reader.
        let out = run_on(
            h,
            &[
                &spec,
                "--trace-ring",
                "256",
                image("bench-calls").to_str().unwrap(),
                "--",
                &n.to_string(),
            ],
        );
        out.assert_code(0);
        let dec = moat(&["trace", file.to_str().unwrap()]);
        dec.assert_code(0);
        let lines: Vec<&str> = dec.stdout.lines().collect();
        let q = lines
            .iter()
            .filter(|l| l.contains("DkSystemTimeQuery()"))
            .count();
        assert_eq!(q, time_queries(n), "{h}");
        assert!(!dec.stdout.contains("dropped"), "{h}");
        assert!(!dec.stdout.contains("lost"), "{h}");
        assert!(
            lines.last().unwrap().contains("DkProcessExit(code=0)"),
            "{h}"
        );
        // The filter of `moat trace`.
        let only = moat(&["trace", file.to_str().unwrap(), "--filter", "DkStreamWrite"]);
        only.assert_code(0);
        assert!(
            only.stdout.lines().all(|l| l.contains("DkStreamWrite(")),
            "{h}"
        );
        assert!(only.stdout.lines().count() > (n / 4) as usize, "{h}");
    }
}

#[test]
fn dropped_records_are_counted_and_placed() {
    if !sandbox_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for h in hosts() {
        let n: u64 = if h == "kvm" { 20_000 } else { 200_000 };
        // The ring holds 64 records and the reader is held up (the trace
        // file is a FIFO nobody reads until the guest has made its calls):
        // records are dropped, and every one is counted.
        let saved = d.path().join(format!("{h}.trace"));
        let out = run_with_a_stalled_trace_file(
            h,
            &[
                "--trace-ring",
                "64",
                "--trace-filter",
                "DkSystemTimeQuery",
                image("bench-calls").to_str().unwrap(),
                "--",
                &n.to_string(),
            ],
            "time_query ",
            &saved,
        );
        out.assert_code(0);
        let dec = moat(&["trace", saved.to_str().unwrap()]);
        dec.assert_code(0);
        let t: Vec<&str> = dec.stdout.lines().collect();
        let seen = t
            .iter()
            .filter(|l| l.contains("DkSystemTimeQuery()"))
            .count();
        let dropped: usize = t
            .iter()
            .filter_map(|l| {
                l.strip_prefix("... ")?
                    .split(' ')
                    .next()?
                    .parse::<usize>()
                    .ok()
                    .filter(|_| l.contains("dropped here"))
            })
            .sum();
        assert!(dropped > 0, "{h}: nothing dropped with a 64-record ring");
        assert_eq!(
            seen + dropped,
            time_queries(n),
            "{h}: seen {seen}, dropped {dropped}"
        );
        // The filter let nothing else through.
        assert!(
            t.iter()
                .all(|l| l.contains("DkSystemTimeQuery()") || l.starts_with("... ")),
            "{h}"
        );
    }
}

/// `moat run --host HOST --trace=FIFO ARGS...`, the FIFO not read until
/// the guest has printed a line starting with `until` on its standard
/// output (the FIFO holds one page): the monitor's trace reader is stalled
/// for as long as the guest takes to get there, however fast or loaded the
/// machine is. What the FIFO carried is saved to `saved`.
fn run_with_a_stalled_trace_file(
    host: &str,
    args: &[&str],
    until: &str,
    saved: &std::path::Path,
) -> Output {
    use std::io::{BufRead, Read};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    use std::process::{Command, Stdio};
    let fifo = saved.with_extension("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo {}", fifo.display());
    // Opened for reading first (without waiting for a writer), so that
    // moat's open for writing finds a reader.
    let mut rd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    // SAFETY: fcntl on a FIFO descriptor this function owns; no memory is
    // passed.
    let r = unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(r > 0, "F_SETPIPE_SZ: {}", std::io::Error::last_os_error());
    let mut child = Command::new(built("moat"))
        .args(["run", "--host", host])
        .arg(format!("--trace={}", fifo.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start moat");
    let mut se = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .is_err()
        {
            // SAFETY: a signal to the child this test started and has not
            // yet waited for.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut so = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut stdout = String::new();
    while !stdout.lines().any(|l| l.starts_with(until)) {
        if so.read_line(&mut stdout).unwrap_or(0) == 0 {
            break;
        }
    }
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    // SAFETY: fcntl on the FIFO descriptor owned here: blocking reads
    // from now on.
    unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_SETFL, 0) };
    let mut trace = Vec::new();
    rd.read_to_end(&mut trace).unwrap();
    std::fs::write(saved, &trace).unwrap();
    stdout.push_str(&rest.join().unwrap());
    let status = child.wait().unwrap();
    let _ = tx.send(());
    watchdog.join().unwrap();
    Output {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr: stderr.join().unwrap(),
    }
}

#[test]
fn bad_traces_and_filters_are_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t");
    std::fs::write(&p, b"something else entirely, not a trace").unwrap();
    let out = moat(&["trace", p.to_str().unwrap()]);
    out.assert_code(2);
    assert!(out.stderr.contains("is not a moat trace"), "{}", out.stderr);
    let out = moat(&["run", "--trace", "--trace-filter", "DkNothing", "hello"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("`DkNothing` is neither a call"),
        "{}",
        out.stderr
    );
    let out = moat(&["run", "--trace", "--trace-ring", "100", "hello"]);
    out.assert_code(2);
    assert!(out.stderr.contains("power of two"), "{}", out.stderr);
    let out = moat(&["run", "--trace-filter", "sync", "hello"]);
    out.assert_code(2);
    assert!(out.stderr.contains("need --trace"), "{}", out.stderr);
}

/// A trace layer inside a stack is numbered; the outermost one is 0.
#[test]
fn trace_layers_in_a_stack_are_told_apart() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let out = run_on(h, &["--layer", "trace,remap,trace", "hello"]);
        out.assert_code(0);
        let t = trace_lines(&out.stderr);
        let outer = t.iter().filter(|l| l.contains("t1 DkStreamWrite(")).count();
        let inner = t
            .iter()
            .filter(|l| l.contains("[trace 1] DkStreamWrite("))
            .count();
        assert_eq!((outer, inner), (1, 1), "{h}:\n{}", out.stderr);
    }
}
