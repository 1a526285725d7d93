//! moat's Linux host: the picoprocess loader (binary `moat-loader`), the
//! small program the monitor execs inside new namespaces (or its zygote,
//! `moat-loader --zygote`, forks warm). It leaves the host's mounts,
//! confines itself for good (Landlock, then seccomp), receives its
//! configuration and the image descriptor from the monitor, maps the
//! image, and calls the image's entry (LibOsInitialize) with the start-up
//! block and the PAL function table.
//!
//! Everything it runs on is in `moat-host-common` (the PAL, the sandbox,
//! the wire to the monitor), which the KVM host's VMM shares; this crate
//! is only the loader's start-up.
use moat_host_common::pal::{self as hpal, LinuxPal};
use moat_host_common::protocol::{self, Config, ReportKind};
use moat_host_common::{image, mountns, sandbox, seal, signals, startup, sys, zygote};
use moat_pal::memory::RegionKind;
use moat_pal::{prot, PalTable};
use std::os::fd::{FromRawFd, OwnedFd};

mod resume;

/// A layer's line to the monitor's log.
fn layer_line(line: std::fmt::Arguments<'_>) {
    pal().tell(&protocol::Request::Debug {
        text: line.to_string(),
    });
}

fn pal() -> &'static LinuxPal {
    hpal::global()
}

fn fail(msg: &str) -> ! {
    signals::report(ReportKind::Startup, msg);
    sys::exit_process(protocol::EXIT_HOST_FAILURE)
}

/// The loader's `main`.
pub fn main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 2 && (args[1] == "--help" || args[1] == "-h") {
        println!(
            "moat-loader: moat's sandboxed picoprocess loader (host-linux).\n\n\
             The monitor starts it, in new namespaces, with its socket on descriptor 3;\n\
             it is not meant to be run by hand. Run picoprocesses with `moat run IMAGE`.\n\n\
             Usage (by the monitor only): moat-loader | moat-loader --zygote PATH"
        );
        std::process::exit(0);
    }
    if args.len() == 3 && args[1] == "--zygote" {
        zygote::main_with(&args[2], |_| run(), false);
    }
    if let Err(e) = mountns::enter_empty() {
        fail(&format!("loader: cannot leave the host's mounts: {e}"));
    }
    run()
}

/// Run one picoprocess: descriptor 3 is its monitor socket.
pub fn run() -> ! {
    // SAFETY: descriptor 3 is the monitor socket the monitor set up for us;
    // nothing else in this process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(protocol::MONITOR_FD) };

    // Confine first: from here on no path is reachable and only the
    // allow-listed system calls, made from the PAL's own code, are. The
    // image comes later, as a descriptor, so a loader can wait sandboxed
    // for work (the zygote keeps one warm).
    // The Rust runtime sets up its thread machinery (and signal handlers,
    // which ours then replace) on the first thread it starts; do that now,
    // while sigaction is still allowed, and return to a single thread.
    if std::thread::Builder::new()
        .stack_size(64 << 10)
        .spawn(|| {})
        .map(|t| t.join())
        .is_err()
    {
        fail("loader: cannot start a thread");
    }
    if let Err(e) =
        signals::install_all().and_then(|()| moat_host_common::freeze::install_handlers())
    {
        fail(&format!("loader: {e}"));
    }
    let ranges = sys::pal_code_ranges();
    if ranges.is_empty() {
        fail("loader: cannot find its own code ranges");
    }
    // PAL code stays PAL code: its mappings (and later the table's page)
    // sealed before the guest can reach a system call (see `seal`).
    let sealing = match seal::seal_code() {
        Ok(s) => s,
        Err(e) => fail(&format!("loader: {e}")),
    };
    let table_page = match seal::TablePage::new() {
        Ok(p) => p,
        Err(e) => fail(&format!("loader: {e}")),
    };
    if let Err(e) = sandbox::install(&ranges, Some((&sealing, table_page.addr()))) {
        fail(&e);
    }

    let (cfg, mut fds) = match protocol::recv::<Config>(sys::borrow(&sock)) {
        Ok(v) => v,
        Err(e) => fail(&format!("loader: no configuration from the monitor: {e}")),
    };
    if fds.is_empty() {
        fail("loader: the monitor sent no image descriptor");
    }
    let image_fd = fds.remove(0);
    let (ctl, template) = match moat_host_common::freeze::control::take_fds(&cfg, &mut fds) {
        Ok(v) => v,
        Err(e) => fail(&format!("loader: {e}")),
    };
    if cfg.checkpoint || cfg.restore {
        if let Err(e) = moat_host_common::freeze::enable() {
            fail(&format!("loader: {e}"));
        }
    }
    let ring = match (cfg.trace_ring, fds.is_empty()) {
        (None, _) => None,
        (Some(_), true) => fail("loader: the monitor sent no trace ring"),
        (Some(t), false) => match moat_host_common::trace_ring::map(fds.remove(0), t.records) {
            Ok(p) => Some((p, t.filter)),
            Err(e) => fail(&format!("loader: {e}")),
        },
    };
    let mem_limit = cfg.limits.memory_mib << 20;
    let p = LinuxPal::new(sock, cfg.limits.threads, cfg.limits.handles, mem_limit);
    // Guest memory in the window both hosts share (`moat_pal::layout`).
    let (lo, hi) = moat_pal::layout::window(cfg.limits.memory_mib, cfg.limits.threads);
    p.regions.write().unwrap().set_window(lo, hi);
    if hpal::install(p).is_none() {
        fail("loader: initialised twice");
    }
    let pal = pal();
    // A picoprocess from an image, or from a checkpoint (its regions
    // mapped from the file; see `moat_host_common::freeze::restore`).
    let start = if cfg.restore {
        Start::Restore(Box::new(resume::map(pal, image_fd)))
    } else {
        start_image(pal, image_fd, &cfg.args)
    };
    // `--trace` and `--layer`: the layers between the image and the PAL
    // (see `moat_layers`); the guest's table enters the outermost.
    let freeze: &'static moat_host_common::freeze::Host = &moat_host_common::freeze::Host;
    let stack = moat_layers::Stack::build(
        &moat_layers::names(cfg.trace, &cfg.layers, !cfg.remaps.is_empty()),
        pal,
        moat_layers::Parts {
            log: layer_line,
            ring,
            mem: pal,
            remaps: cfg.remaps.clone(),
            freeze: Some(freeze),
        },
    )
    .unwrap_or_else(|e| fail(&format!("loader: {e}")));
    let table = if stack.is_empty() {
        moat_pal::table_from(pal)
    } else {
        stack.table()
    };
    let table = match table_page.publish(table, &sealing) {
        Ok(t) => t,
        Err(e) => fail(&format!("loader: {e}")),
    };
    moat_host_common::freeze::set_table(table);
    let layer = stack.checkpointer();
    let started = moat_host_common::freeze::control::start(
        ctl,
        template,
        pal,
        layer,
        cfg.args.clone(),
        cfg.limits.memory_mib,
    );
    if let Err(e) = started {
        fail(&format!("loader: {e}"));
    }
    match start {
        Start::Restore(c) => resume::start(pal, layer, *c, table),
        Start::Image { page, entry } => {
            let (argbytes, _) = startup::layout(&cfg.args);
            startup::write(
                pal,
                page,
                table as *const PalTable,
                &cfg.args,
                &argbytes,
                moat_pal::host_kind::LINUX,
            );
            pal.start_main_thread(entry, page)
        }
    }
}

/// What the first thread starts from: an image (its entry, and the page
/// of the start-up block, written once the table exists), or a
/// checkpoint.
enum Start {
    Image { page: u64, entry: u64 },
    Restore(Box<moat_checkpoint::Checkpoint>),
}

/// Map the image and make the start-up block's page (written once the
/// table exists).
fn start_image(pal: &'static LinuxPal, image_fd: OwnedFd, args: &[String]) -> Start {
    let bytes = match image::read_all(std::os::fd::AsRawFd::as_raw_fd(&image_fd)) {
        Ok(b) => b,
        Err(e) => fail(&format!("cannot read the image: {e}")),
    };
    drop(image_fd);
    let img = match image::map(&pal.regions, pal.mem_limit, &bytes) {
        Ok(i) => i,
        Err(e) => fail(&format!("cannot load the image: {e}")),
    };
    drop(bytes);
    // The start-up block and the argument bytes live in one page of guest
    // memory (readable and writable: the guest stores its upcall there).
    let (_, len) = startup::layout(args);
    let page = {
        let mut r = pal.regions.write().unwrap();
        let Some(at) = r.find_free(len, 0, u64::MAX) else {
            fail("no guest memory left for the start-up block")
        };
        if sys::mmap_anon(at, len, prot::READ | prot::WRITE).is_err()
            || r.insert(at, len, prot::READ | prot::WRITE, RegionKind::Host)
                .is_err()
        {
            fail("cannot allocate the start-up block");
        }
        at
    };
    Start::Image {
        page,
        entry: img.entry,
    }
}
