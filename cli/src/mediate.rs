//! `moat serve`, `moat demo`, `moat campaign`: a block driver picoprocess
//! behind the safe mediator.
use crate::bad_input;
use clap::{Args, ValueEnum};
use moat_mediator::block::{Config, Counters, DriverSpec, FaultPlan, SECTION};
use moat_mediator::campaign::{self, Campaign};
use moat_monitor::disklock::DiskLock;
use moat_policy::{Access, DeviceSpec, Policy};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Host {
    Linux,
    Kvm,
}

/// Which driver serves the disk, where.
#[derive(Args, Debug, Clone)]
pub struct DriverArgs {
    /// The host the driver picoprocess runs on.
    #[arg(long, value_enum, default_value_t = Host::Linux)]
    pub host: Host,
    /// The driver: `blk-file` (serves the disk file; both hosts) or
    /// `virtio-blk` (kvm only: a virtio-mmio disk backed by the file).
    #[arg(long, default_value = "blk-file")]
    pub driver: String,
    /// A request the driver does not answer within this ends the driver
    /// (`moat campaign`: 100 unless given).
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub deadline_ms: u64,
    /// Restarts in a row without progress before requests fail (`moat
    /// campaign`: 10 unless given).
    #[arg(long, default_value_t = 5)]
    pub max_failed_restarts: u32,
    /// Inject driver faults: SEED:PER_MILLION:KIND[,KIND...] with kinds
    /// crash, panic, hang, double, wrong-id, wrong-len, bad-status, oom,
    /// flood, bad-index, outside-pool, wrong-buf, torn, or all.
    #[arg(long, value_name = "SPEC")]
    pub faults: Option<String>,
    /// Show the driver's console and log lines.
    #[arg(long)]
    pub driver_console: bool,
    /// Boot every new driver from its image. By default the first driver
    /// is checkpointed at its first open (a template), and the next one is
    /// restored from it ahead of time and stands by (a second, idle
    /// driver process), so a restart takes well under a millisecond;
    /// never with --faults (each driver's faults are its arguments).
    #[arg(long)]
    pub no_template: bool,
}

/// The disks' block size: both drivers serve 512-byte blocks.
const BLOCK: u64 = 512;

/// Check a disk file up front, so that what would fail later (or be
/// silently cut short) is refused now with the reason: a regular file, a
/// whole number of blocks, at least one, that can be opened for what it
/// is served for. Returns its canonical path.
fn check_disk(disk: &Path, read_only: bool) -> Result<PathBuf, String> {
    let path =
        std::fs::canonicalize(disk).map_err(|e| format!("disk `{}`: {e}", disk.display()))?;
    let meta = std::fs::metadata(&path).map_err(|e| format!("disk `{}`: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("disk `{}` is not a regular file", path.display()));
    }
    let size = meta.len();
    if size < BLOCK {
        return Err(format!(
            "disk `{}` is {size} bytes, smaller than one {BLOCK}-byte block: make it at least {BLOCK} bytes (e.g. `truncate -s 64M {}`)",
            path.display(),
            path.display()
        ));
    }
    if !size.is_multiple_of(BLOCK) {
        return Err(format!(
            "disk `{}` is {size} bytes, not a whole number of {BLOCK}-byte blocks (the last {} bytes could not be served): round it up with `truncate -s %{BLOCK} {}`",
            path.display(),
            size % BLOCK,
            path.display()
        ));
    }
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&path);
    if let Err(e) = opened {
        let hint = match e.raw_os_error() {
            Some(libc::EROFS | libc::EPERM | libc::EACCES | libc::ETXTBSY) if !read_only => {
                "; to serve it read-only, add --read-only"
            }
            _ => "",
        };
        return Err(format!(
            "disk `{}` cannot be opened {}: {e}{hint}",
            path.display(),
            if read_only {
                "for reading"
            } else {
                "read-write"
            },
        ));
    }
    Ok(path)
}

impl DriverArgs {
    /// The driver and mediator for `disk`, checked (see [`check_disk`]) and
    /// locked for serving (the lock is held while the result lives).
    fn spec(
        &self,
        disk: &Path,
        read_only: bool,
    ) -> Result<(DriverSpec, Config, std::sync::Arc<DiskLock>), String> {
        let disk = check_disk(disk, read_only)?;
        let lock = DiskLock::acquire(&disk, !read_only).map_err(|e| e.to_string())?;
        let mut policy = Policy::default();
        policy.limits.memory_mib = 64;
        let (image, args, host) = match (self.driver.as_str(), self.host) {
            ("blk-file", h) => {
                let uri = format!("file:{}", disk.display());
                let access = if read_only { Access::Ro } else { Access::Rw };
                policy.allow(&uri, access).map_err(|e| e.to_string())?;
                let mut args: Vec<String> = Vec::new();
                if read_only {
                    args.push("--read-only".into());
                }
                args.extend([SECTION.to_string(), uri]);
                (
                    "blk-file",
                    args,
                    if h == Host::Kvm {
                        moat_monitor::Host::Kvm
                    } else {
                        moat_monitor::Host::Linux
                    },
                )
            }
            ("virtio-blk", Host::Kvm) => {
                let mut d = DeviceSpec::parse(&format!("blk0=virtio-blk:{}", disk.display()))
                    .map_err(|e| e.to_string())?;
                d.read_only = read_only;
                policy.add_device(d).map_err(|e| e.to_string())?;
                (
                    "virtio-blk",
                    vec!["blk0".into(), "serve".into(), SECTION.into()],
                    moat_monitor::Host::Kvm,
                )
            }
            ("virtio-blk", Host::Linux) => {
                return Err("the virtio-blk driver needs a device: add --host kvm".into())
            }
            (other, _) => {
                return Err(format!(
                    "unknown driver `{other}`; the drivers are `blk-file` and `virtio-blk`"
                ))
            }
        };
        let image = crate::resolve::resolve(image)?;
        let faults = match &self.faults {
            None => None,
            Some(s) => Some(parse_faults(s)?),
        };
        Ok((
            DriverSpec {
                files: Vec::new(),
                image,
                args,
                host,
                policy,
                faults,
                console: self.driver_console,
            },
            Config {
                deadline: Duration::from_millis(self.deadline_ms.max(1)),
                start_timeout: Duration::from_millis(self.deadline_ms.max(1))
                    .max(Duration::from_secs(1)),
                max_failed_restarts: self.max_failed_restarts,
                read_only,
                templates: !self.no_template,
                ..Config::default()
            },
            lock,
        ))
    }
}

fn check_kinds(kinds: &str) -> Result<(), String> {
    moat_service_proto::fault::parse(kinds)
        .map(|_| ())
        .map_err(|k| {
            let names: Vec<&str> = moat_service_proto::fault::NAMES
                .iter()
                .map(|(n, _)| *n)
                .collect();
            format!(
                "unknown fault kind `{k}`; the kinds are {}",
                names.join(", ")
            )
        })
}

/// The faults of a NIC's or a serial line's drivers (`--faults`), after
/// refusing what is only for disks.
pub(crate) fn stream_faults(a: &ServeArgs) -> Result<Option<FaultPlan>, String> {
    if a.read_only {
        return Err("--read-only is for disks".into());
    }
    a.driver.faults.as_deref().map(parse_faults).transpose()
}

pub(crate) fn parse_faults(s: &str) -> Result<FaultPlan, String> {
    let bad = || {
        format!("bad fault spec `{s}`: SEED:PER_MILLION:KIND[,KIND...] (e.g. 7:20000:crash,hang)")
    };
    let mut it = s.splitn(3, ':');
    let seed = it.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let per_million = it
        .next()
        .and_then(|x| x.parse().ok())
        .filter(|&p: &u32| p <= 1_000_000)
        .ok_or_else(bad)?;
    let kinds = it.next().filter(|k| !k.is_empty()).ok_or_else(bad)?;
    if let Err(k) = moat_service_proto::fault::parse(kinds) {
        let names: Vec<&str> = moat_service_proto::fault::NAMES
            .iter()
            .map(|(n, _)| *n)
            .collect();
        return Err(format!(
            "unknown fault kind `{k}`; the kinds are {}",
            names.join(", ")
        ));
    }
    Ok(FaultPlan {
        seed,
        per_million,
        kinds: kinds.to_string(),
    })
}

/// Print the mediator's counters.
pub fn print_counters(c: &Counters, out: &mut impl Write) {
    let _ = writeln!(
        out,
        "client requests {}  completed {}  failed {}  sent to drivers {}  re-issued {}  restarts {}  circuit opened {}",
        c.submitted, c.completed, c.failed, c.requests, c.reissued, c.restarts, c.circuit_opened
    );
    let v: Vec<String> = c
        .violations
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "faults seen {}: {}",
        c.faults(),
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    );
    if let Some(why) = &c.last_start_failure {
        let _ = writeln!(
            out,
            "driver starts that failed: {} (the last: {why})",
            c.failed_starts
        );
    }
    if let (Some(p50), Some(p99)) = (c.recovery_percentile(0.5), c.recovery_percentile(0.99)) {
        let _ = writeln!(
            out,
            "recovery time: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            c.recovery_percentile(1.0).unwrap().as_secs_f64() * 1e3
        );
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub driver: DriverArgs,
    /// How long to run the workload.
    #[arg(long, value_name = "SECONDS", default_value_t = 3)]
    pub seconds: u64,
}

/// `moat demo`: a disk served by a driver picoprocess through the
/// mediator, a verified workload, crashes and lies injected, counters.
pub fn demo(a: DemoArgs) -> i32 {
    let dir = std::env::temp_dir().join(format!("moat-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return bad_input(format!("cannot create {}: {e}", dir.display()));
    }
    let disk = dir.join("disk.img");
    let made = std::fs::File::create(&disk).and_then(|f| f.set_len(16 << 20));
    if let Err(e) = made {
        return bad_input(format!("cannot create {}: {e}", disk.display()));
    }
    let mut da = a.driver.clone();
    if da.faults.is_none() {
        da.faults = Some("1:20000:crash,panic,double,wrong-id,wrong-len,bad-status,flood".into());
    }
    if a.driver.deadline_ms == 2000 {
        da.deadline_ms = 250;
    }
    let (spec, config, _lock) = match da.spec(&disk, false) {
        Ok(v) => v,
        Err(e) => return bad_input(e),
    };
    println!(
        "moat demo: a {} MiB disk served by the `{}` driver picoprocess on {:?}, through the safe mediator",
        16,
        a.driver.driver,
        a.driver.host
    );
    println!(
        "injected: driver faults {} (rate per million requests), and a kill from outside every 500 requests",
        da.faults.as_deref().unwrap_or("-")
    );
    let plan = spec.faults.clone().unwrap();
    let c = Campaign {
        driver: spec,
        config,
        faults: u64::MAX,
        seed: plan.seed,
        per_million: plan.per_million,
        kinds: plan.kinds.clone(),
        kill_every: 500,
        hang_after: Duration::from_secs(10),
        time_limit: Duration::from_secs(a.seconds),
        depth: 32,
    };
    let r = campaign::run(&c, |_, _| {});
    let _ = std::fs::remove_dir_all(&dir);
    match r {
        Ok(r) => {
            println!(
                "workload: {} verified requests in {:.1} s: {} data mismatches, {} errors, {} hangs",
                r.requests,
                r.elapsed.as_secs_f64(),
                r.mismatches,
                r.errors,
                r.hangs
            );
            print_counters(&r.counters, &mut std::io::stdout());
            if r.mismatches == 0 && r.errors == 0 && r.hangs == 0 {
                println!("the clients saw delays, not failures");
                0
            } else {
                println!("FAILED: the clients saw failures");
                1
            }
        }
        Err(e) => {
            eprintln!("moat: {e}");
            moat_monitor::EXIT_HOST_FAILURE
        }
    }
}

#[derive(Args, Debug)]
pub struct CampaignArgs {
    #[command(flatten)]
    pub driver: DriverArgs,
    /// Faults to inject (the run ends when the mediator has seen them).
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Fault probability per request, per million.
    #[arg(long, default_value_t = 50_000)]
    pub per_million: u32,
    /// Fault kinds (comma-separated, or `all`).
    #[arg(long, default_value = "all")]
    pub kinds: String,
    /// Also kill the driver from outside every N requests (0: never).
    #[arg(long, default_value_t = 200)]
    pub kill_every: u64,
    /// The disk file (default: a fresh 16 MiB file in a temporary directory).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub time_limit: u64,
    /// Requests the workload keeps in flight (1 to 1024).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub depth: u16,
}

/// `moat campaign`: seeded faults through the mediator, every byte checked.
pub fn campaign(a: CampaignArgs) -> i32 {
    if let Err(e) = check_kinds(&a.kinds) {
        return bad_input(e);
    }
    let tmp = std::env::temp_dir().join(format!("moat-campaign-{}", std::process::id()));
    let disk = match &a.disk {
        Some(d) => d.clone(),
        None => {
            let p = tmp.join("disk.img");
            let made = std::fs::create_dir_all(&tmp)
                .and_then(|_| std::fs::File::create(&p))
                .and_then(|f| f.set_len(16 << 20));
            if let Err(e) = made {
                return bad_input(format!("cannot create {}: {e}", p.display()));
            }
            p
        }
    };
    let mut da = a.driver.clone();
    if a.driver.deadline_ms == 2000 {
        da.deadline_ms = 100;
    }
    // At 5% faults per request and 32 requests re-issued per restart, about
    // one incarnation in ten ends before completing anything: five in a row
    // (the default) open the circuit about once per 10^5 restarts, which a
    // 10,000-fault run hits now and then although nothing kills every
    // driver. Ten in a row: about once per 10^10.
    if a.driver.max_failed_restarts == 5 {
        da.max_failed_restarts = 10;
    }
    let (spec, config, _lock) = match da.spec(&disk, false) {
        Ok(v) => v,
        Err(e) => return bad_input(e),
    };
    let c = Campaign {
        driver: spec,
        config,
        faults: a.count,
        seed: a.seed,
        per_million: a.per_million,
        kinds: a.kinds.clone(),
        kill_every: a.kill_every,
        hang_after: Duration::from_secs(10),
        time_limit: Duration::from_secs(a.time_limit),
        depth: a.depth.into(),
    };
    let bar = indicatif::ProgressBar::new(a.count);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} faults ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let r = campaign::run(&c, |seen, _| {
        if !stop.load(Ordering::Relaxed) {
            bar.set_position(seen);
        }
    });
    stop.store(true, Ordering::Relaxed);
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&tmp);
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            eprintln!("moat: {e}");
            return moat_monitor::EXIT_HOST_FAILURE;
        }
    };
    println!(
        "campaign: seed {}, {} faults in {:.1} s, {} verified requests",
        a.seed,
        r.faults,
        t0.elapsed().as_secs_f64(),
        r.requests
    );
    println!(
        "the mediator ran to the end (no host crash); hangs {}, lost or failed requests {}, duplicated completions {}, data mismatches {}",
        r.hangs, r.errors, r.counters.duplicate_completions, r.mismatches
    );
    print_counters(&r.counters, &mut std::io::stdout());
    if r.timed_out {
        println!("the time limit ended the run before {} faults", a.count);
    }
    if r.clean() {
        0
    } else {
        1
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub driver: DriverArgs,
    /// The disk image the driver serves: an existing regular file, a whole
    /// number of 512-byte blocks. It is locked while served.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present_any = ["nic", "pty"],
        conflicts_with_all = ["nic", "pty"]
    )]
    pub disk: Option<PathBuf>,
    /// An empty directory to mount the disk on, as the file DIR/NAME.
    #[arg(long, value_name = "DIR", required_unless_present_any = ["nic", "pty"])]
    pub mount: Option<PathBuf>,
    /// Serve a serial line instead of a disk, as a PTY whose path is
    /// printed: its bytes go through the mediator to the UART driver
    /// picoprocess (`uart-driver`, --host kvm only), whose UART's line
    /// ends in a loopback plug held by this process (every byte sent
    /// comes back).
    #[arg(long, conflicts_with_all = ["nic", "mount"])]
    pub pty: bool,
    /// Serve a network interface instead of a disk: a TAP interface
    /// IFNAME made in this network namespace, its frames through the
    /// mediator to a NIC driver picoprocess (`net-soft`, host-linux),
    /// whose wire is the interface `moat0` made in --wire-netns.
    #[arg(long, value_name = "IFNAME", requires = "wire_netns")]
    pub nic: Option<String>,
    /// The network namespace (`ip netns add NS`) where the NIC's wire,
    /// the interface `moat0`, is made: the stand-in for the network.
    #[arg(long, value_name = "NS", requires = "nic")]
    pub wire_netns: Option<String>,
    /// The file name in the mount.
    #[arg(long, default_value = "disk")]
    pub name: String,
    /// Serve the disk read-only: the driver opens it for reading, the file
    /// in the mount is read-only, and every write fails with EROFS.
    #[arg(long)]
    pub read_only: bool,
    /// Kill the driver picoprocess every MS milliseconds (fault injection
    /// from outside: the mediator restarts it each time).
    #[arg(long, value_name = "MS", value_parser = positive_ms)]
    pub kill_every: Option<u64>,
    /// Serve for this many seconds, then stop as on SIGTERM (default:
    /// until SIGINT or SIGTERM).
    #[arg(long, value_name = "SECONDS")]
    pub seconds: Option<u64>,
}

fn positive_ms(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("it must be a positive number of milliseconds (0 would kill every driver before it served anything)".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("not a number of milliseconds: {e}")),
    }
}

/// Stop signals received (SIGINT, SIGTERM).
pub(crate) static SIGNALS: AtomicU32 = AtomicU32::new(0);

/// SIGINT and SIGTERM count in [`SIGNALS`] from now on.
pub(crate) fn catch_stop_signals() {
    // SAFETY: the handler only increments an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as usize);
        libc::signal(libc::SIGTERM, on_stop as *const () as usize);
    }
}

extern "C" fn on_stop(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// How often a stopping server tries to unmount while its export is in use.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Exit code of a stop forced while the export was in use.
pub const EXIT_FORCED_STOP: i32 = 1;

/// `moat serve`: a driver picoprocess serves a disk through the mediator,
/// exported as a file in a FUSE mount (attach it with `losetup`).
///
/// Stopping (SIGTERM, SIGINT, or the end of `--seconds`) is orderly: the
/// export is unmounted only once nothing uses it (no loop device, no open
/// file), and until then it is served as before, which is said once. Then
/// the mediator finishes what is in flight, the disk is flushed, the
/// driver is stopped, the counters are printed, and the exit code is 0.
/// A second signal forces the stop at once: the export is detached
/// lazily, its users get I/O errors, and the exit code is
/// [`EXIT_FORCED_STOP`].
pub fn serve(a: ServeArgs) -> i32 {
    let (Some(disk), Some(mount)) = (a.disk.clone(), a.mount.clone()) else {
        return bad_input(
            "--disk FILE and --mount DIR are needed (or --nic IFNAME --wire-netns NS, or --pty)",
        );
    };
    let a = ServeDisk { a, disk, mount };
    serve_disk(a)
}

/// `moat serve` for a disk: its arguments, the disk and the mount point
/// given.
struct ServeDisk {
    a: ServeArgs,
    disk: PathBuf,
    mount: PathBuf,
}

fn serve_disk(d: ServeDisk) -> i32 {
    let ServeDisk {
        a,
        disk,
        mount: mount_dir,
    } = d;
    let (spec, config, _lock) = match a.driver.spec(&disk, a.read_only) {
        Ok(v) => v,
        Err(e) => return bad_input(e),
    };
    match moat_mediator::export::check_mount_point(&mount_dir) {
        Ok(moat_mediator::export::MountPointState::Ready) => {}
        Ok(moat_mediator::export::MountPointState::ClearedStale) => eprintln!(
            "moat: cleared the stale mount a killed moat server had left on {}",
            mount_dir.display()
        ),
        Err(e) => return bad_input(e),
    }
    let dev = match moat_mediator::block::MediatedBlock::start(spec, config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("moat: {e}");
            return moat_monitor::EXIT_HOST_FAILURE;
        }
    };
    let mut mount = match moat_mediator::export::mount(Arc::new(dev.clone()), &mount_dir, &a.name) {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "moat: cannot mount the disk on {}: {e}",
                mount_dir.display()
            );
            dev.shutdown();
            return moat_monitor::EXIT_HOST_FAILURE;
        }
    };
    catch_stop_signals();
    println!(
        "serving {} ({} bytes, {}-byte blocks{}) at {}; attach it with: losetup --find --show --direct-io=on {}",
        disk.display(),
        dev.capacity(),
        dev.block_size(),
        if a.read_only { ", read-only" } else { "" },
        mount.path().display(),
        mount.path().display()
    );
    let _ = std::io::stdout().flush();
    let t0 = Instant::now();
    let mut last_kill = Instant::now();
    // Signals seen when the stop began; one more forces it.
    let mut stopping: Option<u32> = None;
    let mut last_try = Instant::now() - STOP_POLL;
    let mut said_busy = false;
    let forced = loop {
        std::thread::sleep(Duration::from_millis(10));
        let sigs = SIGNALS.load(Ordering::SeqCst);
        if stopping.is_none()
            && (sigs > 0
                || a.seconds
                    .is_some_and(|s| t0.elapsed() >= Duration::from_secs(s)))
        {
            stopping = Some(sigs.max(1));
        }
        if let Some(at) = stopping {
            if sigs > at {
                break true;
            }
            if last_try.elapsed() >= STOP_POLL {
                last_try = Instant::now();
                match mount.try_unmount() {
                    Ok(true) => break false,
                    Ok(false) if !said_busy => {
                        said_busy = true;
                        let users = mount.users();
                        let (who, how) = if users.is_empty() {
                            ("a process that has it open".to_string(), String::new())
                        } else {
                            (
                                users.join(", "),
                                format!(
                                    " (unmount what is mounted from it, then `losetup -d {}`)",
                                    users.join(" ")
                                ),
                            )
                        };
                        eprintln!(
                            "moat: stopping: {} is still in use by {who}; serving it until its last user lets go{how}; signal again to stop now, failing its I/O",
                            mount.path().display()
                        );
                    }
                    Ok(false) => {}
                    Err(e) => {
                        eprintln!("moat: unmounting {}: {e}", mount_dir.display());
                        break true;
                    }
                }
            }
        }
        if let Some(ms) = a.kill_every {
            if stopping.is_none() && last_kill.elapsed() >= Duration::from_millis(ms) {
                dev.kill_driver();
                last_kill = Instant::now();
            }
        }
    };
    if forced {
        let users = mount.users();
        let _ = mount.unmount();
        dev.shutdown();
        print_counters(&dev.counters(), &mut std::io::stdout());
        eprintln!(
            "moat: stopped by force while {} was {}: what it had in flight failed",
            mount_dir.join(&a.name).display(),
            if users.is_empty() {
                "in use".to_string()
            } else {
                format!("in use by {}", users.join(", "))
            }
        );
        return EXIT_FORCED_STOP;
    }
    let flushed = if a.read_only { Ok(()) } else { dev.flush() };
    dev.shutdown();
    print_counters(&dev.counters(), &mut std::io::stdout());
    match flushed {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("moat: the last flush of the disk failed: {e}");
            moat_monitor::EXIT_HOST_FAILURE
        }
    }
}
