//! End to end: a block service exported through FUSE becomes a loop device
//! that Linux formats, mounts, fills, checks and reads back.
//!
//! Needs what `moat_tests::root` needs (root, FUSE, loop devices,
//! util-linux, e2fsprogs); without it the tests skip, unless
//! MOAT_REQUIRE_ROOT_TOOLS is set, when they fail.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moat_mediator::export::{self, BlockBackend};
use moat_tests::root::{missing_prerequisites, run_ok, FsMount, LoopDev};

const CAPACITY: usize = 64 << 20;
const BLOCK_SIZE: u32 = 4096;
const FILES: usize = 200;
const MAX_FILE: u64 = 256 << 10;

/// The tests here take turns: they share loop devices and mounts, and a
/// picoprocess started by one while the other's FUSE mount is up must not
/// race its unmount.
static SERIAL: Mutex<()> = Mutex::new(());

/// An in-memory block service. It refuses (and counts) any call that is not
/// block aligned, which would be a bug of the exporter.
struct MemBackend {
    data: Mutex<Vec<u8>>,
    misaligned: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
}

impl MemBackend {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; CAPACITY]),
            misaligned: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        })
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<usize> {
        let bs = u64::from(BLOCK_SIZE);
        if !offset.is_multiple_of(bs)
            || !(len as u64).is_multiple_of(bs)
            || offset + len as u64 > CAPACITY as u64
        {
            self.misaligned.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::other(format!("bad call: {offset}+{len}")));
        }
        Ok(offset as usize)
    }
}

impl BlockBackend for MemBackend {
    fn capacity(&self) -> u64 {
        CAPACITY as u64
    }
    fn block_size(&self) -> u32 {
        BLOCK_SIZE
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = self.check(offset, buf.len())?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let o = self.check(offset, data.len())?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A fresh empty directory, removed (only if empty) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "moat-export-e2e-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Never recursive: should something still be mounted here, keep it.
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// 64-bit FNV-1a.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The relative path, size and checksum of each file written.
type Manifest = Vec<(PathBuf, usize, u64)>;

fn write_tree(root: &Path, rng: &mut Rng) -> Manifest {
    let mut manifest = Vec::with_capacity(FILES);
    for i in 0..FILES {
        let dir = match i % 3 {
            0 => PathBuf::from(format!("d{}", i % 7)),
            1 => PathBuf::from(format!("d{}/e{}", i % 7, i % 5)),
            _ => PathBuf::from(format!("d{}/e{}/f{}", i % 7, i % 5, i % 2)),
        };
        std::fs::create_dir_all(root.join(&dir)).unwrap();
        let len = (rng.next() % (MAX_FILE + 1)) as usize;
        let mut data = Vec::with_capacity(len + 8);
        while data.len() < len {
            data.extend_from_slice(&rng.next().to_le_bytes());
        }
        data.truncate(len);
        let rel = dir.join(format!("file{i:03}.bin"));
        std::fs::write(root.join(&rel), &data).unwrap();
        manifest.push((rel, len, fnv1a(&data)));
    }
    manifest
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let ty = e.file_type().unwrap();
            if ty.is_dir() {
                count_files(&e.path())
            } else {
                usize::from(ty.is_file())
            }
        })
        .sum()
}

fn verify_tree(root: &Path, manifest: &Manifest) {
    for (rel, len, sum) in manifest {
        let data = std::fs::read(root.join(rel)).unwrap();
        assert_eq!(data.len(), *len, "{} has the wrong size", rel.display());
        assert_eq!(
            fnv1a(&data),
            *sum,
            "{} has the wrong contents",
            rel.display()
        );
    }
    // lost+found is a directory: only our files are regular files.
    assert_eq!(count_files(root), manifest.len());
}

#[test]
fn ext4_on_a_loop_device_over_the_fuse_export() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = missing_prerequisites() {
        assert!(
            std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_none(),
            "MOAT_REQUIRE_ROOT_TOOLS is set but the export end-to-end test cannot run: {why}"
        );
        eprintln!("skipping the export end-to-end test: {why}");
        return;
    }
    let seed = std::env::var("MOAT_EXPORT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed {seed} (MOAT_EXPORT_SEED to repeat)");
    let mut rng = Rng(seed);
    let total = Instant::now();
    let mut step = Instant::now();
    let mut lap = |what: &str| {
        eprintln!("{what:>24}: {:>8.1?}", step.elapsed());
        step = Instant::now();
    };

    // Guards are dropped in reverse order: the ext4 mount, the loop device,
    // then the FUSE mount, then the directories.
    let fuse_dir = TempDir::new("fuse");
    let ext_dir = TempDir::new("ext4");
    let backend = MemBackend::new();
    let export = export::mount(backend.clone(), &fuse_dir.0, "disk.img").unwrap();
    let file = export.path();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), CAPACITY as u64);
    lap("FUSE mount");

    let (mut loop_dev, direct_io) = LoopDev::attach(&file);
    eprintln!(
        "{} (direct I/O {}, dio in sysfs: {:?})",
        loop_dev.dev,
        if direct_io { "requested" } else { "refused" },
        loop_dev.sysfs("dio")
    );
    lap("losetup");

    run_ok("mkfs.ext4", &["-q", "-F", &loop_dev.dev]);
    lap("mkfs.ext4");

    let mut ext = FsMount::ext4(&loop_dev.dev, &ext_dir.0);
    lap("mount ext4");
    let manifest = write_tree(&ext_dir.0, &mut rng);
    let bytes: usize = manifest.iter().map(|m| m.1).sum();
    lap(&format!("write {FILES} files"));
    let flushes = backend.flushes.load(Ordering::SeqCst);
    run_ok("sync", &[]);
    lap("sync");
    ext.unmount();
    lap("umount");
    assert!(
        backend.flushes.load(Ordering::SeqCst) > flushes,
        "sync and umount flushed nothing to the backend"
    );

    run_ok("fsck.ext4", &["-fn", &loop_dev.dev]);
    lap("fsck.ext4 -fn");

    let mut ext = FsMount::ext4(&loop_dev.dev, &ext_dir.0);
    verify_tree(&ext_dir.0, &manifest);
    ext.unmount();
    lap("mount, verify, umount");

    assert!(loop_dev.detach(), "{} kept its file", loop_dev.dev);
    lap("losetup -d");
    export.unmount().unwrap();
    lap("FUSE unmount");

    assert_eq!(backend.misaligned.load(Ordering::SeqCst), 0);
    eprintln!(
        "{FILES} files, {} KiB; backend: {} reads, {} writes, {} flushes; total {:.1?}",
        bytes >> 10,
        backend.reads.load(Ordering::Relaxed),
        backend.writes.load(Ordering::Relaxed),
        backend.flushes.load(Ordering::SeqCst),
        total.elapsed()
    );
}

/// The whole story: a file-backed driver picoprocess behind the mediator,
/// exported through FUSE, made a loop device, formatted, mounted, filled
/// while the driver is killed again and again, checked clean by fsck, and
/// read back intact; on each host.
#[test]
fn ext4_over_a_mediated_driver_survives_its_kills() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use moat_mediator::block::{Config, DriverSpec, MediatedBlock, SECTION};
    if let Some(why) = missing_prerequisites() {
        assert!(
            std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_none(),
            "MOAT_REQUIRE_ROOT_TOOLS is set but the export end-to-end test cannot run: {why}"
        );
        eprintln!("skipping the mediated export test: {why}");
        return;
    }
    let mut hosts = vec![moat_monitor::Host::Linux];
    if moat_tests::kvm_available() {
        hosts.push(moat_monitor::Host::Kvm);
    }
    for host in hosts {
        let seed = 0x5eed ^ host as u64;
        let mut rng = Rng(seed);
        let work = TempDir::new("disk");
        let disk = work.0.join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(CAPACITY as u64)
            .unwrap();
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
            Config::default(),
        )
        .unwrap();
        let fuse_dir = TempDir::new("fuse");
        let ext_dir = TempDir::new("ext4");
        let export = export::mount(Arc::new(dev.clone()), &fuse_dir.0, "disk.img").unwrap();
        let (mut loop_dev, _) = LoopDev::attach(&export.path());
        // Kill the driver every 60 ms from now until at least 20 kills
        // have happened and the work is done.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kills = Arc::new(AtomicU64::new(0));
        let chaos = {
            let (dev, stop, kills) = (dev.clone(), stop.clone(), kills.clone());
            std::thread::spawn(move || {
                // Until the mediator has seen 20 driver deaths. While the
                // work runs, only a driver that has completed something since
                // the last kill is killed: killing every new driver before
                // it serves (a kvm start can take longer than 60 ms on a
                // loaded machine) is a driver that never works, which opens
                // the mediator's circuit by design and is not this test.
                let crashes =
                    |d: &MediatedBlock| d.counters().violations.get("crash").copied().unwrap_or(0);
                let mut served = 0;
                while !stop.load(Ordering::SeqCst) || crashes(&dev) < 20 {
                    std::thread::sleep(Duration::from_millis(60));
                    let completed = dev.counters().completed;
                    if completed > served || stop.load(Ordering::SeqCst) {
                        served = completed;
                        dev.kill_driver();
                        kills.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        run_ok("mkfs.ext4", &["-q", "-F", &loop_dev.dev]);
        let mut ext = FsMount::ext4(&loop_dev.dev, &ext_dir.0);
        let manifest = write_tree(&ext_dir.0, &mut rng);
        run_ok("sync", &[]);
        stop.store(true, Ordering::SeqCst);
        chaos.join().unwrap();
        ext.unmount();
        eprintln!("{host:?} after the writes: {:?}", {
            let mut c = dev.counters();
            c.recovery.clear();
            c
        });
        run_ok("fsck.ext4", &["-fn", &loop_dev.dev]);
        let mut ext = FsMount::ext4(&loop_dev.dev, &ext_dir.0);
        verify_tree(&ext_dir.0, &manifest);
        ext.unmount();
        assert!(loop_dev.detach(), "{} kept its file", loop_dev.dev);
        export.unmount().unwrap();
        let c = dev.counters();
        eprintln!(
            "{host:?}: {} kills, {} restarts, {} requests, {} re-issued, failed {}",
            kills.load(Ordering::SeqCst),
            c.restarts,
            c.requests,
            c.reissued,
            c.failed
        );
        let crashes = c.violations.get("crash").copied().unwrap_or(0);
        assert!(
            crashes >= 20 && c.restarts >= 20,
            "{host:?}: only {crashes} kills seen: {c:?}"
        );
        assert_eq!(c.failed, 0, "{host:?}: clients saw failures: {c:?}");
        assert_eq!(c.duplicate_completions, 0);
        dev.shutdown();
    }
}

/// The export keeps the loop device's concurrent requests in flight at
/// once, through the mediator to the driver: 32 threads reading 4 KiB
/// with `O_DIRECT` put far more than the FUSE threads' number (4) in
/// flight to the driver, which a FUSE thread per request never did.
#[test]
fn a_mediated_export_keeps_many_reads_in_flight() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use moat_mediator::block::{Config, DriverSpec, MediatedBlock, SECTION};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if let Some(why) = missing_prerequisites() {
        assert!(
            std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_none(),
            "MOAT_REQUIRE_ROOT_TOOLS is set but the export end-to-end test cannot run: {why}"
        );
        eprintln!("skipping the mediated export test: {why}");
        return;
    }
    const READERS: usize = 32;
    let work = TempDir::new("depth");
    let disk = work.0.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(CAPACITY as u64)
        .unwrap();
    let uri = format!("file:{}", disk.display());
    let mut policy = moat_policy::Policy::default();
    policy.limits.memory_mib = 64;
    policy.allow(&uri, moat_policy::Access::Rw).unwrap();
    let dev = MediatedBlock::start(
        DriverSpec {
            files: Vec::new(),
            image: moat_tests::built("blk-file"),
            args: vec![SECTION.into(), uri],
            host: moat_monitor::Host::Linux,
            policy,
            faults: None,
            console: false,
        },
        Config::default(),
    )
    .unwrap();
    let fuse_dir = TempDir::new("fuse");
    let export = export::mount(Arc::new(dev.clone()), &fuse_dir.0, "disk.img").unwrap();
    let (mut loop_dev, direct_io) = LoopDev::attach(&export.path());
    assert!(direct_io, "the loop device refused direct I/O");
    let until = Instant::now() + Duration::from_secs(1);
    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            let path = loop_dev.dev.clone();
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .unwrap();
                // O_DIRECT wants an aligned buffer.
                let mut mem = vec![0u8; 8192];
                let at = mem.as_ptr().align_offset(4096);
                let buf = &mut mem[at..at + 4096];
                let mut rng = Rng(i as u64);
                let mut reads = 0u64;
                while Instant::now() < until {
                    let block = rng.next() % (CAPACITY as u64 / 4096);
                    f.read_exact_at(buf, block * 4096).unwrap();
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(loop_dev.detach(), "{} kept its file", loop_dev.dev);
    export.unmount().unwrap();
    let c = dev.counters();
    eprintln!("{reads} reads, at most {} in flight", c.peak_in_flight);
    assert!(
        c.peak_in_flight > 4,
        "at most {} requests were in flight to the driver",
        c.peak_in_flight
    );
    assert_eq!(c.failed, 0);
    dev.shutdown();
}
