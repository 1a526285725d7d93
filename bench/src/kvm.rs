//! The `kvm` group: picoprocesses on the KVM host (`Host::Kvm`, one
//! `moat-vmm` process and micro-VM each) against a bare micro-VM
//! ([`MicroVm`], or one made here with kvm-ioctls alone) or the host
//! system call doing the same work.
//!
//! It runs as four parts, each in its own process: `kvm-spawn` and
//! `kvm-spawn-fresh` (unpinned, as `spawn`; the second without the VMM
//! zygote), `kvm-calls` and `kvm-blk` (pinned to CPU 0, with the VMMs
//! they start).
use crate::{image, median, p99, parse, row};
use moat_host_hypervisor::{kvm_available, MicroVm, VmExit, GUEST_BASE_RESERVED};
use moat_monitor::{Host, LogSink, Sandbox, Stdio};
use moat_policy::{DeviceSpec, Limits, Policy};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The parts of the group, each run in its own process.
pub const PARTS: [&str; 4] = ["kvm-spawn", "kvm-spawn-fresh", "kvm-calls", "kvm-blk"];

const CODE: u64 = GUEST_BASE_RESERVED;
const STACK: u64 = 0x8000;
const LONG: Duration = Duration::from_secs(5);
/// `out 0x50, eax; jmp` back to it: one exit per iteration.
const OUT_LOOP: [u8; 4] = [0xe7, 0x50, 0xeb, 0xfc];
/// `out 0x50, eax; hlt`: the first instruction leaves.
const OUT_HLT: [u8; 3] = [0xe7, 0x50, 0xf4];

/// Whether the group can run here; if not, says so in a row and the
/// group passes (a machine without KVM has nothing to measure).
pub fn available() -> bool {
    if kvm_available() {
        return true;
    }
    crate::note("| kvm: skipped, /dev/kvm is not usable here | - | - | - | - |");
    false
}

fn bare_vm(size: u64, code: &[u8]) -> MicroVm {
    let mut vm = MicroVm::new(size).expect("a bare micro-VM");
    vm.write(CODE, code).unwrap();
    vm.set_entry(CODE, STACK, 0).unwrap();
    vm
}

fn expect_out(e: VmExit) {
    assert!(
        matches!(e, VmExit::IoOut { port: 0x50, .. }),
        "the bare VM stopped with {e:?}"
    );
}

/// The floor of a hypercall: ns per `out` exit round trip of a bare VM
/// whose guest loops on `out` (KVM_RUN, exit to this process, back).
fn bare_out_loop(n: u64) -> f64 {
    let mut vm = bare_vm(2 << 20, &OUT_LOOP);
    for _ in 0..n / 10 + 1 {
        expect_out(vm.run(LONG).unwrap());
    }
    let t = Instant::now();
    for _ in 0..n {
        expect_out(vm.run(LONG).unwrap());
    }
    t.elapsed().as_secs_f64() * 1e9 / n as f64
}

/// Null ABI calls on kvm (timed in the guest) against the bare VM's
/// `out` loop (timed here).
pub fn calls(quick: bool) {
    let n: u64 = if quick { 2_000 } else { 50_000 };
    let reps = if quick { 1 } else { 5 };
    let img = image("bench-null-call");
    let (mut gp, mut peek, mut tq, mut floor) = (vec![], vec![], vec![], vec![]);
    let (mut raw0, mut raw3, mut mmio3) = (vec![], vec![], vec![]);
    // First, while this process has one thread (it forks).
    let mut confined: Vec<f64> = (0..reps).map(|_| raw_exit_loop_confined(n)).collect();
    for _ in 0..reps {
        let (code, out) = run_kvm(&img, &[n.to_string()], Policy::default());
        assert_eq!(code, 0, "{out}");
        gp.push(parse(&out, "thread_get_parameter"));
        peek.push(parse(&out, "event_peek"));
        tq.push(parse(&out, "time_query"));
        floor.push(bare_out_loop(n));
        raw0.push(raw_exit_loop(n, Mode::Cpl0Out));
        raw3.push(raw_exit_loop(n, Mode::Cpl3Out));
        mmio3.push(raw_exit_loop(n, Mode::Cpl3Mmio));
    }
    let f = median(&mut floor);
    row(
        "kvm: null ABI call (DkThreadGetParameter) vs bare VM `out` exit",
        median(&mut gp) / 1000.0,
        f / 1000.0,
        "µs",
        "≤ 1.15x",
    );
    row(
        "kvm: DkEventPeek vs bare VM `out` exit",
        median(&mut peek) / 1000.0,
        f / 1000.0,
        "µs",
        "-",
    );
    row(
        "kvm: DkSystemTimeQuery vs bare VM `out` exit",
        median(&mut tq) / 1000.0,
        f / 1000.0,
        "µs",
        "-",
    );
    let (r0, r3) = (median(&mut raw0), median(&mut raw3));
    row(
        "  breakdown: bare VM without its watchdog (raw KVM_RUN, CPL 0 `out`)",
        r0 / 1000.0,
        f / 1000.0,
        "µs",
        "-",
    );
    row(
        "  breakdown: the same `out` at CPL 3, as picoprocess code runs; vs CPL 0",
        r3 / 1000.0,
        r0 / 1000.0,
        "µs",
        "-",
    );
    row(
        "  breakdown: an MMIO write at CPL 3 instead; vs CPL 0 `out`",
        median(&mut mmio3) / 1000.0,
        r0 / 1000.0,
        "µs",
        "-",
    );
    row(
        "  breakdown: the CPL 3 `out` loop under a VMM vCPU thread's seccomp filter",
        median(&mut confined) / 1000.0,
        r3 / 1000.0,
        "µs",
        "-",
    );
    row(
        "  breakdown: null ABI call vs the raw CPL 3 `out` loop",
        median(&mut gp) / 1000.0,
        r3 / 1000.0,
        "µs",
        "-",
    );
}

/// Run `img` on kvm with `args`; its exit code and standard output.
fn run_kvm(img: &Path, args: &[String], policy: Policy) -> (i32, String) {
    let mut p = Sandbox::new(img)
        .host(Host::Kvm)
        .policy(policy)
        .args(args.iter().cloned())
        .stdout(Stdio::Piped)
        .stderr(Stdio::Inherit)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {} on kvm: {e}", img.display()));
    let mut out = String::new();
    if let Some(mut o) = p.stdout.take() {
        o.read_to_string(&mut out).unwrap();
    }
    let exit = p.wait().unwrap();
    if exit.code != 0 {
        eprintln!("moat-bench: {} on kvm: {:?}", img.display(), exit.report);
    }
    (exit.code, out)
}

/// Cold start: `Sandbox::spawn` on kvm to the picoprocess's first ABI
/// call, against creating a bare VM of the same memory size and running
/// it to its first exit. VMMs come from the VMM zygote (warm, their VM
/// already created); `kvm-spawn-fresh` measures them without it.
pub fn spawn(quick: bool) {
    let n = if quick { 5 } else { 200 };
    for mib in [1024u64, 64] {
        let s = cold_starts(n, mib, false);
        let ff = median(&mut s.f_first.clone());
        row(
            &format!("kvm: spawn to first ABI call, {mib} MiB (median)"),
            median(&mut s.m_first.clone()),
            ff,
            "µs",
            "≤ 1.5x",
        );
        row(
            &format!("kvm: spawn to first ABI call, {mib} MiB (p99)"),
            p99(&mut s.m_first.clone()),
            p99(&mut s.f_first.clone()),
            "µs",
            "-",
        );
        row(
            &format!("kvm: spawn, run, exit, reap, {mib} MiB (median)"),
            median(&mut s.m_total.clone()),
            median(&mut s.f_total.clone()),
            "µs",
            "-",
        );
        row(
            "  breakdown: of the floor, creating the bare VM",
            median(&mut s.f_create.clone()),
            ff,
            "µs",
            "-",
        );
    }
}

/// Cold start without the VMM zygote (`MOAT_NO_ZYGOTE=1`: fresh
/// namespaces and an exec of `moat-vmm` per picoprocess), broken down.
/// Runs itself again with the variable set if it is not.
pub fn spawn_fresh(quick: bool) {
    if std::env::var_os("MOAT_NO_ZYGOTE").is_none() {
        let mut c = std::process::Command::new(std::env::current_exe().unwrap());
        c.env("MOAT_NO_ZYGOTE", "1")
            .args(["--no-header", "kvm-spawn-fresh"]);
        if quick {
            c.arg("--quick");
        }
        assert!(c.status().unwrap().success(), "kvm-spawn-fresh failed");
        return;
    }
    let n = if quick { 5 } else { 100 };
    let (floor_img, vmm_bin) = (image("floor-exit"), image("moat-vmm"));
    let mib = 64;
    let s = cold_starts(n, mib, true);
    let (mut ns, mut vmm) = (vec![], vec![]);
    for _ in 0..n {
        ns.push(ns_first_syscall(&floor_img));
        vmm.push(vmm_without_monitor(&vmm_bin));
    }
    let ff = median(&mut s.f_first.clone());
    row(
        &format!("  breakdown: spawn to first ABI call without the VMM zygote, {mib} MiB"),
        median(&mut s.m_first.clone()),
        ff,
        "µs",
        "-",
    );
    row(
        "  breakdown: of which a static binary in 7 fresh namespaces, to its first system call",
        median(&mut ns),
        ff,
        "µs",
        "-",
    );
    row(
        "  breakdown: of which moat-vmm started in them, to its exit with no monitor",
        median(&mut vmm),
        ff,
        "µs",
        "-",
    );
    row(
        "  breakdown: of which creating the VM (the floor's share)",
        median(&mut s.f_create.clone()),
        ff,
        "µs",
        "-",
    );
}

/// Samples of [`cold_starts`], in µs.
struct ColdStarts {
    /// Floor: to the bare VM's first exit; creating it; and dropping it too.
    f_first: Vec<f64>,
    f_create: Vec<f64>,
    f_total: Vec<f64>,
    /// moat: to the first ABI call; and to the exit status.
    m_first: Vec<f64>,
    m_total: Vec<f64>,
}

/// `n` cold starts of the floor and of moat with `mib` MiB of memory,
/// alternating. With `fresh`, moat's samples must not come from the zygote.
fn cold_starts(n: usize, mib: u64, fresh: bool) -> ColdStarts {
    assert_eq!(fresh, std::env::var_os("MOAT_NO_ZYGOTE").is_some());
    let first = image("bench-first-call");
    let size = mib << 20;
    let mut s = ColdStarts {
        f_first: vec![],
        f_create: vec![],
        f_total: vec![],
        m_first: vec![],
        m_total: vec![],
    };
    for _ in 0..n {
        // Floor: a bare VM with `size` bytes of memory and a vCPU in long
        // mode, its code written, run to its first exit.
        let t = Instant::now();
        let mut vm = MicroVm::new(size).expect("a bare micro-VM");
        let created = t.elapsed();
        vm.write(CODE, &OUT_HLT).unwrap();
        vm.set_entry(CODE, STACK, 0).unwrap();
        expect_out(vm.run(LONG).unwrap());
        s.f_first.push(t.elapsed().as_secs_f64() * 1e6);
        s.f_create.push(created.as_secs_f64() * 1e6);
        drop(vm);
        s.f_total.push(t.elapsed().as_secs_f64() * 1e6);

        // moat: to the first ABI call (a debug print the monitor logs),
        // and to the exit status.
        let seen: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let s2 = seen.clone();
        let sink = LogSink::Callback(Arc::new(move |_l: &str| {
            s2.lock().unwrap().get_or_insert_with(Instant::now);
        }));
        let t = Instant::now();
        let mut p = Sandbox::new(&first)
            .host(Host::Kvm)
            .limits(Limits {
                memory_mib: mib,
                ..Default::default()
            })
            .stdout(Stdio::Null)
            .log(sink)
            .spawn()
            .unwrap();
        let e = p.wait().unwrap();
        let total = t.elapsed();
        assert_eq!(e.code, 0, "{:?}", e.report);
        let at = seen.lock().unwrap().expect("the first call was seen");
        s.m_first.push((at - t).as_secs_f64() * 1e6);
        s.m_total.push(total.as_secs_f64() * 1e6);
    }
    s
}

/// A command for `img` that starts in the seven namespaces a VMM gets
/// (fork, unshare, exec).
fn in_fresh_namespaces(img: &Path) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new(img);
    // SAFETY: unshare is async-signal-safe and only affects the child.
    unsafe {
        c.pre_exec(|| {
            let flags = libc::CLONE_NEWUSER
                | libc::CLONE_NEWPID
                | libc::CLONE_NEWNS
                | libc::CLONE_NEWNET
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWCGROUP;
            if libc::unshare(flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// The floor binary in fresh namespaces, in µs to its first system call
/// (a byte on a pipe).
fn ns_first_syscall(img: &Path) -> f64 {
    let mut c = in_fresh_namespaces(img);
    c.stdout(std::process::Stdio::piped());
    let t = Instant::now();
    let mut child = c.spawn().unwrap();
    let mut b = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut b).unwrap();
    let us = t.elapsed().as_secs_f64() * 1e6;
    assert!(child.wait().unwrap().success());
    us
}

/// `moat-vmm` in fresh namespaces with a monitor socket whose other end
/// is closed: it starts (exec, C library and Rust start-up, signal
/// handlers, Landlock), finds no configuration and exits. µs to its exit.
fn vmm_without_monitor(vmm: &Path) -> f64 {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let mut sv = [0i32; 2];
    // SAFETY: socketpair into a local array; both ends are owned below.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair");
    // SAFETY: fresh descriptors, owned here only.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    drop(ours);
    let fd = sv[1];
    let mut c = in_fresh_namespaces(vmm);
    c.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: dup2 and fcntl are async-signal-safe; descriptor 3 is the
    // monitor socket a VMM expects (4, /dev/kvm, is not used before a
    // configuration).
    unsafe {
        c.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it then.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t = Instant::now();
    let status = c.status().unwrap();
    let us = t.elapsed().as_secs_f64() * 1e6;
    assert!(!status.success(), "moat-vmm ran without a monitor");
    drop(theirs);
    us
}

/// 4 KiB reads through the virtio-blk driver picoprocess (timed in the
/// guest) against `pread` of the same file at the same offsets.
pub fn blk(quick: bool) {
    let count: u64 = if quick { 500 } else { 20_000 };
    let reps = if quick { 1 } else { 5 };
    let img = image("virtio-blk");
    let file = BenchFile::new(64 << 20);
    let spec = format!("blk0=virtio-blk:{}", file.path.display());
    let (mut m, mut f) = (vec![], vec![]);
    for _ in 0..reps {
        let mut policy = Policy::default();
        policy
            .add_device(DeviceSpec::parse(&spec).expect("a device spec"))
            .expect("the device is granted");
        let args = ["blk0".into(), "read-bench".into(), count.to_string()];
        let (code, out) = run_kvm(&img, &args, policy);
        assert_eq!(code, 0, "{out}");
        m.push(blk_ns_per_read(&out, count));
        f.push(pread_floor(&file.path, count));
    }
    row(
        "kvm: 4 KiB read via the virtio-blk picoprocess vs pread",
        median(&mut m) / 1000.0,
        median(&mut f) / 1000.0,
        "µs",
        "-",
    );
}

/// `virtio-blk: COUNT reads of 4096 bytes in T us` -> ns per read.
fn blk_ns_per_read(out: &str, count: u64) -> f64 {
    let line = out
        .lines()
        .find(|l| l.contains("reads of 4096 bytes in"))
        .unwrap_or_else(|| panic!("no read-bench line in:\n{out}"));
    let us: f64 = line
        .rsplit(" in ")
        .next()
        .and_then(|s| s.trim().strip_suffix(" us"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read `{line}`"));
    us * 1000.0 / count as f64
}

/// ns per `pread` of 4096 bytes at the driver's offsets: xorshift64 from
/// the same seed, a 4 KiB block of the file each.
fn pread_floor(path: &Path, count: u64) -> f64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let blocks = f.metadata().unwrap().len() / 4096;
    let mut buf = vec![0u8; 4096];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let t = Instant::now();
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % blocks) * 4096;
        // SAFETY: reading into our own 4096-byte buffer.
        let r = unsafe {
            libc::pread(
                f.as_raw_fd(),
                buf.as_mut_ptr() as *mut _,
                4096,
                off as libc::off_t,
            )
        };
        assert_eq!(r, 4096);
    }
    t.elapsed().as_secs_f64() * 1e9 / count as f64
}

/// A file of pseudo-random bytes in /tmp, removed when dropped.
struct BenchFile {
    path: std::path::PathBuf,
}

impl BenchFile {
    fn new(size: usize) -> BenchFile {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("moat-bench-blk-{}.img", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..size / chunk.len() {
            for w in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
        BenchFile { path }
    }
}

impl Drop for BenchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How the guest of a [`RawVm`] leaves, once per loop iteration.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `out 0x50, eax` at CPL 0.
    Cpl0Out,
    /// `out 0x50, eax` at CPL 3 (IOPL 3, and a TSS whose I/O bitmap
    /// allows the port): as a picoprocess's hypercall stub leaves.
    Cpl3Out,
    /// A write at CPL 3 to an address outside guest memory (an MMIO exit).
    Cpl3Mmio,
}

/// A VM made here with kvm-ioctls alone, without MicroVm's watchdog: 2 MiB
/// identity-mapped with 2 MiB pages (user-accessible for CPL 3), one vCPU
/// in long mode, its guest looping on one exit.
struct RawVm {
    vcpu: kvm_ioctls::VcpuFd,
    _vm: kvm_ioctls::VmFd,
    mem: *mut u8,
}

const RAW_SIZE: usize = 2 << 20;
/// Where the guest's MMIO write goes (no memory there).
const RAW_MMIO: u64 = 0xc000_0000;

impl RawVm {
    fn new(mode: Mode) -> RawVm {
        use kvm_bindings::kvm_userspace_memory_region;
        use moat_host_hypervisor::longmode::{self, PTE_HUGE, PTE_PCD, PTE_PRESENT, PTE_PWT};
        let user = mode != Mode::Cpl0Out;
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        // SAFETY: a fresh anonymous mapping, owned by the RawVm and
        // unmapped only when it is dropped.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAW_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(mem != libc::MAP_FAILED, "cannot map the raw VM's memory");
        let mem = mem as *mut u8;
        let w = |at: u64, b: &[u8]| {
            assert!(at as usize + b.len() <= RAW_SIZE);
            // SAFETY: inside the mapping (asserted).
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), mem.add(at as usize), b.len()) }
        };
        let w64 = |at: u64, v: u64| w(at, &v.to_le_bytes());
        let (gdt, pml4, pdpt, pd, pd_mmio, tss, code) =
            (0x500, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x10000);
        let u = if user { longmode::PTE_USER } else { 0 };
        let rw = PTE_PRESENT | longmode::PTE_WRITE | u;
        // GDT: null, kernel code and data, user code and data, 64-bit TSS.
        for (i, e) in longmode::GDT.iter().enumerate() {
            w64(gdt + i as u64 * 8, *e);
        }
        w64(pml4, pdpt | rw);
        w64(pdpt, pd | rw);
        w64(pd, rw | PTE_HUGE);
        // An uncached 2 MiB page at RAW_MMIO, with no memory behind it.
        w64(pdpt + 3 * 8, pd_mmio | rw);
        w64(pd_mmio, RAW_MMIO | rw | PTE_HUGE | PTE_PCD | PTE_PWT);
        // The TSS, its I/O bitmap right after it (every port allowed), and
        // the bitmap's end byte.
        w(tss, &longmode::tss(0));
        match mode {
            Mode::Cpl0Out | Mode::Cpl3Out => w(code, &OUT_LOOP),
            // mov [RAW_MMIO], eax (64-bit absolute address); jmp back
            Mode::Cpl3Mmio => w(code, &[0xa3, 0, 0, 0, 0xc0, 0, 0, 0, 0, 0xeb, 0xf5]),
        }
        // SAFETY: the mapping outlives the VM (see Drop).
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: 0,
                guest_phys_addr: 0,
                memory_size: RAW_SIZE as u64,
                userspace_addr: mem as u64,
                flags: 0,
            })
        }
        .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut s = vcpu.get_sregs().unwrap();
        longmode::long_mode(&mut s, gdt, pml4);
        if user {
            longmode::user_mode(&mut s);
        }
        // The whole GDT (the TSS descriptor too) at either CPL.
        s.gdt.limit = longmode::GDT_LIMIT;
        s.tr = longmode::tss_segment(tss);
        vcpu.set_sregs(&s).unwrap();
        let r = kvm_bindings::kvm_regs {
            rip: code,
            rsp: 0x8000,
            // IOPL 3 at CPL 3
            rflags: if user {
                longmode::USER_RFLAGS
            } else {
                longmode::KERNEL_RFLAGS
            },
            ..Default::default()
        };
        vcpu.set_regs(&r).unwrap();
        RawVm { vcpu, _vm: vm, mem }
    }

    /// One KVM_RUN, to the guest's next exit.
    fn run(&mut self) {
        match self.vcpu.run() {
            Ok(kvm_ioctls::VcpuExit::IoOut(0x50, _)) => {}
            Ok(kvm_ioctls::VcpuExit::MmioWrite(RAW_MMIO, _)) => {}
            other => panic!("the raw VM stopped with {other:?}"),
        }
    }
}

impl Drop for RawVm {
    fn drop(&mut self) {
        // SAFETY: our mapping, no longer used by us; KVM keeps its own
        // reference to the pages until the VM descriptor closes.
        unsafe { libc::munmap(self.mem as *mut _, RAW_SIZE) };
    }
}

/// ns per exit round trip of a [`RawVm`] whose guest leaves as `mode` says.
fn raw_exit_loop(n: u64, mode: Mode) -> f64 {
    timed_loop(n, RawVm::new(mode))
}

fn timed_loop(n: u64, mut vm: RawVm) -> f64 {
    for _ in 0..n / 10 + 1 {
        vm.run();
    }
    let t = Instant::now();
    for _ in 0..n {
        vm.run();
    }
    t.elapsed().as_secs_f64() * 1e9 / n as f64
}

/// [`raw_exit_loop`] at CPL 3 in a forked child that first installs the
/// seccomp filter of a VMM's vCPU threads. Call it while this process
/// has one thread.
fn raw_exit_loop_confined(n: u64) -> f64 {
    let mut fds = [0i32; 2];
    // SAFETY: pipe/fork/write/read/waitpid on our own descriptors; the
    // process is single-threaded, so the child may allocate; it ends with
    // _exit.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        let pid = libc::fork();
        if pid == 0 {
            let vm = RawVm::new(Mode::Cpl3Out);
            let ns = match moat_host_hypervisor::confine::apply(
                moat_host_hypervisor::confine::vcpu_rules(),
            ) {
                Ok(()) => timed_loop(n, vm),
                Err(_) => f64::NAN,
            };
            libc::write(fds[1], &ns as *const f64 as *const _, 8);
            libc::_exit(0);
        }
        let mut ns = f64::NAN;
        libc::read(fds[0], &mut ns as *mut f64 as *mut _, 8);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        libc::close(fds[0]);
        libc::close(fds[1]);
        assert!(
            ns.is_finite(),
            "the confined raw loop failed (status {st:#x})"
        );
        ns
    }
}
