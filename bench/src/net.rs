//! `net`: a NIC driver picoprocess between two network namespaces (`moat
//! serve --nic`, host-linux: the client's interface, the mediator, the
//! `net-soft` driver, its wire to `moat0`) against a veth pair between
//! two other namespaces (the floor), in the same run:
//!
//! - `net.tcp.throughput`: one TCP stream, MB/s;
//! - `net.tcp.rr1`: 1-byte request/response over TCP, µs per round trip;
//! - `net.recovery`: the link's recovery after a kill (kill to a new
//!   driver serving), median ms, from the mediator's counters;
//! - the same on kvm (`net.kvm.*`: the `virtio-net` driver on the VMM's
//!   virtio-net device, whose wire is `moat0`), with
//!   `net.kvm.exits_per_frame`: the VM exits of the driver's VMMs per
//!   frame moved, from the VMM's statistics page.
//!
//! Needs root, `ip`, and `/dev/net/tun`; skips otherwise (fails with
//! `MOAT_REQUIRE_ROOT_TOOLS`).
use crate::{image, note, row};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Result<Netns, String> {
        let name = format!("moat-b{}-{tag}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let n = Netns(name);
        ip(&["-n", &n.0, "link", "set", "lo", "up"])?;
        Ok(n)
    }

    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("the namespace");
            // SAFETY: setns on an open namespace descriptor changes only
            // this thread's network namespace.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("a thread in a namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn missing() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("root");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("ip (iproute2)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun");
    }
    None
}

pub(crate) fn bench(quick: bool) {
    if let Some(what) = missing() {
        if std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_some() {
            eprintln!("moat-bench net: needs {what} (MOAT_REQUIRE_ROOT_TOOLS is set)");
            std::process::exit(1);
        }
        note(&format!("net: skipped, needs {what}"));
        return;
    }
    if let Err(e) = run(quick) {
        eprintln!("moat-bench net: {e}");
        std::process::exit(1);
    }
}

/// MB/s of one TCP stream of `bytes` from `from` to `to_addr` (in `to`),
/// and µs per 1-byte round trip (`n` of them).
fn measure(from: &Netns, to: &Netns, to_addr: &str, bytes: usize, n: u32) -> (f64, f64) {
    let addr = format!("{to_addr}:5003");
    let l = to.run({
        let a = addr.clone();
        move || TcpListener::bind(a).expect("bind")
    });
    let sink = std::thread::spawn(move || {
        let (mut c, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        while c.read(&mut buf).map(|k| k > 0).unwrap_or(false) {}
        drop(c);
        let (mut c, _) = l.accept().expect("accept");
        c.set_nodelay(true).unwrap();
        let mut b = [0u8; 1];
        while c.read_exact(&mut b).is_ok() {
            if c.write_all(&b).is_err() {
                break;
            }
        }
    });
    let (mbs, us) = from.run(move || {
        let a: std::net::SocketAddr = addr.parse().unwrap();
        let mut c = TcpStream::connect_timeout(&a, Duration::from_secs(10)).expect("connect");
        let chunk = vec![0xa5u8; 1 << 16];
        let t = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            c.write_all(&chunk).expect("send");
            sent += chunk.len();
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut b = [0u8; 1];
        let _ = c.read(&mut b);
        let mbs = sent as f64 / t.elapsed().as_secs_f64() / 1e6;
        let mut c = TcpStream::connect_timeout(&a, Duration::from_secs(10)).expect("connect");
        c.set_nodelay(true).unwrap();
        let mut b = [7u8; 1];
        let t = Instant::now();
        for _ in 0..n {
            c.write_all(&b).unwrap();
            c.read_exact(&mut b).unwrap();
        }
        (mbs, t.elapsed().as_secs_f64() * 1e6 / f64::from(n))
    });
    let _ = sink.join();
    (mbs, us)
}

/// `moat serve --nic` between `a` and `b`, ready.
fn serve(
    a: &Netns,
    b: &Netns,
    ifname: &str,
    extra: &[&str],
) -> Result<(Child, std::path::PathBuf), String> {
    let out = std::env::temp_dir().join(format!("moat-bench-net-{}-{ifname}", std::process::id()));
    let mut args = vec![
        "netns".to_string(),
        "exec".into(),
        a.0.clone(),
        image("moat").display().to_string(),
        "serve".into(),
        "--nic".into(),
        ifname.into(),
        "--wire-netns".into(),
        b.0.clone(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).map_err(|e| e.to_string())?)
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("serving a NIC")
    {
        if t.elapsed() > Duration::from_secs(20) {
            return Err("moat serve --nic did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, out))
}

fn stop(mut child: Child, out: &std::path::Path) -> String {
    // SAFETY: kill on our own child's pid, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let s = std::fs::read_to_string(out).unwrap_or_default();
    let _ = std::fs::remove_file(out);
    s
}

fn run(quick: bool) -> Result<(), String> {
    let (bytes, n) = if quick {
        (16 << 20, 500)
    } else {
        (512 << 20, 20_000)
    };
    let kvm = std::path::Path::new("/dev/kvm").exists();
    // The floor: a veth pair.
    let fa = Netns::new("fa")?;
    let fb = Netns::new("fb")?;
    ip(&[
        "-n", &fa.0, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &fb.0,
    ])?;
    ip(&["-n", &fa.0, "addr", "add", "10.81.0.1/24", "dev", "va"])?;
    ip(&["-n", &fb.0, "addr", "add", "10.81.0.2/24", "dev", "vb"])?;
    ip(&["-n", &fa.0, "link", "set", "va", "up"])?;
    ip(&["-n", &fb.0, "link", "set", "vb", "up"])?;
    let (floor_mbs, floor_us) = measure(&fa, &fb, "10.81.0.2", bytes, n);
    let (ma, mb) = (Netns::new("ma")?, Netns::new("mb")?);
    through(&ma, &mb, "", &[], bytes, n, (floor_mbs, floor_us), quick)?;
    if kvm {
        let (ka, kb) = (Netns::new("ka")?, Netns::new("kb")?);
        through(
            &ka,
            &kb,
            ".kvm",
            &["--host", "kvm"],
            bytes,
            n,
            (floor_mbs, floor_us),
            quick,
        )?;
    } else {
        note("net.kvm: skipped, no /dev/kvm");
    }
    Ok(())
}

/// The rows through a driver picoprocess (`moat serve --nic` with
/// `host`), named `net{tag}.*`, against the floor's figures.
#[allow(clippy::too_many_arguments)]
fn through(
    ma: &Netns,
    mb: &Netns,
    tag: &str,
    host: &[&str],
    bytes: usize,
    n: u32,
    (floor_mbs, floor_us): (f64, f64),
    quick: bool,
) -> Result<(), String> {
    let subnet = if tag.is_empty() { 82 } else { 83 };
    let ifname = format!("mb{}{}", std::process::id() % 100_000, tag.len());
    let (child, out) = serve(ma, mb, &ifname, host)?;
    let (ca, cb) = (format!("10.{subnet}.0.1/24"), format!("10.{subnet}.0.2/24"));
    ip(&["-n", &ma.0, "addr", "add", &ca, "dev", &ifname])?;
    ip(&["-n", &ma.0, "link", "set", &ifname, "up"])?;
    ip(&["-n", &mb.0, "addr", "add", &cb, "dev", "moat0"])?;
    ip(&["-n", &mb.0, "link", "set", "moat0", "up"])?;
    let (mbs, us) = measure(ma, mb, &format!("10.{subnet}.0.2"), bytes, n);
    let counters = stop(child, &out);
    row(
        &format!("net{tag}.tcp.throughput"),
        mbs,
        floor_mbs,
        "MB/s",
        "≥ 0.5",
    );
    row(&format!("net{tag}.tcp.rr1"), us, floor_us, "µs", "≤ 3");
    // "VM exits E for F frames: X per frame (...)", kvm only.
    if let Some(per) = counters
        .lines()
        .find(|l| l.starts_with("VM exits "))
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse::<f64>().ok())
    {
        row(
            &format!("net{tag}.exits_per_frame"),
            per,
            1.0,
            "exits/frame",
            "report",
        );
    }
    // Recovery: the driver killed every 200 ms for a while.
    let mut extra = vec!["--kill-every", "200"];
    extra.extend_from_slice(host);
    let (child, out) = serve(ma, mb, &format!("{ifname}r"), &extra)?;
    std::thread::sleep(Duration::from_millis(if quick { 1000 } else { 5000 }));
    let c = stop(child, &out);
    let median = c
        .split("recovery time: median ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    row(&format!("net{tag}.recovery"), median, 1.0, "ms", "report");
    note(&format!(
        "net{tag}: {}",
        counters.lines().skip(1).collect::<Vec<_>>().join("; ")
    ));
    Ok(())
}
