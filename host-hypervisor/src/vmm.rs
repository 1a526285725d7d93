//! The VMM process (`moat-vmm`): what the monitor starts for a picoprocess
//! on `--host kvm`, in the same fresh namespaces and under the same
//! rlimits as a loader, with the monitor socket as descriptor 3 and
//! `/dev/kvm` as descriptor 4. It speaks the loader's protocol, so the
//! monitor, the broker, the policy, the console and the exit reports are
//! the same for both hosts.
use crate::layout::{MAX_RAM, TABLE};
use crate::pal::SpawnThread;
use crate::pico::{PicoVm, VmShell};
use kvm_ioctls::Kvm;
use moat_host_common::pal::LinuxPal;
use moat_host_common::protocol::{self, Config, ReportKind};
use moat_host_common::{image, signals, sys};
use moat_pal::memory::RegionKind;
use moat_pal::{prot, PalTable};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

fn fail(msg: &str) -> ! {
    signals::report(ReportKind::Startup, msg);
    sys::exit_process(moat_host_common::protocol::EXIT_HOST_FAILURE)
}

/// The VMM's `main`: `moat-vmm` exec'd for one picoprocess, or
/// `moat-vmm --zygote PATH`, the zygote of warm VMMs.
pub fn main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 2 && (args[1] == "--help" || args[1] == "-h") {
        println!(
            "moat-vmm: moat's VMM for one picoprocess (host-hypervisor, a KVM micro-VM).\n\n\
             The monitor starts it, in new namespaces, with its socket on descriptor 3 and\n\
             /dev/kvm on 4; it is not meant to be run by hand. Run picoprocesses on this\n\
             host with `moat run --host kvm IMAGE`.\n\n\
             Usage (by the monitor only): moat-vmm | moat-vmm --zygote PATH"
        );
        std::process::exit(0);
    }
    if args.len() == 3 && args[1] == "--zygote" {
        moat_host_common::zygote::main_with(&args[2], |l| run(Some(l)), true);
    }
    if let Err(e) = moat_host_common::mountns::enter_empty() {
        fail(&format!("vmm: cannot leave the host's mounts: {e}"));
    }
    run(None)
}

/// What the first thread starts from.
enum Start {
    Image(u64),
    Restore(Box<moat_checkpoint::Checkpoint>),
}

/// Map the image and make the start-up block (the image's entry and the
/// block's address).
fn start_image(lin: &'static LinuxPal, image_fd: OwnedFd, args: &[String], ram: u64) -> (u64, u64) {
    let bytes = match image::read_all(image_fd.as_raw_fd()) {
        Ok(b) => b,
        Err(e) => fail(&format!("cannot read the image: {e}")),
    };
    drop(image_fd);
    let img = match image::map(&lin.regions, lin.mem_limit, &bytes) {
        Ok(i) => i,
        Err(e) => fail(&format!(
            "cannot load the image: {e} (on kvm an image must lie inside guest memory, {:#x}..{ram:#x})",
            crate::layout::RAM_START
        )),
    };
    drop(bytes);
    // The start-up block and the argument bytes, in one guest-writable page.
    let (argbytes, len) = moat_host_common::startup::layout(args);
    let page = {
        let mut r = lin.regions.write().unwrap();
        let Some(at) = r.find_free(len, crate::layout::RAM_START, ram) else {
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
    moat_host_common::startup::write(
        lin,
        page,
        TABLE as *const PalTable,
        args,
        &argbytes,
        moat_pal::host_kind::KVM,
    );
    (img.entry, page)
}

fn ram_for(memory_mib: u64) -> u64 {
    moat_pal::layout::guest_ram(memory_mib)
}

/// Run one picoprocess. A warm VMM (forked by the zygote with `limits`)
/// creates its VM before it waits for the picoprocess.
fn run(warm: Option<&moat_policy::Limits>) -> ! {
    // SAFETY: descriptors 3 and 4 were set up by the monitor for this
    // process (spawn_vmm); nothing else here owns them.
    let (sock, kvm_fd) = unsafe {
        (
            OwnedFd::from_raw_fd(protocol::MONITOR_FD),
            OwnedFd::from_raw_fd(moat_host_common::protocol::KVM_FD),
        )
    };
    if let Err(e) =
        signals::install_for_vmm().and_then(|()| moat_host_common::freeze::install_handlers())
    {
        fail(&format!("vmm: {e}"));
    }
    // A panic (a VMM bug) is reported before the process aborts.
    std::panic::set_hook(Box::new(|info| {
        signals::report(ReportKind::Startup, &format!("vmm: internal error: {info}"));
    }));
    // No file system from here on: the image, and every file the
    // picoprocess opens, come as descriptors from the monitor.
    if let Err(e) = moat_host_common::sandbox::landlock_restrict() {
        fail(&e);
    }
    // SAFETY: the descriptor is /dev/kvm, handed over by the monitor.
    let kvm = unsafe { Kvm::from_raw_fd(kvm_fd.as_raw_fd()) };
    std::mem::forget(kvm_fd);
    let mut shell = warm
        .map(|l| ram_for(l.memory_mib))
        .filter(|&r| r <= MAX_RAM)
        .and_then(|r| VmShell::new(&kvm, r, warm.map_or(1, |l| l.threads)).ok());
    let (cfg, mut fds) = match protocol::recv::<Config>(sys::borrow(&sock)) {
        Ok(v) => v,
        Err(e) => fail(&format!("vmm: no configuration from the monitor: {e}")),
    };
    if fds.is_empty() {
        fail("vmm: the monitor sent no image descriptor");
    }
    let image_fd = fds.remove(0);
    let (ctl, template) = match moat_host_common::freeze::control::take_fds(&cfg, &mut fds) {
        Ok(v) => v,
        Err(e) => fail(&format!("vmm: {e}")),
    };
    if cfg.checkpoint || cfg.restore {
        if let Err(e) = moat_host_common::freeze::enable() {
            fail(&format!("vmm: {e}"));
        }
        moat_host_common::freeze::set_vcpus();
    }
    if cfg.stats {
        if fds.is_empty() {
            fail("vmm: the monitor sent no statistics page");
        }
        if let Err(e) = crate::stats::install(fds.remove(0)) {
            fail(&format!("vmm: {e}"));
        }
    }
    let ring = match (cfg.trace_ring, fds.is_empty()) {
        (None, _) => None,
        (Some(_), true) => fail("vmm: the monitor sent no trace ring"),
        (Some(t), false) => match moat_host_common::trace_ring::map(fds.remove(0), t.records) {
            Ok(p) => Some((p, t.filter)),
            Err(e) => fail(&format!("vmm: {e}")),
        },
    };
    // One descriptor per device that has a file, in declaration order,
    // and nothing after them.
    if cfg.device_files.len() != cfg.devices.len()
        || cfg.device_files.iter().filter(|&&f| f).count() != fds.len()
    {
        fail("vmm: the monitor's device descriptors do not match its devices");
    }
    let mut fds = fds.into_iter().map(std::fs::File::from);
    let mut files: Vec<Option<std::fs::File>> = Vec::with_capacity(cfg.devices.len());
    for i in 0..cfg.devices.len() {
        files.push(if cfg.device_files.get(i) == Some(&true) {
            match fds.next() {
                Some(f) => Some(f),
                None => fail("vmm: the monitor sent fewer device descriptors than it said"),
            }
        } else {
            None
        });
    }
    let mem_limit = cfg.limits.memory_mib << 20;
    let ram = ram_for(cfg.limits.memory_mib);
    if ram > MAX_RAM {
        fail(&format!(
            "a memory limit of {} MiB is more than the kvm host offers ({} MiB); lower memory_mib",
            cfg.limits.memory_mib,
            MAX_RAM >> 20
        ));
    }
    let Some(lin) = moat_host_common::pal::install(LinuxPal::new(
        sock,
        cfg.limits.threads,
        cfg.limits.handles,
        mem_limit,
    )) else {
        fail("vmm: initialised twice")
    };
    let threads = cfg.limits.threads;
    let shell = match shell
        .take()
        .filter(|s| s.ram() == ram && s.threads() == threads)
    {
        Some(s) => s,
        None => match VmShell::new(&kvm, ram, threads) {
            Ok(s) => s,
            Err(e) => fail(&format!("cannot create the micro-VM: {e}")),
        },
    };
    let devices = match crate::devices::DeviceSet::new(&cfg.devices, files, ram, lin) {
        Ok(d) => d,
        Err(e) => fail(&format!("cannot set up the devices: {e}")),
    };
    let mut vm = PicoVm::new(shell, lin, devices);
    if cfg.limits.cpu_seconds != 0 {
        vm.watchdog = vm.watchdog.min(Duration::from_secs(cfg.limits.cpu_seconds));
    }
    crate::devices::start_inputs(&vm.devices);
    vm.devices
        .start_io(lin, &|fd, addr| vm.register_notify(fd, addr));
    // Confine before touching the image: this thread and every vCPU
    // thread (started from here or from a vCPU thread) keep to the vCPU
    // allow-list.
    if let Err(e) = crate::confine::apply(crate::confine::vcpu_rules()) {
        fail(&e);
    }
    // A picoprocess from an image, or from a checkpoint (its regions
    // mapped from the file; see `moat_host_common::freeze::restore`).
    let (start, page) = if cfg.restore {
        let c = crate::resume::map(lin, image_fd);
        let startup = c.startup;
        (Start::Restore(Box::new(c)), startup)
    } else {
        let (entry, page) = start_image(lin, image_fd, &cfg.args, ram);
        (Start::Image(entry), page)
    };
    // The image and the start-up block into the page tables (no vCPU has
    // run yet: nothing to invalidate).
    vm.pt.map_all(&lin.regions.read().unwrap());

    let vm = Arc::new(vm);
    let pal = Arc::new(vm.pal());
    // The layers sit above this PAL for the life of the process.
    let base: &'static crate::pal::KvmPal = Box::leak(Box::new(pal.clone()));
    let stack = moat_layers::Stack::build(
        &moat_layers::names(cfg.trace, &cfg.layers, !cfg.remaps.is_empty()),
        base,
        moat_layers::Parts {
            log: crate::guest_thread::layer_line,
            ring,
            // Guest RAM is identity-mapped: the shared PAL's checks and
            // copies are the VMM's too.
            mem: lin,
            remaps: cfg.remaps.clone(),
            freeze: Some(&moat_host_common::freeze::Host),
        },
    )
    .unwrap_or_else(|e| fail(&format!("vmm: {e}")));
    let layer = stack.checkpointer();
    if vm.layers.set(stack).is_err() {
        fail("vmm: layers built twice");
    }
    // The stubs' table: what a restarted call enters (see `pico`).
    let started = moat_host_common::freeze::control::start(
        ctl,
        template,
        lin,
        layer,
        cfg.args.clone(),
        cfg.limits.memory_mib,
    );
    if let Err(e) = started {
        fail(&format!("vmm: {e}"));
    }
    match start {
        Start::Image(entry) => {
            lin.threads_live.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = vm.clone().spawn_thread(pal, entry, page, 0, None, None) {
                fail(&format!("cannot start the first thread: {e:?}"));
            }
        }
        Start::Restore(c) => crate::resume::start(&vm, lin, pal, layer, &c),
    }
    // The last guest thread to end exits the process.
    loop {
        std::thread::park();
    }
}
