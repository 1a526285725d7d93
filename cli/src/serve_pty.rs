//! `moat serve --pty --host kvm`: a serial line served by the UART driver
//! picoprocess through the mediator, as a PTY. It opens a PTY pair (the
//! slave in raw mode, so `picocom`, `screen` or a program see bytes as
//! they are), prints the slave's path on stdout, and serves: bytes written
//! into the PTY go to the mediated serial line
//! ([`moat_mediator::serial::MediatedSerial`]), which the `uart-driver`
//! writes to its 16550's THR; bytes the driver reads from the UART come
//! back out of the PTY.
//!
//! The UART's line has to end somewhere. Its far end is a **loopback
//! plug** this process holds: a socket pair, one end handed to each driver
//! incarnation's `uart` device as its line, the other read here, every
//! byte written back into it, as a loopback plug on a real serial port
//! sends each byte back. It stands in for a device on the cable, as the
//! wire's namespace does for a NIC's network. So what is typed into the
//! PTY comes back out of it, through the UART twice.
//!
//! `--kill-every MS` kills each driver MS after it came up (a start that
//! takes long on a busy machine does not shorten the next driver's life).
//! Across a driver's replacement (`--kill-every`, `--faults`) the
//! mediator's guarantees hold (see `moat_mediator::serial`): bytes typed
//! are kept until a driver acknowledges them and may reach the UART twice
//! (counted as re-issued); bytes come back in order; bytes a dead driver
//! or its UART held are lost, as an overrun loses them. Bytes that come
//! back while nobody reads the PTY wait in it, then in the mediator's
//! queue and the UART's FIFO; past that the plug drops the echo it
//! cannot send back (counted at exit), and keeps taking what the UART
//! sends.
//!
//! The UART exists only on the kvm host: on `--host linux` this is bad
//! input. SIGINT or SIGTERM (or the end of `--seconds`) stops it: what was
//! typed is given a moment to be acknowledged, the driver is ended, and
//! the counters go to stderr.
use crate::bad_input;
use crate::mediate::Host;
use crate::mediate::{ServeArgs, SIGNALS};
use moat_mediator::block::{DriverSpec, SECTION};
use moat_mediator::serial::{MediatedSerial, SerialConfig, SerialCounters};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The UART device's name in the driver's manifest.
const DEVICE: &str = "com1";

pub fn serve(a: ServeArgs) -> i32 {
    if a.driver.host != Host::Kvm {
        return bad_input(
            "a PTY is served on --host kvm only: the UART exists only on the kvm host",
        );
    }
    match a.driver.driver.as_str() {
        // The default driver names the disk's: a serial line's is
        // uart-driver.
        "uart-driver" | "blk-file" => {}
        other => {
            return bad_input(format!(
                "unknown serial driver `{other}`; the serial driver is `uart-driver`"
            ))
        }
    }
    let faults = match crate::mediate::stream_faults(&a) {
        Ok(f) => f,
        Err(e) => return bad_input(e),
    };
    let image = match crate::resolve::resolve("uart-driver") {
        Ok(i) => i,
        Err(e) => return bad_input(e),
    };
    let mut policy = moat_policy::Policy::default();
    policy.limits.memory_mib = 64;
    let uart = moat_policy::DeviceSpec::parse(&format!("{DEVICE}=uart"))
        .map_err(|e| e.to_string())
        .and_then(|d| policy.add_device(d).map_err(|e| e.to_string()));
    if let Err(e) = uart {
        return bad_input(e);
    }
    let plug = match Plug::start() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("moat: cannot make the UART's line: {e}");
            return moat_monitor::EXIT_HOST_FAILURE;
        }
    };
    let templates = !a.driver.no_template && faults.is_none();
    let spec = DriverSpec {
        image,
        args: vec![DEVICE.into(), "serve".into(), SECTION.into()],
        host: moat_monitor::Host::Kvm,
        policy,
        faults,
        console: a.driver.driver_console,
        files: vec![(DEVICE.into(), plug.line.clone())],
    };
    let config = SerialConfig {
        deadline: Duration::from_millis(a.driver.deadline_ms.max(1)),
        max_failed_restarts: a.driver.max_failed_restarts,
        templates,
        ..SerialConfig::default()
    };
    // Before the first driver starts (a slow start may be interrupted).
    crate::mediate::catch_stop_signals();
    let serial = match MediatedSerial::start(spec, config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("moat: {e}");
            return moat_monitor::EXIT_HOST_FAILURE;
        }
    };
    let pty = match Pty::open() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("moat: cannot open a PTY: {e}");
            serial.shutdown();
            return moat_monitor::EXIT_HOST_FAILURE;
        }
    };
    println!("{}", pty.path);
    let _ = std::io::stdout().flush();

    let stop = Arc::new(AtomicBool::new(false));
    let typed = {
        let (master, serial, stop) = (pty.master.clone(), serial.clone(), stop.clone());
        std::thread::spawn(move || pty_to_line(&master, &serial, &stop))
    };
    let shown = {
        let (master, serial, stop) = (pty.master.clone(), serial.clone(), stop.clone());
        std::thread::spawn(move || line_to_pty(&master, &serial, &stop))
    };
    let t0 = Instant::now();
    // When the current driver came up: each one serves MS before it is
    // killed, however long a start takes on a busy machine.
    let mut up = Instant::now();
    let mut restarts = 0;
    while SIGNALS.load(Ordering::SeqCst) == 0
        && a.seconds
            .is_none_or(|s| t0.elapsed() < Duration::from_secs(s))
    {
        std::thread::sleep(Duration::from_millis(10));
        if serial.failed().is_some() {
            break;
        }
        pty.keep_raw();
        if let Some(ms) = a.kill_every {
            let now = serial.restarts();
            if now != restarts {
                restarts = now;
                up = Instant::now();
            }
            if up.elapsed() >= Duration::from_millis(ms) {
                serial.kill_driver();
                up = Instant::now();
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    // What was typed gets a moment to reach the UART; then the line is
    // shut down, which also ends a write waiting for room (the client may
    // have stopped reading, so the line may never drain).
    let flushed = serial.flush(Duration::from_secs(2));
    serial.shutdown();
    let _ = typed.join();
    let _ = shown.join();
    let (at_plug, plug_dropped) = plug.stop();
    print_counters(&serial.counters(), at_plug, &mut std::io::stderr());
    if plug_dropped > 0 {
        eprintln!("echo dropped at the plug (the UART took no more): {plug_dropped}");
    }
    if let Some(why) = serial.failed() {
        eprintln!("moat: {why}");
        return moat_monitor::EXIT_HOST_FAILURE;
    }
    if !flushed {
        eprintln!("moat: stopped before every byte typed was acknowledged by the driver");
    }
    0
}

/// The PTY pair: the master this process serves, the slave's path. The
/// slave stays open here too, so the PTY lives while clients come and go.
struct Pty {
    master: Arc<OwnedFd>,
    /// Held open, so a client may close the PTY and open it again.
    slave: OwnedFd,
    path: String,
}

impl Pty {
    fn open() -> std::io::Result<Pty> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let p = nix::pty::openpty(None, None)?;
        let mut t = tcgetattr(p.slave.as_fd())?;
        cfmakeraw(&mut t);
        tcsetattr(p.slave.as_fd(), SetArg::TCSANOW, &t)?;
        nix::fcntl::fcntl(
            p.master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let path = std::fs::read_link(format!("/proc/self/fd/{}", p.slave.as_raw_fd()))?;
        Ok(Pty {
            master: Arc::new(p.master),
            slave: p.slave,
            path: path.display().to_string(),
        })
    }

    /// Puts the slave back in raw mode if a client changed it (`stty
    /// sane`, a program that exits without restoring its settings): with
    /// echo on, what the server writes would come back and go round.
    fn keep_raw(&self) {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let Ok(now) = tcgetattr(self.slave.as_fd()) else {
            return;
        };
        let mut raw = now.clone();
        cfmakeraw(&mut raw);
        let same = now.input_flags == raw.input_flags
            && now.output_flags == raw.output_flags
            && now.local_flags == raw.local_flags
            && now.control_flags == raw.control_flags;
        if !same {
            let _ = tcsetattr(self.slave.as_fd(), SetArg::TCSANOW, &raw);
        }
    }
}

/// Waits up to 100 ms for `fd` to be ready for `flags`.
fn ready(fd: &OwnedFd, flags: PollFlags) {
    let mut fds = [PollFd::new(fd.as_fd(), flags)];
    let _ = poll(&mut fds, PollTimeout::from(100u16));
}

/// Bytes typed into the PTY go to the serial line.
fn pty_to_line(master: &OwnedFd, serial: &MediatedSerial, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match nix::unistd::read(master.as_raw_fd(), &mut buf) {
            Ok(0) => ready(master, PollFlags::POLLIN),
            Ok(n) => {
                if serial.write(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {
                ready(master, PollFlags::POLLIN)
            }
            // EIO: no slave open (cannot happen while ours is); wait.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Bytes read from the serial line come out of the PTY.
fn line_to_pty(master: &OwnedFd, serial: &MediatedSerial, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let n = match serial.read(&mut buf, Duration::from_millis(100)) {
            Ok(n) => n,
            Err(_) => return,
        };
        let mut at = 0;
        while at < n && !stop.load(Ordering::SeqCst) {
            match nix::unistd::write(master, &buf[at..n]) {
                Ok(k) => at += k,
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {
                    ready(master, PollFlags::POLLOUT)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// The far end of the UART's line: every byte read is written back.
/// The socket buffer of the plug's line toward the UART (the kernel
/// doubles and rounds it): a cable holds a few bytes in flight.
const LINE_BUFFER: usize = 4096;

struct Plug {
    /// The end handed to the drivers' UARTs.
    line: Arc<File>,
    ours: UnixStream,
    bytes: Arc<AtomicU64>,
    /// Bytes the plug could not send back (the UART's side full).
    dropped: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Plug {
    fn start() -> std::io::Result<Plug> {
        let (ours, line) = UnixStream::pair()?;
        // Toward the UART a cable holds a few bytes, not a socket's 200
        // KiB: when the UART takes no more (its driver lends no reads, its
        // client does not read), the plug's echo backs up at once and is
        // dropped there, counted, as a device on a line without flow
        // control drops it. The plug never stops reading: what the UART
        // sends is always taken, so its driver never stalls on the line.
        {
            use nix::sys::socket::{setsockopt, sockopt};
            setsockopt(&ours, sockopt::SndBuf, &LINE_BUFFER)?;
            setsockopt(&line, sockopt::RcvBuf, &LINE_BUFFER)?;
        }
        let bytes = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut r = ours.try_clone()?;
        let w = ours.try_clone()?;
        let (b, d) = (bytes.clone(), dropped.clone());
        let thread = std::thread::Builder::new()
            .name("moat-plug".into())
            .spawn(move || {
                use nix::sys::socket::{send, MsgFlags};
                let mut buf = [0u8; 4096];
                loop {
                    let n = match r.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    b.fetch_add(n as u64, Ordering::SeqCst);
                    let mut at = 0;
                    while at < n {
                        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
                        match send(w.as_raw_fd(), &buf[at..n], flags) {
                            Ok(k) => at += k,
                            Err(nix::errno::Errno::EINTR) => {}
                            Err(nix::errno::Errno::EAGAIN) => {
                                d.fetch_add((n - at) as u64, Ordering::SeqCst);
                                break;
                            }
                            Err(_) => return,
                        }
                    }
                }
            })?;
        Ok(Plug {
            line: Arc::new(File::from(OwnedFd::from(line))),
            ours,
            bytes,
            dropped,
            thread: Some(thread),
        })
    }

    /// Stops echoing; the bytes that reached the plug, and those it
    /// dropped.
    fn stop(mut self) -> (u64, u64) {
        let _ = self.ours.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.bytes.load(Ordering::SeqCst),
            self.dropped.load(Ordering::SeqCst),
        )
    }
}

fn print_counters(c: &SerialCounters, at_plug: u64, w: &mut dyn Write) {
    let _ = writeln!(
        w,
        "bytes typed {}  acknowledged {}  re-issued {}  failed {}  at the plug {}  received {}",
        c.written, c.sent, c.reissued, c.write_failed, at_plug, c.received
    );
    let faults: u64 = c.violations.values().sum();
    let kinds: Vec<String> = c
        .violations
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(
        w,
        "restarts {}  faults seen {faults}: {}",
        c.restarts,
        kinds.join(", ")
    );
    if !c.recovery.is_empty() {
        let mut v = c.recovery.clone();
        v.sort();
        let _ = writeln!(
            w,
            "recovery time: median {:.2} ms, max {:.2} ms",
            v[v.len() / 2].as_secs_f64() * 1e3,
            v[v.len() - 1].as_secs_f64() * 1e3
        );
    }
}
