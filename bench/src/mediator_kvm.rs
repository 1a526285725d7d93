//! `mediator.kvm.*`: 4 KiB random reads through the mediator to the
//! `virtio-blk` driver picoprocess on kvm, which drives a virtio-mmio disk
//! backed by the same 64 MiB file the linux rows read; the floor is a
//! positioned read of that file by the client's own thread.
//!
//! - `mediator.kvm.read4k.qd1`: one read at a time: latency (target:
//!   report).
//! - `mediator.kvm.read4k.qd32`: 32 in flight from one thread: IOPS. The
//!   floor runs the same reads back to back on one thread, as for the
//!   linux row (a page-cache read gains nothing from being queued).
//! - `mediator.kvm.exits_per_request`: VM exits of the driver's VMM (every
//!   kind: ABI calls, MMIO, notifications KVM answered through the
//!   ioeventfd) per request during the QD32 run. Its "floor" is one exit
//!   per request, what a notification per request costs, so the ratio is
//!   the figure itself.
//!
//! Each row runs a few seconds at most.
use crate::mediator::{disk_file, per_op, per_op_deep, xorshift, DISK};
use crate::{image, note, row};
use moat_mediator::block::{Config, DriverSpec, MediatedBlock, SECTION};
use moat_monitor::VmCounter;
use moat_policy::{DeviceSpec, Policy};
use std::os::unix::fs::FileExt;

pub fn rows(quick: bool) {
    let dir = std::env::temp_dir().join(format!("moat-bench-medkvm-{}", std::process::id()));
    let (disk, file) = disk_file(&dir);
    let mut policy = Policy::default();
    policy.limits.memory_mib = 64;
    let spec = DeviceSpec::parse(&format!("blk0=virtio-blk:{}", disk.display())).unwrap();
    policy.add_device(spec).unwrap();
    let dev = MediatedBlock::start(
        DriverSpec {
            files: Vec::new(),
            image: image("virtio-blk"),
            args: vec!["blk0".into(), "serve".into(), SECTION.into()],
            host: moat_monitor::Host::Kvm,
            policy,
            faults: None,
            console: false,
        },
        Config::default(),
    )
    .unwrap();
    let (rounds, n1, n32) = if quick {
        (3, 500, 2000)
    } else {
        (5, 5000, 20_000)
    };
    let blocks = DISK / 4096;
    let mut buf = vec![0u8; 4096];

    // QD1: latency.
    let mut rng = 11u64;
    let floor = per_op(rounds, n1, |_| {
        let off = (xorshift(&mut rng) % blocks) * 4096;
        file.read_exact_at(&mut buf, off).unwrap();
    });
    let mut rng = 11u64;
    let moat = per_op(rounds, n1, |_| {
        let off = (xorshift(&mut rng) % blocks) * 4096;
        dev.read_at(off, &mut buf).unwrap();
    });
    row(
        "mediator.kvm.read4k.qd1",
        moat / 1000.0,
        floor / 1000.0,
        "µs",
        "report",
    );

    // QD32: IOPS, and the exits it costs.
    let iops = |ns: f64| 1e9 / ns;
    let before = dev.counters();
    let moat = per_op_deep(
        rounds,
        n32,
        32,
        |_| {
            let off = (xorshift(&mut rng) % blocks) * 4096;
            dev.submit_read(off, 4096).unwrap()
        },
        |t| dev.wait_read(t, &mut buf).unwrap(),
    );
    let after = dev.counters();
    row(
        "mediator.kvm.read4k.qd32",
        iops(moat),
        iops(floor),
        "IOPS",
        "≥ 0.5",
    );
    let requests = after.requests - before.requests;
    match (after.vm, before.vm) {
        (Some(a), Some(b)) if requests > 0 => {
            let s = a.since(&b);
            row(
                "mediator.kvm.exits_per_request",
                s.exits() as f64 / requests as f64,
                1.0,
                "exits/request",
                "≤ 0.05 (floor: one exit per request)",
            );
            note(&format!(
                "kvm QD32: {requests} requests, {} exits: {} ABI calls, {} MMIO writes, {} \
                 notifications answered in KVM, {} MMIO reads, {} other; the I/O thread slept \
                 {} times and raised {} interrupts; doorbells: {} to the driver, {} from it",
                s.exits(),
                s.get(VmCounter::ExitHypercall),
                s.get(VmCounter::ExitMmioWrite),
                s.get(VmCounter::ExitNotifyInKernel),
                s.get(VmCounter::ExitMmioRead),
                s.get(VmCounter::ExitPio)
                    + s.get(VmCounter::ExitInterrupted)
                    + s.get(VmCounter::ExitOther),
                s.get(VmCounter::IoSleeps),
                s.get(VmCounter::IoInterrupts),
                after.kicks - before.kicks,
                after.bells - before.bells,
            ));
        }
        _ => note("| mediator.kvm.exits_per_request: the VMM counted nothing | - | - | - | - |"),
    }
    dev.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
