//! The `kvm` group: picoprocesses on the KVM host (`Host::Kvm`, one
//! `moat-vmm` process and micro-VM each) against a bare micro-VM
//! ([`MicroVm`]) or the host system call doing the same work.
//!
//! It runs as three parts, each in its own process: `kvm-spawn`
//! (unpinned, as `spawn`), `kvm-calls` and `kvm-blk` (pinned to CPU 0,
//! with the VMMs they start).
use crate::{image, median, p99, parse, row};
use moat_host_hypervisor::{kvm_available, Exit, MicroVm, GUEST_BASE_RESERVED};
use moat_host_linux::{Host, LogSink, Sandbox, Stdio};
use moat_policy::{DeviceSpec, Limits, Policy};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The parts of the group, each run in its own process.
pub const PARTS: [&str; 3] = ["kvm-spawn", "kvm-calls", "kvm-blk"];

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
    println!("| kvm: skipped, /dev/kvm is not usable here | - | - | - | - |");
    false
}

fn bare_vm(size: u64, code: &[u8]) -> MicroVm {
    let mut vm = MicroVm::new(size).expect("a bare micro-VM");
    vm.write(CODE, code).unwrap();
    vm.set_entry(CODE, STACK, 0).unwrap();
    vm
}

fn expect_out(e: Exit) {
    assert!(
        matches!(e, Exit::IoOut { port: 0x50, .. }),
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
    let n: u64 = if quick { 2_000 } else { 100_000 };
    let reps = if quick { 1 } else { 5 };
    let img = image("bench-null-call");
    let (mut gp, mut peek, mut tq, mut floor) = (vec![], vec![], vec![], vec![]);
    let (mut raw0, mut raw3, mut raw3s) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let (code, out) = run_kvm(&img, &[n.to_string()], Policy::default());
        assert_eq!(code, 0, "{out}");
        gp.push(parse(&out, "thread_get_parameter"));
        peek.push(parse(&out, "event_peek"));
        tq.push(parse(&out, "time_query"));
        floor.push(bare_out_loop(n));
        raw0.push(raw_out_loop(n, Mode::Cpl0, false));
        raw3.push(raw_out_loop(n, Mode::Cpl3Out, false));
        raw3s.push(raw_out_loop(n, Mode::Cpl3Out, true));
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
    row(
        "  breakdown: raw KVM_RUN `out` loop at CPL 0, no watchdog",
        median(&mut raw0) / 1000.0,
        f / 1000.0,
        "µs",
        "-",
    );
    row(
        "  breakdown: raw KVM_RUN `out` loop at CPL 3 (as picoprocess code runs)",
        median(&mut raw3) / 1000.0,
        f / 1000.0,
        "µs",
        "-",
    );
    row(
        "  breakdown: the same at CPL 3, registers through kvm_run (sync_regs)",
        median(&mut raw3s) / 1000.0,
        f / 1000.0,
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
/// it to its first exit.
pub fn spawn(quick: bool) {
    let n = if quick { 5 } else { 200 };
    let first = image("bench-first-call");
    let floor_img = image("floor-exit");
    for mib in [1024u64, 64] {
        let size = mib << 20;
        let (mut f_first, mut f_create, mut f_total) = (vec![], vec![], vec![]);
        let (mut m_first, mut m_total, mut ns) = (vec![], vec![], vec![]);
        for _ in 0..n {
            // Floor: a bare VM with `size` bytes of memory, a vCPU in long
            // mode and its code written, run to its first exit.
            let t = Instant::now();
            let mut vm = MicroVm::new(size).expect("a bare micro-VM");
            let created = t.elapsed();
            vm.write(CODE, &OUT_HLT).unwrap();
            vm.set_entry(CODE, STACK, 0).unwrap();
            expect_out(vm.run(LONG).unwrap());
            f_first.push(t.elapsed().as_secs_f64() * 1e6);
            f_create.push(created.as_secs_f64() * 1e6);
            drop(vm);
            f_total.push(t.elapsed().as_secs_f64() * 1e6);

            // Breakdown: a static binary started in the seven fresh
            // namespaces a VMM gets, to its first system call.
            ns.push(ns_first_syscall(&floor_img));

            // moat: to the first ABI call (a debug print the monitor logs).
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
            m_first.push((at - t).as_secs_f64() * 1e6);
            m_total.push(total.as_secs_f64() * 1e6);
        }
        let ff = median(&mut f_first);
        row(
            &format!("kvm: spawn to first ABI call, {mib} MiB (median)"),
            median(&mut m_first),
            ff,
            "µs",
            "≤ 1.5x",
        );
        row(
            &format!("kvm: spawn to first ABI call, {mib} MiB (p99)"),
            p99(&mut m_first),
            p99(&mut f_first),
            "µs",
            "-",
        );
        row(
            &format!("kvm: spawn, run, exit, reap, {mib} MiB (median)"),
            median(&mut m_total),
            median(&mut f_total),
            "µs",
            "-",
        );
        row(
            "  breakdown: bare VM creation alone (of the floor)",
            median(&mut f_create),
            ff,
            "µs",
            "-",
        );
        row(
            "  breakdown: static binary in 7 fresh namespaces, to its first system call",
            median(&mut ns),
            ff,
            "µs",
            "-",
        );
    }
}

/// fork + unshare(the seven namespaces of a VMM) + exec of the floor
/// binary, in µs to its first system call (a byte on a pipe).
fn ns_first_syscall(img: &Path) -> f64 {
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new(img);
    c.stdout(std::process::Stdio::piped());
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
    let t = Instant::now();
    let mut child = c.spawn().unwrap();
    let mut b = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut b).unwrap();
    let us = t.elapsed().as_secs_f64() * 1e6;
    assert!(child.wait().unwrap().success());
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

/// A VM made here with kvm-ioctls alone (no MicroVm, no watchdog): 2 MiB
/// identity-mapped, long mode, its guest looping on `out 0x50, eax`, at
/// CPL 0 or (`user`) at CPL 3 with every page user-accessible and a TSS
/// whose I/O bitmap allows the port, as a picoprocess's vCPU runs.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `out` at CPL 0.
    Cpl0,
    /// `out` at CPL 3 (IOPL 3, the TSS's I/O bitmap allows the port).
    Cpl3Out,
    /// `syscall` at CPL 3 to a CPL 0 entry that does `out` and `sysretq`.
    Cpl3Syscall,
    /// A write to an address outside guest memory at CPL 3 (an MMIO exit).
    Cpl3Mmio,
    /// `int 0x40` at CPL 3 to a CPL 0 gate that does `out` and `iretq`.
    Cpl3Int,
}

struct RawVm {
    vcpu: kvm_ioctls::VcpuFd,
    _vm: kvm_ioctls::VmFd,
    mem: *mut u8,
}

const RAW_SIZE: usize = 2 << 20;

impl RawVm {
    fn new(mode: Mode, sync_regs: bool) -> RawVm {
        let user = mode != Mode::Cpl0;
        use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        // SAFETY: a fresh anonymous mapping, owned by the RawVm and
        // unmapped after the VM is gone (Drop).
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAW_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as *mut u8;
        assert!(mem as isize != -1);
        let w = |at: u64, b: &[u8]| {
            assert!(at as usize + b.len() <= RAW_SIZE);
            // SAFETY: inside the mapping (asserted).
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), mem.add(at as usize), b.len()) }
        };
        let w64 = |at: u64, v: u64| w(at, &v.to_le_bytes());
        let (gdt, pml4, pdpt, pd, tss, code) = (0x500, 0x1000, 0x2000, 0x3000, 0x5000, 0x10000);
        let u = if user { 4 } else { 0 };
        w64(gdt, 0);
        w64(gdt + 0x08, 0x00af_9a00_0000_ffff);
        w64(gdt + 0x10, 0x00cf_9200_0000_ffff);
        // User code and data; for `sysret`, data first.
        let (ucode, udata) = (0x00af_fa00_0000_ffff, 0x00cf_f200_0000_ffff);
        if mode == Mode::Cpl3Syscall {
            w64(gdt + 0x18, udata);
            w64(gdt + 0x20, ucode);
        } else {
            w64(gdt + 0x18, ucode);
            w64(gdt + 0x20, udata);
        }
        w64(gdt + 0x28, 0x0000_8900_0000_0067);
        w64(gdt + 0x30, 0);
        w64(pml4, pdpt | 3 | u);
        w64(pdpt, pd | 3 | u);
        w64(pd, 0x83 | u);
        // TSS: the I/O bitmap right after it, all ports allowed, and its
        // end byte.
        let tss_limit = 104 + 8192;
        w(tss + 102, &104u16.to_le_bytes());
        w(tss + tss_limit, &[0xff]);
        let stub = 0x11000;
        if mode == Mode::Cpl3Syscall {
            // syscall; jmp back. The CPL 0 entry: out 0x50, eax; sysretq.
            w(code, &[0x0f, 0x05, 0xeb, 0xfc]);
            w(stub, &[0xe7, 0x50, 0x48, 0x0f, 0x07]);
        } else if mode == Mode::Cpl3Int {
            w(code, &[0xcd, 0x40, 0xeb, 0xfc]);
            w(stub, &[0xe7, 0x50, 0x48, 0xcf]);
            let lo: u64 =
                (stub & 0xffff) | (8 << 16) | (0xee00u64 << 32) | (((stub >> 16) & 0xffff) << 48);
            w64(0xa000 + 0x40 * 16, lo);
            w64(0xa000 + 0x40 * 16 + 8, 0);
            w64(tss + 4, 0x9000);
        } else if mode == Mode::Cpl3Mmio {
            // mov [0xc000_0000], eax; jmp back.
            w(code, &[0xa3, 0, 0, 0, 0xc0, 0, 0, 0, 0, 0xeb, 0xf5]);
            w64(pdpt + 3 * 8, 0x6000 | 3 | u);
            w64(0x6000, 0xc000_0000 | 0x83 | 0x18 | u);
        } else {
            w(code, &OUT_LOOP);
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
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut s = vcpu.get_sregs().unwrap();
        let dpl = if user { 3 } else { 0 };
        let seg = |selector: u16, type_: u8, l: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl,
            db: 1 - l,
            s: 1,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let (cs, ds) = match mode {
            Mode::Cpl0 => (0x08, 0x10),
            Mode::Cpl3Out | Mode::Cpl3Mmio => (0x1b, 0x23),
            Mode::Cpl3Syscall => (0x23, 0x1b),
            Mode::Cpl3Int => (0x1b, 0x23),
        };
        s.cs = seg(cs, 11, 1);
        let d = seg(ds, 3, 0);
        (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
        s.gdt.base = gdt;
        s.gdt.limit = 7 * 8 - 1;
        s.tr = kvm_segment {
            base: tss,
            limit: tss_limit as u32,
            selector: 0x28,
            type_: 11,
            present: 1,
            ..Default::default()
        };
        s.cr3 = pml4;
        s.cr4 = 0x20 | 0x200 | 0x400;
        s.cr0 = 0x8000_0033;
        s.efer = 0x500;
        s.idt.base = 0xa000;
        s.idt.limit = 0x41 * 16 - 1;
        if mode == Mode::Cpl3Syscall {
            s.efer |= 1; // SCE
            let msr = |index, data| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            };
            let msrs = kvm_bindings::Msrs::from_entries(&[
                msr(0xc000_0081, (0x08u64 << 32) | (0x10u64 << 48)), // STAR
                msr(0xc000_0082, stub),                              // LSTAR
                msr(0xc000_0084, 0),                                 // FMASK
            ])
            .unwrap();
            assert_eq!(vcpu.set_msrs(&msrs).unwrap(), 3);
        }
        vcpu.set_sregs(&s).unwrap();
        let r = kvm_bindings::kvm_regs {
            rip: code,
            rsp: 0x8000,
            rflags: if user { 0x3002 } else { 2 },
            ..Default::default()
        };
        vcpu.set_regs(&r).unwrap();
        if sync_regs {
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        }
        RawVm { vcpu, _vm: vm, mem }
    }

    /// One KVM_RUN to the next `out`.
    fn run(&mut self) {
        match self.vcpu.run() {
            Ok(kvm_ioctls::VcpuExit::IoOut(0x50, _)) => {}
            Ok(kvm_ioctls::VcpuExit::MmioWrite(0xc000_0000, _)) => {}
            other => {
                let o = format!("{other:?}");
                let r = self.vcpu.get_regs().unwrap();
                let sr = self.vcpu.get_sregs().unwrap();
                panic!(
                    "the raw VM stopped with {o} rip {:#x} rsp {:#x} rcx {:#x} cs {:?} cr2 {:#x}",
                    r.rip, r.rsp, r.rcx, sr.cs, sr.cr2
                )
            }
        }
    }
}

impl Drop for RawVm {
    fn drop(&mut self) {
        // SAFETY: our mapping; the VM and vCPU descriptors are closed
        // after this (field drops), and KVM holds its own reference.
        unsafe { libc::munmap(self.mem as *mut _, RAW_SIZE) };
    }
}

/// ns per exit round trip of a [`RawVm`]; with `sync_regs`, also reading
/// the registers from `kvm_run` and writing rax back at each exit, as
/// the VMM answers a hypercall.
fn raw_out_loop(n: u64, mode: Mode, sync_regs: bool) -> f64 {
    let mut vm = RawVm::new(mode, sync_regs);
    let mut one = |vm: &mut RawVm| {
        vm.run();
        if sync_regs {
            let r = vm.vcpu.sync_regs().regs;
            vm.vcpu.sync_regs_mut().regs.rax = std::hint::black_box(r.rsi);
            vm.vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
        }
    };
    for _ in 0..n / 10 + 1 {
        one(&mut vm);
    }
    let t = Instant::now();
    for _ in 0..n {
        one(&mut vm);
    }
    t.elapsed().as_secs_f64() * 1e9 / n as f64
}

pub fn explore() {
    let n = 20_000;
    println!("raw0 {:.0}", raw_out_loop(n, Mode::Cpl0, false));
    println!("raw3 {:.0}", raw_out_loop(n, Mode::Cpl3Out, false));
    println!("microvm {:.0}", bare_out_loop(n));
    println!("raw3 mmio {:.0}", raw_out_loop(n, Mode::Cpl3Mmio, false));
    println!("raw3 int {:.0}", raw_out_loop(n, Mode::Cpl3Int, false));
    let img = image("bench-null-call");
    for mib in [64u64, 1024] {
        let mut pol = Policy::default();
        pol.limits.memory_mib = mib;
        let (_, out) = run_kvm(&img, &[n.to_string()], pol);
        println!("moat {mib} MiB: {}", out.replace('\n', "; "));
    }
}
