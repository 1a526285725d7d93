//! The child side of starting a sandboxed process: what runs between
//! `clone` (the monitor) or `fork` (a zygote) and `execve` (or, for a
//! zygote's warm loader, instead of it). Raw, async-signal-safe system
//! calls only: the parent may have had other threads holding locks.
//!
//! A child that fails writes the stage it was at and the errno to its
//! error pipe (five bytes) and exits [`CHILD_SETUP_FAILED`]; the parent
//! reads the pipe to its end with [`read_child_failure`].
use moat_policy::Limits;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{OwnedFd, RawFd};

use crate::protocol::{KVM_FD, MONITOR_FD, SETUP_FD};

/// Exit status of the cloned child when it could not set itself up.
pub const CHILD_SETUP_FAILED: i32 = 125;

/// What the child reads after `clone` (or the zygote's `fork`): plain data
/// and a pointer to the loader path, which the caller keeps alive.
pub struct ChildArgs {
    /// Write end of a close-on-exec pipe: the child writes why it failed;
    /// the parent reads end-of-file once `execve` succeeded.
    err_pipe: RawFd,
    devnull: RawFd,
    sock: RawFd,
    path: *const libc::c_char,
    /// `--zygote`: start the zygote instead of a loader.
    zygote: bool,
    /// With `zygote`: read end of a pipe; the child waits for one byte on
    /// it (the parent has written its uid/gid maps), then takes uid and
    /// gid 0 inside its user namespace (an unprivileged id outside).
    id_sync: RawFd,
    /// The write end of that pipe, closed first thing in the child, so a
    /// parent that dies before writing leaves it end-of-file, not a hang.
    id_sync_w: RawFd,
    rlimits: [(libc::__rlimit_resource_t, libc::rlimit); 4],
    n_rlimits: usize,
    /// The VMM: `/dev/kvm`, to become [`KVM_FD`] in the child (-1: none).
    kvm: RawFd,
    /// argv[0] of the new program.
    arg0: *const libc::c_char,
    /// The picoprocess's `threads` and `handles` limits (for the VMM's
    /// descriptor limit).
    threads: u64,
    handles: u64,
    /// Pass [`crate::seal::ENV_FORCE_SECCOMP`] on to the loader (it was in
    /// our own environment).
    seal_seccomp: bool,
}

const ARG0_VMM: &std::ffi::CStr = c"moat-vmm";

const ARG0: &std::ffi::CStr = c"moat-loader";
const ZYGOTE_FLAG: &std::ffi::CStr = c"--zygote";
const ENV0: &std::ffi::CStr = c"MALLOC_ARENA_MAX=1";
const ENV_SEAL: &std::ffi::CStr = c"MOAT_SEAL=seccomp";

impl ChildArgs {
    pub fn new(
        err_pipe: RawFd,
        devnull: RawFd,
        sock: RawFd,
        path: &CString,
        limits: &Limits,
    ) -> ChildArgs {
        let mib = |m: u64| m.saturating_mul(1 << 20);
        let lim = |v: u64| libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        let mut rlimits = [(libc::RLIMIT_CORE, lim(0)); 4];
        rlimits[1] = (
            libc::RLIMIT_NOFILE,
            lim(limits.handles.saturating_add(FD_OVERHEAD)),
        );
        rlimits[2] = (
            libc::RLIMIT_AS,
            lim(mib(limits.memory_mib.saturating_add(768))),
        );
        let mut n_rlimits = 3;
        if limits.cpu_seconds != 0 {
            rlimits[3] = (libc::RLIMIT_CPU, lim(limits.cpu_seconds));
            n_rlimits = 4;
        }
        ChildArgs {
            err_pipe,
            devnull,
            sock,
            path: path.as_ptr(),
            zygote: false,
            id_sync: -1,
            id_sync_w: -1,
            rlimits,
            n_rlimits,
            kvm: -1,
            arg0: ARG0.as_ptr(),
            threads: limits.threads,
            handles: limits.handles,
            seal_seccomp: std::env::var_os(crate::seal::ENV_FORCE_SECCOMP.0)
                .is_some_and(|v| v == crate::seal::ENV_FORCE_SECCOMP.1),
        }
    }
}

/// Descriptors a loader may hold besides its guest's handles: the
/// console and monitor socket (0-3), the PAL's own (the signal-safe report
/// path, a zygote's leftovers) and the listening sockets of the pipe and
/// TCP servers it opened ([`MAX_SERVERS`](crate::pal::MAX_SERVERS)), and
/// the two descriptors each open shared-section stream holds besides its
/// own ([`MAX_OPEN_SECTIONS`](crate::pal::MAX_OPEN_SECTIONS)).
/// `RLIMIT_NOFILE` is the guest's `handles` plus this, so a guest that
/// bypasses the ABI gets no more descriptors than that.
pub const FD_OVERHEAD: u64 =
    8 + crate::pal::MAX_SERVERS as u64 + 2 * crate::pal::MAX_OPEN_SECTIONS as u64;

/// Descriptors a VMM holds besides a loader's: `/dev/kvm`, the VM, one
/// vCPU per guest thread (added separately), each device's backing file
/// and interrupt event.
pub const VMM_FD_OVERHEAD: u64 = 8 + 2 * moat_policy::device::MAX_DEVICES as u64;

impl ChildArgs {
    /// Start the zygote (`--zygote PATH`) instead of a loader.
    pub fn set_zygote(&mut self, zygote: bool) {
        self.zygote = zygote;
    }

    /// The child waits for one byte on `read` (the parent has written its
    /// uid/gid maps), then takes uid and gid 0 inside its user namespace;
    /// `write` is the pipe's other end, which the child closes first.
    pub fn set_identity_sync(&mut self, read: RawFd, write: RawFd) {
        self.id_sync = read;
        self.id_sync_w = write;
    }

    /// Set no rlimit but `RLIMIT_NPROC` (a zygote keeps the host's other
    /// limits: its loaders lower theirs, and a hard limit only goes down).
    pub fn set_only_nproc(&mut self, nproc: u64) {
        self.rlimits[0] = (
            libc::RLIMIT_NPROC,
            libc::rlimit {
                rlim_cur: nproc,
                rlim_max: nproc,
            },
        );
        self.n_rlimits = 1;
    }

    /// Hand `/dev/kvm` (descriptor `fd`) to the child as [`KVM_FD`] (and
    /// allow the VMM its own descriptors: see [`VMM_FD_OVERHEAD`]).
    pub fn set_kvm(&mut self, fd: RawFd) {
        let n = self
            .handles
            .saturating_add(FD_OVERHEAD)
            .saturating_add(VMM_FD_OVERHEAD)
            .saturating_add(self.threads);
        self.rlimits[1].1 = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        self.kvm = fd;
        self.arg0 = ARG0_VMM.as_ptr();
    }
}

/// What the child was doing when it failed (first byte on the error pipe).
const STAGES: [&str; 8] = [
    "set the parent-death signal",
    "arrange descriptors",
    "close inherited descriptors",
    "set resource limits",
    "execute the loader",
    "take its unprivileged identity",
    "make its empty mount namespace",
    "?",
];

/// The stage a zygote reports when it cannot make its mount namespace.
pub const STAGE_MOUNT_NS: u8 = 6;

/// In a fresh child (of clone or of the zygote's fork): arrange the
/// descriptors and limits and exec the loader (or the zygote). Never
/// returns; on failure writes the stage and errno to the error pipe.
///
/// # Safety
/// Only in a child process; every call below is a plain system call that
/// touches only memory prepared before the child was made.
pub unsafe fn exec_loader_child(a: &ChildArgs) -> ! {
    // SAFETY: see the function contract.
    unsafe {
        let e = setup_child(a);
        // A zygote reports on the set-up pipe until its mount namespace
        // is made: keep a copy open across execve.
        if a.zygote && libc::dup2(e, SETUP_FD) != SETUP_FD {
            child_fail(1, e);
        }
        let argv: [*const libc::c_char; 4] = if a.zygote {
            [a.arg0, ZYGOTE_FLAG.as_ptr(), a.path, std::ptr::null()]
        } else {
            [a.arg0, std::ptr::null(), std::ptr::null(), std::ptr::null()]
        };
        let seal = if a.seal_seccomp {
            ENV_SEAL.as_ptr()
        } else {
            std::ptr::null()
        };
        let envp: [*const libc::c_char; 3] = [ENV0.as_ptr(), seal, std::ptr::null()];
        libc::execve(a.path, argv.as_ptr(), envp.as_ptr());
        child_fail(4, e)
    }
}

/// Tell the parent which stage failed and why (on the error pipe `e`), then exit.
///
/// # Safety
/// Only in a child process.
unsafe fn child_fail(stage: u8, e: RawFd) -> ! {
    // SAFETY: plain system calls on a local buffer.
    unsafe {
        let errno = *libc::__errno_location();
        let mut msg = [stage, 0, 0, 0, 0];
        msg[1..].copy_from_slice(&errno.to_ne_bytes());
        if e >= 0 {
            libc::write(e, msg.as_ptr() as *const libc::c_void, msg.len());
        }
        libc::_exit(CHILD_SETUP_FAILED)
    }
}

/// In a fresh child: parent-death signal, descriptors 0-2 on /dev/null,
/// the monitor socket on 3, everything else closed but the error pipe
/// (returned, close-on-exec), rlimits. On failure: reports and exits.
///
/// # Safety
/// Only in a child process, with `a` prepared before it was made.
pub unsafe fn setup_child(a: &ChildArgs) -> RawFd {
    // SAFETY: see the function contract.
    unsafe {
        let fail = |stage: u8, e: RawFd| -> ! { child_fail(stage, e) };
        if a.id_sync >= 0 {
            libc::close(a.id_sync_w);
            let mut b = 0u8;
            if libc::read(a.id_sync, &mut b as *mut u8 as *mut libc::c_void, 1) != 1 {
                fail(5, a.err_pipe);
            }
            // Raw system calls: the C library's setresuid would try to
            // change the credentials of every thread the parent had, and
            // wait for threads that do not exist in this child.
            if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
            {
                fail(5, a.err_pipe);
            }
        }
        // Die with the spawner thread (the host process).
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(0, a.err_pipe);
        }
        // Move the descriptors we keep above the ones we are about to
        // overwrite, so that each dup2 below really duplicates (and so
        // clears close-on-exec).
        let e = libc::fcntl(a.err_pipe, libc::F_DUPFD_CLOEXEC, 10);
        let s = libc::fcntl(a.sock, libc::F_DUPFD_CLOEXEC, 10);
        let n = libc::fcntl(a.devnull, libc::F_DUPFD_CLOEXEC, 10);
        if e < 0 || s < 0 || n < 0 {
            fail(1, if e >= 0 { e } else { a.err_pipe });
        }
        let k = if a.kvm >= 0 {
            libc::fcntl(a.kvm, libc::F_DUPFD_CLOEXEC, 10)
        } else {
            -1
        };
        if a.kvm >= 0 && k < 0 {
            fail(1, e);
        }
        for fd in 0..3 {
            if libc::dup2(n, fd) != fd {
                fail(1, e);
            }
        }
        if libc::dup2(s, MONITOR_FD) != MONITOR_FD {
            fail(1, e);
        }
        let mut keep = MONITOR_FD;
        if k >= 0 {
            if libc::dup2(k, KVM_FD) != KVM_FD {
                fail(1, e);
            }
            keep = KVM_FD;
        }
        // Close everything above, but the error pipe (close-on-exec).
        let close = |lo: RawFd, hi: libc::c_uint| -> bool {
            libc::syscall(libc::SYS_close_range, lo as libc::c_uint, hi, 0) == 0
        };
        if !(close(keep + 1, (e - 1) as libc::c_uint) && close(e + 1, libc::c_uint::MAX)) {
            if *libc::__errno_location() != libc::ENOSYS {
                fail(2, e);
            }
            // Kernels before 5.9: close them one by one.
            for fd in (keep + 1)..65536 {
                if fd != e {
                    libc::close(fd);
                }
            }
        }
        for (res, lim) in &a.rlimits[..a.n_rlimits] {
            if libc::setrlimit(*res, lim) != 0 {
                fail(3, e);
            }
        }
        e
    }
}

/// Read a child's error pipe to its end: end-of-file alone means it got
/// through its set-up (exec, or for a zygote fork, `setup_child`); five
/// bytes are the failed stage and errno it wrote.
pub fn read_child_failure(err_r: OwnedFd) -> Option<(u8, i32)> {
    let mut msg = [0u8; 5];
    let mut got = 0;
    let mut f = std::fs::File::from(err_r);
    while got < msg.len() {
        match f.read(&mut msg[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    (got == msg.len()).then(|| (msg[0], i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]])))
}

/// The name of a child set-up stage reported on the error pipe.
pub fn stage_name(stage: u8) -> &'static str {
    STAGES[(stage as usize).min(STAGES.len() - 1)]
}
