//! A mediated serial line on kvm (the UART exists only there): the
//! `uart-driver` picoprocess serving the char contract, its UART's line a
//! socket pair whose far end this test holds as a loopback plug (every
//! byte it reads is written back). Numbered lines typed one at a time come
//! back in order while the driver is killed again and again, and while a
//! driver lies (its lies caught as violations) or hangs (caught by a
//! write's deadline); a line whose echo was lost
//! with a killed driver (bytes the driver or the UART held: the documented
//! loss) is typed again after a timeout. Every byte written reaches the
//! plug, none more than the re-issued ones twice.
use moat_mediator::block::{DriverSpec, FaultPlan, SECTION};
use moat_mediator::serial::{MediatedSerial, SerialConfig};
use moat_tests::typing::type_lines;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn kvm() -> bool {
    if !moat_tests::kvm_available() || !moat_tests::sandbox_available() {
        eprintln!("skipping: no /dev/kvm (set MOAT_REQUIRE_KVM=1 to fail instead)");
        return false;
    }
    true
}

/// The far end of the UART's line: echoes every byte back, counting.
struct Plug {
    line: Arc<File>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    ours: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Plug {
    fn new() -> Plug {
        let (ours, line) = UnixStream::pair().unwrap();
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (mut r, b, st) = (ours.try_clone().unwrap(), bytes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut w = r.try_clone().unwrap();
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::SeqCst) {
                let n = match r.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                b.fetch_add(n as u64, Ordering::SeqCst);
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
        Plug {
            line: Arc::new(File::from(OwnedFd::from(line))),
            bytes,
            stop,
            ours,
            thread: Some(thread),
        }
    }

    fn spec(&self, faults: Option<FaultPlan>) -> DriverSpec {
        let mut policy = moat_policy::Policy::default();
        policy.limits.memory_mib = 64;
        policy
            .add_device(moat_policy::DeviceSpec::parse("com1=uart").unwrap())
            .unwrap();
        DriverSpec {
            image: moat_tests::built("uart-driver"),
            args: vec!["com1".into(), "serve".into(), SECTION.into()],
            host: moat_monitor::Host::Kvm,
            policy,
            faults,
            console: false,
            files: vec![("com1".into(), self.line.clone())],
        }
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.ours.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Types `n` lines through `s`, running `between` after each echo.
fn type_through(
    s: &MediatedSerial,
    n: usize,
    between: impl FnMut(usize),
) -> moat_tests::typing::Typed {
    type_lines(
        n,
        Duration::from_secs(3),
        5,
        |b| assert_eq!(s.write(b).unwrap(), b.len()),
        |buf, limit| s.read(buf, limit).unwrap(),
        between,
    )
}

#[test]
fn lines_come_back_in_order() {
    if !kvm() {
        return;
    }
    let plug = Plug::new();
    let config = SerialConfig {
        // Nothing fails here: a deadline no busy machine's stall reaches.
        deadline: Duration::from_secs(10),
        ..SerialConfig::default()
    };
    let s = MediatedSerial::start(plug.spec(None), config).unwrap();
    let t = type_through(&s, 40, |_| {});
    let v = t.check();
    assert_eq!((v.whole, v.damaged, t.retyped), (40, 0, 0), "{v:?}");
    // Nothing comes that was not sent: a quiet read returns nothing.
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b, Duration::from_millis(300)).unwrap(), 0);
    assert!(s.flush(Duration::from_secs(5)));
    let c = s.counters();
    assert_eq!(c.written, t.bytes_typed as u64);
    assert_eq!(c.sent, c.written, "{c:?}");
    assert_eq!(c.received, c.written, "{c:?}");
    assert_eq!(plug.bytes.load(Ordering::SeqCst), c.written);
    assert_eq!(c.restarts, 0);
    assert!(c.violations.is_empty(), "{c:?}");
    s.shutdown();
}

#[test]
fn a_silent_line_is_no_fault() {
    if !kvm() {
        return;
    }
    let plug = Plug::new();
    let config = SerialConfig {
        deadline: Duration::from_millis(300),
        ..SerialConfig::default()
    };
    let s = MediatedSerial::start(plug.spec(None), config).unwrap();
    // Reads are lent all along, without a deadline: five deadlines of
    // silence end no driver.
    std::thread::sleep(Duration::from_millis(1500));
    let c = s.counters();
    assert_eq!(c.restarts, 0, "{c:?}");
    assert!(c.violations.is_empty(), "{c:?}");
    // And the driver still serves.
    type_through(&s, 3, |_| {}).check();
    s.shutdown();
}

/// Kills each driver 150 ms after it came up, from another thread, while
/// lines flow.
fn typed_under_kills(templates: bool) {
    let plug = Plug::new();
    let config = SerialConfig {
        templates,
        // Kills are what is tested here: a deadline long enough that a
        // busy machine's stalls are not taken for a hung driver (the hang
        // test below covers deadlines).
        deadline: Duration::from_secs(10),
        ..SerialConfig::default()
    };
    let s = MediatedSerial::start(plug.spec(None), config).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut kills = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // The last kill's replacement is up (or it is the first).
                while s.restarts() < kills && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                std::thread::sleep(Duration::from_millis(150));
                s.kill_driver();
                kills += 1;
            }
            kills
        })
    };
    let t0 = Instant::now();
    // Keep typing for 2 s at least: at least 5 kills on a busy machine.
    let mut n = 0;
    let mut typed = Vec::new();
    while n < 40 || t0.elapsed() < Duration::from_millis(2000) {
        let t = type_through(&s, 20, |_| {});
        typed.push(t);
        n += 20;
        assert!(n <= 2000, "typing never took 2 s");
    }
    stop.store(true, Ordering::SeqCst);
    let kills = killer.join().unwrap();
    let mut retyped = 0;
    let mut damaged = 0;
    for t in &typed {
        let v = t.check();
        retyped += t.retyped;
        damaged += v.damaged;
    }
    assert!(s.flush(Duration::from_secs(10)));
    let c = s.counters();
    eprintln!(
        "{kills} kills, {n} lines, {retyped} typed again, {damaged} damaged; {c:?}, plug {}",
        plug.bytes.load(Ordering::SeqCst)
    );
    assert!(c.restarts >= 5, "{c:?}");
    let typed_bytes: usize = typed.iter().map(|t| t.bytes_typed).sum();
    assert_eq!(c.written, typed_bytes as u64);
    assert_eq!(c.sent, c.written, "every byte written was acknowledged");
    // At least once toward the UART: every byte reached the plug, and
    // only re-issued ones may have reached it twice.
    let at_plug = plug.bytes.load(Ordering::SeqCst);
    assert!(at_plug >= c.written, "{at_plug} < {}", c.written);
    assert!(at_plug <= c.written + c.reissued, "{c:?}, plug {at_plug}");
    assert_eq!(
        c.violations.keys().copied().collect::<Vec<_>>(),
        vec!["crash"],
        "kills are crashes, nothing else: {c:?}"
    );
    if templates {
        assert!(c.from_template > 0 || c.template.is_some(), "{c:?}");
    }
    s.shutdown();
}

#[test]
fn lines_come_back_in_order_across_kills() {
    if !kvm() {
        return;
    }
    typed_under_kills(false);
}

#[test]
fn lines_come_back_in_order_across_kills_from_a_template() {
    if !kvm() {
        return;
    }
    typed_under_kills(true);
}

#[test]
fn a_lying_driver_is_caught_and_replaced() {
    if !kvm() {
        return;
    }
    let plug = Plug::new();
    let faults = FaultPlan {
        seed: 11,
        per_million: 60_000,
        kinds: "double,wrong-id,bad-status,outside-pool,wrong-buf,bad-index,crash".into(),
    };
    let config = SerialConfig {
        max_failed_restarts: 20,
        ..SerialConfig::default()
    };
    let s = MediatedSerial::start(plug.spec(Some(faults)), config).unwrap();
    let t = type_through(&s, 80, |_| {});
    t.check();
    assert!(s.flush(Duration::from_secs(10)));
    let c = s.counters();
    eprintln!("{} typed again; {c:?}", t.retyped);
    let caught: u64 = c.violations.values().sum();
    assert!(caught >= 3, "the faults were not caught: {c:?}");
    assert_eq!(
        caught, c.restarts,
        "every violation replaced the driver: {c:?}"
    );
    assert!(
        c.violations.keys().any(|k| *k != "crash"),
        "lies were seen, not only crashes: {c:?}"
    );
    assert_eq!(c.sent, c.written, "{c:?}");
    assert!(plug.bytes.load(Ordering::SeqCst) >= c.written);
    assert!(s.failed().is_none());
    s.shutdown();
}

#[test]
fn a_driver_that_stops_answering_writes_is_replaced() {
    if !kvm() {
        return;
    }
    let plug = Plug::new();
    let faults = FaultPlan {
        seed: 3,
        per_million: 50_000,
        kinds: "hang".into(),
    };
    let config = SerialConfig {
        deadline: Duration::from_millis(300),
        max_failed_restarts: 20,
        ..SerialConfig::default()
    };
    let s = MediatedSerial::start(plug.spec(Some(faults)), config).unwrap();
    let t = type_through(&s, 60, |_| {});
    t.check();
    assert!(s.flush(Duration::from_secs(10)));
    let c = s.counters();
    eprintln!("{} typed again; {c:?}", t.retyped);
    // A hung driver is found out by the next write's deadline (a read
    // has none: a silent line is no fault).
    assert!(
        c.violations.get("deadline").is_some_and(|&n| n > 0),
        "{c:?}"
    );
    assert_eq!(c.sent, c.written, "{c:?}");
    assert!(s.failed().is_none());
    s.shutdown();
}
