//! Starting one sandboxed loader process.
//!
//! The monitor never forks a copy of itself into the sandbox: it `clone`s a
//! child into fresh user, pid, net, ipc, uts and cgroup namespaces that
//! only rearranges descriptors, sets rlimits and `execve`s the small
//! `moat-loader` binary. The mount namespace is the exception: the new
//! program makes its own after `execve`, so that nothing it maps comes
//! from a copy of the host's mounts (see `loader::mountns`, which says
//! why that matters). Everything the child touches is prepared before
//! `clone`; the child runs raw, async-signal-safe system calls only (the
//! parent may have other threads holding locks) and `_exit(125)`s on any
//! failure.
//!
//! Every `unsafe` block of the monitor that is about processes lives here.
use moat_policy::Limits;
use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, OnceLock};

use crate::protocol::MONITOR_FD;

/// Exit status of the cloned child when it could not set itself up.
pub const CHILD_SETUP_FAILED: i32 = 125;

/// Namespaces a loader is cloned into, with their names for error
/// messages. (Its mount namespace it makes itself, after `execve`.)
const NAMESPACES: [(libc::c_int, &str); 6] = [
    (libc::CLONE_NEWUSER, "user"),
    (libc::CLONE_NEWPID, "pid"),
    (libc::CLONE_NEWNET, "network"),
    (libc::CLONE_NEWIPC, "ipc"),
    (libc::CLONE_NEWUTS, "uts"),
    (libc::CLONE_NEWCGROUP, "cgroup"),
];

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot find the VMM `moat-vmm` (looked in {0}); build it with `cargo build` or set MOAT_VMM")]
    NoVmm(String),
    #[error("cannot use KVM: {0}")]
    NoKvm(String),
    #[error("cannot find the loader `moat-loader` (looked in {0}); build it with `cargo build` or set MOAT_LOADER")]
    NoLoader(String),
    #[error("cannot create {what}: {err}")]
    Setup {
        what: &'static str,
        err: std::io::Error,
    },
    #[error("cannot create {ns} namespace: {errno}{hint}")]
    Namespace {
        ns: &'static str,
        errno: String,
        hint: String,
    },
    #[error("cannot start the sandbox process: {0}")]
    Clone(std::io::Error),
    #[error("cannot start the loader `{path}`: cannot {stage}: {err}")]
    Child {
        path: String,
        stage: &'static str,
        err: std::io::Error,
    },
}

/// A freshly started loader.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid (in the monitor's pid namespace).
    pub pid: libc::pid_t,
    /// A pidfd for it: signals and waits through it never hit a reused pid.
    pub pidfd: OwnedFd,
    /// The monitor's end of the `SOCK_SEQPACKET` socket (the loader's is
    /// [`MONITOR_FD`]).
    pub sock: OwnedFd,
}

/// Where the loader binary is: `$MOAT_LOADER`, else `moat-loader` next to
/// the running executable, else in its parent directory (tests run from
/// `target/debug/deps`).
pub fn loader_path() -> Result<PathBuf, SpawnError> {
    find_binary("moat-loader", "MOAT_LOADER").map_err(SpawnError::NoLoader)
}

/// Where the KVM host's VMM binary is: `$MOAT_VMM`, else `moat-vmm` found
/// as the loader is.
pub fn vmm_path() -> Result<PathBuf, SpawnError> {
    find_binary("moat-vmm", "MOAT_VMM").map_err(SpawnError::NoVmm)
}

fn find_binary(name: &str, var: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(format!("{var}={}", p.display()));
    }
    let exe = std::env::current_exe().map_err(|e| format!("(current executable unknown: {e})"))?;
    let mut looked = Vec::new();
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let cand = d.join(name);
        if cand.is_file() {
            return Ok(cand);
        }
        looked.push(d.display().to_string());
        dir = d.parent();
    }
    Err(looked.join(", "))
}

/// What the child reads after `clone` (or the zygote's `fork`): plain data
/// and a pointer to the loader path, which the caller keeps alive.
pub(crate) struct ChildArgs {
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
}

/// The VMM's descriptor for `/dev/kvm` (the monitor opens it: inside the
/// sandbox's user namespace the device node is out of reach).
pub const KVM_FD: RawFd = 4;
const ARG0_VMM: &std::ffi::CStr = c"moat-vmm";

const ARG0: &std::ffi::CStr = c"moat-loader";
const ZYGOTE_FLAG: &std::ffi::CStr = c"--zygote";
const ENV0: &std::ffi::CStr = c"MALLOC_ARENA_MAX=1";

impl ChildArgs {
    pub(crate) fn new(
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
        rlimits[1] = (libc::RLIMIT_NOFILE, lim(limits.handles.saturating_add(64)));
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
        }
    }
}

impl ChildArgs {
    /// Hand `/dev/kvm` (descriptor `fd`) to the child as [`KVM_FD`].
    pub(crate) fn set_kvm(&mut self, fd: RawFd) {
        self.kvm = fd;
        self.arg0 = ARG0_VMM.as_ptr();
    }
}

fn cstring(s: &OsStr) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes()).map_err(|_| SpawnError::Setup {
        what: "loader path",
        err: std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL byte in path"),
    })
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

type Job = Box<dyn FnOnce() + Send>;

/// Run `f` on the process-wide spawner thread. Loaders are cloned from
/// that one thread, which lives as long as the host process, because the
/// parent-death signal they get (SIGKILL) fires when the *thread* that
/// cloned them ends: so sandboxes die with the host process, and never
/// earlier.
fn on_spawner_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SpawnError> {
    static SPAWNER: OnceLock<Result<mpsc::Sender<Job>, String>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("moat-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .map(|_| tx)
            .map_err(|e| e.to_string())
    });
    let gone = || SpawnError::Setup {
        what: "the spawner thread",
        err: std::io::Error::other("it is not running"),
    };
    let tx = tx.as_ref().map_err(|e| SpawnError::Setup {
        what: "the spawner thread",
        err: std::io::Error::other(e.clone()),
    })?;
    let (rtx, rrx) = mpsc::sync_channel(1);
    tx.send(Box::new(move || {
        let _ = rtx.send(f());
    }))
    .map_err(|_| gone())?;
    rrx.recv().map_err(|_| gone())
}

/// Start `loader` in new namespaces with `limits` applied as rlimits.
///
/// Loaders start from the zygote (one per host process, in the sandbox
/// namespaces; see `loader::zygote`), which saves creating namespaces per
/// picoprocess. `MOAT_NO_ZYGOTE=1` creates fresh namespaces for every
/// loader instead.
pub fn spawn_loader(loader: &Path, limits: &Limits) -> Result<Spawned, SpawnError> {
    if std::env::var_os("MOAT_NO_ZYGOTE").is_some() {
        let (loader, limits) = (loader.to_path_buf(), *limits);
        return on_spawner_thread(move || spawn_here(&loader, &limits, false))?;
    }
    crate::zygote::spawn(loader, limits, false)
}

fn open_kvm() -> Result<std::fs::File, SpawnError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .map_err(|e| {
            SpawnError::NoKvm(format!(
                "cannot open /dev/kvm ({e}); --host kvm needs KVM (load kvm_intel or kvm_amd, and run as a user who may open /dev/kvm)"
            ))
        })
}

/// Start a VMM (`moat-vmm`, the KVM host) with `/dev/kvm` as descriptor
/// [`KVM_FD`] and the monitor socket as 3: from the VMM zygote (a warm
/// VMM, its VM already created), or with `MOAT_NO_ZYGOTE=1` in fresh
/// namespaces.
pub fn spawn_vmm(vmm: &Path, limits: &Limits) -> Result<Spawned, SpawnError> {
    let (vmm, mut limits) = (vmm.to_path_buf(), *limits);
    // The VMM's vCPU watchdog ends a runaway guest at the CPU-time limit
    // with a report; the kernel's limit stays as the backstop.
    if limits.cpu_seconds != 0 {
        limits.cpu_seconds += 2;
    }
    if std::env::var_os("MOAT_NO_ZYGOTE").is_none() {
        return crate::zygote::spawn(&vmm, &limits, true);
    }
    let kvm = open_kvm()?;
    on_spawner_thread(move || spawn_with(&vmm, &limits, false, Some(kvm.as_raw_fd())))?
}

/// Start a zygote itself (`moat-loader --zygote`, or with `kvm`
/// `moat-vmm --zygote` holding `/dev/kvm`) in new namespaces.
pub(crate) fn spawn_zygote(binary: &Path, kvm: bool) -> Result<Spawned, SpawnError> {
    let binary = binary.to_path_buf();
    let kvm = if kvm { Some(open_kvm()?) } else { None };
    on_spawner_thread(move || {
        spawn_with(
            &binary,
            &Limits::default(),
            true,
            kvm.as_ref().map(|k| k.as_raw_fd()),
        )
    })?
}

fn spawn_here(loader: &Path, limits: &Limits, zygote: bool) -> Result<Spawned, SpawnError> {
    spawn_with(loader, limits, zygote, None)
}

fn spawn_with(
    loader: &Path,
    limits: &Limits,
    zygote: bool,
    kvm: Option<RawFd>,
) -> Result<Spawned, SpawnError> {
    let (mon, child_end) = crate::protocol::seqpacket_pair().map_err(|err| SpawnError::Setup {
        what: "the monitor socket",
        err,
    })?;
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|err| SpawnError::Setup {
            what: "/dev/null",
            err,
        })?;

    let path = cstring(loader.as_os_str())?;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Setup {
            what: "a pipe",
            err: e.into(),
        })?;
    let mut args = ChildArgs::new(
        err_w.as_raw_fd(),
        devnull.as_raw_fd(),
        child_end.as_raw_fd(),
        &path,
        limits,
    );
    args.zygote = zygote;
    if let Some(k) = kvm {
        args.set_kvm(k);
    }
    // Every process cloned here takes uid and gid 0 of its user namespace
    // (an unprivileged identity outside): that keeps the capabilities it
    // needs after execve to make its own mount namespace.
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Setup {
            what: "a pipe",
            err: e.into(),
        })?;
    args.id_sync = r.as_raw_fd();
    args.id_sync_w = w.as_raw_fd();
    let id_pipe = Some((r, w));
    if zygote {
        // The zygote keeps the host's limits but one: its loaders lower
        // theirs, and an unprivileged process can lower a hard limit but
        // never raise it. RLIMIT_NPROC caps the tasks of all its loaders
        // together (they share its namespace and identity).
        args.rlimits[0] = (
            libc::RLIMIT_NPROC,
            libc::rlimit {
                rlim_cur: crate::zygote::MAX_TASKS,
                rlim_max: crate::zygote::MAX_TASKS,
            },
        );
        args.n_rlimits = 1;
    }

    let ns_flags = NAMESPACES.iter().fold(0, |a, (f, _)| a | f);
    let (pid, pidfd) = match clone_child(ns_flags, &args) {
        Ok(v) => v,
        Err(e) => return Err(diagnose(e)),
    };
    if let Some((r, w)) = id_pipe {
        drop(r);
        // Map uid/gid 0 inside to an unprivileged identity outside, then
        // let the child take it. On failure the child sees end-of-file
        // and exits.
        if let Err(err) = crate::zygote::map_identity(pid) {
            drop(w);
            let _ = signal_pidfd(&pidfd, libc::SIGKILL);
            let _ = wait_pidfd(&pidfd);
            return Err(SpawnError::Setup {
                what: "the sandbox user namespace's id maps",
                err,
            });
        }
        let mut w = std::fs::File::from(w);
        let _ = std::io::Write::write_all(&mut w, b"1");
    }
    // The child has its copies; ours of its end and /dev/null close here.
    drop(child_end);
    drop(devnull);
    drop(err_w);
    if let Some((stage, errno)) = read_child_failure(err_r) {
        let _ = wait_pidfd(&pidfd);
        return Err(SpawnError::Child {
            path: loader.display().to_string(),
            stage: stage_name(stage),
            err: std::io::Error::from_raw_os_error(errno),
        });
    }
    Ok(Spawned {
        pid,
        pidfd,
        sock: mon,
    })
}

const STACK_SIZE: usize = 64 * 1024;

/// `clone` a child running [`child_main`] with `args`; returns its pid and
/// pidfd.
fn clone_child(
    ns_flags: libc::c_int,
    args: &ChildArgs,
) -> Result<(libc::pid_t, OwnedFd), std::io::Error> {
    let mut stack = vec![0u8; STACK_SIZE];
    // Stacks grow down on x86-64; 16-byte aligned top.
    let top = ((stack.as_mut_ptr() as usize + STACK_SIZE) & !15) as *mut libc::c_void;
    let mut pidfd: libc::c_int = -1;
    let flags = ns_flags | libc::CLONE_PIDFD | libc::SIGCHLD;
    // SAFETY: without CLONE_VM the child runs on its own copy of the address
    // space, on the copy of `stack`; `args` and everything it points to stay
    // alive in this frame until clone has returned, and the child only
    // reads them. With CLONE_PIDFD the kernel writes the pidfd to `pidfd`
    // (the parent_tid argument).
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            flags,
            args as *const ChildArgs as *mut libc::c_void,
            &mut pidfd as *mut libc::c_int,
        )
    };
    if pid < 0 {
        return Err(last_err());
    }
    drop(stack);
    // SAFETY: CLONE_PIDFD installed this descriptor for us (close-on-exec).
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok((pid, pidfd))
}

/// The cloned child: raw system calls only, then `execve`.
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
pub(crate) const STAGE_MOUNT_NS: u8 = 6;

/// The cloned child: raw system calls only, then `execve`.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` the parent passed to clone, in our
    // copy of its memory.
    unsafe { exec_loader_child(&*(arg as *const ChildArgs)) }
}

/// In a fresh child (of clone or of the zygote's fork): arrange the
/// descriptors and limits and exec the loader (or the zygote). Never
/// returns; on failure writes the stage and errno to the error pipe.
///
/// # Safety
/// Only in a child process; every call below is a plain system call that
/// touches only memory prepared before the child was made.
pub(crate) unsafe fn exec_loader_child(a: &ChildArgs) -> ! {
    // SAFETY: see the function contract.
    unsafe {
        let e = setup_child(a);
        // A zygote reports on the set-up pipe until its mount namespace
        // is made: keep a copy open across execve.
        if a.zygote && libc::dup2(e, crate::protocol::SETUP_FD) != crate::protocol::SETUP_FD {
            child_fail(1, e);
        }
        let argv: [*const libc::c_char; 4] = if a.zygote {
            [a.arg0, ZYGOTE_FLAG.as_ptr(), a.path, std::ptr::null()]
        } else {
            [a.arg0, std::ptr::null(), std::ptr::null(), std::ptr::null()]
        };
        let envp: [*const libc::c_char; 2] = [ENV0.as_ptr(), std::ptr::null()];
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
pub(crate) unsafe fn setup_child(a: &ChildArgs) -> RawFd {
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

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::ENOSPC) => "ENOSPC (too many namespaces)".into(),
        Some(libc::EUSERS) => "EUSERS (namespaces nested too deep)".into(),
        Some(libc::ENOMEM) => "ENOMEM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        _ => e.to_string(),
    }
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn userns_hint() -> String {
    if read_sysctl("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return "; kernel.unprivileged_userns_clone is 0: enable it with `sysctl kernel.unprivileged_userns_clone=1`".into();
    }
    if read_sysctl("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return "; user.max_user_namespaces is 0: raise it with `sysctl user.max_user_namespaces=10000`".into();
    }
    if read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1")
    {
        return "; AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1): allow them for moat with an AppArmor profile or set it to 0".into();
    }
    "; is kernel.unprivileged_userns_clone enabled? (in a container, is it allowed to create user namespaces?)".into()
}

/// `clone` with all namespaces failed: find out which namespace the kernel
/// refuses by cloning trivial children, so the error can say which and why.
fn diagnose(err: std::io::Error) -> SpawnError {
    let ns_err = matches!(
        err.raw_os_error(),
        Some(libc::EPERM | libc::EINVAL | libc::ENOSPC | libc::EUSERS | libc::EACCES)
    );
    if !ns_err {
        return SpawnError::Clone(err);
    }
    let mut flags = 0;
    for (f, name) in NAMESPACES {
        flags |= f;
        if let Err(e) = probe(flags) {
            let hint = if f == libc::CLONE_NEWUSER {
                userns_hint()
            } else {
                String::new()
            };
            return SpawnError::Namespace {
                ns: name,
                errno: errno_name(&e),
                hint,
            };
        }
    }
    SpawnError::Clone(err)
}

extern "C" fn probe_main(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: _exit is a plain system call.
    unsafe { libc::_exit(0) }
}

/// Clone a child with `flags` that exits at once; reap it.
fn probe(flags: libc::c_int) -> Result<(), std::io::Error> {
    let mut stack = vec![0u8; 16 * 1024];
    let top = ((stack.as_mut_ptr() as usize + stack.len()) & !15) as *mut libc::c_void;
    // SAFETY: as in clone_child; the child only calls _exit.
    let pid = unsafe { libc::clone(probe_main, top, flags | libc::SIGCHLD, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(last_err());
    }
    let mut st = 0;
    // SAFETY: reaping our own child; `st` is a valid int.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    drop(stack);
    Ok(())
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
}

/// Read a child's error pipe to its end: end-of-file alone means it got
/// through its set-up (exec, or for a zygote fork, `setup_child`); five
/// bytes are the failed stage and errno it wrote.
pub(crate) fn read_child_failure(err_r: OwnedFd) -> Option<(u8, i32)> {
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
pub(crate) fn stage_name(stage: u8) -> &'static str {
    STAGES[(stage as usize).min(STAGES.len() - 1)]
}

/// Wait for a loader: our own child (reaped here), or one the zygote
/// started (whose status the zygote reports).
pub fn wait_process(pidfd: &OwnedFd, pid: u32) -> Result<Status, std::io::Error> {
    match wait_pidfd(pidfd) {
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
            Ok(crate::zygote::wait_exit(pid as i32))
        }
        r => r,
    }
}

/// Wait for (and reap) the process behind `pidfd`.
pub fn wait_pidfd(pidfd: &OwnedFd) -> Result<Status, std::io::Error> {
    loop {
        // SAFETY: siginfo_t is plain data; zeroed is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own pidfd; `info` is valid for writes.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED,
            )
        };
        if r != 0 {
            let e = last_err();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid with WEXITED filled in a SIGCHLD siginfo.
        let status = unsafe { info.si_status() };
        return Ok(match info.si_code {
            libc::CLD_EXITED => Status::Exited(status),
            _ => Status::Signaled(status),
        });
    }
}

/// Send `sig` to the process behind `pidfd` (a no-op once it is reaped).
pub fn signal_pidfd(pidfd: &OwnedFd, sig: libc::c_int) -> Result<(), std::io::Error> {
    // SAFETY: pidfd_send_signal on our own pidfd with no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        let e = last_err();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}
