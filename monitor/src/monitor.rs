//! The embedding API: start a picoprocess in the Linux sandbox, talk to it,
//! wait for it.
//!
//! ```no_run
//! use moat_monitor::{Sandbox, Stdio};
//! use std::io::{BufRead, BufReader, Write};
//!
//! # fn main() -> Result<(), moat_monitor::Error> {
//! let mut p = Sandbox::new("target/debug/echo")
//!     .allow_ro("file:/srv/data")?          // what the picoprocess may read
//!     .stdin(Stdio::Piped)
//!     .stdout(Stdio::Piped)
//!     .spawn()?;
//! let mut stdin = p.stdin.take().unwrap();
//! writeln!(stdin, "hello").unwrap();
//! drop(stdin);
//! let mut line = String::new();
//! BufReader::new(p.stdout.take().unwrap()).read_line(&mut line).unwrap();
//! let exit = p.wait()?;
//! println!("echoed {line:?}, exit code {}", exit.code);
//! # Ok(()) }
//! ```
//!
//! How it works: [`Sandbox::spawn`] checks the image in the host, starts
//! the `moat-loader` binary in new namespaces (see [`crate::spawn`]),
//! sends it the [`Config`] with the image descriptor, and runs a monitor
//! thread that answers the loader's requests through the
//! [`Broker`] until the loader's socket closes. A
//! waiter thread reaps the loader and turns its status into an [`Exit`].
use crate::broker::{Broker, Console, LogSink, ReportSlot, Session};
use crate::launch;
use crate::process::{self, SpawnError, Status};
use moat_host_common::protocol::{self, Config, ReportKind, Request, WireError};
use moat_policy::{Access, Limits, Policy, PolicyError};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

pub use moat_host_common::protocol::{EXIT_BAD_INPUT, EXIT_HOST_FAILURE, EXIT_SANDBOX_VIOLATION};

/// Why a picoprocess could not be started (or waited for).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A grant, manifest or limit is not valid.
    #[error("{0}")]
    Policy(#[from] PolicyError),
    /// The image cannot be used.
    #[error("image `{path}`: {msg}")]
    Image { path: String, msg: String },
    /// Another argument is not valid.
    #[error("{0}")]
    BadInput(String),
    /// The sandbox could not be set up.
    #[error("{0}")]
    Spawn(#[from] SpawnError),
    /// The host failed otherwise.
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
}

impl Error {
    /// The exit code the CLI ends with for this error:
    /// [`EXIT_BAD_INPUT`] or [`EXIT_HOST_FAILURE`].
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Policy(_) | Error::Image { .. } | Error::BadInput(_) => EXIT_BAD_INPUT,
            Error::Spawn(_) | Error::Io { .. } => EXIT_HOST_FAILURE,
        }
    }

    fn io(what: impl Into<String>, err: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            err,
        }
    }
}

/// Where a console stream of the picoprocess goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stdio {
    /// The host process's own stream (the default).
    #[default]
    Inherit,
    /// A pipe whose host end is in [`Picoprocess::stdin`] (`stdout`, `stderr`).
    Piped,
    /// `/dev/null`.
    Null,
}

/// How a picoprocess ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Its exit code; killed by signal N: 128 + N; a sandbox violation:
    /// [`EXIT_SANDBOX_VIOLATION`].
    pub code: i32,
    /// The loader's report of an abnormal end, if any.
    pub report: Option<(ReportKind, String)>,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// A picoprocess to start: image, arguments, grants, console. A builder.
#[derive(Debug)]
pub struct Sandbox {
    image: PathBuf,
    args: Vec<String>,
    policy: Policy,
    stdio: [Stdio; 3],
    log: LogSink,
    trace: bool,
    host: crate::Host,
}

impl Sandbox {
    /// A picoprocess running the image at `image` (a path; the CLI resolves
    /// image names), with nothing granted and the default limits.
    pub fn new(image: impl AsRef<Path>) -> Self {
        Sandbox {
            image: image.as_ref().to_path_buf(),
            args: Vec::new(),
            policy: Policy::default(),
            stdio: [Stdio::Inherit; 3],
            log: LogSink::Stderr,
            trace: false,
            host: crate::Host::Linux,
        }
    }

    /// Run on `host` (default: [`Host::Linux`](crate::Host::Linux)). On
    /// [`Host::Kvm`](crate::Host::Kvm) the `moat-vmm` binary (from
    /// moat-host-hypervisor) must be next to `moat-loader` or named by
    /// `$MOAT_VMM`.
    pub fn host(mut self, host: crate::Host) -> Self {
        self.host = host;
        self
    }

    /// Add one argument (after the image name, which is always the first).
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Add arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Replace the policy (grants and limits).
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }

    /// Grant `uri` (a URI prefix) for reading and writing.
    pub fn allow(mut self, uri: &str) -> Result<Self, Error> {
        self.policy.allow(uri, Access::Rw)?;
        Ok(self)
    }

    /// Grant `uri` (a URI prefix) for reading only.
    pub fn allow_ro(mut self, uri: &str) -> Result<Self, Error> {
        self.policy.allow(uri, Access::Ro)?;
        Ok(self)
    }

    /// Replace the limits.
    pub fn limits(mut self, l: Limits) -> Self {
        self.policy.limits = l;
        self
    }

    pub fn stdin(mut self, s: Stdio) -> Self {
        self.stdio[0] = s;
        self
    }

    pub fn stdout(mut self, s: Stdio) -> Self {
        self.stdio[1] = s;
        self
    }

    pub fn stderr(mut self, s: Stdio) -> Self {
        self.stdio[2] = s;
        self
    }

    /// Where refusal, debug and trace lines go (default: standard error).
    pub fn log(mut self, sink: LogSink) -> Self {
        self.log = sink;
        self
    }

    /// Log a line per brokered request, and ask the loader to log a line
    /// per ABI call.
    pub fn trace(mut self, on: bool) -> Self {
        self.trace = on;
        self
    }

    /// Check the image and start the picoprocess.
    pub fn spawn(self) -> Result<Picoprocess, Error> {
        self.policy.limits.validate()?;
        let shown = self.image.display().to_string();
        let image = File::open(&self.image).map_err(|e| Error::Image {
            path: shown.clone(),
            msg: format!("cannot open: {e}"),
        })?;
        check_image(&image, &self.policy.limits).map_err(|msg| Error::Image {
            path: shown.clone(),
            msg,
        })?;
        let name = self
            .image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| shown.clone());
        let mut args = Vec::with_capacity(self.args.len() + 1);
        args.push(name.clone());
        args.extend(self.args);
        let total: usize = args.iter().map(|a| a.len() + 1).sum();
        if total > moat_pal::limits::MAX_ARGS_LEN as usize || args.iter().any(|a| a.contains('\0'))
        {
            return Err(Error::BadInput(format!(
                "the arguments take {total} bytes or contain NUL; at most {} bytes without NUL are allowed",
                moat_pal::limits::MAX_ARGS_LEN
            )));
        }

        let (console, host_ends) = make_console(self.stdio)?;
        let [stdin, stdout, stderr] = host_ends;
        let session = Session::on_host(self.host, self.policy, self.log, self.trace, console);
        let root = start(&session, image, name, args, None, false)?;
        Ok(Picoprocess {
            stdin,
            stdout,
            stderr,
            root,
            session,
            exit: None,
        })
    }
}

/// Check an image file in the host before any loader sees it.
pub(crate) fn check_image(image: &File, limits: &Limits) -> Result<(), String> {
    let meta = image.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > moat_host_common::elf::MAX_IMAGE_BYTES as u64 {
        return Err(moat_host_common::elf::ImageError::TooLarge(meta.len() as usize).to_string());
    }
    // Refuse before reading: a file larger than the picoprocess's memory
    // cannot be an image it can run.
    if meta.len() > limits.memory_mib << 20 {
        return Err(format!(
            "image is {} bytes; the memory limit is {} MiB",
            meta.len(),
            limits.memory_mib
        ));
    }
    // An image that passed unchanged (same file, size and change time)
    // under at least this memory limit passes again without re-reading.
    use std::os::unix::fs::MetadataExt;
    let key = (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec(),
    );
    if CHECKED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .is_some_and(|&m| m <= limits.memory_mib)
    {
        return Ok(());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    image
        .take(moat_host_common::elf::MAX_IMAGE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    moat_host_common::elf::parse(&bytes, limits.memory_mib << 20).map_err(|e| e.to_string())?;
    let mut c = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if c.len() >= 1024 {
        c.clear();
    }
    c.insert(key, limits.memory_mib);
    Ok(())
}

/// Images that passed `check_image`: (device, inode, size, ctime) -> the
/// memory limit (MiB) they passed under. The loader checks every image
/// again anyway; this only spares the monitor re-reading a known file.
type ImageKey = (u64, u64, u64, i64, i64);
static CHECKED: std::sync::LazyLock<Mutex<std::collections::HashMap<ImageKey, u64>>> =
    std::sync::LazyLock::new(Default::default);

fn dev_null() -> Result<OwnedFd, Error> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::io("cannot open /dev/null", e))?
        .into())
}

/// The picoprocess's console descriptors, and the host's ends of pipes.
fn make_console(stdio: [Stdio; 3]) -> Result<(Console, [Option<File>; 3]), Error> {
    let mut pico: Vec<OwnedFd> = Vec::new();
    let mut host: [Option<File>; 3] = [None, None, None];
    for (i, s) in stdio.iter().enumerate() {
        let fd = match s {
            Stdio::Null => dev_null()?,
            Stdio::Inherit => {
                let own = match i {
                    0 => std::io::stdin().as_fd().try_clone_to_owned(),
                    1 => std::io::stdout().as_fd().try_clone_to_owned(),
                    _ => std::io::stderr().as_fd().try_clone_to_owned(),
                };
                // A closed host stream becomes /dev/null.
                match own {
                    Ok(fd) => fd,
                    Err(_) => dev_null()?,
                }
            }
            Stdio::Piped => {
                let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                    .map_err(|e| Error::io("cannot create a pipe", e.into()))?;
                if i == 0 {
                    host[i] = Some(File::from(w));
                    r
                } else {
                    host[i] = Some(File::from(r));
                    w
                }
            }
        };
        pico.push(fd);
    }
    let mut it = pico.into_iter();
    let (Some(stdin), Some(stdout), Some(stderr)) = (it.next(), it.next(), it.next()) else {
        unreachable!("three console streams")
    };
    Ok((
        Console {
            stdin,
            stdout,
            stderr,
        },
        host,
    ))
}

/// One running (or ended) picoprocess of a session.
pub(crate) struct Proc {
    pub(crate) pid: u32,
    name: String,
    pidfd: OwnedFd,
    exit: Mutex<Option<Exit>>,
    ended: Condvar,
    /// The disks its devices are backed by, locked while it runs.
    _disks: Vec<Arc<crate::disklock::DiskLock>>,
}

impl Proc {
    pub(crate) fn signal(&self, sig: libc::c_int) -> std::io::Result<()> {
        process::signal_pidfd(&self.pidfd, sig)
    }

    fn wait(&self) -> Exit {
        let mut e = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(x) = &*e {
                return x.clone();
            }
            e = self.ended.wait(e).unwrap_or_else(|e| e.into_inner());
        }
    }
}

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
        name: crate::broker::sanitize(&name),
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
    let mut broker = Broker::new(session.clone(), name);
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

/// A running picoprocess (the root of a session). Dropping it kills the
/// picoprocess and everything it started.
/// Kills one picoprocess (see [`Picoprocess::killer`]).
#[derive(Clone)]
pub struct Killer(Arc<Proc>);

impl Killer {
    /// SIGKILL the picoprocess (a no-op once it has ended).
    pub fn kill(&self) {
        let _ = self.0.signal(libc::SIGKILL);
    }
}

impl std::fmt::Debug for Killer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Killer({})", self.0.pid)
    }
}

pub struct Picoprocess {
    /// The host end of its `stdin:` with [`Stdio::Piped`].
    pub stdin: Option<File>,
    /// The host end of its `stdout:` with [`Stdio::Piped`].
    pub stdout: Option<File>,
    /// The host end of its `stderr:` with [`Stdio::Piped`].
    pub stderr: Option<File>,
    root: Arc<Proc>,
    session: Arc<Session>,
    exit: Option<Exit>,
}

impl std::fmt::Debug for Picoprocess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Picoprocess")
            .field("id", &self.root.pid)
            .field("exit", &self.exit)
            .finish_non_exhaustive()
    }
}

impl Picoprocess {
    /// Its id: the pid of its sandbox process in the host.
    pub fn id(&self) -> u32 {
        self.root.pid
    }

    /// A handle that can kill this picoprocess from any thread, while
    /// another waits for it (through its pidfd: never a reused pid).
    pub fn killer(&self) -> Killer {
        Killer(self.root.clone())
    }

    /// Wait for the picoprocess to end, then kill whatever it started that
    /// is still running. The host ends of piped stdin are closed first, so
    /// that a picoprocess reading its input sees the end of it.
    pub fn wait(&mut self) -> Result<Exit, Error> {
        if let Some(e) = &self.exit {
            return Ok(e.clone());
        }
        drop(self.stdin.take());
        let exit = self.root.wait();
        self.kill_descendants();
        self.exit = Some(exit.clone());
        Ok(exit)
    }

    /// Kill the picoprocess (SIGKILL) and everything it started.
    pub fn kill(&mut self) -> Result<(), Error> {
        self.root
            .signal(libc::SIGKILL)
            .map_err(|e| Error::io("cannot kill the picoprocess", e))?;
        self.kill_descendants();
        Ok(())
    }

    /// Ask the picoprocess to stop: SIGTERM, which the loader turns into
    /// the picoprocess's registered abort event.
    pub fn request_stop(&self) -> Result<(), Error> {
        self.root
            .signal(libc::SIGTERM)
            .map_err(|e| Error::io("cannot signal the picoprocess", e))
    }

    /// Connect to the session's pipe `name`: the host's side of a
    /// picoprocess's `pipe.server:NAME` (it accepts this connection).
    pub fn connect_pipe(&self, name: &str) -> Result<UnixStream, Error> {
        check_pipe_name(name)?;
        self.session
            .pipe_listener(name)
            .map_err(|e| Error::io(format!("pipe `{name}`"), e))?;
        let addr = self
            .session
            .pipe_addr(name)
            .map_err(|e| Error::io(format!("pipe `{name}`"), e))?;
        UnixStream::connect_addr(&addr)
            .map_err(|e| Error::io(format!("cannot connect to pipe `{name}`"), e))
    }

    /// The session's listener of pipe `name`: the host accepts on it the
    /// connections of a picoprocess's `pipe.client:NAME` (a picoprocess
    /// that listens on `pipe.server:NAME` accepts from the same queue).
    pub fn pipe_listener(&self, name: &str) -> Result<UnixListener, Error> {
        check_pipe_name(name)?;
        let l = self
            .session
            .pipe_listener(name)
            .map_err(|e| Error::io(format!("pipe `{name}`"), e))?;
        l.try_clone()
            .map_err(|e| Error::io(format!("pipe `{name}`"), e))
    }

    fn kill_descendants(&self) {
        let procs: Vec<Arc<Proc>> = {
            let mut t = self.session.procs.lock().unwrap_or_else(|e| e.into_inner());
            t.closed = true;
            t.live
                .values()
                .filter(|p| p.pid != self.root.pid)
                .cloned()
                .collect()
        };
        for p in procs {
            let _ = p.signal(libc::SIGKILL);
        }
    }
}

fn check_pipe_name(name: &str) -> Result<(), Error> {
    match moat_pal::uri::Uri::parse(&format!("pipe.server:{name}")) {
        Ok(_) => Ok(()),
        Err(_) => Err(Error::BadInput(format!(
            "pipe name `{name}` is not valid: use 1 to 64 of A-Z a-z 0-9 . _ -"
        ))),
    }
}

impl Drop for Picoprocess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.root.signal(libc::SIGKILL);
        }
        self.kill_descendants();
    }
}
