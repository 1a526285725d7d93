//! The host side of the zygote (see `loader::zygote`): one per host
//! process, started on first use, restarted if it dies. Loaders it starts
//! are its children, not ours, so their exit statuses come back over its
//! control socket and wait here for whoever waits on the picoprocess.
use crate::protocol::{self, ZygoteEvent, ZygoteRequest};
use crate::spawn::{self, SpawnError, Spawned, Status};
use moat_policy::Limits;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

/// (host pid, pidfd, monitor socket), or (stage, errno).
type Reply = Result<(Option<i32>, OwnedFd, OwnedFd), (u8, i32)>;

struct Zygote {
    ctl: OwnedFd,
    send_lock: Mutex<()>,
    pending: Mutex<HashMap<u64, mpsc::SyncSender<Reply>>>,
    /// Zygote-namespace pid -> host pid of its live loaders.
    ns_to_host: Mutex<HashMap<i32, i32>>,
    alive: AtomicBool,
}

/// Tasks (threads included) all loaders of one host process may have at
/// once (RLIMIT_NPROC of the zygote's identity): the kernel's backstop
/// behind each picoprocess's `threads` limit, which the in-process PAL
/// enforces and a hostile guest could bypass.
pub(crate) const MAX_TASKS: u64 = 8192;

static CURRENT: Mutex<Option<Arc<Zygote>>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static EXITS: Mutex<Option<HashMap<i32, Status>>> = Mutex::new(None);
static EXITED: Condvar = Condvar::new();

fn record_exit(host_pid: i32, st: Status) {
    let mut m = EXITS.lock().unwrap_or_else(|e| e.into_inner());
    m.get_or_insert_with(HashMap::new).insert(host_pid, st);
    EXITED.notify_all();
}

/// Wait for the exit status of a loader the zygote started.
pub(crate) fn wait_exit(host_pid: i32) -> Status {
    let mut m = EXITS.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(st) = m.get_or_insert_with(HashMap::new).remove(&host_pid) {
            return st;
        }
        m = EXITED.wait(m).unwrap_or_else(|e| e.into_inner());
    }
}

fn get_or_start(loader: &Path) -> Result<Arc<Zygote>, SpawnError> {
    let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(z) = cur.as_ref() {
        if z.alive.load(Ordering::Acquire) {
            return Ok(z.clone());
        }
    }
    let sp = spawn::spawn_zygote(loader)?;
    let z = Arc::new(Zygote {
        ctl: sp.sock,
        send_lock: Mutex::new(()),
        pending: Mutex::new(HashMap::new()),
        ns_to_host: Mutex::new(HashMap::new()),
        alive: AtomicBool::new(true),
    });
    let zr = z.clone();
    let zpidfd = sp.pidfd;
    std::thread::Builder::new()
        .name("moat-zygote".into())
        .spawn(move || read_events(zr, zpidfd))
        .map_err(|err| SpawnError::Setup {
            what: "the zygote reader thread",
            err,
        })?;
    *cur = Some(z.clone());
    Ok(z)
}

fn read_events(z: Arc<Zygote>, zpidfd: OwnedFd) {
    loop {
        match protocol::recv::<ZygoteEvent>(z.ctl.as_fd()) {
            Ok((ZygoteEvent::Spawned { id, pid }, mut fds)) if fds.len() == 2 => {
                // Map the pid before reading the next event, which may be
                // this loader's exit. (Not yet reaped, so fdinfo has it.)
                let sock = fds.pop().unwrap();
                let pidfd = fds.pop().unwrap();
                let host = host_pid(pidfd.as_raw_fd());
                if let Some(h) = host {
                    z.ns_to_host.lock().unwrap().insert(pid, h);
                }
                if let Some(tx) = z.pending.lock().unwrap().remove(&id) {
                    let _ = tx.send(Ok((host, pidfd, sock)));
                }
            }
            Ok((ZygoteEvent::Failed { id, stage, errno }, _)) => {
                if let Some(tx) = z.pending.lock().unwrap().remove(&id) {
                    let _ = tx.send(Err((stage, errno)));
                }
            }
            Ok((ZygoteEvent::Exited { pid, code, signal }, _)) => {
                if let Some(host) = z.ns_to_host.lock().unwrap().remove(&pid) {
                    record_exit(
                        host,
                        if signal == 0 {
                            Status::Exited(code)
                        } else {
                            Status::Signaled(signal)
                        },
                    );
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // The zygote is gone, and with it (as init of their pid namespace)
    // every loader it started.
    z.alive.store(false, Ordering::Release);
    z.pending.lock().unwrap().clear();
    for (_, host) in z.ns_to_host.lock().unwrap().drain() {
        record_exit(host, Status::Signaled(libc::SIGKILL));
    }
    let _ = spawn::wait_pidfd(&zpidfd);
}

/// Map uid and gid 0 of the zygote's user namespace to an unprivileged
/// identity outside: `nobody` (65534) when the host runs as root, else the
/// host's own ids. Picoprocesses then never run as the host's root.
pub(crate) fn map_identity(pid: i32) -> std::io::Result<()> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let (ou, og) = if uid == 0 { (65534, 65534) } else { (uid, gid) };
    std::fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
    std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {ou} 1"))?;
    std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {og} 1"))?;
    Ok(())
}

/// The pid (in our namespace) of the process behind a pidfd: the
/// PIDFD_GET_INFO ioctl (Linux 6.13), else the pidfd's /proc fdinfo.
fn host_pid(pidfd: RawFd) -> Option<i32> {
    #[repr(C)]
    #[derive(Default)]
    struct PidfdInfo {
        mask: u64,
        cgroupid: u64,
        pid: u32,
        tgid: u32,
        ppid: u32,
        ids: [u32; 8],
        exit_code: i32,
    }
    const _: () = assert!(std::mem::size_of::<PidfdInfo>() == 64);
    const PIDFD_GET_INFO: libc::c_ulong = 0xC040_FF0B; // _IOWR(0xFF, 11, 64 bytes)
    const PIDFD_INFO_PID: u64 = 1;
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_PID,
        ..Default::default()
    };
    // SAFETY: the ioctl writes at most the 64 bytes its number encodes,
    // the size of `info`.
    let r = unsafe { libc::ioctl(pidfd, PIDFD_GET_INFO, &mut info as *mut PidfdInfo) };
    if r == 0 && info.mask & PIDFD_INFO_PID != 0 && info.pid > 0 {
        return Some(info.pid as i32);
    }
    let s = std::fs::read_to_string(format!("/proc/self/fdinfo/{pidfd}")).ok()?;
    // "Pid: -1" once the process is reaped (and 0 outside our namespace).
    s.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|p: &i32| *p > 0)
}

/// Start a loader through the zygote.
pub(crate) fn spawn(loader: &Path, limits: &Limits) -> Result<Spawned, SpawnError> {
    for attempt in 0..2 {
        let z = get_or_start(loader)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        z.pending.lock().unwrap().insert(id, tx);
        let sent = {
            let _g = z.send_lock.lock().unwrap();
            protocol::send(
                z.ctl.as_fd(),
                &ZygoteRequest::Spawn {
                    id,
                    limits: *limits,
                },
                &[],
            )
        };
        if sent.is_err() {
            z.alive.store(false, Ordering::Release);
            z.pending.lock().unwrap().remove(&id);
            if attempt == 0 {
                continue;
            }
            return Err(SpawnError::Setup {
                what: "the zygote",
                err: std::io::Error::other("it is not running"),
            });
        }
        return match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok((Some(pid), pidfd, sock))) => Ok(Spawned { pid, pidfd, sock }),
            Ok(Ok((None, pidfd, _))) => {
                let _ = spawn::signal_pidfd(&pidfd, libc::SIGKILL);
                Err(SpawnError::Setup {
                    what: "the loader's pid",
                    err: std::io::Error::other("not in /proc"),
                })
            }
            Ok(Err((stage, errno))) => Err(SpawnError::Child {
                path: loader.display().to_string(),
                stage: spawn::stage_name(stage),
                err: std::io::Error::from_raw_os_error(errno),
            }),
            Err(_) => {
                z.pending.lock().unwrap().remove(&id);
                if attempt == 0 && !z.alive.load(Ordering::Acquire) {
                    continue;
                }
                Err(SpawnError::Setup {
                    what: "the zygote",
                    err: std::io::Error::other("no answer"),
                })
            }
        };
    }
    unreachable!("the loop returns")
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_pid_of_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        // SAFETY: pidfd_open of our own live child.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as i32, 0) } as i32;
        assert!(fd >= 0);
        assert_eq!(super::host_pid(fd), Some(child.id() as i32));
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
