//! `export`: what a user of `moat serve` sees. `fio` on a loop device over
//! the FUSE export of a mediated disk (the `blk-file` driver picoprocess on
//! host-linux behind the mediator), against `fio` on a loop device over the
//! plain disk file, in the same run.
//!
//! - `export.fio.randread4k.qd32`: 4 KiB random reads, 32 in flight
//!   (`libaio`, `O_DIRECT` on the loop device): IOPS.
//! - `export.fio.seq1m`: 1 MiB sequential reads, 8 in flight: MB/s.
//!
//! Both loop devices are opened by fio with `O_DIRECT`, so neither side is
//! served from the loop device's own page cache. The floor's loop device
//! reads its backing file through the host page cache (buffered, where the
//! file is warm), which is what the driver picoprocess does with the same
//! file; the export's loop device uses direct I/O on the FUSE file (the
//! export opens it `FOPEN_DIRECT_IO`), so every request reaches the
//! mediator and the driver, and many at once (loop's direct I/O is
//! asynchronous).
//!
//! Needs root, `/dev/fuse`, `losetup` and `fio`; without them the group
//! says what is missing and measures nothing, unless
//! `MOAT_REQUIRE_ROOT_TOOLS` is set, when that is an error (exit 1).
use crate::{image, note, row};
use moat_mediator::block::{Config, DriverSpec, MediatedBlock, SECTION};
use moat_mediator::export;
use moat_policy::{Access, Policy};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// Size of the disk: large enough that 4 KiB random reads do not stay in
/// one CPU cache, small enough to fill quickly.
const DISK: u64 = 256 << 20;

/// What is missing for this group, if anything.
fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("root (loop devices, FUSE mounts)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse".into());
    }
    for tool in ["losetup", "fio"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{tool}` (apt-get install fio util-linux)"));
        }
    }
    None
}

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path, direct_io: bool) -> Result<Self, String> {
        let mut c = Command::new("losetup");
        c.args(["--find", "--show"]);
        if direct_io {
            c.arg("--direct-io=on");
        }
        let out = c.arg(file).output().map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// One fio job on `dev`; returns (IOPS, MB/s) of its reads.
fn fio(dev: &str, rw: &str, bs: &str, depth: u32, secs: u32) -> Result<(f64, f64), String> {
    let out = Command::new("fio")
        .args([
            "--name=moat-bench",
            &format!("--filename={dev}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            "--ioengine=libaio",
            "--direct=1",
            "--numjobs=1",
            "--time_based",
            "--ramp_time=1",
            &format!("--runtime={secs}"),
            "--randseed=2026",
            "--output-format=json",
        ])
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "fio on {dev} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // fio may print notes before its JSON.
    let json = text.find('{').map_or("", |i| &text[i..]);
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("fio's JSON: {e}: {text}"))?;
    let read = &v["jobs"][0]["read"];
    if read["io_bytes"].as_u64().unwrap_or(0) == 0 {
        return Err(format!("fio on {dev} read nothing: {text}"));
    }
    let iops = read["iops"].as_f64().unwrap_or(0.0);
    let mbs = read["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6;
    Ok((iops, mbs))
}

/// Busy and total jiffies of all CPUs (`/proc/stat`).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// One configuration's figures: random 4 KiB IOPS, the CPU time the whole
/// machine spent per random read (µs), sequential 1 MiB MB/s.
#[derive(Clone, Copy)]
struct Figures {
    iops: f64,
    cpu_us: f64,
    mbs: f64,
}

/// The two fio jobs.
fn jobs(dev: &str, secs: u32) -> Result<Figures, String> {
    let (b0, t0) = cpu_jiffies();
    let (iops, _) = fio(dev, "randread", "4k", 32, secs)?;
    let (b1, t1) = cpu_jiffies();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64 * cpus;
    let (_, mbs) = fio(dev, "read", "1m", 8, secs)?;
    Ok(Figures {
        iops,
        cpu_us: busy * 1e6 / iops.max(1.0),
        mbs,
    })
}

pub fn export_bench(quick: bool) {
    if let Some(what) = missing() {
        if std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_some() {
            eprintln!("moat-bench export: needs {what} (MOAT_REQUIRE_ROOT_TOOLS is set)");
            std::process::exit(1);
        }
        note(&format!("export: skipped, needs {what}"));
        return;
    }
    if let Err(e) = run(quick) {
        eprintln!("moat-bench export: {e}");
        std::process::exit(1);
    }
}

/// Seconds each fio job runs (after one second of ramp).
static SECS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(10);

fn secs_of_run() -> u32 {
    SECS.load(std::sync::atomic::Ordering::Relaxed)
}

fn run(quick: bool) -> Result<(), String> {
    if quick {
        SECS.store(1, std::sync::atomic::Ordering::Relaxed);
    }
    let dir = std::env::temp_dir().join(format!("moat-bench-export-{}", std::process::id()));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
    let result = measure(&dir, &mnt);
    let _ = std::fs::remove_dir_all(&dir);
    let (floor, moat) = result?;
    row(
        "export.fio.randread4k.qd32",
        moat.iops,
        floor.iops,
        "IOPS",
        "≥ 0.5",
    );
    row("export.fio.seq1m", moat.mbs, floor.mbs, "MB/s", "≥ 0.8");
    Ok(())
}

fn measure(dir: &Path, mnt: &Path) -> Result<(Figures, Figures), String> {
    let path = dir.join("disk.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // Real data, warm in the page cache for both sides.
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..(DISK >> 20) {
        chunk.iter_mut().for_each(|b| *b = i as u8);
        file.write_all_at(&chunk, i << 20)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // Written back before anything is measured: writeback running under
    // the first measurement slowed it several times over.
    file.sync_all()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    drop(file);

    // The floor: a loop device over the plain file, buffered underneath.
    let floor = {
        let dev = Loop::attach(&path, false)?;
        jobs(&dev.0, secs_of_run())?
    };

    // The export alone: the same FUSE export of the file read in-process,
    // without the mediator or a driver (what FUSE and loop cost).
    let bare = {
        let backend = Arc::new(FileBackend(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?,
        ));
        let mount = export::mount(backend, mnt, "disk")
            .map_err(|e| format!("the FUSE export at {}: {e}", mnt.display()))?;
        let r = over_export(&mount);
        mount
            .unmount()
            .map_err(|e| format!("unmounting {}: {e}", mnt.display()))?;
        r?
    };

    // moat: the same file behind the blk-file driver, the mediator and the
    // FUSE export, under a loop device with direct I/O.
    let uri = format!("file:{}", path.display());
    let mut policy = Policy::default();
    policy.limits.memory_mib = 64;
    policy
        .allow(&uri, Access::Rw)
        .map_err(|e| format!("policy: {e}"))?;
    let block = MediatedBlock::start(
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
    .map_err(|e| format!("the mediated disk: {e}"))?;
    let block = Arc::new(block);
    let mount = export::mount(block.clone(), mnt, "disk")
        .map_err(|e| format!("the FUSE export at {}: {e}", mnt.display()))?;
    let moat = over_export(&mount);
    let c = block.counters();
    mount
        .unmount()
        .map_err(|e| format!("unmounting {}: {e}", mnt.display()))?;
    block.shutdown();
    let moat = moat?;
    note(&format!(
        "export: the FUSE export of the plain file without the mediator: {:.0} IOPS ({:.2}x), \
         {:.0} MB/s ({:.2}x); CPU time per random read, whole machine: {:.1} µs plain loop, \
         {:.1} µs FUSE alone, {:.1} µs through the mediator; {} requests to the driver (at \
         most {} in flight), {} doorbells to it, {} from it",
        bare.iops,
        bare.iops / floor.iops,
        bare.mbs,
        bare.mbs / floor.mbs,
        floor.cpu_us,
        bare.cpu_us,
        moat.cpu_us,
        c.requests,
        c.peak_in_flight,
        c.kicks,
        c.bells
    ));
    Ok((floor, moat))
}

/// fio on a loop device (direct I/O where the kernel takes it) over the
/// exported file.
fn over_export(mount: &export::Mount) -> Result<Figures, String> {
    let dev = Loop::attach(&mount.path(), true).or_else(|_| Loop::attach(&mount.path(), false))?;
    jobs(&dev.0, secs_of_run())
}

/// The disk file served in-process: the export without the mediator.
struct FileBackend(std::fs::File);

impl export::BlockBackend for FileBackend {
    fn capacity(&self) -> u64 {
        DISK
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_all_at(data, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}
