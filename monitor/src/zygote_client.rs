//! The host side of the zygote (see `moat_host_common::zygote`): one per host
//! process, started on first use, restarted if it dies. Loaders it starts
//! are its children, not ours, so their exit statuses come back over its
//! control socket and wait here for whoever waits on the picoprocess.
use crate::process::{self, SpawnError, Spawned, Status};
use crate::spawn;
use moat_host_common::protocol::{self, WireError, ZygoteEvent, ZygoteRequest};
use moat_policy::Limits;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

struct Zygote {
    ctl: OwnedFd,
    send_lock: Mutex<()>,
    /// Exit bookkeeping, by request id (never reused).
    exits: Mutex<Exits>,
    alive: AtomicBool,
}

/// What the reader thread and the spawning threads share about exits.
#[derive(Default)]
struct Exits {
    /// Request id -> host pid of a loader handed out (None: the spawner
    /// gave up on it; its exit is discarded).
    live: HashMap<u64, Option<i32>>,
    /// Exits that arrived before their spawner recorded the loader.
    early: HashMap<u64, Status>,
    /// The zygote is gone: every loader it started is dead.
    dead: bool,
}

impl Exits {
    /// The spawner of request `id` records its loader (or gives up on it).
    fn record(&mut self, id: u64, pid: Option<i32>) {
        if self.dead {
            if let Some(p) = pid {
                record_exit(p, Status::Signaled(libc::SIGKILL));
            }
            return;
        }
        match self.early.remove(&id) {
            Some(st) => {
                if let Some(p) = pid {
                    record_exit(p, st);
                }
            }
            None => {
                self.live.insert(id, pid);
            }
        }
    }
}

/// The zygotes of this host process: the loaders' and the VMMs', by binary.
static CURRENT: Mutex<Vec<(std::path::PathBuf, Arc<Zygote>)>> = Mutex::new(Vec::new());
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

fn get_or_start(binary: &Path, kvm: bool) -> Result<Arc<Zygote>, SpawnError> {
    let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, z)) = cur.iter().find(|(p, _)| p == binary) {
        if z.alive.load(Ordering::Acquire) {
            return Ok(z.clone());
        }
    }
    cur.retain(|(p, _)| p != binary);
    let sp = spawn::spawn_zygote(binary, kvm)?;
    let z = Arc::new(Zygote {
        ctl: sp.sock,
        send_lock: Mutex::new(()),
        exits: Mutex::new(Exits::default()),
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
    cur.push((binary.to_path_buf(), z.clone()));
    Ok(z)
}

fn read_events(z: Arc<Zygote>, zpidfd: OwnedFd) {
    loop {
        match protocol::recv::<ZygoteEvent>(z.ctl.as_fd()) {
            Ok((ZygoteEvent::Exited { id, code, signal }, _)) => {
                let st = if signal == 0 {
                    Status::Exited(code)
                } else {
                    Status::Signaled(signal)
                };
                let mut m = z.exits.lock().unwrap();
                match m.live.remove(&id) {
                    Some(Some(host)) => record_exit(host, st),
                    Some(None) => {}
                    // Its spawner has not recorded the loader yet.
                    None => {
                        m.early.insert(id, st);
                    }
                }
            }
            Ok((ZygoteEvent::Warm { limits }, mut fds)) if fds.len() == 1 => {
                let pidfd = fds.pop().expect("one");
                if let Some(pid) = host_pid(pidfd.as_raw_fd()) {
                    crate::cgroup::PicoCgroup::prepare(pid as u32, pidfd, &limits);
                }
            }
            Ok(_) => {}
            // A message this side cannot take (a descriptor over the
            // limit, an event it does not know): skipped, the channel
            // stays. Only a closed or failing channel means the zygote is
            // gone.
            Err(WireError::Decode(_) | WireError::TooLarge | WireError::Empty) => {}
            Err(_) => break,
        }
    }
    // The zygote is gone, and with it (as init of their pid namespace)
    // every loader it started.
    z.alive.store(false, Ordering::Release);
    {
        let mut m = z.exits.lock().unwrap();
        m.dead = true;
        for (_, host) in m.live.drain() {
            if let Some(h) = host {
                record_exit(h, Status::Signaled(libc::SIGKILL));
            }
        }
    }
    let _ = process::wait_pidfd(&zpidfd);
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

/// Start a loader (or, with `kvm`, a VMM) through its zygote. The answer
/// comes on a socket of this request's own, straight to this thread.
pub(crate) fn spawn(loader: &Path, limits: &Limits, kvm: bool) -> Result<Spawned, SpawnError> {
    for attempt in 0..2 {
        let z = get_or_start(loader, kvm)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (mine, theirs) = protocol::seqpacket_pair().map_err(|err| SpawnError::Setup {
            what: "a reply socket",
            err,
        })?;
        let sent = {
            let _g = z.send_lock.lock().unwrap();
            protocol::send(
                z.ctl.as_fd(),
                &ZygoteRequest::Spawn {
                    id,
                    limits: *limits,
                },
                &[theirs.as_raw_fd()],
            )
        };
        drop(theirs);
        if sent.is_err() {
            z.alive.store(false, Ordering::Release);
            if attempt == 0 {
                continue;
            }
            return Err(SpawnError::Setup {
                what: "the zygote",
                err: std::io::Error::other("it is not running"),
            });
        }
        // The zygote answers at once (it forks only when it has no warm
        // loader); a dead zygote closes the socket.
        let mut p = libc::pollfd {
            fd: mine.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut p, 1, 30_000) } > 0;
        let answer = if ready {
            protocol::recv::<ZygoteEvent>(mine.as_fd()).ok()
        } else {
            None
        };
        return match answer {
            Some((ZygoteEvent::Spawned { id: rid, .. }, mut fds))
                if rid == id && fds.len() == 2 =>
            {
                let sock = fds.pop().unwrap();
                let pidfd = fds.pop().unwrap();
                let Some(pid) = host_pid(pidfd.as_raw_fd()) else {
                    z.exits.lock().unwrap().record(id, None);
                    let _ = process::signal_pidfd(&pidfd, libc::SIGKILL);
                    return Err(SpawnError::Setup {
                        what: "the loader's pid",
                        err: std::io::Error::other("unknown"),
                    });
                };
                z.exits.lock().unwrap().record(id, Some(pid));
                Ok(Spawned { pid, pidfd, sock })
            }
            Some((ZygoteEvent::Failed { stage, errno, .. }, _)) => Err(SpawnError::Child {
                path: loader.display().to_string(),
                stage: moat_host_common::child::stage_name(stage),
                err: std::io::Error::from_raw_os_error(errno),
            }),
            _ => {
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
