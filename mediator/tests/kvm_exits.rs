//! The virtio-blk driver on kvm at depth: requests reach the device's I/O
//! thread and come back without VM exits once the pair is busy. Reads
//! 4 KiB blocks 32 at a time through the mediator and checks what the
//! VMM counted: exits (of every kind) per request stay far below one.
//! The figure itself is the benchmark's (`moat-bench mediator`,
//! `mediator.kvm.exits_per_request`); this only guards the mechanism.
use moat_mediator::block::{Config, DriverSpec, MediatedBlock, SECTION};
use moat_monitor::{VmCounter, VmStats};
use std::collections::VecDeque;
use std::os::unix::fs::FileExt;

/// The byte at `offset` of the disk.
fn pattern(offset: u64) -> u8 {
    (offset / 4096).wrapping_mul(31) as u8 ^ (offset as u8)
}

/// Reads `n` random 4 KiB blocks, 32 in flight, checking each.
fn read_at_depth(dev: &MediatedBlock, blocks: u64, n: u64, rng: &mut u64) {
    let mut q = VecDeque::new();
    let mut buf = vec![0u8; 4096];
    let check = |off: u64, buf: &[u8]| {
        for (i, &b) in buf.iter().enumerate().step_by(509) {
            assert_eq!(b, pattern(off + i as u64), "byte {i} of the block at {off}");
        }
    };
    for _ in 0..n {
        if q.len() == 32 {
            let (off, t) = q.pop_front().unwrap();
            dev.wait_read(t, &mut buf).unwrap();
            check(off, &buf);
        }
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let off = (*rng % blocks) * 4096;
        q.push_back((off, dev.submit_read(off, 4096).unwrap()));
    }
    for (off, t) in q {
        dev.wait_read(t, &mut buf).unwrap();
        check(off, &buf);
    }
}

#[test]
fn a_busy_virtio_blk_driver_causes_almost_no_vm_exits() {
    if !moat_tests::kvm_available() {
        eprintln!("skipping: no usable /dev/kvm");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    const SIZE: u64 = 8 << 20;
    let bytes: Vec<u8> = (0..SIZE).map(pattern).collect();
    f.write_all_at(&bytes, 0).unwrap();
    drop(f);
    let mut policy = moat_policy::Policy::default();
    policy.limits.memory_mib = 64;
    let spec =
        moat_policy::DeviceSpec::parse(&format!("blk0=virtio-blk:{}", disk.display())).unwrap();
    policy.add_device(spec).unwrap();
    let dev = MediatedBlock::start(
        DriverSpec {
            files: Vec::new(),
            image: moat_tests::built("virtio-blk"),
            args: vec!["blk0".into(), "serve".into(), SECTION.into()],
            host: moat_monitor::Host::Kvm,
            policy,
            faults: None,
            console: false,
        },
        Config {
            spin: std::time::Duration::from_micros(200),
            ..Config::default()
        },
    )
    .unwrap();
    let blocks = SIZE / 4096;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    // Warm up: the driver and the I/O thread start polling.
    read_at_depth(&dev, blocks, 500, &mut rng);
    let before = dev.counters();
    const N: u64 = 4000;
    read_at_depth(&dev, blocks, N, &mut rng);
    let after = dev.counters();
    dev.shutdown();
    let vm = |c: &moat_mediator::block::Counters| c.vm.expect("a kvm driver's VMM counts");
    let s: VmStats = vm(&after).since(&vm(&before));
    let requests = after.requests - before.requests;
    let per = s.exits() as f64 / requests as f64;
    eprintln!(
        "{requests} requests: {} exits ({per:.3} per request): {} calls, {} MMIO writes, \
         {} notifications in KVM, {} MMIO reads, {} other; the I/O thread slept {} times",
        s.exits(),
        s.get(VmCounter::ExitHypercall),
        s.get(VmCounter::ExitMmioWrite),
        s.get(VmCounter::ExitNotifyInKernel),
        s.get(VmCounter::ExitMmioRead),
        s.get(VmCounter::ExitPio) + s.get(VmCounter::ExitInterrupted) + s.get(VmCounter::ExitOther),
        s.get(VmCounter::IoSleeps),
    );
    assert_eq!(requests, N);
    assert!(
        s.get(VmCounter::IoRequests) >= N,
        "the I/O thread served {} of {N} requests",
        s.get(VmCounter::IoRequests)
    );
    assert!(per <= 0.2, "{per:.3} exits per request");
}
