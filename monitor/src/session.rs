//! What one picoprocess tree shares: the [`Session`] (policy, console,
//! pipe and TCP listeners, shared sections, the live processes), and where
//! the monitor's log lines go ([`LogSink`]).
use crate::proc::Proc;
use crate::shm::{HostSection, Section, MAX_SECTIONS};
use moat_policy::Policy;
use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

/// Most pipe names, and most TCP listening addresses, one session (a
/// picoprocess tree) may have at once: each is a descriptor of the host.
pub const MAX_LISTENERS: usize = 64;

pub use crate::proc::ReportSlot;

/// Where the monitor's log lines (refusals, `DkDebugStringPrint`, traces)
/// go. Every line is one line: guest-provided text in it has its control
/// characters escaped.
#[derive(Clone, Default)]
pub enum LogSink {
    /// The host process's standard error (the default; what the CLI uses).
    #[default]
    Stderr,
    /// Call this function with each line.
    Callback(Arc<dyn Fn(&str) + Send + Sync>),
    /// Append each line to this vector.
    Buffer(Arc<Mutex<Vec<String>>>),
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogSink::Stderr => "LogSink::Stderr",
            LogSink::Callback(_) => "LogSink::Callback",
            LogSink::Buffer(_) => "LogSink::Buffer",
        })
    }
}

impl LogSink {
    /// A sink that collects lines, and the vector they land in.
    pub fn buffer() -> (LogSink, Arc<Mutex<Vec<String>>>) {
        let v = Arc::new(Mutex::new(Vec::new()));
        (LogSink::Buffer(v.clone()), v)
    }

    /// A sink that calls `f` with each line.
    pub fn callback(f: impl Fn(&str) + Send + Sync + 'static) -> LogSink {
        LogSink::Callback(Arc::new(f))
    }

    /// Emit one line.
    pub fn line(&self, line: &str) {
        match self {
            LogSink::Stderr => {
                use std::io::Write;
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
            LogSink::Callback(f) => f(line),
            LogSink::Buffer(v) => v
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line.to_string()),
        }
    }
}

/// Make guest-provided text safe for a one-line log: control characters
/// (newlines, terminal escapes) are escaped; a final newline is dropped.
pub fn sanitize(s: &str) -> String {
    let s = s.strip_suffix('\n').unwrap_or(s);
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The picoprocess's console: the descriptors `stdin:`, `stdout:` and
/// `stderr:` open duplicates of.
#[derive(Debug)]
pub struct Console {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// What one picoprocess tree shares: the policy, the console, the pipe and
/// TCP listeners, the count of live child picoprocesses.
pub struct Session {
    policy: Arc<Policy>,
    host: crate::Host,
    log: LogSink,
    trace: Option<crate::trace::TraceOptions>,
    /// With `trace.file`: the trace file every picoprocess's drain appends to.
    trace_file: Option<Arc<Mutex<crate::trace::file::Writer>>>,
    layers: Vec<moat_layers::LayerName>,
    pub(crate) console: Mutex<Option<Console>>,
    /// `\0moat-<pid>-<random>-`: the abstract socket prefix of this session.
    pub(crate) tag: String,
    pipes: Mutex<HashMap<String, Arc<UnixListener>>>,
    tcp: Mutex<HashMap<SocketAddr, Arc<TcpListener>>>,
    /// Shared sections by name (see [`crate::shm`]).
    sections: Mutex<HashMap<String, Arc<Section>>>,
    pub(crate) procs: Mutex<ProcTable>,
}

/// Live picoprocesses of a session.
#[derive(Default)]
pub(crate) struct ProcTable {
    /// Child picoprocesses started (or being started) by ProcessCreate.
    pub(crate) children: u64,
    pub(crate) live: HashMap<u32, Arc<Proc>>,
    /// Monitor threads still serving a loader.
    pub(crate) serving: usize,
    /// The root was waited for, killed or dropped: a picoprocess that is
    /// started from now on (by a request already under way) is killed at once.
    pub(crate) closed: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("tag", &self.tag.trim_start_matches('\0'))
            .finish_non_exhaustive()
    }
}

fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if let Ok(mut f) = File::open("/dev/urandom") {
        if f.read_exact(&mut b).is_ok() {
            return u64::from_ne_bytes(b);
        }
    }
    // Fall back on std's randomly keyed hasher.
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

impl Session {
    /// A session with `policy`, logging to `log`, with `console` as the
    /// console streams.
    pub fn new(policy: Policy, log: LogSink, trace: bool, console: Console) -> Arc<Session> {
        let trace = trace.then(crate::trace::TraceOptions::default);
        Session::on_host(crate::Host::Linux, policy, log, trace, Vec::new(), console)
            .expect("a trace without a file opens nothing")
    }

    /// A session whose picoprocesses (the root and every child) run on
    /// `host`, under `layers` (outermost first).
    pub fn on_host(
        host: crate::Host,
        policy: Policy,
        log: LogSink,
        trace: Option<crate::trace::TraceOptions>,
        layers: Vec<moat_layers::LayerName>,
        console: Console,
    ) -> Result<Arc<Session>, crate::Error> {
        let trace_file = match trace.as_ref().and_then(|t| t.file.as_ref()) {
            Some(p) => Some(Arc::new(Mutex::new(
                crate::trace::file::Writer::create(p).map_err(|e| {
                    crate::Error::BadInput(format!(
                        "cannot create the trace file `{}`: {e}",
                        p.display()
                    ))
                })?,
            ))),
            None => None,
        };
        Ok(Arc::new(Session {
            policy: Arc::new(policy),
            host,
            log,
            trace,
            trace_file,
            layers,
            console: Mutex::new(Some(console)),
            tag: format!("moat-{}-{:016x}-", std::process::id(), random_u64()),
            pipes: Mutex::new(HashMap::new()),
            tcp: Mutex::new(HashMap::new()),
            sections: Mutex::new(HashMap::new()),
            procs: Mutex::new(ProcTable::default()),
        }))
    }

    /// A session whose console is `/dev/null` (for tests and tools).
    pub fn with_null_console(policy: Policy, log: LogSink) -> std::io::Result<Arc<Session>> {
        let n = || -> std::io::Result<OwnedFd> {
            Ok(std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?
                .into())
        };
        Ok(Session::new(
            policy,
            log,
            false,
            Console {
                stdin: n()?,
                stdout: n()?,
                stderr: n()?,
            },
        ))
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub fn log(&self) -> &LogSink {
        &self.log
    }

    pub fn host(&self) -> crate::Host {
        self.host
    }

    /// Whether brokered requests are logged (tracing to the log, not to
    /// a file).
    pub fn trace(&self) -> bool {
        self.trace
            .as_ref()
            .is_some_and(|t| t.outermost && t.file.is_none())
    }

    /// How the session traces, if it does (`--trace`).
    pub fn trace_options(&self) -> Option<&crate::trace::TraceOptions> {
        self.trace.as_ref()
    }

    /// Where a picoprocess's trace ring drains to.
    pub(crate) fn trace_sink(&self) -> crate::trace::Sink {
        match &self.trace_file {
            Some(f) => crate::trace::Sink::File(f.clone()),
            None => {
                let log = self.log.clone();
                crate::trace::Sink::Log(Arc::new(move |l: &str| log.line(l)))
            }
        }
    }

    /// The layers every picoprocess of the session runs under.
    pub fn layers(&self) -> &[moat_layers::LayerName] {
        &self.layers
    }

    /// Drop the console descriptors (once no loader is served any more),
    /// so that the host's ends of piped stdio see end-of-file.
    pub(crate) fn close_console(&self) {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// The session's listener for pipe `name`, created on first use.
    pub fn pipe_listener(&self, name: &str) -> std::io::Result<Arc<UnixListener>> {
        let mut pipes = self.pipes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = pipes.get(name) {
            return Ok(l.clone());
        }
        if pipes.len() >= MAX_LISTENERS {
            return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
        }
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(format!("{}{name}", self.tag))?;
        let l = Arc::new(UnixListener::bind_addr(&addr)?);
        // Its connections inherit it: no descriptor reaches a picoprocess
        // through a pipe (another picoprocess's monitor channel least).
        self.refuse_descriptors(l.as_fd())?;
        pipes.insert(name.to_string(), l.clone());
        Ok(l)
    }

    /// The abstract address of pipe `name` (it exists once
    /// [`Session::pipe_listener`] has made it).
    pub fn pipe_addr(&self, name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
        std::os::unix::net::SocketAddr::from_abstract_name(format!("{}{name}", self.tag))
    }

    /// Make `sock`, which a picoprocess will hold, refuse descriptors (see
    /// `moat_host_common::protocol::SO_PASSRIGHTS`). On a kernel before
    /// 6.16, which cannot, says once that picoprocesses connected by a pipe
    /// can pass descriptors to each other there.
    pub(crate) fn refuse_descriptors(&self, sock: BorrowedFd<'_>) -> std::io::Result<()> {
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !moat_host_common::protocol::refuse_descriptors(sock)?
            && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.log.line(
                "moat: this kernel has no SO_PASSRIGHTS (Linux 6.16): picoprocesses connected by a pipe can pass descriptors to each other; the monitor still attributes every message to the picoprocess it started",
            );
        }
        Ok(())
    }

    /// The live picoprocess of this session with host pid `pid`.
    pub(crate) fn proc_by_pid(&self, pid: u32) -> Option<Arc<Proc>> {
        let t = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        t.live.get(&pid).cloned()
    }

    /// The session's TCP listener at `addr`, bound on first use.
    pub fn tcp_listener(&self, addr: SocketAddr) -> std::io::Result<Arc<TcpListener>> {
        let mut tcp = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = tcp.get(&addr) {
            return Ok(l.clone());
        }
        if tcp.len() >= MAX_LISTENERS {
            return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
        }
        // std sets SO_REUSEADDR on Unix listeners.
        let l = Arc::new(TcpListener::bind(addr)?);
        tcp.insert(addr, l.clone());
        Ok(l)
    }

    /// The shared section `name`, opened with the creation disposition
    /// `disp` of DkStreamOpen, and whether this open made it (the opener
    /// is then its creator side). At most [`MAX_SECTIONS`].
    pub(crate) fn section_open(
        &self,
        name: &str,
        disp: u32,
    ) -> Result<(Arc<Section>, bool), moat_pal::Error> {
        use moat_pal::{create, Error as E};
        let mut all = self.sections.lock().unwrap_or_else(|e| e.into_inner());
        match (all.get(name), disp) {
            (Some(_), create::CREATE_NEW) => Err(E::AlreadyExists),
            (Some(s), _) => Ok((s.clone(), false)),
            (None, create::OPEN_EXISTING) => Err(E::NotFound),
            (None, _) if all.len() >= MAX_SECTIONS => Err(E::LimitExceeded),
            (None, _) => {
                let s = Arc::new(Section::new(name).map_err(|_| E::Io)?);
                all.insert(name.to_string(), s.clone());
                Ok((s, true))
            }
        }
    }

    /// The shared section `name`, if the session has it.
    pub(crate) fn section(&self, name: &str) -> Option<Arc<Section>> {
        let all = self.sections.lock().unwrap_or_else(|e| e.into_inner());
        all.get(name).cloned()
    }

    /// Give the session the host's section `section` as `shm:NAME` (the
    /// host is its creator side; the picoprocesses that open it are the
    /// other side). Its size must not pass the session's memory limit.
    pub fn shm_attach(&self, name: &str, section: &HostSection) -> Result<(), crate::Error> {
        self.attach(name, section.shared().clone(), section.len())
    }

    pub(crate) fn attach(
        &self,
        name: &str,
        section: Arc<Section>,
        len: u64,
    ) -> Result<(), crate::Error> {
        let bad = crate::Error::BadInput;
        crate::shm::check_name(name)?;
        if len > self.policy.limits.memory_mib << 20 {
            return Err(bad(format!(
                "section `{name}` is {len} bytes, more than the memory limit ({} MiB)",
                self.policy.limits.memory_mib
            )));
        }
        let mut all = self.sections.lock().unwrap_or_else(|e| e.into_inner());
        if all.contains_key(name) {
            return Err(bad(format!("the session already has a section `{name}`")));
        }
        if all.len() >= MAX_SECTIONS {
            return Err(bad(format!(
                "the session already has {MAX_SECTIONS} sections"
            )));
        }
        all.insert(name.to_string(), section);
        Ok(())
    }

    /// Make a section of `size` bytes and give it to the session as
    /// `shm:NAME` (see [`Session::shm_attach`] and [`HostSection::new`]).
    pub fn shm_create(&self, name: &str, size: u64) -> Result<HostSection, crate::Error> {
        let s = HostSection::new(size)?;
        self.shm_attach(name, &s)?;
        Ok(s)
    }
}
