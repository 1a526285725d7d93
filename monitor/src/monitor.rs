//! The monitor: starting a confined process for a picoprocess and serving
//! it. Each confined process (a loader or a VMM) gets its configuration
//! and image, then one monitor thread that answers its requests through
//! the [`Broker`] until its socket closes, then reaps it and records its
//! [`Exit`].
use crate::broker::Broker;
use crate::error::{Error, Exit, EXIT_HOST_FAILURE, EXIT_SANDBOX_VIOLATION};
use crate::launch;
use crate::proc::Proc;
use crate::process::Status;
use crate::session::{ReportSlot, Session};
use moat_host_common::protocol::{self, Config, ReportKind, Request, WireError};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

/// Start a loader for `image` in `session`: the root picoprocess, or (with
/// `child`) one started by ProcessCreate, whose exit code goes to `notify`.
pub(crate) fn start(
    session: &Arc<Session>,
    image: File,
    name: String,
    args: Vec<String>,
    notify: Option<OwnedFd>,
    child: bool,
) -> Result<Arc<Proc>, Error> {
    let limits = session.policy().limits;
    // Devices belong to the root picoprocess; its children get none.
    if session.host() == crate::Host::Kvm && limits.memory_mib > moat_policy::KVM_MAX_MEMORY_MIB {
        return Err(Error::BadInput(format!(
            "a memory limit of {} MiB is more than the kvm host gives a picoprocess ({} MiB): lower memory_mib",
            limits.memory_mib,
            moat_policy::KVM_MAX_MEMORY_MIB
        )));
    }
    let devices = if child {
        Vec::new()
    } else {
        session.policy().devices.clone()
    };
    let (backing, disks) = open_backing_files(session.host(), &devices)?;
    let sp = match session.host() {
        crate::Host::Linux => launch::spawn_loader(&launch::loader_path()?, &limits)?,
        crate::Host::Kvm => launch::spawn_vmm(&launch::vmm_path()?, &limits)?,
    };
    let proc = Arc::new(Proc {
        pid: sp.pid as u32,
        name: crate::session::sanitize(&name),
        pidfd: sp.pidfd,
        exit: Mutex::new(None),
        ended: Condvar::new(),
        _disks: disks,
    });
    let config = Config {
        args,
        limits,
        trace: session.trace(),
        devices,
    };
    let mut fds = vec![image.as_raw_fd()];
    fds.extend(backing.iter().map(|f| f.as_raw_fd()));
    match protocol::send(sp.sock.as_fd(), &config, &fds) {
        Ok(()) => {}
        // The loader already ended (it failed to set itself up): its
        // report and exit status come through the monitor thread as usual.
        Err(protocol::WireError::Io(nix::Error::EPIPE | nix::Error::ECONNRESET)) => {}
        Err(e) => {
            let _ = proc.signal(libc::SIGKILL);
            let _ = launch::wait_process(&proc.pidfd, proc.pid);
            return Err(Error::io(
                "cannot configure the sandbox",
                std::io::Error::other(e.to_string()),
            ));
        }
    }
    drop(image);

    {
        let mut t = session.procs.lock().unwrap_or_else(|e| e.into_inner());
        t.live.insert(proc.pid, proc.clone());
        t.serving += 1;
        if t.closed {
            let _ = proc.signal(libc::SIGKILL);
        }
    }
    let mut broker = Broker::new(session.clone(), name).with_start_child(start_child);
    let report = broker.report_slot();
    let sess = session.clone();
    let p = proc.clone();
    let sock = sp.sock;
    // One thread per picoprocess: it answers the loader until the socket
    // closes (the loader ended), then reaps it.
    let monitor = run_monitor_thread(Box::new(move || {
        serve(sock, &mut broker, &p);
        let last = {
            let mut t = sess.procs.lock().unwrap_or_else(|e| e.into_inner());
            t.serving -= 1;
            t.serving == 0
        };
        if last {
            sess.close_console();
        }
        reap(&sess, &p, report, notify, child);
    }));
    if let Err(e) = monitor {
        let _ = proc.signal(libc::SIGKILL);
        return Err(Error::io("cannot start the monitor thread", e));
    }
    Ok(proc)
}

/// How the broker starts a child picoprocess (see [`Broker::with_start_child`]).
fn start_child(
    session: &Arc<Session>,
    image: File,
    name: String,
    args: Vec<String>,
    notify: OwnedFd,
) -> Result<(), String> {
    start(session, image, name, args, Some(notify), true)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Open the backing files of the devices granted (kvm only), read-write or
/// read-only as declared, and lock each for serving (see
/// [`crate::disklock`]): a declared device whose file cannot be opened, or
/// that another process serves, refuses the start, naming both.
#[allow(clippy::type_complexity)]
fn open_backing_files(
    host: crate::Host,
    devices: &[moat_policy::DeviceSpec],
) -> Result<(Vec<File>, Vec<Arc<crate::disklock::DiskLock>>), Error> {
    if let (crate::Host::Linux, Some(d)) = (host, devices.first()) {
        return Err(Error::BadInput(format!(
            "device `{}` is declared, but only the kvm host grants devices: run it with --host kvm",
            d.name
        )));
    }
    if devices.len() > moat_policy::device::MAX_DEVICES {
        return Err(Error::BadInput(format!(
            "{} devices are declared; at most {} are allowed",
            devices.len(),
            moat_policy::device::MAX_DEVICES
        )));
    }
    let mut out = Vec::new();
    let mut locks = Vec::new();
    for d in devices {
        let Some(path) = &d.backing else { continue };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(!d.read_only)
            .open(path)
            .map_err(|e| {
                Error::BadInput(format!(
                    "device `{}`: cannot open its backing file `{}`: {e} (create it first, e.g. `truncate -s 64M {}`)",
                    d.name,
                    path.display(),
                    path.display()
                ))
            })?;
        let meta = f
            .metadata()
            .map_err(|e| Error::io("cannot stat a backing file", e))?;
        if !meta.is_file() {
            return Err(Error::BadInput(format!(
                "device `{}`: backing file `{}` is not a regular file",
                d.name,
                path.display()
            )));
        }
        let lock = crate::disklock::DiskLock::acquire(path, !d.read_only)
            .map_err(|e| Error::BadInput(format!("device `{}`: {e}", d.name)))?;
        locks.push(lock);
        out.push(f);
    }
    Ok((out, locks))
}

type Job = Box<dyn FnOnce() + Send>;

/// A monitor thread started ahead of need: starting a thread costs tens of
/// microseconds, which a spawn should not wait for.
static SPARE: Mutex<Option<std::sync::mpsc::Sender<Job>>> = Mutex::new(None);

fn spare_thread() -> std::io::Result<std::sync::mpsc::Sender<Job>> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("moat-monitor".into())
        .spawn(move || {
            if let Ok(job) = rx.recv() {
                job();
            }
        })?;
    Ok(tx)
}

/// Run `job` on the spare monitor thread (or a new one), then start the
/// next spare.
fn run_monitor_thread(job: Job) -> std::io::Result<()> {
    let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).take();
    let job = match spare {
        Some(tx) => tx.send(job).err().map(|e| e.0),
        None => Some(job),
    };
    if let Some(j) = job {
        std::thread::Builder::new()
            .name("moat-monitor".into())
            .spawn(j)?;
    }
    if let Ok(tx) = spare_thread() {
        *SPARE.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }
    Ok(())
}

/// Answer the loader's requests until its socket closes. A malformed
/// message ends the picoprocess.
fn serve(sock: OwnedFd, broker: &mut Broker, proc: &Proc) {
    loop {
        let violation = match protocol::recv::<Request>(sock.as_fd()) {
            Ok((req, fds)) if fds.is_empty() => {
                if let Some(reply) = broker.handle(req) {
                    let raw: Vec<_> = reply.fds.iter().map(|f| f.as_raw_fd()).collect();
                    if protocol::send(sock.as_fd(), &reply.response, &raw).is_err() {
                        return;
                    }
                }
                continue;
            }
            Ok(_) => "a request came with descriptors attached".to_string(),
            Err(WireError::Closed) | Err(WireError::Io(_)) => return,
            Err(e @ (WireError::Decode(_) | WireError::TooLarge)) => e.to_string(),
        };
        {
            let slot = broker.report_slot();
            let mut r = slot.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some((
                    ReportKind::Violation,
                    format!("protocol violation: {violation}"),
                ));
            }
        }
        let _ = proc.signal(libc::SIGKILL);
        return;
    }
}

/// Reap the loader, compute its [`Exit`], tell whoever waits.
fn reap(
    session: &Arc<Session>,
    proc: &Arc<Proc>,
    report: ReportSlot,
    notify: Option<OwnedFd>,
    child: bool,
) {
    // The socket is drained (the report, if any, was read): now the status.
    let status = launch::wait_process(&proc.pidfd, proc.pid);
    let mut report = report.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let code = match status {
        Ok(Status::Exited(c)) => c,
        Ok(Status::Signaled(s)) => {
            if s == libc::SIGSYS && report.is_none() {
                report = Some((ReportKind::Violation, "killed by seccomp (SIGSYS)".into()));
            }
            128 + s
        }
        Err(e) => {
            report.get_or_insert((
                ReportKind::Startup,
                format!("cannot wait for the sandbox process: {e}"),
            ));
            EXIT_HOST_FAILURE
        }
    };
    let code = match &report {
        Some((ReportKind::Violation, _)) => EXIT_SANDBOX_VIOLATION,
        _ => code,
    };
    {
        let mut t = session.procs.lock().unwrap_or_else(|e| e.into_inner());
        t.live.remove(&proc.pid);
        if child {
            t.children = t.children.saturating_sub(1);
        }
    }
    if let Some(fd) = notify {
        let _ = File::from(fd).write_all(&code.to_le_bytes());
    }
    if let Some((kind, text)) = &report {
        if child {
            session.log().line(&format!(
                "moat: [picoprocess {} {}] {kind:?}: {text}",
                proc.name, proc.pid
            ));
        }
    }
    *proc.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(Exit { code, report });
    proc.ended.notify_all();
}
