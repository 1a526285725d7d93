//! Drivers restarted from a template: the first incarnation is
//! checkpointed at its first stream open (before it opened its file,
//! device or section), and every later one is restored from that
//! checkpoint instead of booting the image, on a fresh section. Killed
//! again and again while a client writes and reads, on both hosts and
//! with both block drivers, the disk holds exactly what was written and
//! every restart came from the template (through a standby driver made
//! from it ahead of time, or restored at the restart).
use moat_mediator::block::{Config, Counters, DriverSpec, MediatedBlock, SECTION};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;
const KILLS: u64 = 8;

/// The byte at `offset` after round `r` wrote it.
fn pattern(offset: u64, r: u64) -> u8 {
    ((offset / 512).wrapping_mul(131) ^ r.wrapping_mul(29)) as u8
}

/// Kills the driver `KILLS` times; between kills, writes a round of
/// blocks and reads every block back. Returns the counters and each
/// recovery (kill to the next request completed).
fn kill_and_check(dev: &MediatedBlock) -> (Counters, Vec<Duration>) {
    let blocks = SIZE / 4096;
    let mut written = vec![0u64; blocks as usize];
    let mut buf = vec![0u8; 4096];
    let mut recoveries = Vec::new();
    for r in 1..=KILLS {
        // A round writes every third block (shifted each round).
        for b in (r % 3..blocks).step_by(3) {
            let data: Vec<u8> = (0..4096).map(|i| pattern(b * 4096 + i, r)).collect();
            dev.write_at(b * 4096, &data).unwrap();
            written[b as usize] = r;
        }
        for b in 0..blocks {
            dev.read_at(b * 4096, &mut buf).unwrap();
            let w = written[b as usize];
            let want: Vec<u8> = (0..4096).map(|i| pattern(b * 4096 + i, w)).collect();
            if w == 0 {
                assert!(buf.iter().all(|&x| x == 0), "round {r}: block {b} not zero");
            } else {
                assert!(buf == want, "round {r}: block {b} is not round {w}'s");
            }
        }
        let t = Instant::now();
        dev.kill_driver();
        dev.read_at(0, &mut buf).unwrap();
        recoveries.push(t.elapsed());
    }
    (dev.counters(), recoveries)
}

fn check(what: &str, c: &Counters, rec: &[Duration], templates: bool, standby: bool) {
    eprintln!(
        "{what}: {} restarts, {} from the template ({} to a standby), {} failed starts, median recovery {:?}; template: {:?}",
        c.restarts,
        c.from_template,
        c.from_standby,
        c.failed_starts,
        {
            let mut v = rec.to_vec();
            v.sort();
            v[v.len() / 2]
        },
        c.template,
    );
    assert!(c.restarts >= KILLS, "{what}: {c:?}");
    assert_eq!(c.failed, 0, "{what}: {c:?}");
    assert_eq!(c.duplicate_completions, 0, "{what}");
    if templates {
        assert_eq!(c.template, None, "{what}: the template was given up");
        assert_eq!(c.from_template, c.restarts, "{what}: {c:?}");
    } else {
        assert_eq!(c.from_template, 0, "{what}");
    }
    if templates && standby {
        // A standby is made after each switch, well before the next kill.
        assert!(c.from_standby >= KILLS - 1, "{what}: {c:?}");
    } else {
        assert_eq!(c.from_standby, 0, "{what}");
    }
}

fn blk_file(host: moat_monitor::Host, templates: bool, standby: bool) {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
    let uri = format!("file:{}", disk.display());
    let mut policy = moat_policy::Policy::default();
    policy.limits.memory_mib = 64;
    policy.allow(&uri, moat_policy::Access::Rw).unwrap();
    let dev = MediatedBlock::start(
        DriverSpec {
            files: Vec::new(),
            image: moat_tests::built("blk-file"),
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
    let (c, rec) = kill_and_check(&dev);
    dev.shutdown();
    check(
        &format!("blk-file on {host:?}, templates {templates}, standby {standby}"),
        &c,
        &rec,
        templates,
        standby,
    );
    // What the client wrote is in the file.
    let f = std::fs::File::open(&disk).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 4096 * ((KILLS % 3) + 3 * 5))
        .unwrap();
    assert!(buf.iter().any(|&x| x != 0));
}

#[test]
fn blk_file_restarts_from_its_template_on_linux() {
    blk_file(moat_monitor::Host::Linux, true, true);
    // From the template at each restart, no standby.
    blk_file(moat_monitor::Host::Linux, true, false);
    // And without: every restart boots.
    blk_file(moat_monitor::Host::Linux, false, false);
}

#[test]
fn blk_file_restarts_from_its_template_on_kvm() {
    if !moat_tests::kvm_available() {
        eprintln!("skipping: no usable /dev/kvm");
        return;
    }
    blk_file(moat_monitor::Host::Kvm, true, true);
    blk_file(moat_monitor::Host::Kvm, true, false);
}

#[test]
fn virtio_blk_restarts_from_its_template_before_its_device() {
    if !moat_tests::kvm_available() {
        eprintln!("skipping: no usable /dev/kvm");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
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
        Config::default(),
    )
    .unwrap();
    let (c, rec) = kill_and_check(&dev);
    dev.shutdown();
    check("virtio-blk on kvm", &c, &rec, true, true);
}
