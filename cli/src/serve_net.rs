//! `moat serve --nic IFNAME --wire-netns NS`: a network interface served
//! by a NIC driver picoprocess through the mediator. IFNAME is a TAP
//! interface made in this network namespace; its frames go through the
//! mediator ([`moat_mediator::net::MediatedNet`]) to the `net-soft` driver
//! (host-linux), whose wire is a TCP connection to this process, bridged
//! to the interface `moat0` made in NS (the stand-in for the network).
//! Both interfaces live as long as the server: nothing is left behind.
//! Addresses and links are the user's to set (`ip addr`, `ip link set
//! up`), on both sides.
use crate::bad_input;
use crate::mediate::Host;
use crate::mediate::{ServeArgs, SIGNALS};
use moat_mediator::block::{DriverSpec, SECTION};
use moat_mediator::net::export::{export, Wire};
use moat_mediator::net::{tap, MediatedNet, NetConfig, NetCounters};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The wire's interface in the user's namespace.
pub const WIRE_IF: &str = "moat0";
/// The address the driver reports (locally administered, unicast).
const MAC: &str = "02:6d:6f:61:74:01";

pub fn serve(a: ServeArgs) -> i32 {
    let (Some(ifname), Some(netns)) = (a.nic.clone(), a.wire_netns.clone()) else {
        return bad_input("--nic IFNAME needs --wire-netns NS");
    };
    if let Err(e) = tap::check_name(&ifname) {
        return bad_input(e);
    }
    if a.driver.host != Host::Linux {
        return bad_input(
            "a NIC is served on --host linux only for now (the kvm host has no virtio-net device yet)",
        );
    }
    match a.driver.driver.as_str() {
        // The default driver names the disk's: a NIC's is net-soft.
        "net-soft" | "blk-file" => {}
        other => {
            return bad_input(format!(
                "unknown NIC driver `{other}`; the NIC driver is `net-soft`"
            ))
        }
    }
    if a.driver.faults.is_some() || a.read_only {
        return bad_input("--faults and --read-only are for disks");
    }
    // The wire first: a namespace that does not exist makes nothing.
    let wire_tap = match tap::create_in(&netns, WIRE_IF) {
        Ok(t) => t,
        Err(e) => return bad_input(e),
    };
    let client_tap = match tap::create(&ifname) {
        Ok(t) => t,
        Err(e) => return bad_input(e),
    };
    let token = match moat_mediator::net::export::new_token() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("moat: cannot make the wire's token: {e}");
            return moat_monitor::EXIT_HOST_FAILURE;
        }
    };
    let wire = match Wire::start(wire_tap, &token) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("moat: cannot start the wire: {e}");
            return moat_monitor::EXIT_HOST_FAILURE;
        }
    };
    let image = match crate::resolve::resolve("net-soft") {
        Ok(i) => i,
        Err(e) => return bad_input(e),
    };
    let uri = format!("tcp.client:127.0.0.1:{}", wire.port);
    let mut policy = moat_policy::Policy::default();
    policy.limits.memory_mib = 64;
    if let Err(e) = policy.allow(&uri, moat_policy::Access::Rw) {
        return bad_input(e);
    }
    let spec = DriverSpec {
        files: Vec::new(),
        image,
        args: vec![SECTION.into(), uri, MAC.into(), format!("token={token}")],
        host: moat_monitor::Host::Linux,
        policy,
        faults: None,
        console: a.driver.driver_console,
    };
    let config = NetConfig {
        deadline: Duration::from_millis(a.driver.deadline_ms.max(1)),
        max_failed_restarts: a.driver.max_failed_restarts,
        ..NetConfig::default()
    };
    let nic = match MediatedNet::start(spec, config) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("moat: {e}");
            return moat_monitor::EXIT_HOST_FAILURE;
        }
    };
    // The interface is the NIC: its address and MTU are the driver's.
    if let Err(e) = tap::set_link(&ifname, nic.info().mac, nic.info().mtu) {
        eprintln!("moat: {e}");
        nic.shutdown();
        return moat_monitor::EXIT_HOST_FAILURE;
    }
    let exported = match export(nic.clone(), client_tap) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("moat: cannot export the interface: {e}");
            nic.shutdown();
            return moat_monitor::EXIT_HOST_FAILURE;
        }
    };
    crate::mediate::catch_stop_signals();
    println!(
        "serving a NIC ({}) as {ifname}; its wire is {WIRE_IF} in network namespace {netns}",
        nic.info()
    );
    let _ = std::io::stdout().flush();
    let t0 = Instant::now();
    let mut last_kill = Instant::now();
    while SIGNALS.load(Ordering::SeqCst) == 0
        && a.seconds
            .is_none_or(|s| t0.elapsed() < Duration::from_secs(s))
    {
        std::thread::sleep(Duration::from_millis(10));
        if nic.failed().is_some() {
            break;
        }
        if let Some(ms) = a.kill_every {
            if last_kill.elapsed() >= Duration::from_millis(ms) {
                nic.kill_driver();
                last_kill = Instant::now();
            }
        }
    }
    let refused = exported.dropped.load(Ordering::Relaxed);
    drop(exported);
    nic.shutdown();
    let host_drops = wire.running.dropped.load(Ordering::Relaxed);
    drop(wire);
    print_counters(&nic.counters(), host_drops, &mut std::io::stdout());
    if refused > 0 {
        println!("frames the interface could not carry (longer than its MTU allows): {refused}");
    }
    if let Some(why) = nic.failed() {
        eprintln!("moat: {why}");
        return moat_monitor::EXIT_HOST_FAILURE;
    }
    0
}

fn print_counters(c: &NetCounters, wire_drops: u64, w: &mut dyn Write) {
    let _ = writeln!(
        w,
        "frames sent {}  send failed {}  lost to restarts {}  queue drops out {} in {}  received {}  wire drops {}",
        c.sent,
        c.send_failed,
        c.send_dropped,
        c.tx_queue_drops,
        c.rx_queue_drops,
        c.received,
        wire_drops
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
