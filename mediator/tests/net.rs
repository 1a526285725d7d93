//! A mediated network interface: the `net-soft` driver picoprocess on
//! host-linux serving the net contract, its wire a TCP connection to a
//! device side this test plays; and the `virtio-net` driver on kvm, whose
//! device's wire is a datagram socket this test plays (a TAP stand-in: one
//! frame per datagram). Frames go both ways intact; with the driver
//! killed again and again while frames flow through a wire that echoes
//! them, no frame comes back twice or damaged, most come back, and every
//! kill is recovered from; a lying driver is caught and replaced; frames
//! the interface cannot carry are refused or dropped, never delivered.
use moat_mediator::block::{DriverSpec, SECTION};
use moat_mediator::net::{MediatedNet, NetConfig};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAC: &str = "02:6d:6f:61:74:01";

/// A frame: broadcast destination, our source, an experimental type, a
/// sequence number and a payload derived from it, padded to `len`.
fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0x6d, 0x6f, 0x61, 0x74, 0x01]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&seq.to_le_bytes());
    while f.len() < len {
        let i = f.len() as u32;
        f.push((seq.wrapping_mul(31) ^ i.wrapping_mul(7)) as u8);
    }
    f
}

/// The sequence number of an intact frame, `None` if it is damaged.
fn check(f: &[u8]) -> Option<u32> {
    if f.len() < 18 {
        return None;
    }
    let seq = u32::from_le_bytes(f[14..18].try_into().unwrap());
    (frame(seq, f.len()) == f).then_some(seq)
}

fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut n = [0u8; 2];
    s.read_exact(&mut n).ok()?;
    let mut f = vec![0u8; usize::from(u16::from_le_bytes(n))];
    s.read_exact(&mut f).ok()?;
    Some(f)
}

fn write_frame(s: &mut TcpStream, f: &[u8]) -> bool {
    let mut b = (f.len() as u16).to_le_bytes().to_vec();
    b.extend_from_slice(f);
    s.write_all(&b).is_ok()
}

/// The device side of the wire: accepts each driver's connection in turn
/// and runs `serve` on it; `got` collects what the drivers put on it.
struct Wire {
    port: u16,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    /// The current driver's connection, to send frames into it.
    conn: Arc<Mutex<Option<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Wire {
    fn new(echo: bool) -> Wire {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let conn: Arc<Mutex<Option<TcpStream>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, c, st) = (got.clone(), conn.clone(), stop.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut s) = s else { continue };
                *c.lock().unwrap() = s.try_clone().ok();
                let (g, st) = (g.clone(), st.clone());
                std::thread::spawn(move || {
                    while let Some(f) = read_frame(&mut s) {
                        if echo && !write_frame(&mut s, &f) {
                            break;
                        }
                        g.lock().unwrap().push(f);
                        if st.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                });
            }
        });
        Wire {
            port,
            got,
            conn,
            stop,
        }
    }

    fn spec(&self) -> DriverSpec {
        let uri = format!("tcp.client:127.0.0.1:{}", self.port);
        let mut policy = moat_policy::Policy::default();
        policy.limits.memory_mib = 64;
        policy.allow(&uri, moat_policy::Access::Rw).unwrap();
        DriverSpec {
            files: Vec::new(),
            image: moat_tests::built("net-soft"),
            args: vec![SECTION.into(), uri, MAC.into()],
            host: moat_monitor::Host::Linux,
            policy,
            faults: None,
            console: false,
        }
    }

    fn inject(&self, f: &[u8]) -> bool {
        let mut c = self.conn.lock().unwrap();
        c.as_mut().is_some_and(|s| write_frame(s, f))
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn frames_go_both_ways_intact() {
    if !moat_tests::sandbox_available() {
        return;
    }
    let wire = Wire::new(false);
    let nic = MediatedNet::start(wire.spec(), NetConfig::default()).unwrap();
    assert_eq!(nic.info().mac, [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x01]);
    assert_eq!(nic.info().mtu, 1500);
    // Out: every size from a bare header to the largest frame.
    let sizes = [14usize, 60, 61, 1000, 1514, 1518];
    for (i, &n) in sizes.iter().enumerate() {
        nic.send(&frame(i as u32, n.max(18))).unwrap();
    }
    wait_for(
        "frames never reached the wire",
        Duration::from_secs(10),
        || wire.got.lock().unwrap().len() == sizes.len(),
    );
    let got = wire.got.lock().unwrap().clone();
    for (i, f) in got.iter().enumerate() {
        assert_eq!(check(f), Some(i as u32), "frame {i} in order and intact");
    }
    // In.
    wait_for(
        "the driver never connected",
        Duration::from_secs(10),
        || wire.conn.lock().unwrap().is_some(),
    );
    for i in 0..50u32 {
        assert!(wire.inject(&frame(1000 + i, 60 + i as usize * 20)));
    }
    for i in 0..50u32 {
        let f = nic.recv(Duration::from_secs(10)).expect("a frame");
        assert_eq!(check(&f), Some(1000 + i));
    }
    // What the interface cannot carry: refused before the driver...
    assert!(nic.send(&[0u8; 13]).is_err());
    assert!(nic.send(&vec![0u8; 1519]).is_err());
    // ...or dropped by the driver (longer than the MTU allows).
    assert!(wire.inject(&frame(7, 3000)));
    assert!(wire.inject(&frame(8, 100)));
    let f = nic.recv(Duration::from_secs(10)).expect("a frame");
    assert_eq!(check(&f), Some(8), "the oversized frame was dropped");
    let c = nic.counters();
    assert_eq!(c.sent, sizes.len() as u64);
    assert_eq!(c.received, 51);
    assert_eq!(c.restarts, 0);
    assert!(c.violations.is_empty(), "{c:?}");
    nic.shutdown();
}

#[test]
fn killed_drivers_lose_frames_but_never_duplicate_or_damage_one() {
    if !moat_tests::sandbox_available() {
        return;
    }
    let wire = Wire::new(true);
    let nic = MediatedNet::start(wire.spec(), NetConfig::default()).unwrap();
    const FRAMES: u32 = 3000;
    const KILLS: u64 = 10;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (nic, seen, done) = (nic.clone(), seen.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Some(f) = nic.recv(Duration::from_millis(50)) {
                    let seq = check(&f).expect("a damaged frame came back");
                    assert!(
                        seen.lock().unwrap().insert(seq),
                        "frame {seq} came back twice"
                    );
                }
            }
        })
    };
    let mut kills = 0;
    for i in 0..FRAMES {
        nic.send(&frame(i, 64 + (i as usize % 1400))).unwrap();
        if i % (FRAMES / (KILLS as u32 + 1)) == FRAMES / (KILLS as u32 + 1) / 2 && kills < KILLS {
            nic.kill_driver();
            kills += 1;
        }
        if i % 32 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Let the last frames come back.
    wait_for("no frames came back", Duration::from_secs(20), || {
        seen.lock().unwrap().len() as u32 >= FRAMES / 2
    });
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    let c = nic.counters();
    nic.shutdown();
    let back = seen.lock().unwrap().len() as u32;
    eprintln!(
        "{back} of {FRAMES} frames came back; {} restarts, {} sends dropped, {} received, \
         violations {:?}, recovery {:?}",
        c.restarts, c.send_dropped, c.received, c.violations, c.recovery
    );
    assert!(c.restarts >= KILLS, "{c:?}");
    assert_eq!(c.violations.get("crash").copied(), Some(KILLS), "{c:?}");
    // Every driver after the first came from its template.
    assert_eq!(c.template, None, "{c:?}");
    assert_eq!(c.from_template, c.restarts, "{c:?}");
    assert!(back >= FRAMES / 2, "only {back} of {FRAMES} came back");
    // On the wire too, no frame twice.
    let on_wire = wire.got.lock().unwrap().clone();
    let mut once = HashSet::new();
    for f in &on_wire {
        let seq = check(f).expect("a damaged frame on the wire");
        assert!(once.insert(seq), "frame {seq} was put on the wire twice");
    }
}

/// The wire of a virtio-net device on kvm, played by this test: a
/// datagram socket pair, the device's end handed to each driver's VMM;
/// every frame that comes out is echoed back.
struct EchoDatagrams {
    device_end: Arc<std::fs::File>,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl EchoDatagrams {
    fn new() -> EchoDatagrams {
        let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Ends when the device's end is gone (every VMM and this
            // test's copy closed).
            while let Ok(n) = ours.recv(&mut buf) {
                g.lock().unwrap().push(buf[..n].to_vec());
                if ours.send(&buf[..n]).is_err() {
                    return;
                }
            }
        });
        let device_end = Arc::new(std::fs::File::from(std::os::fd::OwnedFd::from(theirs)));
        EchoDatagrams { device_end, got }
    }

    fn spec(&self) -> DriverSpec {
        let mut policy = moat_policy::Policy::default();
        policy.limits.memory_mib = 64;
        policy
            .add_device(moat_policy::DeviceSpec::parse("net0=virtio-net").unwrap())
            .unwrap();
        DriverSpec {
            files: vec![("net0".into(), self.device_end.clone())],
            image: moat_tests::built("virtio-net"),
            args: vec!["net0".into(), "serve".into(), SECTION.into()],
            host: moat_monitor::Host::Kvm,
            policy,
            faults: None,
            console: false,
        }
    }
}

#[test]
fn virtio_net_on_kvm_carries_frames_both_ways_across_kills() {
    if !moat_tests::sandbox_available() || !moat_tests::kvm_available() {
        return;
    }
    let wire = EchoDatagrams::new();
    let nic = MediatedNet::start(wire.spec(), NetConfig::default()).unwrap();
    assert_eq!(nic.info().mac[..3], [0x02, 0x6d, 0x6f]);
    assert_eq!(nic.info().mtu, 1500);
    let mut seen = HashSet::new();
    const FRAMES: u32 = 1000;
    for i in 0..FRAMES {
        nic.send(&frame(i, 60 + (i as usize * 7) % 1450)).unwrap();
        if i % 100 == 50 {
            nic.kill_driver();
        }
        while let Some(f) = nic.recv(Duration::ZERO) {
            let seq = check(&f).expect("a damaged frame came back");
            assert!(seen.insert(seq), "frame {seq} came back twice");
        }
        if i % 16 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        if let Some(f) = nic.recv(Duration::from_millis(100)) {
            let seq = check(&f).expect("a damaged frame came back");
            assert!(seen.insert(seq), "frame {seq} came back twice");
        }
    }
    // What the interface cannot carry is refused before the driver.
    assert!(nic.send(&[0u8; 13]).is_err());
    assert!(nic.send(&vec![0u8; 1519]).is_err());
    let c = nic.counters();
    nic.shutdown();
    eprintln!(
        "{} of {FRAMES} back; {} restarts ({} from the template), recovery {:?}",
        seen.len(),
        c.restarts,
        c.from_template,
        c.recovery
    );
    assert!(c.restarts >= 10, "{c:?}");
    assert_eq!(
        c.violations.get("crash").copied(),
        Some(c.restarts),
        "{c:?}"
    );
    assert_eq!(c.from_template, c.restarts, "{c:?}");
    assert!(
        seen.len() as u32 >= FRAMES / 2,
        "only {} of {FRAMES} came back",
        seen.len()
    );
    // On the wire too, no frame twice, none damaged.
    let mut once = HashSet::new();
    for f in wire.got.lock().unwrap().iter() {
        let seq = check(f).expect("a damaged frame on the wire");
        assert!(once.insert(seq), "frame {seq} was put on the wire twice");
    }
}

#[test]
fn a_lying_driver_is_caught_and_replaced_and_no_frame_is_duplicated() {
    if !moat_tests::sandbox_available() {
        return;
    }
    let wire = Wire::new(true);
    lying(wire.spec());
}

#[test]
fn a_lying_virtio_net_driver_on_kvm_is_caught_and_replaced() {
    if !moat_tests::sandbox_available() || !moat_tests::kvm_available() {
        return;
    }
    let wire = EchoDatagrams::new();
    lying(wire.spec());
}

fn lying(mut spec: DriverSpec) {
    spec.faults = Some(moat_mediator::block::FaultPlan {
        seed: 0x6e6574,
        per_million: 6000,
        kinds: "crash,double,wrong-id,bad-status,outside-pool,wrong-buf,flood,bad-index,hang"
            .into(),
    });
    let config = NetConfig {
        deadline: Duration::from_millis(300),
        ..NetConfig::default()
    };
    let nic = MediatedNet::start(spec, config).unwrap();
    // Frames until enough faults were caught (or a time limit).
    let mut seen = HashSet::new();
    let mut sent = 0u32;
    let t0 = Instant::now();
    let enough = |c: &moat_mediator::net::NetCounters| c.restarts >= 10 && c.violations.len() >= 4;
    while !enough(&nic.counters()) && t0.elapsed() < Duration::from_secs(60) {
        nic.send(&frame(sent, 60 + (sent as usize % 900))).unwrap();
        sent += 1;
        while let Some(f) = nic.recv(Duration::ZERO) {
            let seq = check(&f).expect("a damaged frame came back");
            assert!(seen.insert(seq), "frame {seq} came back twice");
        }
        if sent.is_multiple_of(16) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        if let Some(f) = nic.recv(Duration::from_millis(100)) {
            let seq = check(&f).expect("a damaged frame came back");
            assert!(seen.insert(seq), "frame {seq} came back twice");
        }
    }
    let c = nic.counters();
    nic.shutdown();
    eprintln!(
        "{} of {sent} back; {} restarts, violations {:?}, {} sends lost",
        seen.len(),
        c.restarts,
        c.violations,
        c.send_dropped
    );
    let kinds = c.violations.len();
    assert!(
        kinds >= 4,
        "only {kinds} kinds of fault seen: {:?}",
        c.violations
    );
    assert!(c.restarts >= 10, "{c:?}");
    assert_eq!(c.from_template, 0, "faults: drivers boot");
    // A network may lose frames: here to faults, to restarts, and to the
    // send queue filling while a hung driver waits for its deadline (the
    // sender does not slow down). Frames still flow.
    assert!(!seen.is_empty(), "nothing came back of {sent}");
}

/// The software NIC's wire answers only the driver: a connection that
/// does not start with its token is closed, one that does is kept.
#[test]
fn the_wire_turns_away_a_connection_without_the_token() {
    use moat_mediator::net::export::{new_token, preamble, Wire};
    use moat_mediator::net::tap;
    if !moat_tests::root::is_root() || moat_tests::root::find_tool("ip").is_none() {
        assert!(
            std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_none(),
            "MOAT_REQUIRE_ROOT_TOOLS is set but the wire test needs root and ip"
        );
        return;
    }
    let ns = format!("moat-w{}", std::process::id());
    let _ = moat_tests::root::run("ip", &["netns", "del", &ns]);
    assert!(moat_tests::root::run("ip", &["netns", "add", &ns])
        .status
        .success());
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = moat_tests::root::run("ip", &["netns", "del", &self.0]);
        }
    }
    let _del = Del(ns.clone());
    let token = new_token().unwrap();
    assert_eq!(token.len(), 32);
    let wire = Wire::start(tap::create_in(&ns, "moat0").unwrap(), &token).unwrap();
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", wire.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    };
    // Closed (end of file) within the wire's second, whatever it sent.
    let closed = |mut s: TcpStream| {
        let t = Instant::now();
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) if t.elapsed() < Duration::from_secs(3) => {}
                Err(_) => return false,
            }
        }
    };
    let mut wrong = connect();
    wrong.write_all(&preamble(&"0".repeat(32))).unwrap();
    assert!(closed(wrong), "a wrong token was let in");
    let silent = connect();
    assert!(closed(silent), "a connection that says nothing was kept");
    let mut right = connect();
    right.write_all(&preamble(&token)).unwrap();
    assert!(!closed(right), "the driver's token was turned away");
}
