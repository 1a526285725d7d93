//! The zygote: `moat-loader --zygote LOADER_PATH`, started once per host
//! process inside the sandbox namespaces (user, pid, mount, net, ipc, uts,
//! cgroup). Creating namespaces costs over a millisecond, and exec'ing and
//! linking a loader and installing its sandbox most of another; the zygote
//! pays both once. It keeps one *warm* loader: forked from the zygote (it
//! is the loader binary, already linked and initialised), its rlimits set,
//! already confined by Landlock and seccomp, waiting on its monitor socket
//! for a configuration and an image. A spawn hands that loader out and
//! forks the next.
//!
//! Every picoprocess of the host process shares the (empty) namespaces;
//! the seccomp allow-list gives none of them a call that could reach
//! another through them (no sockets, no SysV IPC, no signals to others, no
//! ptrace). Loaders share the zygote's address-space layout (as Android's
//! zygote children do); they hold nothing of the host's, and none of the
//! zygote's descriptors.
//!
//! The zygote is the namespace's init: when it ends (its control socket
//! closed because the host process is gone), the kernel kills every
//! loader in the namespace.
use crate::child::{setup_child, ChildArgs};
use crate::protocol::{self, ZygoteEvent, ZygoteRequest};
use moat_policy::Limits;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn ctl() -> BorrowedFd<'static> {
    // SAFETY: descriptor 3 is the control socket for the life of the zygote.
    unsafe { BorrowedFd::borrow_raw(protocol::MONITOR_FD) }
}

fn send(ev: &ZygoteEvent, fds: &[i32]) {
    if protocol::send(ctl(), ev, fds).is_err() {
        // The monitor is gone: end the namespace.
        std::process::exit(0);
    }
}

/// A loader forked ahead of need.
struct Warm {
    limits: Limits,
    pid: i32,
    /// The monitor's end of its socket.
    sock: OwnedFd,
}

struct State {
    /// Loaders handed out, by pid: the request id their exit is reported under.
    handed: std::collections::HashMap<i32, u64>,
    path: CString,
    devnull: OwnedFd,
    warm: Option<Warm>,
    /// Fork the next warm loader (with these limits) at this time.
    refill: Option<(Limits, std::time::Instant)>,
    /// What a forked child runs.
    child: fn(&Limits) -> !,
    /// Pass `/dev/kvm` on to the children.
    kvm: bool,
}

/// How long after a hand-off the zygote waits before warming the next
/// loader.
const REFILL_DELAY: std::time::Duration = std::time::Duration::from_micros(300);

/// The zygote loop for any binary: `child` is what a forked warm process
/// runs (it gets the limits it was forked with: a warm VMM prepares its VM
/// of that size before it is handed out). With `kvm`, descriptor
/// [`KVM_FD`](crate::protocol::KVM_FD) (`/dev/kvm`) is passed on to them.
pub fn main_with(binary: &str, child: fn(&Limits) -> !, kvm: bool) -> ! {
    let path = CString::new(binary).unwrap_or_else(|_| std::process::exit(125));
    // SIGCHLD arrives through a signalfd, so the loop is one poll().
    // SAFETY: plain signal-mask and signalfd calls on this single thread.
    let sfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            std::process::exit(125);
        }
        OwnedFd::from_raw_fd(fd)
    };
    let devnull = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        Ok(f) => OwnedFd::from(f),
        Err(_) => std::process::exit(125),
    };
    // Leave the host's mounts behind (see `mountns`): a copy of them
    // would keep every one alive after the host unmounts it, and within
    // reach of a bug. This also tells the monitor the zygote is ready.
    crate::mountns::enter_empty_or_report();
    let mut st = State {
        handed: std::collections::HashMap::new(),
        path,
        devnull,
        warm: None,
        refill: None,
        child,
        kvm,
    };
    // Warm one with the default limits before the first request.
    st.warm = warm_up(&st, &Limits::default());
    loop {
        let mut p = [
            libc::pollfd {
                fd: protocol::MONITOR_FD,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = st.refill.map(|(_, at)| {
            let d = at.saturating_duration_since(std::time::Instant::now());
            libc::timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as i64,
            }
        });
        let tp = timeout
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: p is a valid array of two pollfds; tp is null or points
        // at a live timespec.
        let n = unsafe { libc::ppoll(p.as_mut_ptr(), 2, tp, std::ptr::null()) };
        if n < 0 {
            continue;
        }
        if let Some((limits, at)) = st.refill {
            if std::time::Instant::now() >= at && p[0].revents == 0 {
                st.refill = None;
                if st.warm.is_none() {
                    st.warm = warm_up(&st, &limits);
                }
            }
        }
        if p[1].revents != 0 {
            reap(&sfd, &mut st);
        }
        if p[0].revents != 0 {
            match protocol::recv::<ZygoteRequest>(ctl()) {
                Ok((ZygoteRequest::Spawn { id, limits }, fds)) if fds.len() == 1 => {
                    serve(id, &limits, &fds[0], &mut st)
                }
                Ok(_) => {}
                Err(_) => std::process::exit(0),
            }
        }
    }
}

/// Answer a spawn request on its own reply socket.
fn serve(id: u64, limits: &Limits, reply: &OwnedFd, st: &mut State) {
    let send = |ev: &ZygoteEvent, fds: &[i32]| protocol::send(reply.as_fd(), ev, fds).is_ok();
    let warm = match st.warm.take() {
        Some(w) if w.limits == *limits => Ok(w),
        stale => {
            if let Some(w) = stale {
                // Other limits: it cannot be reused (rlimits only go down).
                // SAFETY: killing our own idle child.
                unsafe { libc::kill(w.pid, libc::SIGKILL) };
            }
            fork_loader(st, limits)
        }
    };
    match warm {
        Ok(w) => {
            let pidfd = pidfd_of(w.pid);
            if let Err(errno) = pidfd {
                // SAFETY: killing our own child that we cannot hand over.
                unsafe { libc::kill(w.pid, libc::SIGKILL) };
                send(
                    &ZygoteEvent::Failed {
                        id,
                        stage: 0,
                        errno,
                    },
                    &[],
                );
            } else if let Ok(pidfd) = pidfd {
                if send(
                    &ZygoteEvent::Spawned { id, pid: w.pid },
                    &[pidfd.as_raw_fd(), w.sock.as_raw_fd()],
                ) {
                    st.handed.insert(w.pid, id);
                } else {
                    // Nobody took it (the requester gave up).
                    // SAFETY: killing our own child.
                    unsafe { libc::kill(w.pid, libc::SIGKILL) };
                }
            }
        }
        Err((stage, errno)) => {
            send(&ZygoteEvent::Failed { id, stage, errno }, &[]);
        }
    }
    // Warm the next one a little later, not while this one starts: on
    // two cores the warm-up would compete with the spawn in progress.
    st.refill = Some((*limits, std::time::Instant::now() + REFILL_DELAY));
}

fn reap(sfd: &OwnedFd, st: &mut State) {
    let mut buf = [0u8; 128];
    // SAFETY: draining the signalfd into a local buffer.
    while unsafe { libc::read(sfd.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len()) } > 0 {}
    loop {
        let mut status = 0;
        // SAFETY: reaping our own children.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if st.warm.as_ref().is_some_and(|w| w.pid == pid) {
            st.warm = None; // died idle (killed from outside): not a picoprocess
            continue;
        }
        // Only loaders handed out are reported (not stale warm ones or
        // failed forks), under their request id, which is never reused.
        let Some(id) = st.handed.remove(&pid) else {
            continue;
        };
        let (code, signal) = if libc::WIFEXITED(status) {
            (libc::WEXITSTATUS(status), 0)
        } else {
            (0, libc::WTERMSIG(status))
        };
        send(&ZygoteEvent::Exited { id, code, signal }, &[]);
    }
}

/// Fork a loader that sets itself up, confines itself and waits for its
/// configuration. Errors: (stage, errno) as the child reported them.
/// Fork a warm loader and tell the monitor (with its pidfd), which puts it
/// in its cgroup before anyone asks for it.
fn warm_up(st: &State, limits: &Limits) -> Option<Warm> {
    let w = fork_loader(st, limits).ok()?;
    if let Ok(pidfd) = pidfd_of(w.pid) {
        send(&ZygoteEvent::Warm { limits: *limits }, &[pidfd.as_raw_fd()]);
    }
    Some(w)
}

/// A pidfd of our own child `pid`, or the errno.
fn pidfd_of(pid: i32) -> Result<OwnedFd, i32> {
    // SAFETY: pidfd_open of our own child.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return Err(crate::sys::errno());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fork_loader(st: &State, limits: &Limits) -> Result<Warm, (u8, i32)> {
    let errno = crate::sys::errno;
    let (mon, child_end) =
        protocol::seqpacket_pair().map_err(|e| (1, e.raw_os_error().unwrap_or(libc::EIO)))?;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| (1, e as i32))?;
    let mut args = ChildArgs::new(
        err_w.as_raw_fd(),
        st.devnull.as_raw_fd(),
        child_end.as_raw_fd(),
        &st.path,
        limits,
    );
    if st.kvm {
        args.set_kvm(crate::protocol::KVM_FD);
    }
    // SAFETY: the zygote is single-threaded, so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // In the child: restore the signal mask, arrange descriptors and
        // limits, and become the loader without an exec.
        // SAFETY: single-threaded child of fork; see setup_child.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            let e = setup_child(&args);
            libc::close(e);
        }
        (st.child)(limits)
    }
    drop(err_w);
    drop(child_end);
    if pid < 0 {
        return Err((0, errno()));
    }
    if let Some(failure) = crate::child::read_child_failure(err_r) {
        return Err(failure);
    }
    Ok(Warm {
        limits: *limits,
        pid,
        sock: mon,
    })
}
