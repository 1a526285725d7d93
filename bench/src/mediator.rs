//! `mediator`: block I/O through the safe mediator to the `blk-file` driver
//! picoprocess (host-linux), over the shared-memory rings, against the
//! floor: the driver's own work (a positioned read or write of the disk
//! file) done in-process by the client's thread. Also the recovery time
//! after the driver is killed.
//!
//! - `mediator.read4k.qd1`: 4 KiB random reads, one at a time: latency.
//! - `mediator.read4k.qd32`: 4 KiB random reads, 32 in flight from one
//!   thread (submit / wait): IOPS. The floor runs the same reads back to
//!   back on one thread, as the driver does (a page-cache read gains
//!   nothing from being queued).
//! - `mediator.seqread64k`, `mediator.seqwrite64k`: 64 KiB sequential
//!   reads and writes, 8 in flight: MB/s. The floor is back-to-back
//!   positioned reads and writes on one thread.
//! - `mediator.recovery`: the driver killed, time until the next read
//!   completes: median ms (no floor; the ratio is to the 5 ms target).
//! - `mediator.kvm.*`: the same 4 KiB reads through the `virtio-blk`
//!   driver on kvm (`crate::mediator_kvm`, run after these).
//!
//! The disk is a 64 MiB file, warm in the page cache on both sides.
use crate::{image, median, p99, row};
use moat_mediator::block::{Config, DriverSpec, MediatedBlock, Ticket, SECTION};
use moat_policy::{Access, Policy};
use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

pub(crate) const DISK: u64 = 64 << 20;

pub(crate) fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// ns per operation: `n` ops of `f(i)`, median of `rounds` rounds.
pub(crate) fn per_op(rounds: usize, n: u64, mut f: impl FnMut(u64)) -> f64 {
    let mut v = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        for i in 0..n {
            f(i);
        }
        v.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    median(&mut v)
}

/// ns per operation with `depth` in flight: `submit(i)` starts op `i`,
/// `finish(ticket)` collects one; median of `rounds` rounds.
pub(crate) fn per_op_deep(
    rounds: usize,
    n: u64,
    depth: usize,
    mut submit: impl FnMut(u64) -> Ticket,
    mut finish: impl FnMut(Ticket),
) -> f64 {
    let mut v = Vec::new();
    for _ in 0..rounds {
        let mut q = VecDeque::with_capacity(depth);
        let t = Instant::now();
        for i in 0..n {
            if q.len() == depth {
                finish(q.pop_front().unwrap());
            }
            q.push_back(submit(i));
        }
        for tk in q {
            finish(tk);
        }
        v.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    median(&mut v)
}

pub fn mediator_bench(quick: bool) {
    let dir = std::env::temp_dir().join(format!("moat-bench-med-{}", std::process::id()));
    let (path, file) = disk_file(&dir);
    let uri = format!("file:{}", path.display());
    let mut policy = Policy::default();
    policy.limits.memory_mib = 64;
    policy.allow(&uri, Access::Rw).unwrap();
    let dev = MediatedBlock::start(
        DriverSpec {
            files: Vec::new(),
            image: image("blk-file"),
            args: vec![SECTION.into(), uri],
            host: moat_monitor::Host::Linux,
            policy,
            faults: None,
            console: false,
        },
        Config::default(),
    )
    .unwrap();
    let (rounds, n4k, n64k) = if quick {
        (3, 2000, 300)
    } else {
        (7, 100_000, 10_000)
    };

    // 4 KiB random reads, QD1: latency per read.
    let blocks = DISK / 4096;
    let mut buf = vec![0u8; 4096];
    let mut rng = 7u64;
    let floor = per_op(rounds, n4k, |_| {
        let off = (xorshift(&mut rng) % blocks) * 4096;
        file.read_exact_at(&mut buf, off).unwrap();
    });
    let mut rng = 7u64;
    let moat = per_op(rounds, n4k, |_| {
        let off = (xorshift(&mut rng) % blocks) * 4096;
        dev.read_at(off, &mut buf).unwrap();
    });
    row(
        "mediator.read4k.qd1",
        moat / 1000.0,
        floor / 1000.0,
        "µs",
        "≤ 1.5",
    );
    // What serving on another core costs by itself (bench/src/handoff.rs).
    let other = crate::handoff::Handoff::start(file.try_clone().unwrap(), 4096);
    let mut rng = 7u64;
    let cross = per_op(rounds, n4k, |_| {
        let off = (xorshift(&mut rng) % blocks) * 4096;
        other.read_at(off, &mut buf);
    });
    drop(other);
    crate::note(&format!(
        "  breakdown: the same reads served by a polling thread of the client's process \
         (no process, ring, contract or PAL): {:.2} µs ({:.2}x the floor); moat is {:.2}x that",
        cross / 1000.0,
        cross / floor,
        moat / cross
    ));

    // 4 KiB random reads, 32 in flight: IOPS.
    let iops = |ns: f64| 1e9 / ns;
    let moat = per_op_deep(
        rounds,
        n4k,
        32,
        |_| {
            let off = (xorshift(&mut rng) % blocks) * 4096;
            dev.submit_read(off, 4096).unwrap()
        },
        |t| dev.wait_read(t, &mut buf).unwrap(),
    );
    row(
        "mediator.read4k.qd32",
        iops(moat),
        iops(floor),
        "IOPS",
        "≥ 0.8",
    );
    let mut rng = 11u64;
    let next = || (xorshift(&mut rng) % blocks) * 4096;
    match crate::uring::reads(&file, next, 32, n4k) {
        Ok(ns) => crate::note(&format!(
            "  an asynchronous back end: the floor's reads through io_uring, 32 in flight: \
             {:.0} IOPS ({:.2}x the floor's pread one at a time)",
            iops(ns),
            floor / ns
        )),
        Err(e) => crate::note(&format!("  io_uring: not measured ({e})")),
    }

    // 64 KiB sequential reads and writes, 8 in flight: throughput.
    let mut big = vec![0u8; 64 << 10];
    let span = DISK / (64 << 10);
    let mbs = |ns: f64| (64.0 * 1024.0) / ns * 1e9 / 1e6;
    let floor = per_op(rounds, n64k, |i| {
        file.read_exact_at(&mut big, (i % span) * (64 << 10))
            .unwrap();
    });
    let moat = per_op_deep(
        rounds,
        n64k,
        8,
        |i| dev.submit_read((i % span) * (64 << 10), 64 << 10).unwrap(),
        |t| dev.wait_read(t, &mut big).unwrap(),
    );
    row(
        "mediator.seqread64k",
        mbs(moat),
        mbs(floor),
        "MB/s",
        "≥ 0.9",
    );
    let data = vec![0xa5u8; 64 << 10];
    let floor = per_op(rounds, n64k, |i| {
        file.write_all_at(&data, (i % span) * (64 << 10)).unwrap();
    });
    let moat = per_op_deep(
        rounds,
        n64k,
        8,
        |i| dev.submit_write((i % span) * (64 << 10), &data).unwrap(),
        |t| dev.wait(t).unwrap(),
    );
    row(
        "mediator.seqwrite64k",
        mbs(moat),
        mbs(floor),
        "MB/s",
        "≥ 0.9",
    );

    // Recovery: kill the driver, time until a read completes again.
    let kills = if quick { 5 } else { 100 };
    let mut rec = recoveries(&dev, kills);
    let c = dev.counters();
    let med = median(&mut rec.clone());
    row(
        "mediator.recovery",
        med,
        5.0,
        "ms",
        "≤ 5 ms (floor: the target)",
    );
    crate::note(&format!(
        "recovery after a kill, {kills} kills: median {med:.2} ms, p99 {:.2} ms ({} restarts); \
         doorbells: {} to the driver, {} from it, over {} requests",
        p99(&mut rec),
        c.restarts,
        c.kicks,
        c.bells,
        c.requests
    ));
    dev.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kills the driver of `dev` `kills` times: ms from each kill to the
/// next read completed.
pub(crate) fn recoveries(dev: &MediatedBlock, kills: usize) -> Vec<f64> {
    let mut rec = Vec::new();
    let mut buf = vec![0u8; 4096];
    for _ in 0..kills {
        dev.read_at(0, &mut buf).unwrap();
        let t = Instant::now();
        dev.kill_driver();
        dev.read_at(4096, &mut buf).unwrap();
        rec.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(2));
    }
    rec
}

/// A 64 MiB disk file in `dir`, filled (so reads come from the page
/// cache, not holes), open for reading and writing.
pub(crate) fn disk_file(dir: &std::path::Path) -> (std::path::PathBuf, std::fs::File) {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("disk.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..(DISK >> 20) {
        file.write_all_at(&chunk, i << 20).unwrap();
    }
    (path, file)
}
