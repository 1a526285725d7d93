//! Processes the monitor started: how one started, how it ended, and the
//! pidfd operations (waits and signals through a pidfd never hit a
//! reused pid).
use std::os::fd::{AsRawFd, OwnedFd};

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
    /// [`MONITOR_FD`](moat_host_common::protocol::MONITOR_FD)).
    pub sock: OwnedFd,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
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

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Whether the process behind `pidfd` has ended, or ends within `timeout`
/// (a pidfd becomes readable when its process exits). Errors count as
/// ended: there is nothing left to wait for.
pub fn exited_within(pidfd: &OwnedFd, timeout: std::time::Duration) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 && last_err().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return r != 0;
    }
}
