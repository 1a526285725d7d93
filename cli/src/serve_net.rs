//! `moat serve --nic IFNAME --wire-netns NS [--host kvm]`: a network
//! interface served by a NIC driver picoprocess through the mediator.
//! IFNAME is a TAP interface made in this network namespace; its frames go
//! through the mediator ([`moat_mediator::net::MediatedNet`]) to the
//! driver. Its wire is the TAP interface `moat0` made in NS (the stand-in
//! for the network):
//!
//! - on host-linux the `net-soft` driver's wire is a TCP connection to
//!   this process, bridged to `moat0`;
//! - on kvm the `virtio-net` driver (virtio-drivers' `VirtIONet`) drives a
//!   virtio-mmio network device whose wire is `moat0` itself: this
//!   process opens it and hands each driver incarnation's VMM a copy of
//!   the descriptor, so the interface outlives every driver (frames that
//!   come while no driver runs wait in its queue). `net-soft` runs on kvm
//!   too (`--driver net-soft`).
//!
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
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The wire's interface in the user's namespace.
pub const WIRE_IF: &str = "moat0";
/// The address the driver reports (locally administered, unicast).
const MAC: &str = "02:6d:6f:61:74:01";
/// The virtio-net device's name in the driver's grant.
const NIC_DEVICE: &str = "net0";

pub fn serve(a: ServeArgs) -> i32 {
    let (Some(ifname), Some(netns)) = (a.nic.clone(), a.wire_netns.clone()) else {
        return bad_input("--nic IFNAME needs --wire-netns NS");
    };
    if let Err(e) = tap::check_name(&ifname) {
        return bad_input(e);
    }
    let kvm = a.driver.host == Host::Kvm;
    // The default driver names the disk's: a NIC's is net-soft on linux,
    // virtio-net on kvm.
    let virtio = match (a.driver.driver.as_str(), kvm) {
        ("virtio-net", true) | ("blk-file", true) => true,
        ("net-soft", _) | ("blk-file", false) => false,
        ("virtio-net", false) => {
            return bad_input(
                "the virtio-net driver needs a virtio-net device, which only the kvm host has: add --host kvm",
            )
        }
        (other, _) => {
            return bad_input(format!(
                "unknown NIC driver `{other}`; NIC drivers are `net-soft` (both hosts) and `virtio-net` (kvm)"
            ))
        }
    };
    let faults = match crate::mediate::stream_faults(&a) {
        Ok(f) => f,
        Err(e) => return bad_input(e),
    };
    // The wire first: a namespace that does not exist makes nothing.
    let wire_tap = match tap::create_in(&netns, WIRE_IF) {
        Ok(t) => t,
        Err(e) => return bad_input(e),
    };
    let client_tap = match tap::create(&ifname) {
        Ok(t) => t,
        Err(e) => return bad_input(e),
    };
    let (mut spec, wire) = if virtio {
        match virtio_spec(wire_tap, &a) {
            Ok(spec) => (spec, None),
            Err(code) => return code,
        }
    } else {
        match soft_spec(wire_tap, &a) {
            Ok((spec, wire)) => (spec, Some(wire)),
            Err(code) => return code,
        }
    };
    // Each incarnation gets its own seed; a faulty driver boots each time
    // (a template would carry the first one's faults).
    let templates = faults.is_none() && !a.driver.no_template;
    spec.faults = faults;
    let config = NetConfig {
        deadline: Duration::from_millis(a.driver.deadline_ms.max(1)),
        max_failed_restarts: a.driver.max_failed_restarts,
        templates,
        // A standby virtio-net driver stays off the wire until it serves.
        standby: virtio,
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
    let host_drops = wire
        .as_ref()
        .map_or(0, |w| w.running.dropped.load(Ordering::Relaxed));
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

/// The `virtio-net` driver on kvm, its device's wire the TAP `wire_tap`.
fn virtio_spec(wire_tap: std::os::fd::OwnedFd, a: &ServeArgs) -> Result<DriverSpec, i32> {
    let image = crate::resolve::resolve("virtio-net").map_err(bad_input)?;
    let mut policy = moat_policy::Policy::default();
    policy.limits.memory_mib = 64;
    let device = moat_policy::DeviceSpec::parse(&format!("{NIC_DEVICE}=virtio-net"))
        .map_err(|e| bad_input(e.to_string()))?;
    policy
        .add_device(device)
        .map_err(|e| bad_input(e.to_string()))?;
    Ok(DriverSpec {
        files: vec![(NIC_DEVICE.into(), Arc::new(std::fs::File::from(wire_tap)))],
        image,
        args: vec![NIC_DEVICE.into(), "serve".into(), SECTION.into()],
        host: moat_monitor::Host::Kvm,
        policy,
        faults: None,
        console: a.driver.driver_console,
    })
}

/// The `net-soft` driver, its wire a TCP connection to this process
/// bridged to the TAP `wire_tap`.
fn soft_spec(wire_tap: std::os::fd::OwnedFd, a: &ServeArgs) -> Result<(DriverSpec, Wire), i32> {
    let token = match moat_mediator::net::export::new_token() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("moat: cannot make the wire's token: {e}");
            return Err(moat_monitor::EXIT_HOST_FAILURE);
        }
    };
    let wire = match Wire::start(wire_tap, &token) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("moat: cannot start the wire: {e}");
            return Err(moat_monitor::EXIT_HOST_FAILURE);
        }
    };
    let image = match crate::resolve::resolve("net-soft") {
        Ok(i) => i,
        Err(e) => return Err(bad_input(e)),
    };
    let uri = format!("tcp.client:127.0.0.1:{}", wire.port);
    let mut policy = moat_policy::Policy::default();
    policy.limits.memory_mib = 64;
    if let Err(e) = policy.allow(&uri, moat_policy::Access::Rw) {
        return Err(bad_input(e));
    }
    let spec = DriverSpec {
        files: Vec::new(),
        image,
        args: vec![SECTION.into(), uri, MAC.into(), format!("token={token}")],
        host: match a.driver.host {
            Host::Linux => moat_monitor::Host::Linux,
            Host::Kvm => moat_monitor::Host::Kvm,
        },
        policy,
        faults: None,
        console: a.driver.driver_console,
    };
    Ok((spec, wire))
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
    if let Some(vm) = &c.vm {
        use moat_monitor::VmCounter as V;
        let frames = (c.sent + c.received).max(1);
        let _ = writeln!(
            w,
            "VM exits {} for {} frames: {:.2} per frame (ABI calls {}, MMIO writes {}, MMIO reads {}, other {}); the device's thread moved {} frames",
            vm.exits(),
            c.sent + c.received,
            vm.exits() as f64 / frames as f64,
            vm.get(V::ExitHypercall),
            vm.get(V::ExitMmioWrite),
            vm.get(V::ExitMmioRead),
            vm.get(V::ExitPio)
                + vm.get(V::ExitNotifyInKernel)
                + vm.get(V::ExitInterrupted)
                + vm.get(V::ExitOther),
            vm.get(V::NetFrames)
        );
    }
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
