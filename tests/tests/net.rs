//! A NIC driver picoprocess behind a real interface (`moat serve --nic
//! IFNAME --wire-netns NS`), in two network namespaces this test makes:
//! the server and its interface in one (the client side), the wire's
//! interface `moat0` in the other (the network). On host-linux the
//! driver is `net-soft`; on kvm it is `virtio-net` (virtio-drivers'
//! driver on the VMM's virtio-net device, whose wire is `moat0`). On both:
//! ping goes both ways; 64 MiB over TCP arrive intact while the driver is
//! killed every 40 ms, the connection never reset; a UDP flood is dropped,
//! not hung on; bad input is refused with exit 2 and leaves no interface
//! behind.
use moat_tests::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether this machine can run these tests (root, `ip`, `ping`).
fn can_run() -> bool {
    let missing = if !root::is_root() {
        Some("not root")
    } else if root::find_tool("ip").is_none() {
        Some("no ip (package iproute2)")
    } else if root::find_tool("ping").is_none() {
        Some("no ping (package iputils-ping)")
    } else if !std::path::Path::new("/dev/net/tun").exists() {
        Some("no /dev/net/tun")
    } else {
        None
    };
    match missing {
        None => sandbox_available(),
        Some(why) => {
            assert!(
                std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_none(),
                "MOAT_REQUIRE_ROOT_TOOLS is set but the NIC tests cannot run: {why}"
            );
            eprintln!("skipping the NIC tests: {why}");
            false
        }
    }
}

fn ip(args: &[&str]) {
    let out = root::run("ip", args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("moat-t{}-{tag}", std::process::id());
        let _ = root::run("ip", &["netns", "del", &name]);
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    /// Runs `f` on a thread inside this namespace (its sockets stay there).
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: setns on an open namespace descriptor changes only
            // this thread's network namespace.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = root::run("ip", &["netns", "del", &self.0]);
    }
}

/// `moat serve --nic` running in `client`'s namespace, its output in a
/// file.
struct Server {
    /// Ended if it still runs when the test fails half-way.
    child: Reaped,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(client: &Netns, wire: &Netns, ifname: &str, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            client.0.clone(),
            built("moat").display().to_string(),
            "serve".into(),
            "--nic".into(),
            ifname.into(),
            "--wire-netns".into(),
            wire.0.clone(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(root::find_tool("ip").unwrap())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        let s = Server {
            child: Reaped(child),
            out,
            _dir: dir,
        };
        let t = Instant::now();
        while !s.output().contains("serving a NIC") {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the server did not start: {}",
                std::fs::read_to_string(s.out.with_extension("err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Stops it (SIGTERM); its exit code and output.
    fn stop(mut self) -> (i32, String) {
        // SAFETY: kill on a child's pid that has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s.code().unwrap_or(-1), self.output());
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the server did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Two namespaces joined through `moat serve --nic`, addressed
/// 10.N.0.1 (client side, on IFNAME) and 10.N.0.2 (the wire's moat0).
fn link(n: u8, extra: &[&str]) -> (Netns, Netns, Server, String) {
    let a = Netns::new(&format!("{n}a"));
    let b = Netns::new(&format!("{n}b"));
    let ifname = format!("mt{}x{n}", std::process::id() % 100_000);
    let srv = Server::start(&a, &b, &ifname, extra);
    let (ca, cb) = (format!("10.{n}.0.1/24"), format!("10.{n}.0.2/24"));
    ip(&["-n", &a.0, "addr", "add", &ca, "dev", &ifname]);
    ip(&["-n", &a.0, "link", "set", &ifname, "up"]);
    ip(&["-n", &b.0, "addr", "add", &cb, "dev", "moat0"]);
    ip(&["-n", &b.0, "link", "set", "moat0", "up"]);
    (a, b, srv, ifname)
}

fn ping(from: &Netns, to: &str) {
    let out = root::run(
        "ip",
        &[
            "netns", "exec", &from.0, "ping", "-c", "3", "-i", "0.2", "-W", "3", to,
        ],
    );
    assert!(
        out.status.success(),
        "ping {to} from {}: {}{}",
        from.0,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 64-bit FNV-1a of the bytes.
fn fnv(h: &mut u64, b: &[u8]) {
    for &x in b {
        *h ^= u64::from(x);
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

/// The kvm host's arguments, or `None` where there is no KVM (a failure
/// under `MOAT_REQUIRE_KVM`).
fn kvm() -> Option<&'static [&'static str]> {
    kvm_available().then_some(&["--host", "kvm"][..])
}

#[test]
fn ping_goes_both_ways_through_the_driver() {
    if can_run() {
        // net-soft reports the MAC address it is given.
        ping_both_ways(71, &[], "link/ether 02:6d:6f:61:74:01");
    }
}

#[test]
fn ping_goes_both_ways_through_virtio_net_on_kvm() {
    if let (true, Some(host)) = (can_run(), kvm()) {
        // The virtio-net device's address: 02:6d:6f and a hash of its name.
        ping_both_ways(75, host, "link/ether 02:6d:6f:");
    }
}

fn ping_both_ways(n: u8, host: &[&str], mac: &str) {
    let (a, b, srv, ifname) = link(n, host);
    let (to_b, to_a) = (format!("10.{n}.0.2"), format!("10.{n}.0.1"));
    // The interface is the NIC: the driver's MAC address and MTU.
    let l = root::run("ip", &["-n", &a.0, "link", "show", &ifname]);
    let l = String::from_utf8_lossy(&l.stdout).into_owned();
    assert!(l.contains(mac), "{l}");
    assert!(l.contains("mtu 1500"), "{l}");
    ping(&a, &to_b);
    ping(&b, &to_a);
    let (code, out) = srv.stop();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("restarts 0"), "{out}");
    // Nothing left behind.
    let gone = root::run("ip", &["-n", &a.0, "link", "show", &ifname]);
    assert!(!gone.status.success(), "{ifname} is still there");
    let gone = root::run("ip", &["-n", &b.0, "link", "show", "moat0"]);
    assert!(!gone.status.success(), "moat0 is still there");
}

#[test]
fn tcp_carries_64_mib_intact_while_the_driver_is_killed() {
    if can_run() {
        tcp_under_kills(72, &[]);
    }
}

#[test]
fn tcp_carries_64_mib_intact_while_virtio_net_is_killed_on_kvm() {
    if let (true, Some(host)) = (can_run(), kvm()) {
        tcp_under_kills(76, host);
    }
}

fn tcp_under_kills(n: u8, host: &[&str]) {
    let mut extra = vec!["--kill-every", "40"];
    extra.extend_from_slice(host);
    let out = tcp_through(n, &extra, 64 << 20);
    let restarts: u64 = out
        .split("restarts ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(restarts >= 10, "only {restarts} restarts: {out}");
}

#[test]
fn lying_drivers_are_caught_and_tcp_carries_on() {
    if can_run() {
        faulty(78, &[]);
    }
}

#[test]
fn lying_virtio_net_drivers_are_caught_and_tcp_carries_on_on_kvm() {
    if let (true, Some(host)) = (can_run(), kvm()) {
        faulty(79, host);
    }
}

/// Drivers that lie (`--faults`: completions for buffers they were not
/// lent, twice, with another id, a bad status, frames of a wrong length,
/// crashes) are caught and replaced; 8 MiB over TCP arrive intact.
fn faulty(n: u8, host: &[&str]) {
    let mut extra = vec![
        "--faults",
        "11:3000:crash,double,wrong-id,bad-status,wrong-len,wrong-buf,outside-pool",
        "--deadline-ms",
        "300",
    ];
    extra.extend_from_slice(host);
    let out = tcp_through(n, &extra, 8 << 20);
    let kinds = out
        .split("faults seen ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .and_then(|s| s.split(": ").nth(1))
        .map_or(0, |s| s.split(", ").filter(|k| !k.is_empty()).count());
    assert!(kinds >= 4, "only {kinds} kinds of fault caught: {out}");
}

/// `size` bytes over TCP through `moat serve --nic` started with
/// `extra`, checksummed at both ends, the connection never reset; the
/// server's output.
fn tcp_through(n: u8, extra: &[&str], size: usize) -> String {
    let (a, b, srv, _) = link(n, extra);
    let to: std::net::SocketAddr = format!("10.{n}.0.2:5001").parse().unwrap();
    let listener = b
        .run(move || TcpListener::bind(to).unwrap())
        .join()
        .unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut n = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = c.read(&mut buf).expect("the connection was reset");
            if k == 0 {
                break;
            }
            fnv(&mut h, &buf[..k]);
            n += k;
        }
        c.write_all(&h.to_le_bytes()).unwrap();
        (n, h)
    });
    let t0 = Instant::now();
    let sender = a.run(move || {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 1 << 16];
        for _ in 0..size / chunk.len() {
            for w in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            c.write_all(&chunk).expect("the connection was reset");
            fnv(&mut h, &chunk);
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut back = [0u8; 8];
        c.read_exact(&mut back).expect("no checksum came back");
        (h, u64::from_le_bytes(back))
    });
    let (sent, echoed) = sender.join().unwrap();
    let (n, got) = receiver.join().unwrap();
    let took = t0.elapsed();
    let (code, out) = srv.stop();
    eprintln!("{n} bytes in {took:?}; {out}");
    assert_eq!(n, size);
    assert_eq!(got, sent, "the receiver's checksum");
    assert_eq!(echoed, sent, "the checksum came back");
    assert_eq!(code, 0, "{out}");
    out
}

#[test]
fn bad_nic_requests_are_refused_and_leave_nothing() {
    if !can_run() {
        return;
    }
    let a = Netns::new("73a");
    let b = Netns::new("73b");
    let moat_in = |args: &[&str]| {
        let mut all = vec!["netns", "exec", &a.0];
        let m = built("moat").display().to_string();
        let m: &'static str = Box::leak(m.into_boxed_str());
        all.push(m);
        all.extend_from_slice(args);
        root::run("ip", &all)
    };
    let code = |o: &std::process::Output| o.status.code().unwrap_or(-1);
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // An interface that exists (lo), a name too long, a namespace that
    // does not exist, a driver that is not a NIC's, virtio-net without
    // the kvm host.
    for (args, says) in [
        (
            vec!["serve", "--nic", "lo", "--wire-netns", &b.0],
            "exists already",
        ),
        (
            vec![
                "serve",
                "--nic",
                "a-name-far-too-long",
                "--wire-netns",
                &b.0,
            ],
            "1 to 15 bytes",
        ),
        (
            vec!["serve", "--nic", "mtq0", "--wire-netns", "moat-no-such-ns"],
            "no network namespace",
        ),
        (
            vec![
                "serve",
                "--nic",
                "mtq0",
                "--wire-netns",
                &b.0,
                "--driver",
                "virtio-blk",
            ],
            "unknown NIC driver",
        ),
        (
            vec![
                "serve",
                "--nic",
                "mtq0",
                "--wire-netns",
                &b.0,
                "--driver",
                "virtio-net",
            ],
            "add --host kvm",
        ),
    ] {
        let o = moat_in(&args);
        assert_eq!(code(&o), 2, "{args:?}: {}", err(&o));
        assert!(err(&o).contains(says), "{args:?}: {}", err(&o));
        assert_eq!(err(&o).trim().lines().count(), 1, "one line: {}", err(&o));
    }
    // The wire's namespace is needed (the argument parser says so).
    let o = moat_in(&["serve", "--nic", "mtq0"]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("--wire-netns"), "{}", err(&o));
    // A wire interface that exists already in the network's namespace.
    ip(&["-n", &b.0, "tuntap", "add", "dev", "moat0", "mode", "tap"]);
    let o = moat_in(&["serve", "--nic", "mtq0", "--wire-netns", &b.0]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("exists already"), "{}", err(&o));
    // Without the capabilities (as nobody): refused, nothing made.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("moat");
    std::fs::copy(built("moat"), &copy).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(&copy);
    cmd.args(["serve", "--nic", "mtq0", "--wire-netns", &b.0]);
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls, on
    // integers: the child drops to nobody (and so every capability).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(65534, 65534, 65534) != 0
                || libc::setresuid(65534, 65534, 65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let o = cmd.output().unwrap();
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("run as root"), "{}", err(&o));
    assert_eq!(err(&o).trim().lines().count(), 1, "one line: {}", err(&o));
    // Nothing was made in either namespace.
    for ns in [&a.0, &b.0] {
        let l = root::run("ip", &["-n", ns, "-o", "link", "show"]);
        let links = String::from_utf8_lossy(&l.stdout).into_owned();
        assert!(!links.contains("mtq0"), "{links}");
    }
}

#[test]
fn a_udp_flood_is_dropped_not_hung_on() {
    if can_run() {
        udp_flood(74, &[]);
    }
}

#[test]
fn a_udp_flood_through_virtio_net_is_dropped_not_hung_on_on_kvm() {
    if let (true, Some(host)) = (can_run(), kvm()) {
        udp_flood(77, host);
    }
}

fn udp_flood(n: u8, host: &[&str]) {
    let (a, b, srv, _) = link(n, host);
    let (to_b, from_a) = (format!("10.{n}.0.2"), format!("10.{n}.0.1:0"));
    // Addresses resolved first: the flood starts at once.
    ping(&a, &to_b);
    const SENT: usize = 100_000;
    let sock = b
        .run(move || {
            let s = std::net::UdpSocket::bind(format!("10.{n}.0.2:5002")).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        })
        .join()
        .unwrap();
    let receiver = std::thread::spawn(move || {
        let mut n = 0usize;
        let mut buf = vec![0u8; 2048];
        while sock.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    });
    let t0 = Instant::now();
    let dest = format!("{to_b}:5002");
    a.run(move || {
        let s = std::net::UdpSocket::bind(from_a).unwrap();
        let payload = vec![0x5au8; 1400];
        for _ in 0..SENT {
            // A full queue drops, as the kernel does; never blocks long.
            let _ = s.send_to(&payload, dest.as_str());
        }
    })
    .join()
    .unwrap();
    let sent_in = t0.elapsed();
    let got = receiver.join().unwrap();
    eprintln!("{SENT} datagrams sent in {sent_in:?}, {got} received");
    assert!(got > 0, "nothing got through");
    assert!(got <= SENT);
    // The interface still works, and the server stops cleanly.
    ping(&a, &to_b);
    let (code, out) = srv.stop();
    assert_eq!(code, 0, "{out}");
    eprintln!("{out}");
}
