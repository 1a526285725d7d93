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
/// `child`) one started by ProcessCreate, whose exit code goes to `notify`;
/// a root from a checkpoint (`from.restore`), or taking a template
/// (`from.template`).
pub(crate) fn start(
    session: &Arc<Session>,
    image: File,
    name: String,
    args: Vec<String>,
    notify: Option<OwnedFd>,
    child: bool,
    from: Origin,
) -> Result<Arc<Proc>, Error> {
    let Origin {
        restore,
        template,
        device_files,
    } = from;
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
    let (backing, disks) = open_backing_files(session.host(), &devices, device_files)?;
    let device_files: Vec<bool> = backing.iter().map(Option::is_some).collect();
    let backing: Vec<File> = backing.into_iter().flatten().collect();
    // A VMM counts its exits in a page the host can read.
    let stats = match session.host() {
        crate::Host::Kvm => Some(crate::shm::HostSection::new(
            moat_host_common::vmstats::SIZE,
        )?),
        crate::Host::Linux => None,
    };
    let sp = match session.host() {
        crate::Host::Linux => launch::spawn_loader(&launch::loader_path()?, &limits)?,
        crate::Host::Kvm => launch::spawn_vmm(&launch::vmm_path()?, &limits)?,
    };
    // Every message on this socket carries its sender's pid, so the
    // monitor can tell its picoprocess from anyone its channel was handed
    // to, and an empty message from end-of-file.
    protocol::pass_credentials(sp.sock.as_fd())
        .map_err(|e| Error::io("cannot set up the monitor socket", e))?;
    // The limits the kernel enforces: before the process runs guest code.
    let cgroup = match crate::cgroup::PicoCgroup::create(sp.pid as u32, &limits) {
        Some(Ok(g)) => Some(g),
        Some(Err(e)) => {
            let _ = crate::process::signal_pidfd(&sp.pidfd, libc::SIGKILL);
            let _ = launch::wait_process(&sp.pidfd, sp.pid as u32);
            return Err(Error::io("cannot put the picoprocess in its cgroup", e));
        }
        None => {
            say_no_cgroups(session);
            None
        }
    };
    let report: ReportSlot = Arc::new(Mutex::new(None));
    let proc = Arc::new(Proc {
        pid: sp.pid as u32,
        name: crate::session::sanitize(&name),
        pidfd: sp.pidfd,
        exit: Mutex::new(None),
        ended: Condvar::new(),
        report: report.clone(),
        cgroup: Mutex::new(cgroup),
        _disks: disks,
        stats,
        gone: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        trace_drain: Mutex::new(None),
        control: Mutex::new(None),
        template: Mutex::new(if template.is_some() {
            crate::proc::Template::Pending
        } else {
            crate::proc::Template::None
        }),
    });
    // A checkpointable root: its control socket (see `Proc::checkpoint`).
    let checkpointable = !child
        && session
            .layers()
            .contains(&moat_layers::LayerName::Checkpoint);
    let control = if checkpointable {
        let (mine, theirs) = protocol::seqpacket_pair()
            .map_err(|e| Error::io("cannot make the control socket", e))?;
        let t = crate::proc::CONTROL_TIMEOUT;
        nix::sys::socket::setsockopt(
            &mine,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(t.as_secs() as _, 0),
        )
        .map_err(|e| Error::io("cannot set up the control socket", e.into()))?;
        *proc.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(mine);
        Some(theirs)
    } else {
        None
    };
    // A trace layer anywhere in the stack: a ring for it.
    let traced = session.trace_options().is_some()
        || session.layers().contains(&moat_layers::LayerName::Trace);
    let trace_opts = session.trace_options().cloned().unwrap_or_default();
    let ring = if traced {
        match crate::trace::Ring::new(&trace_opts) {
            Ok(r) => Some(r),
            Err(e) => {
                let _ = proc.signal(libc::SIGKILL);
                let _ = launch::wait_process(&proc.pidfd, proc.pid);
                return Err(e);
            }
        }
    } else {
        None
    };
    let config = Config {
        args,
        limits,
        trace: session.trace_options().is_some_and(|t| t.outermost),
        trace_ring: ring.as_ref().map(|r| moat_layers::TraceSetup {
            records: r.records,
            filter: trace_opts.filter,
        }),
        layers: session.layers().to_vec(),
        remaps: session.policy().remaps.clone(),
        devices,
        device_files,
        stats: proc.stats.is_some(),
        checkpoint: control.is_some(),
        restore,
        template: template.is_some() && control.is_some(),
    };
    let mut fds = vec![image.as_raw_fd()];
    if let Some(s) = &proc.stats {
        fds.push(s.memory_fd());
    }
    if let Some(r) = &ring {
        fds.push(r.section.memory_fd());
    }
    fds.extend(backing.iter().map(|f| f.as_raw_fd()));
    if let Some(c) = &control {
        fds.push(c.as_raw_fd());
        if let Some(t) = &template {
            fds.push(t.as_raw_fd());
        }
    }
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
    if let Some(r) = ring {
        let gone = proc.gone.clone();
        match crate::trace::spawn_drain(
            r,
            proc.name.clone(),
            proc.pid,
            session.trace_sink(),
            Box::new(move || gone.load(std::sync::atomic::Ordering::Acquire)),
        ) {
            Ok(h) => *proc.trace_drain.lock().unwrap_or_else(|e| e.into_inner()) = Some(h),
            Err(e) => {
                let _ = proc.signal(libc::SIGKILL);
                return Err(Error::io("cannot start the trace reader", e));
            }
        }
    }
    let mut broker = Broker::new(session.clone(), name)
        .with_start_child(start_child)
        .with_report_slot(report.clone());
    let sess = session.clone();
    let p = proc.clone();
    let sock = sp.sock;
    // One thread per picoprocess: it answers the loader until the socket
    // closes (the loader ended), then reaps it.
    let monitor = run_monitor_thread(Box::new(move || {
        serve(sock, &mut broker, &p, &sess);
        broker.finish();
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

/// Where a root picoprocess starts from, beyond its image.
#[derive(Default)]
pub(crate) struct Origin {
    /// The image is a checkpoint to restore.
    pub(crate) restore: bool,
    /// A template is to be written to this file (`Sandbox::template`).
    pub(crate) template: Option<File>,
    /// Descriptors the embedder handed devices (`Sandbox::device_file`).
    pub(crate) device_files: Vec<(String, File)>,
}

/// How the broker starts a child picoprocess (see [`Broker::with_start_child`]).
fn start_child(
    session: &Arc<Session>,
    image: File,
    name: String,
    args: Vec<String>,
    notify: OwnedFd,
) -> Result<(), String> {
    start(
        session,
        image,
        name,
        args,
        Some(notify),
        true,
        Origin::default(),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// The file of each device granted (kvm only), in declaration order: a
/// backing file opened read-write or read-only as declared, and locked
/// for serving (see [`crate::disklock`]), or the descriptor the embedder
/// handed it (`passed`). A declared device whose file cannot be opened,
/// that another process serves, or that needs a descriptor it was not
/// handed refuses the start, naming both; so does a descriptor handed to
/// no device or to one that takes none.
#[allow(clippy::type_complexity)]
fn open_backing_files(
    host: crate::Host,
    devices: &[moat_policy::DeviceSpec],
    mut passed: Vec<(String, File)>,
) -> Result<(Vec<Option<File>>, Vec<Arc<crate::disklock::DiskLock>>), Error> {
    if let Some((name, _)) = passed.iter().find(|(n, _)| {
        !devices
            .iter()
            .any(|d| &d.name == n && d.kind.takes_passed_file())
    }) {
        return Err(Error::BadInput(format!(
            "a descriptor was handed to device `{name}`, which is not declared or takes none (only uart and virtio-net devices do)"
        )));
    }
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
        if let Some(i) = passed.iter().position(|(n, _)| n == &d.name) {
            out.push(Some(passed.swap_remove(i).1));
            continue;
        }
        if d.kind.needs_passed_file() {
            return Err(Error::BadInput(format!(
                "device `{}` ({}) needs its wire handed over as a descriptor (Sandbox::device_file); from the command line, `moat serve --nic IFNAME --wire-netns NS --host kvm` makes one",
                d.name, d.kind
            )));
        }
        let Some(path) = &d.backing else {
            out.push(None);
            continue;
        };
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
        out.push(Some(f));
    }
    if let Some((name, _)) = passed.first() {
        return Err(Error::BadInput(format!(
            "more than one descriptor was handed to device `{name}`"
        )));
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

/// Say once per host process that picoprocesses run without the limits
/// only cgroups enforce.
fn say_no_cgroups(session: &Session) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Some(why) = crate::cgroup::unavailable() {
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            session.log().line(&format!(
                "moat: no cgroup per picoprocess here ({why}): a guest that bypasses the ABI is bounded in threads and memory only by the host-wide limits"
            ));
        }
    }
}

/// How long a confined process may go on running after its monitor
/// channel closed: a loader that ends closes it on its way out; one still
/// running after this has broken its channel.
const CLOSED_CHANNEL_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Answer the loader's requests until its socket closes. Anything but a
/// well-formed request from the picoprocess itself ends the picoprocess
/// as a protocol violation (exit 159 with a report): a malformed or empty
/// message, descriptors attached, a message another process sent on the
/// channel (it can only have been handed over), and a channel closed while
/// the picoprocess goes on running.
fn serve(sock: OwnedFd, broker: &mut Broker, proc: &Proc, session: &Session) {
    let violation = loop {
        match protocol::recv_from::<Request>(sock.as_fd()) {
            Ok(r) if r.sender.is_some_and(|p| p != proc.pid as i32) => {
                let other = r.sender.unwrap_or(0);
                // The sender is a picoprocess too (nothing else can hold
                // the channel): it breaks the protocol as much as the owner.
                if let Some(o) = session.proc_by_pid(other as u32) {
                    o.violation(format!(
                        "protocol violation: it sent on the monitor channel of picoprocess {} (pid {})",
                        proc.name, proc.pid
                    ));
                }
                break format!("its monitor channel was used by another process (pid {other})");
            }
            Ok(r) if !r.fds.is_empty() => {
                break "a request came with descriptors attached".to_string()
            }
            Ok(r) => {
                if let Some(reply) = broker.handle(r.msg) {
                    let raw: Vec<_> = reply.fds.iter().map(|f| f.as_raw_fd()).collect();
                    if protocol::send(sock.as_fd(), &reply.response, &raw).is_err() {
                        return;
                    }
                }
            }
            Err(WireError::Closed) | Err(WireError::Io(_)) => {
                if crate::process::exited_within(&proc.pidfd, CLOSED_CHANNEL_GRACE) {
                    return;
                }
                break "it closed its monitor channel and went on running".to_string();
            }
            Err(e @ (WireError::Decode(_) | WireError::TooLarge | WireError::Empty)) => {
                break e.to_string();
            }
        }
    };
    proc.violation(format!("protocol violation: {violation}"));
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
    // Its trace: what is left in the ring, before anyone learns it ended.
    proc.gone.store(true, std::sync::atomic::Ordering::Release);
    let drain = proc
        .trace_drain
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(d) = drain {
        let _ = d.join();
    }
    let mut report = report.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // Gone: its cgroup can go too (after asking whether it hit its memory).
    let cgroup = proc.cgroup.lock().unwrap_or_else(|e| e.into_inner()).take();
    let oom = cgroup.as_ref().is_some_and(|g| g.oom_killed());
    drop(cgroup);
    let code = match status {
        Ok(Status::Exited(c)) => c,
        Ok(Status::Signaled(s)) => {
            if s == libc::SIGSYS && report.is_none() {
                report = Some((ReportKind::Violation, "killed by seccomp (SIGSYS)".into()));
            }
            if s == libc::SIGKILL && oom && report.is_none() {
                let limits = session.policy().limits;
                report = Some((
                    ReportKind::Limit,
                    format!(
                        "killed by the kernel at its memory limit (memory_mib = {}, plus {} MiB for the host's own use)",
                        limits.memory_mib,
                        crate::cgroup::MEMORY_OVERHEAD_MIB
                    ),
                ));
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
