//! `moat-bench checkpoint`: writing a checkpoint against writing the same
//! bytes to a file, and restoring one (to its first output) against a
//! cold spawn of the same image (to its first output), on each host.
//!
//! And the mediator's recovery (a driver killed, to the next read
//! completed) with drivers from a template, restored ahead of time and
//! standing by (the default), against booted again; restored at the
//! restart in a note: `blk-file` over a 64 MiB file.
//!
//! The guest is `bench-ckpt MIB` (every page of MIB MiB written, then a
//! `.` about every 50 µs). Files go to /dev/shm where there is one, so
//! that a disk's write-back does not make the figures.
use crate::{image, median, row};
use moat_monitor::{CheckpointOptions, Host, Picoprocess, Sandbox, Stdio};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::Instant;

fn dir() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// Room for the guest's memory, and for the file's pages: a file on
/// tmpfs is memory charged to the writer's cgroup, which is the
/// picoprocess's.
fn limits(mib: u64) -> moat_policy::Limits {
    moat_policy::Limits {
        memory_mib: 2 * mib + 64,
        ..Default::default()
    }
}

/// `bench-ckpt MIB` started checkpointable, past its `ready`, its output
/// drained by a thread from then on.
fn ready(host: Host, mib: u64) -> Picoprocess {
    let mut p = Sandbox::new(image("bench-ckpt"))
        .host(host)
        .limits(limits(mib))
        .args([mib.to_string()])
        .checkpointable()
        .stdout(Stdio::Piped)
        .spawn()
        .expect("bench-ckpt");
    let mut out = BufReader::new(p.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim() != "ready" {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("bench-ckpt ended early");
        }
    }
    std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while out.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
    });
    p
}

/// Milliseconds to write `mib` MiB of written memory as a checkpoint, and
/// to write the same bytes to a fresh file (median of `reps`).
fn write_figures(host: Host, mib: u64, reps: usize) -> (f64, f64) {
    let d = dir();
    let mut moat = vec![];
    let mut floor = vec![];
    let buf: Vec<u8> = (0..1 << 20).map(|i| (i >> 6) as u8 | 1).collect();
    for i in 0..reps {
        let mut p = ready(host, mib);
        let f = d.path().join(format!("c{i}"));
        let file = std::fs::File::create(&f).unwrap();
        let t = Instant::now();
        p.checkpoint(&file, CheckpointOptions::default())
            .expect("checkpoint");
        moat.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = p.wait();
        drop(file);
        std::fs::remove_file(&f).unwrap();
        // The floor: the same bytes, written to a fresh file of the same
        // file system.
        let g = d.path().join(format!("f{i}"));
        let t = Instant::now();
        let mut w = std::fs::File::create(&g).unwrap();
        for _ in 0..mib {
            w.write_all(&buf).unwrap();
        }
        drop(w);
        floor.push(t.elapsed().as_secs_f64() * 1e3);
        std::fs::remove_file(&g).unwrap();
    }
    (median(&mut moat), median(&mut floor))
}

/// Microseconds from asking for the picoprocess to the first output
/// byte after `after` (a line it prints; "" for none).
fn first_output(s: Sandbox, after: &str) -> f64 {
    let t = Instant::now();
    let mut p = s.stdout(Stdio::Piped).spawn().expect("spawn");
    let mut out = BufReader::new(p.stdout.take().unwrap());
    if !after.is_empty() {
        let mut line = String::new();
        while line.trim() != after {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("ended before `{after}`");
            }
        }
    }
    let mut b = [0u8; 1];
    out.read_exact(&mut b).unwrap();
    let us = t.elapsed().as_secs_f64() * 1e6;
    let _ = p.kill();
    let _ = p.wait();
    us
}

/// Restore (to its first output) against a cold spawn of the same image
/// to the state the checkpoint holds (its first output after `ready`),
/// in microseconds (median of `reps`).
fn restore_figures(host: Host, reps: usize) -> (f64, f64) {
    let d = dir();
    let ck = d.path().join("r.ckpt");
    let mut p = ready(host, 8);
    let file = std::fs::File::create(&ck).unwrap();
    p.checkpoint(&file, CheckpointOptions::default())
        .expect("checkpoint");
    let _ = p.wait();
    let mut restore = vec![];
    let mut cold = vec![];
    for _ in 0..reps {
        restore.push(first_output(
            Sandbox::restore(&ck).host(host).limits(limits(8)),
            "",
        ));
        cold.push(first_output(
            Sandbox::new(image("bench-ckpt"))
                .host(host)
                .limits(limits(8))
                .args(["8"]),
            "ready",
        ));
    }
    (median(&mut restore), median(&mut cold))
}

/// Median recovery in ms of a `blk-file` driver on `host`, restarted
/// from its template or booted, and how many restarts came from the
/// template.
fn recovery(host: Host, templates: bool, standby: bool, kills: usize) -> (f64, u64) {
    use moat_mediator::block::{Config, DriverSpec, MediatedBlock, SECTION};
    let d = dir();
    let (path, _file) = crate::mediator::disk_file(d.path());
    let uri = format!("file:{}", path.display());
    let mut policy = moat_policy::Policy::default();
    policy.limits.memory_mib = 64;
    policy.allow(&uri, moat_policy::Access::Rw).unwrap();
    let dev = MediatedBlock::start(
        DriverSpec {
            files: Vec::new(),
            image: image("blk-file"),
            args: vec![SECTION.into(), uri],
            host,
            policy,
            faults: None,
            console: false,
        },
        Config {
            templates,
            standby,
            ..Config::default()
        },
    )
    .unwrap();
    let mut rec = crate::mediator::recoveries(&dev, kills);
    let c = dev.counters();
    dev.shutdown();
    if let Some(why) = &c.template {
        crate::note(&format!("no template: {why}"));
    }
    (median(&mut rec), c.from_template)
}

pub(crate) fn bench(quick: bool) {
    let mut hosts = vec![("linux", Host::Linux)];
    if crate::kvm::available() {
        hosts.push(("kvm", Host::Kvm));
    }
    let reps = if quick { 1 } else { 5 };
    for (name, host) in hosts {
        for mib in [8u64, 256] {
            if quick && mib > 8 {
                continue;
            }
            let (m, f) = write_figures(host, mib, reps);
            row(
                &format!("{name}: checkpoint of {mib} MiB written memory vs writing the same bytes to a file"),
                m,
                f,
                "ms",
                "≤ 1.5x",
            );
        }
        let (r, c) = restore_figures(host, if quick { 3 } else { 21 });
        row(
            &format!("{name}: restore to first output vs a cold spawn of the same image to the same point"),
            r,
            c,
            "µs",
            "≤ 0.3x",
        );
        let kills = if quick { 5 } else { 100 };
        let (s, n) = recovery(host, true, true, kills);
        let (t, _) = recovery(host, true, false, kills);
        let (b, _) = recovery(host, false, false, kills);
        row(
            &format!("{name}: mediator recovery, driver from its template (standing by) vs booted"),
            s,
            b,
            "ms",
            "median ≤ 1 ms (linux)",
        );
        crate::note(&format!(
            "{name}: {n} of {kills} restarts from the template; median {s:.2} ms standing by, \
             {t:.2} ms restored at the restart, {b:.2} ms booted"
        ));
    }
}
