//! Starting one sandboxed loader process.
//!
//! The monitor never forks a copy of itself into the sandbox: it `clone`s a
//! child into fresh user, pid, net, ipc, uts and cgroup namespaces that
//! only rearranges descriptors, sets rlimits and `execve`s the small
//! `moat-loader` binary. The mount namespace is the exception: the new
//! program makes its own after `execve`, so that nothing it maps comes
//! from a copy of the host's mounts (see `moat_host_common::mountns`, which says
//! why that matters). Everything the child touches is prepared before
//! `clone`; the child runs raw, async-signal-safe system calls only (the
//! parent may have other threads holding locks) and `_exit(125)`s on any
//! failure.
//!
//! Every `unsafe` block of the monitor that is about processes lives here.
use moat_host_common::child::{self, ChildArgs};
use moat_policy::Limits;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{mpsc, OnceLock};

use crate::process::{signal_pidfd, wait_pidfd, SpawnError, Spawned};

/// Tasks (threads included) all loaders of one host process may have at
/// once (RLIMIT_NPROC of the zygote's identity): the kernel's backstop
/// behind each picoprocess's `threads` limit, which the in-process PAL
/// enforces and a hostile guest could bypass.
pub(crate) const MAX_TASKS: u64 = 8192;

/// Map uid and gid 0 of the zygote's user namespace to an unprivileged
/// identity outside: `nobody` (65534) when the host runs as root, else the
/// host's own ids. Picoprocesses then never run as the host's root.
fn map_identity(pid: i32) -> std::io::Result<()> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let (ou, og) = if uid == 0 { (65534, 65534) } else { (uid, gid) };
    std::fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
    std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {ou} 1"))?;
    std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {og} 1"))?;
    Ok(())
}

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

/// Start `binary` (a loader, or with `kvm` a VMM holding `/dev/kvm`) in
/// fresh namespaces of its own, without a zygote.
pub(crate) fn fresh(binary: &Path, limits: &Limits, kvm: bool) -> Result<Spawned, SpawnError> {
    let (binary, limits) = (binary.to_path_buf(), *limits);
    let kvm = if kvm { Some(open_kvm()?) } else { None };
    on_spawner_thread(move || {
        spawn_with(&binary, &limits, false, kvm.as_ref().map(|k| k.as_raw_fd()))
    })?
}

fn spawn_with(
    loader: &Path,
    limits: &Limits,
    zygote: bool,
    kvm: Option<RawFd>,
) -> Result<Spawned, SpawnError> {
    let (mon, child_end) =
        moat_host_common::protocol::seqpacket_pair().map_err(|err| SpawnError::Setup {
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
    args.set_zygote(zygote);
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
    args.set_identity_sync(r.as_raw_fd(), w.as_raw_fd());
    if zygote {
        // The zygote keeps the host's limits but one: its loaders lower
        // theirs, and an unprivileged process can lower a hard limit but
        // never raise it. RLIMIT_NPROC caps the tasks of all its loaders
        // together (they share its namespace and identity).
        args.set_only_nproc(MAX_TASKS);
    }

    let ns_flags = NAMESPACES.iter().fold(0, |a, (f, _)| a | f);
    let (pid, pidfd) = match clone_child(ns_flags, &args) {
        Ok(v) => v,
        Err(e) => return Err(diagnose(e)),
    };
    drop(r);
    // Map uid/gid 0 inside to an unprivileged identity outside, then let
    // the child take it. On failure the child sees end-of-file and exits.
    if let Err(err) = map_identity(pid) {
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
    // The child has its copies; ours of its end and /dev/null close here.
    drop(child_end);
    drop(devnull);
    drop(err_w);
    if let Some((stage, errno)) = child::read_child_failure(err_r) {
        let _ = wait_pidfd(&pidfd);
        return Err(SpawnError::Child {
            path: loader.display().to_string(),
            stage: child::stage_name(stage),
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
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` the parent passed to clone, in our
    // copy of its memory.
    unsafe { child::exec_loader_child(&*(arg as *const ChildArgs)) }
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
