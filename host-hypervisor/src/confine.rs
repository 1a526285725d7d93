//! The VMM's own confinement: a seccomp allow-list per thread kind, on top
//! of the namespaces, rlimits and Landlock (no file system at all) that it
//! shares with a loader.
//!
//! | thread | allowed system calls |
//! |---|---|
//! | vCPU (and the main thread, which starts the first one) | the loader's allow-list + `ioctl` limited to the KVM vCPU requests + `mmap`/`mprotect` never W+X + `clone` for threads only + `fcntl` (3 commands) + `tgkill` (own process) + `prctl(PR_SET_NAME)` |
//! | watchdog | [`WATCHDOG_SYSCALLS`] + `tgkill` (own process) |
//! | UART input | [`INPUT_SYSCALLS`] + `fcntl(F_GETFD)` |
//! | virtio-blk I/O | [`IO_SYSCALLS`] + `mmap`/`mprotect` never executable |
//! | virtio-net | [`NET_SYSCALLS`] + `mmap`/`mprotect` never executable |
//!
//! A vCPU thread serves the whole ABI for its guest thread (the host-linux
//! PAL's calls: descriptors it holds, the monitor socket, memory), runs
//! KVM_RUN, and starts the vCPU threads of new guest threads, which
//! inherit its filter. Anything else kills the VMM with SIGSYS (the
//! monitor reports it as a sandbox violation, exit 159).
use moat_host_common::sandbox;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// Calls every VMM thread makes (signals, futexes, its own end).
const COMMON: [i64; 14] = [
    // A refused call is reported to the monitor from the SIGSYS handler.
    libc::SYS_sendto,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // The SIGTERM handler sets the abort event (an eventfd write).
    libc::SYS_write,
    libc::SYS_clock_gettime,
];

/// The watchdog: wait with a timeout, signal a late vCPU thread.
pub const WATCHDOG_SYSCALLS: &[i64] = &[libc::SYS_clock_nanosleep, libc::SYS_nanosleep];

/// A UART's input pump: read the console or its line (waiting in `poll`
/// for a non-blocking line), sleep while the FIFO is full.
pub const INPUT_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_close,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
];

/// A virtio-blk I/O thread: sleep on its kick eventfd, read and write
/// the backing file, sync it, allocate (its buffers, the C library's
/// arena for the thread).
pub const IO_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_brk,
    libc::SYS_mremap,
    libc::SYS_sched_yield,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
];

/// A virtio-net thread: `poll` on its kick eventfd and its wire, frames
/// through `read` and `write`, allocation, yields and sleeps.
pub const NET_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_brk,
    libc::SYS_mremap,
    libc::SYS_sched_yield,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
];

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}

/// The KVM requests a vCPU thread makes on its vCPU (and KVM_CREATE_VCPU
/// on the VM, KVM_GET_VCPU_MMAP_SIZE on /dev/kvm for a new thread's vCPU).
fn kvm_ioctls() -> Vec<u64> {
    use kvm_bindings::{kvm_msrs, kvm_regs, kvm_sregs, kvm_xcrs};
    let (w, r) = (1, 2);
    vec![
        ioc(0, 0x80, 0),                                // KVM_RUN
        ioc(0, 0x41, 0),                                // KVM_CREATE_VCPU
        ioc(0, 0x04, 0),                                // KVM_GET_VCPU_MMAP_SIZE
        ioc(r, 0x81, std::mem::size_of::<kvm_regs>()),  // KVM_GET_REGS
        ioc(w, 0x82, std::mem::size_of::<kvm_regs>()),  // KVM_SET_REGS
        ioc(r, 0x83, std::mem::size_of::<kvm_sregs>()), // KVM_GET_SREGS
        ioc(w, 0x84, std::mem::size_of::<kvm_sregs>()), // KVM_SET_SREGS
        ioc(w, 0x89, std::mem::size_of::<kvm_msrs>()),  // KVM_SET_MSRS
        // A checkpoint's vector state (see `pico`'s `frozen`).
        ioc(r, 0xa4, 4096),                            // KVM_GET_XSAVE
        ioc(w, 0xa5, 4096),                            // KVM_SET_XSAVE
        ioc(r, 0xa6, std::mem::size_of::<kvm_xcrs>()), // KVM_GET_XCRS
    ]
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn plain(calls: &[i64]) -> Rules {
    COMMON
        .iter()
        .chain(calls)
        .map(|&nr| (nr, Vec::new()))
        .collect()
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn tgkill_own(m: &mut Rules) -> Result<(), String> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    let c = Cond::new(0, Len::Dword, Op::Eq, pid).map_err(err)?;
    m.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![c]).map_err(err)?],
    );
    Ok(())
}

/// The vCPU threads' rules: the loader's allow-list (the same PAL code
/// serves the same calls) plus KVM and thread names.
pub fn vcpu_rules() -> Result<Rules, String> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as i64;
    let mut m = sandbox::allow_list(pid)?;
    for nr in COMMON {
        m.entry(nr).or_default();
    }
    let ioctl = kvm_ioctls()
        .into_iter()
        .map(|req| {
            Cond::new(1, Len::Dword, Op::Eq, req)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    m.insert(libc::SYS_ioctl, ioctl);
    let name = Cond::new(0, Len::Dword, Op::Eq, libc::PR_SET_NAME as u64).map_err(err)?;
    m.insert(
        libc::SYS_prctl,
        vec![SeccompRule::new(vec![name]).map_err(err)?],
    );
    Ok(m)
}

pub fn watchdog_rules() -> Result<Rules, String> {
    let mut m = plain(WATCHDOG_SYSCALLS);
    tgkill_own(&mut m)?;
    Ok(m)
}

pub fn input_rules() -> Result<Rules, String> {
    let mut m = plain(INPUT_SYSCALLS);
    // Closing a descriptor checks it first (F_GETFD) in debug builds.
    let c = Cond::new(1, Len::Dword, Op::Eq, libc::F_GETFD as u64).map_err(err)?;
    m.insert(
        libc::SYS_fcntl,
        vec![SeccompRule::new(vec![c]).map_err(err)?],
    );
    Ok(m)
}

pub fn io_rules() -> Result<Rules, String> {
    let mut m = plain(IO_SYSCALLS);
    m.insert(libc::SYS_mmap, no_exec()?);
    m.insert(libc::SYS_mprotect, no_exec()?);
    Ok(m)
}

pub fn net_rules() -> Result<Rules, String> {
    let mut m = plain(NET_SYSCALLS);
    m.insert(libc::SYS_mmap, no_exec()?);
    m.insert(libc::SYS_mprotect, no_exec()?);
    Ok(m)
}

/// `mmap` and `mprotect` never with `PROT_EXEC`.
fn no_exec() -> Result<Vec<SeccompRule>, String> {
    let c = Cond::new(2, Len::Dword, Op::MaskedEq(libc::PROT_EXEC as u64), 0).map_err(err)?;
    Ok(vec![SeccompRule::new(vec![c]).map_err(err)?])
}

/// Compile `rules` (unknown calls: SIGSYS), behind a prefix that answers
/// `clone3` with ENOSYS (the C library then falls back to `clone`, whose
/// flags the rules can check).
pub fn compile(rules: Rules) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(err)?;
    let main: BpfProgram = filter.try_into().map_err(err)?;
    let ins = |code: u16, jt: u8, jf: u8, k: u32| seccompiler::sock_filter { code, jt, jf, k };
    let mut prog = vec![
        ins(0x20, 0, 0, 4),                                 // ld arch
        ins(0x15, 1, 0, 0xC000_003E),                       // x86-64?
        ins(0x06, 0, 0, 0x0003_0000),                       // no: trap
        ins(0x20, 0, 0, 0),                                 // ld nr
        ins(0x15, 0, 1, libc::SYS_clone3 as u32),           // clone3?
        ins(0x06, 0, 0, 0x0005_0000 | libc::ENOSYS as u32), // ENOSYS
    ];
    prog.extend(main);
    Ok(prog)
}

/// Confine the calling thread (and the threads it starts later).
pub fn apply(rules: Result<Rules, String>) -> Result<(), String> {
    let prog = compile(rules?)?;
    seccompiler::apply_filter(&prog)
        .map_err(|e| format!("cannot install the VMM's seccomp filter: {e}"))
}

/// Number of distinct system calls each thread kind may make (README).
pub fn counts() -> Result<(usize, usize, usize, usize, usize), String> {
    Ok((
        vcpu_rules()?.len() + 1, // + clone3, answered ENOSYS
        watchdog_rules()?.len(),
        input_rules()?.len(),
        io_rules()?.len(),
        net_rules()?.len(),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_documented() {
        let (v, w, i, io, net) = super::counts().unwrap();
        // README.md states these numbers.
        assert_eq!(
            (v, w, i, io, net),
            (52, 17, 21, 25, 24),
            "update README.md's security model"
        );
    }
}
