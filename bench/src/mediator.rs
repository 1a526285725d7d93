//! `mediator`: block I/O through the safe mediator to the `blk-file` driver
//! picoprocess (host-linux), against the floor: the same driver code (a
//! positioned read or write of the disk file) called in-process. Also the
//! recovery time after the driver is killed.
//!
//! The disk is a 64 MiB file, warm in the page cache on both sides.
use crate::{header, image, median, p99, row};
use moat_mediator::block::{Config, DriverSpec, MediatedBlock, PIPE};
use moat_policy::{Access, Policy};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const DISK: u64 = 64 << 20;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// ns per operation: `n` ops of `f(i)`, best of `rounds` rounds.
fn per_op(rounds: usize, n: u64, mut f: impl FnMut(u64)) -> f64 {
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

pub fn mediator_bench(quick: bool) {
    let dir = std::env::temp_dir().join(format!("moat-bench-med-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    // Fill it, so both sides read real data from the page cache.
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..(DISK >> 20) {
        file.write_all_at(&chunk, i << 20).unwrap();
    }
    let uri = format!("file:{}", path.display());
    let mut policy = Policy::default();
    policy.limits.memory_mib = 64;
    policy.allow(&uri, Access::Rw).unwrap();
    let dev = MediatedBlock::start(
        DriverSpec {
            image: image("blk-file"),
            args: vec![PIPE.into(), uri],
            host: moat_monitor::Host::Linux,
            policy,
            faults: None,
            console: false,
        },
        Config::default(),
    )
    .unwrap();
    let (rounds, n4k, n64k) = if quick { (3, 300, 50) } else { (7, 5000, 1000) };

    header();
    // 4 KiB random reads, QD1: latency per read.
    let mut buf = vec![0u8; 4096];
    let mut rng = 7u64;
    let floor = per_op(rounds, n4k, |_| {
        let off = (xorshift(&mut rng) % (DISK / 4096)) * 4096;
        file.read_exact_at(&mut buf, off).unwrap();
    });
    let mut rng = 7u64;
    let moat = per_op(rounds, n4k, |_| {
        let off = (xorshift(&mut rng) % (DISK / 4096)) * 4096;
        dev.read_at(off, &mut buf).unwrap();
    });
    row(
        "4 KiB random read, QD1 latency (mediated blk-file vs in-process pread)",
        moat / 1000.0,
        floor / 1000.0,
        "µs",
        "≤ 1.5x",
    );
    // 64 KiB sequential reads and writes: throughput.
    let mut big = vec![0u8; 64 << 10];
    let span = DISK / (64 << 10);
    let mbs = |ns: f64| (64.0 * 1024.0) / ns * 1e9 / 1e6;
    let floor = per_op(rounds, n64k, |i| {
        file.read_exact_at(&mut big, (i % span) * (64 << 10))
            .unwrap();
    });
    let moat = per_op(rounds, n64k, |i| {
        dev.read_at((i % span) * (64 << 10), &mut big).unwrap();
    });
    // Throughput: the floor's MB/s over moat's, shown as moat / floor.
    row(
        "64 KiB sequential read throughput (MB/s; ratio = moat/floor)",
        mbs(moat),
        mbs(floor),
        "MB/s",
        "≥ 0.9x",
    );
    let data = vec![0xa5u8; 64 << 10];
    let floor = per_op(rounds, n64k, |i| {
        file.write_all_at(&data, (i % span) * (64 << 10)).unwrap();
    });
    let moat = per_op(rounds, n64k, |i| {
        dev.write_at((i % span) * (64 << 10), &data).unwrap();
    });
    row(
        "64 KiB sequential write throughput (MB/s; ratio = moat/floor)",
        mbs(moat),
        mbs(floor),
        "MB/s",
        "≥ 0.9x",
    );
    // Recovery: kill the driver, time until a read completes again.
    let kills = if quick { 5 } else { 100 };
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
    let c = dev.counters();
    crate::note(&format!(
        "recovery after a kill (kill to the next read completed), {kills} kills: median {:.2} ms, p99 {:.2} ms ({} restarts)",
        median(&mut rec.clone()),
        p99(&mut rec),
        c.restarts
    ));
    dev.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
