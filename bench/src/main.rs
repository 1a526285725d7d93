//! `moat-bench [--quick] [--json] [GROUP...]`, groups `spawn`, `calls`,
//! `pipe`, `kvm`, `mediator`, `export` (all of them by default, or `all`).
//!
//! Output: a Markdown table row per benchmark, or with `--json` one JSON
//! object per line (`name`, `moat`, `floor`, `unit`, `ratio`, `target`);
//! lines that are not measurements (skips, notes) go to standard error
//! with `--json`.
//!
//! Every benchmark measures the raw floor (the same operation without
//! moat) in the same run and prints moat / floor. Each group runs in its
//! own process. `calls` and `pipe` pin that process to CPU 0 (children
//! inherit it), so process pairs ping-pong on one core in both the floor
//! and the moat case; `spawn` runs unpinned, floor and moat alike. `kvm`
//! runs its parts (see [`kvm`]) each in a process of its own.
//! Results are medians of repeated samples; `--quick` runs a short
//! version (used by the test suite to keep the harness working).
mod checkpoint;
mod export;
mod handoff;
mod kvm;
mod mediator;
mod mediator_kvm;
mod net;
mod trace;
mod uring;

use clap::Parser;
use moat_monitor::{Sandbox, Stdio};
use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

fn image(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    if !p.exists() {
        eprintln!(
            "moat-bench: {} is missing; run `cargo build --workspace --release` first",
            p.display()
        );
        std::process::exit(2);
    }
    p
}

fn pin_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; we set one bit and apply it to ourselves.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * 0.99) as usize).min(v.len() - 1)]
}

/// `--json`: rows as JSON objects, one per line.
static JSON: AtomicBool = AtomicBool::new(false);

fn row(name: &str, moat: f64, floor: f64, unit: &str, target: &str) {
    if JSON.load(Ordering::Relaxed) {
        println!(
            "{}",
            serde_json::json!({
                "name": name,
                "moat": moat,
                "floor": floor,
                "unit": unit,
                "ratio": moat / floor,
                "target": target,
            })
        );
        return;
    }
    println!(
        "| {name} | {moat:.2} {unit} | {floor:.2} {unit} | {:.2}x | {target} |",
        moat / floor
    );
}

/// A line that is not a measurement: a table row, or standard error with
/// `--json` (which keeps standard output to measurements).
fn note(line: &str) {
    if JSON.load(Ordering::Relaxed) {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

fn header() {
    if JSON.load(Ordering::Relaxed) {
        return;
    }
    println!("| benchmark | moat | raw floor | ratio | target |");
    println!("|---|---|---|---|---|");
}

fn run_sandbox(img: &PathBuf, args: &[String]) -> (i32, String) {
    run_sandbox_with(img, args, None)
}

pub(crate) fn run_sandbox_with(
    img: &PathBuf,
    args: &[String],
    trace: Option<moat_monitor::trace::TraceOptions>,
) -> (i32, String) {
    let mut p = Sandbox::new(img);
    if let Some(t) = trace {
        p = p.trace_with(t);
    }
    let mut p = p
        .args(args.iter().cloned())
        .stdout(Stdio::Piped)
        .stderr(Stdio::Inherit);
    let me = format!("file:{}", img.display());
    p = p.allow_ro(&me).unwrap();
    p = p
        .allow("pipe.server:bench")
        .unwrap()
        .allow("pipe.client:bench")
        .unwrap();
    let mut pp = p
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", img.display()));
    let mut out = String::new();
    if let Some(mut o) = pp.stdout.take() {
        o.read_to_string(&mut out).unwrap();
    }
    let exit = pp.wait().unwrap();
    (exit.code, out)
}

fn spawn_bench(quick: bool) {
    use moat_monitor::LogSink;
    use std::sync::{Arc, Mutex};
    let n = if quick { 20 } else { 300 };
    let floor_img = image("floor-exit");
    let first = image("bench-first-call");
    let (mut f_first, mut f_total, mut ns, mut m_first, mut m_total) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        // Floor: fork + exec of a static binary, to its first system call
        // (a byte on a pipe), and to its reaping.
        let t = Instant::now();
        let mut c = Command::new(&floor_img)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut b = [0u8; 1];
        c.stdout.take().unwrap().read_exact(&mut b).unwrap();
        f_first.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(c.wait().unwrap().success());
        f_total.push(t.elapsed().as_secs_f64() * 1e6);

        // Breakdown: the same floor binary started in fresh namespaces, as
        // moat did per picoprocess before the zygote.
        let t = Instant::now();
        assert_eq!(ns_spawn(&floor_img), 0);
        ns.push(t.elapsed().as_secs_f64() * 1e6);

        // moat: to the first ABI call (a debug print the monitor logs),
        // and to the exit status.
        let seen: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let s2 = seen.clone();
        let sink = LogSink::Callback(Arc::new(move |_l: &str| {
            s2.lock().unwrap().get_or_insert_with(Instant::now);
        }));
        let t = Instant::now();
        let mut p = Sandbox::new(&first)
            .stdout(Stdio::Null)
            .log(sink)
            .spawn()
            .unwrap();
        let e = p.wait().unwrap();
        let total = t.elapsed();
        assert_eq!(e.code, 0, "{:?}", e.report);
        let at = seen.lock().unwrap().expect("the first call was seen");
        m_first.push((at - t).as_secs_f64() * 1e6);
        m_total.push(total.as_secs_f64() * 1e6);
    }
    let ff = median(&mut f_first);
    row(
        "spawn to first ABI call (median)",
        median(&mut m_first),
        ff,
        "µs",
        "≤ 1.5x",
    );
    row(
        "spawn to first ABI call (p99)",
        p99(&mut m_first),
        p99(&mut f_first),
        "µs",
        "-",
    );
    row(
        "spawn, run, exit, reap (median)",
        median(&mut m_total),
        median(&mut f_total),
        "µs",
        "-",
    );
    row(
        "  breakdown: floor in fresh namespaces",
        median(&mut ns),
        median(&mut f_total),
        "µs",
        "-",
    );
}

/// fork + unshare(namespaces) + exec + wait of the floor binary.
fn ns_spawn(img: &PathBuf) -> i32 {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(img);
    c.stdout(std::process::Stdio::null());
    // SAFETY: unshare is async-signal-safe and only affects the child.
    unsafe {
        c.pre_exec(|| {
            let flags = libc::CLONE_NEWUSER
                | libc::CLONE_NEWNET
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWNS
                | libc::CLONE_NEWUTS;
            if libc::unshare(flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.status().unwrap().code().unwrap_or(-1)
}

fn parse(out: &str, key: &str) -> f64 {
    out.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no `{key}` in output:\n{out}"))
}

fn calls_bench(quick: bool) {
    let n: u64 = if quick { 100_000 } else { 2_000_000 };
    let reps = if quick { 1 } else { 5 };
    let img = image("bench-calls");
    let (mut tq, mut nw, mut ftq, mut fnw, mut pal0) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        let (code, out) = run_sandbox(&img, &[n.to_string()]);
        assert_eq!(code, 0, "{out}");
        tq.push(parse(&out, "time_query"));
        nw.push(parse(&out, "null_write_4k"));
        pal0.push(parse(&out, "pal_only_write_0"));
        // Floors: the same operations as raw system calls from this process.
        let t = Instant::now();
        for _ in 0..n {
            // The same operation: clock_gettime(CLOCK_REALTIME) in microseconds.
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: ts is a valid out-parameter.
            unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
            std::hint::black_box(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000);
        }
        ftq.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
        // In a fresh child, like the filter breakdowns below (a process
        // with the host's threads measures differently).
        fnw.push(write_under_seccomp(n / 4, Filter::None));
    }
    row(
        "DkSystemTimeQuery vs clock_gettime",
        median(&mut tq),
        median(&mut ftq),
        "ns",
        "≤ 1.2x",
    );
    row(
        "DkStreamWrite 4 KiB to null: vs write(/dev/null)",
        median(&mut nw),
        median(&mut fnw),
        "ns",
        "≤ 1.2x",
    );
    note(&format!(
        "|   breakdown: PAL path alone (0-byte write, no system call) | {:.2} ns | - | - | - |",
        median(&mut pal0)
    ));
    let mut sc: Vec<f64> = (0..reps)
        .map(|_| write_under_seccomp(n / 4, Filter::AllowAll))
        .collect();
    let mut mf: Vec<f64> = (0..reps)
        .map(|_| write_under_seccomp(n / 4, Filter::Moat))
        .collect();
    row(
        "  breakdown: write(/dev/null) under an allow-all seccomp filter",
        median(&mut sc),
        median(&mut fnw),
        "ns",
        "-",
    );
    row(
        "  breakdown: write(/dev/null) under moat's loader filter, no PAL",
        median(&mut mf),
        median(&mut fnw),
        "ns",
        "-",
    );
    trace::bench(quick, median(&mut tq));
}

#[derive(Clone, Copy, PartialEq)]
enum Filter {
    None,
    AllowAll,
    Moat,
}

/// Raw 4 KiB writes to /dev/null in a forked child, with no filter, with
/// `return ALLOW`, or with moat's own loader filter: the filters' cost
/// alone, with no PAL in the way.
fn write_under_seccomp(m: u64, which: Filter) -> f64 {
    let mut fds = [0i32; 2];
    // SAFETY: pipe/fork/prctl/write/read on our own descriptors; the child
    // makes only system calls and _exits.
    unsafe {
        libc::pipe(fds.as_mut_ptr());
        let pid = libc::fork();
        if pid == 0 {
            let f = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            let mut filter = vec![libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0x7fff_0000,
            }];
            if which == Filter::Moat {
                use moat_host_common::{sandbox, sys};
                let p = sandbox::build_filter(&sys::pal_code_ranges(), libc::getpid() as i64, None)
                    .unwrap();
                filter = p
                    .iter()
                    .map(|i| libc::sock_filter {
                        code: i.code,
                        jt: i.jt,
                        jf: i.jf,
                        k: i.k,
                    })
                    .collect();
            }
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_mut_ptr(),
            };
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const _ as usize,
            );
            let buf = [0x5au8; 4096];
            let t = Instant::now();
            for _ in 0..m {
                libc::write(f, buf.as_ptr() as *const _, 4096);
            }
            let ns = t.elapsed().as_secs_f64() * 1e9 / m as f64;
            libc::write(fds[1], &ns as *const f64 as *const _, 8);
            libc::_exit(0);
        }
        let mut ns = 0f64;
        libc::read(fds[0], &mut ns as *mut f64 as *mut _, 8);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        libc::close(fds[0]);
        libc::close(fds[1]);
        ns
    }
}

fn pipe_bench(quick: bool) {
    let n: u64 = if quick { 2_000 } else { 50_000 };
    let reps = if quick { 1 } else { 5 };
    let img = image("bench-pipe");
    let me = format!("file:{}", img.display());
    let (mut m, mut f) = (vec![], vec![]);
    for _ in 0..reps {
        let (code, out) = run_sandbox(&img, &["server".into(), n.to_string(), me.clone()]);
        assert_eq!(code, 0, "{out}");
        m.push(parse(&out, "pipe_round_trip"));
        f.push(raw_pipe_ping_pong(n));
    }
    row(
        "pipe round trip, two picoprocesses vs two processes",
        median(&mut m) / 1000.0,
        median(&mut f) / 1000.0,
        "µs",
        "-",
    );
    let mut u: Vec<f64> = (0..reps).map(|_| raw_unix_ping_pong(n)).collect();
    row(
        "  breakdown: raw AF_UNIX stream ping-pong (what pipe.* uses)",
        median(&mut u) / 1000.0,
        median(&mut f) / 1000.0,
        "µs",
        "-",
    );
}

/// Raw floor: parent and forked child bounce one byte over two pipes.
fn raw_pipe_ping_pong(n: u64) -> f64 {
    let mut a = [0i32; 2];
    let mut b = [0i32; 2];
    // SAFETY: plain pipe calls into local arrays.
    unsafe {
        libc::pipe(a.as_mut_ptr());
        libc::pipe(b.as_mut_ptr());
    }
    ping_pong(n, a, b)
}

/// The same over one AF_UNIX stream socket pair.
fn raw_unix_ping_pong(n: u64) -> f64 {
    let mut s = [0i32; 2];
    // SAFETY: socketpair into a local array.
    unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, s.as_mut_ptr()) };
    // The parent writes and reads s[0]; the child reads and writes s[1].
    // SAFETY: dup of our own descriptors (ping_pong closes four).
    let (s0, s1) = unsafe { (libc::dup(s[0]), libc::dup(s[1])) };
    ping_pong(n, [s[1], s[0]], [s0, s1])
}

/// a: parent writes `a[1]`, child reads `a[0]`; b: child writes `b[1]`, parent reads `b[0]`.
fn ping_pong(n: u64, a: [i32; 2], b: [i32; 2]) -> f64 {
    // SAFETY: plain fork/read/write on our own descriptors; the child only
    // makes system calls and _exits.
    unsafe {
        let pid = libc::fork();
        let mut c = [0u8; 1];
        if pid == 0 {
            for _ in 0..n {
                if libc::read(a[0], c.as_mut_ptr() as *mut _, 1) != 1
                    || libc::write(b[1], c.as_ptr() as *const _, 1) != 1
                {
                    libc::_exit(1);
                }
            }
            libc::_exit(0);
        }
        let t = Instant::now();
        for _ in 0..n {
            libc::write(a[1], c.as_ptr() as *const _, 1);
            libc::read(b[0], c.as_mut_ptr() as *mut _, 1);
        }
        let el = t.elapsed();
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        for fd in [a[0], a[1], b[0], b[1]] {
            libc::close(fd);
        }
        el.as_secs_f64() * 1e9 / n as f64
    }
}

/// Run each group in a process of its own (this binary again), without
/// a header; end this process if one fails.
fn run_in_children(groups: &[&str], quick: bool) {
    let me = std::env::current_exe().unwrap();
    for group in groups {
        let mut c = Command::new(&me);
        c.arg("--no-header").arg(group);
        if quick {
            c.arg("--quick");
        }
        if JSON.load(Ordering::Relaxed) {
            c.arg("--json");
        }
        let s = c.status().unwrap();
        if !s.success() {
            eprintln!("moat-bench: `{group}` failed");
            std::process::exit(1);
        }
    }
}

/// moat's benchmarks: each runs its raw floor (the same operation without
/// moat) in the same run and prints the ratio.
#[derive(Parser, Debug)]
#[command(name = "moat-bench", version)]
struct Args {
    /// A short run (seconds, not minutes): checks the harness, not the figures.
    #[arg(long)]
    quick: bool,
    /// One JSON object per measurement and line: name, moat, floor, unit,
    /// ratio, target.
    #[arg(long)]
    json: bool,
    /// No table header (each group runs in a child process that leaves it
    /// to its parent).
    #[arg(long, hide = true)]
    no_header: bool,
    /// What to run: spawn, calls, pipe, kvm, mediator, export, checkpoint, net,
    /// all (the default),
    /// or one part of kvm (kvm-spawn, kvm-spawn-fresh, kvm-calls, kvm-blk,
    /// and those `kvm` lists), or mediator-kvm (the kvm rows of mediator).
    #[arg(value_name = "GROUP")]
    groups: Vec<String>,
}

fn main() {
    let a = Args::parse();
    JSON.store(a.json, Ordering::Relaxed);
    let quick = a.quick;
    let which: Vec<&str> = a.groups.iter().map(|s| s.as_str()).collect();
    let start = Instant::now();
    match which.as_slice() {
        // Each group runs in its own process: the picoprocess host (and its
        // zygote) is per process, and so is the CPU pinning.
        [] | ["all"] => {
            header();
            run_in_children(
                &[
                    "spawn",
                    "calls",
                    "pipe",
                    "kvm",
                    "mediator",
                    "export",
                    "checkpoint",
                    "net",
                ],
                quick,
            );
        }
        groups => {
            if !a.no_header {
                header();
            }
            for g in groups {
                match *g {
                    // Spawning is measured unpinned, floor and moat alike:
                    // the zygote keeps a loader warm on the other core.
                    "spawn" => spawn_bench(quick),
                    // Unpinned, as `spawn`.
                    "checkpoint" => checkpoint::bench(quick),
                    "calls" => {
                        pin_cpu0();
                        calls_bench(quick)
                    }
                    "pipe" => {
                        pin_cpu0();
                        pipe_bench(quick)
                    }
                    "kvm" => {
                        if kvm::available() {
                            run_in_children(&kvm::PARTS, quick)
                        }
                    }
                    // Unpinned: the engine, reader and writer threads of the
                    // mediator and the driver share both cores.
                    "mediator" => {
                        mediator::mediator_bench(quick);
                        if kvm::available() {
                            mediator_kvm::rows(quick);
                        }
                    }
                    // Unpinned too: fio, the FUSE threads, the mediator and
                    // the driver.
                    "export" => export::export_bench(quick),
                    // Unpinned: the client, the mediator, the driver and
                    // the wire share both cores.
                    "net" => net::bench(quick),
                    // The kvm rows of `mediator` alone.
                    "mediator-kvm" => {
                        if kvm::available() {
                            mediator_kvm::rows(quick);
                        }
                    }
                    // Measured unpinned, as `spawn`.
                    "kvm-spawn" => kvm::spawn(quick),
                    "kvm-spawn-fresh" => kvm::spawn_fresh(quick),
                    // Pinned before anything starts a VMM: the monitor's
                    // spawner thread, and so every VMM, inherits CPU 0.
                    "kvm-calls" => {
                        pin_cpu0();
                        kvm::calls(quick)
                    }
                    "kvm-blk" => {
                        pin_cpu0();
                        kvm::blk(quick)
                    }
                    other => {
                        eprintln!(
                            "moat-bench: unknown benchmark `{other}` (spawn, calls, pipe, kvm, mediator, mediator-kvm, export, checkpoint, net, all)"
                        );
                        std::process::exit(2);
                    }
                }
            }
        }
    }
    eprintln!(
        "moat-bench: done in {:.1?}",
        start.elapsed().max(Duration::from_millis(1))
    );
}
