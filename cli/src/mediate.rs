//! `moat serve`, `moat demo`, `moat campaign`: a block driver picoprocess
//! behind the safe mediator.
use crate::bad_input;
use clap::{Args, ValueEnum};
use moat_mediator::block::{Config, Counters, DriverSpec, FaultPlan, PIPE};
use moat_mediator::campaign::{self, Campaign};
use moat_policy::{Access, DeviceSpec, Policy};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// A request the driver does not answer within this ends the driver.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub deadline_ms: u64,
    /// Restarts in a row without progress before requests fail.
    #[arg(long, default_value_t = 5)]
    pub max_failed_restarts: u32,
    /// Inject driver faults: SEED:PER_MILLION:KIND[,KIND...] with kinds
    /// crash, panic, hang, double, wrong-id, wrong-len, bad-status, oom,
    /// flood, or all.
    #[arg(long, value_name = "SPEC")]
    pub faults: Option<String>,
    /// Show the driver's console and log lines.
    #[arg(long)]
    pub driver_console: bool,
}

impl DriverArgs {
    fn spec(&self, disk: &Path) -> Result<(DriverSpec, Config), String> {
        let disk =
            std::fs::canonicalize(disk).map_err(|e| format!("disk `{}`: {e}", disk.display()))?;
        if !disk.is_file() {
            return Err(format!("disk `{}` is not a regular file", disk.display()));
        }
        let mut policy = Policy::default();
        policy.limits.memory_mib = 64;
        let (image, args, host) = match (self.driver.as_str(), self.host) {
            ("blk-file", h) => {
                let uri = format!("file:{}", disk.display());
                policy.allow(&uri, Access::Rw).map_err(|e| e.to_string())?;
                (
                    "blk-file",
                    vec![PIPE.into(), uri],
                    if h == Host::Kvm {
                        moat_host_linux::Host::Kvm
                    } else {
                        moat_host_linux::Host::Linux
                    },
                )
            }
            ("virtio-blk", Host::Kvm) => {
                let d = DeviceSpec::parse(&format!("blk0=virtio-blk:{}", disk.display()))
                    .map_err(|e| e.to_string())?;
                policy.add_device(d).map_err(|e| e.to_string())?;
                (
                    "virtio-blk",
                    vec!["blk0".into(), "serve".into(), PIPE.into()],
                    moat_host_linux::Host::Kvm,
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
                ..Config::default()
            },
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

fn parse_faults(s: &str) -> Result<FaultPlan, String> {
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
        "requests {}  completed {}  failed {}  re-issued {}  restarts {}  circuit opened {}",
        c.requests, c.completed, c.failed, c.reissued, c.restarts, c.circuit_opened
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
    let (spec, config) = match da.spec(&disk) {
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
            moat_host_linux::EXIT_HOST_FAILURE
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
    let (spec, config) = match da.spec(&disk) {
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
            return moat_host_linux::EXIT_HOST_FAILURE;
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
    /// The disk image the driver serves (it must exist).
    #[arg(long, value_name = "FILE")]
    pub disk: PathBuf,
    /// An empty directory to mount the disk on, as the file DIR/NAME.
    #[arg(long, value_name = "DIR")]
    pub mount: PathBuf,
    /// The file name in the mount.
    #[arg(long, default_value = "disk")]
    pub name: String,
    /// Kill the driver picoprocess every MS milliseconds (fault injection
    /// from outside: the mediator restarts it each time).
    #[arg(long, value_name = "MS")]
    pub kill_every: Option<u64>,
    /// Serve for this many seconds, then unmount (default: until SIGINT
    /// or SIGTERM).
    #[arg(long, value_name = "SECONDS")]
    pub seconds: Option<u64>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// `moat serve`: a driver picoprocess serves a disk through the mediator,
/// exported as a file in a FUSE mount (attach it with `losetup`).
pub fn serve(a: ServeArgs) -> i32 {
    let (spec, config) = match a.driver.spec(&a.disk) {
        Ok(v) => v,
        Err(e) => return bad_input(e),
    };
    match std::fs::read_dir(&a.mount) {
        Ok(mut d) => {
            if d.next().is_some() {
                return bad_input(format!("mount point `{}` is not empty", a.mount.display()));
            }
        }
        Err(e) => return bad_input(format!("mount point `{}`: {e}", a.mount.display())),
    }
    let dev = match moat_mediator::block::MediatedBlock::start(spec, config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("moat: {e}");
            return moat_host_linux::EXIT_HOST_FAILURE;
        }
    };
    let mount = match moat_mediator::export::mount(Arc::new(dev.clone()), &a.mount, &a.name) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("moat: cannot mount the disk on {}: {e}", a.mount.display());
            dev.shutdown();
            return moat_host_linux::EXIT_HOST_FAILURE;
        }
    };
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as usize);
        libc::signal(libc::SIGTERM, on_stop as *const () as usize);
    }
    println!(
        "serving {} ({} bytes, {}-byte blocks) at {}; attach it with: losetup --find --show {}",
        a.disk.display(),
        dev.capacity(),
        dev.block_size(),
        mount.path().display(),
        mount.path().display()
    );
    let _ = std::io::stdout().flush();
    let t0 = Instant::now();
    let mut last_kill = Instant::now();
    while !STOP.load(Ordering::SeqCst)
        && a.seconds
            .is_none_or(|s| t0.elapsed() < Duration::from_secs(s))
    {
        std::thread::sleep(Duration::from_millis(10));
        if let Some(ms) = a.kill_every {
            if last_kill.elapsed() >= Duration::from_millis(ms) {
                dev.kill_driver();
                last_kill = Instant::now();
            }
        }
    }
    let unmounted = mount.unmount();
    let c = dev.counters();
    dev.shutdown();
    print_counters(&c, &mut std::io::stdout());
    match unmounted {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("moat: unmounting {}: {e}", a.mount.display());
            moat_host_linux::EXIT_HOST_FAILURE
        }
    }
}
