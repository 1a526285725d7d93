//! The monitor's side of every loader request, with the [`Policy`] as the
//! only authority.
//!
//! Everything a loader sends is hostile input: URIs are parsed again here
//! with [`Uri::parse`] (never trusting the loader's parsing), sizes are
//! bounded, and every refusal answers with a `moat_pal::Error` code and
//! logs one line saying what to grant. File opens are immune to symlink
//! and `..` escapes: they resolve beneath the grant's directory with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
//!
//! A [`Session`] is what one picoprocess tree shares (policy, console,
//! pipe and TCP listeners, the process count); a [`Broker`] is one
//! picoprocess's view of it.
use moat_host_common::protocol::{ReportKind, Request, Response};
use moat_pal::uri::Uri;
use moat_pal::{access, create, open_option, stream_kind, Error};
use moat_policy::{Grant, Policy};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most bytes of arguments a child picoprocess may be given.
pub const MAX_ARGS_LEN: usize = 65536;
/// Most arguments a child picoprocess may be given.
pub const MAX_ARGS: usize = 4096;
/// How long the monitor tries to connect a `tcp.client:` stream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    trace: bool,
    console: Mutex<Option<Console>>,
    /// `\0moat-<pid>-<random>-`: the abstract socket prefix of this session.
    tag: String,
    pipes: Mutex<HashMap<String, Arc<UnixListener>>>,
    tcp: Mutex<HashMap<SocketAddr, Arc<TcpListener>>>,
    pub(crate) procs: Mutex<ProcTable>,
}

/// Live picoprocesses of a session.
#[derive(Default)]
pub(crate) struct ProcTable {
    /// Child picoprocesses started (or being started) by ProcessCreate.
    pub(crate) children: u64,
    pub(crate) live: HashMap<u32, Arc<crate::monitor::Proc>>,
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
        Session::on_host(crate::Host::Linux, policy, log, trace, console)
    }

    /// A session whose picoprocesses (the root and every child) run on `host`.
    pub fn on_host(
        host: crate::Host,
        policy: Policy,
        log: LogSink,
        trace: bool,
        console: Console,
    ) -> Arc<Session> {
        Arc::new(Session {
            policy: Arc::new(policy),
            host,
            log,
            trace,
            console: Mutex::new(Some(console)),
            tag: format!("moat-{}-{:016x}-", std::process::id(), random_u64()),
            pipes: Mutex::new(HashMap::new()),
            tcp: Mutex::new(HashMap::new()),
            procs: Mutex::new(ProcTable::default()),
        })
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

    pub fn trace(&self) -> bool {
        self.trace
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
        pipes.insert(name.to_string(), l.clone());
        Ok(l)
    }

    /// The abstract address of pipe `name` (it exists once
    /// [`Session::pipe_listener`] has made it).
    pub fn pipe_addr(&self, name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
        std::os::unix::net::SocketAddr::from_abstract_name(format!("{}{name}", self.tag))
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
}

/// One answer to the loader: the response and the descriptors to attach.
#[derive(Debug)]
pub struct Reply {
    pub response: Response,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    fn ok() -> Reply {
        Reply {
            response: Response::Ok,
            fds: Vec::new(),
        }
    }
    fn fd(kind: u32, fd: OwnedFd) -> Reply {
        Reply {
            response: Response::Fd { kind },
            fds: vec![fd],
        }
    }
    fn err(e: Error) -> Reply {
        Reply {
            response: Response::Err { code: code(e) },
            fds: Vec::new(),
        }
    }
}

/// The positive wire code of an error.
pub fn code(e: Error) -> u32 {
    e.code().unsigned_abs() as u32
}

/// The report a picoprocess leaves, shared by its broker and its waiter.
pub type ReportSlot = Arc<Mutex<Option<(ReportKind, String)>>>;

/// One picoprocess's broker.
pub struct Broker {
    session: Arc<Session>,
    name: String,
    report: ReportSlot,
    /// DkDebugStringPrint bytes logged so far.
    debug_bytes: u64,
}

/// Most pipe names, and most TCP listening addresses, one session (a
/// picoprocess tree) may have at once: each is a descriptor of the host.
pub const MAX_LISTENERS: usize = 64;

/// Most debug output one picoprocess may put in the host's log.
pub const DEBUG_BUDGET: u64 = 1 << 20;

type R<T> = Result<T, Error>;

impl Broker {
    /// A broker for the picoprocess `name` in `session`.
    pub fn new(session: Arc<Session>, name: impl Into<String>) -> Broker {
        Broker {
            debug_bytes: 0,
            session,
            name: sanitize(&name.into()),
            report: Arc::new(Mutex::new(None)),
        }
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// The end report the picoprocess sent, if any.
    pub fn report(&self) -> Option<(ReportKind, String)> {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn report_slot(&self) -> ReportSlot {
        self.report.clone()
    }

    fn log(&self, line: &str) {
        self.session.log.line(line);
    }

    /// Handle one request. `None` for requests that take no answer
    /// (`Debug`, `Report`).
    pub fn handle(&mut self, req: Request) -> Option<Reply> {
        let what = if self.session.trace {
            Some(summary(&req))
        } else {
            None
        };
        let reply = match req {
            Request::Open {
                uri,
                access,
                create,
                options,
            } => self.open(&uri, access, create, options),
            Request::Listen { uri } => self.listen(&uri),
            Request::Stat { uri } => self.stat(&uri),
            Request::Rename { from, to } => self.rename(&from, &to).map(|()| Reply::ok()),
            Request::Delete { uri } => self.delete(&uri).map(|()| Reply::ok()),
            Request::ProcessCreate { uri, args } => self.process_create(&uri, args),
            Request::Debug { text } => {
                // Bounded: a picoprocess cannot flood the host's log.
                if self.debug_bytes < DEBUG_BUDGET {
                    self.debug_bytes += text.len() as u64;
                    self.log(&format!("[picoprocess {}] {}", self.name, sanitize(&text)));
                    if self.debug_bytes >= DEBUG_BUDGET {
                        self.log(&format!(
                            "[picoprocess {}] (debug output over {} MiB; the rest is dropped)",
                            self.name,
                            DEBUG_BUDGET >> 20
                        ));
                    }
                }
                return None;
            }
            Request::Report { kind, text } => {
                let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
                if r.is_none() {
                    *r = Some((kind, sanitize(&text)));
                }
                return None;
            }
        };
        let reply = reply.unwrap_or_else(Reply::err);
        if let Some(what) = what {
            let res = match &reply.response {
                Response::Ok => "ok".to_string(),
                Response::Fd { kind } => format!("fd (kind {kind})"),
                Response::Attrs { kind, size, .. } => format!("attrs (kind {kind}, size {size})"),
                Response::Err { code } => match Error::from_code(-(*code as i64)) {
                    Some(e) => format!("{e:?}"),
                    None => format!("error {code}"),
                },
            };
            self.log(&format!("[picoprocess {}] {what} -> {res}", self.name));
        }
        Some(reply)
    }

    fn parse(&self, uri: &str) -> R<Uri> {
        Uri::parse_bytes(uri.as_bytes())
    }

    /// The policy check; a refusal is logged with what to grant.
    fn check(&self, uri: &Uri, write: bool) -> R<Option<&Grant>> {
        self.session.policy.check(uri, write).map_err(|r| {
            let u = sanitize(&r.uri);
            if r.wanted_write {
                self.log(&format!(
                    "moat: refused {u} (not granted for writing; grant it with --allow {u})"
                ));
            } else {
                self.log(&format!(
                    "moat: refused {u} (not granted; grant it with --allow-ro {u})"
                ));
            }
            Error::PermissionDenied
        })
    }

    fn file_grant(&self, uri: &Uri, write: bool) -> R<&Grant> {
        self.check(uri, write)?.ok_or(Error::PermissionDenied)
    }

    fn open(&self, uri: &str, acc: u32, disp: u32, options: u32) -> R<Reply> {
        let u = self.parse(uri)?;
        if acc == 0 || acc & !(access::READ | access::WRITE | access::APPEND) != 0 {
            return Err(Error::InvalidArgument);
        }
        if disp > create::OPEN_ALWAYS
            || options & !(open_option::DIRECTORY | open_option::NONBLOCK) != 0
        {
            return Err(Error::InvalidArgument);
        }
        let nonblock = options & open_option::NONBLOCK != 0;
        match &u {
            Uri::File(path) => {
                let (fd, kind) = self.open_file(&u, path, acc, disp, options)?;
                Ok(Reply::fd(kind, fd))
            }
            Uri::Null => {
                let mode = acc_mode(acc);
                let fd = sys::open_abs("/dev/null", mode | libc::O_CLOEXEC | libc::O_NOCTTY)
                    .map_err(map_errno)?;
                Ok(Reply::fd(stream_kind::NULL, fd))
            }
            Uri::Stdin | Uri::Stdout | Uri::Stderr => {
                let c = self
                    .session
                    .console
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let c = c.as_ref().ok_or(Error::Io)?;
                let fd = match u {
                    Uri::Stdin => &c.stdin,
                    Uri::Stdout => &c.stdout,
                    _ => &c.stderr,
                };
                Ok(Reply::fd(
                    stream_kind::CONSOLE,
                    fd.try_clone().map_err(io_err)?,
                ))
            }
            Uri::TcpClient(addr) => {
                self.check(&u, false)?;
                let s = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).map_err(io_err)?;
                if nonblock {
                    s.set_nonblocking(true).map_err(io_err)?;
                }
                Ok(Reply::fd(stream_kind::TCP, s.into()))
            }
            Uri::PipeClient(name) => {
                self.check(&u, false)?;
                let l = self.session.pipe_listener(name).map_err(io_err)?;
                drop(l);
                let addr = self.session.pipe_addr(name).map_err(io_err)?;
                let fd = sys::connect_nonblocking(&addr).map_err(|e| match e {
                    libc::EAGAIN => Error::LimitExceeded,
                    e => map_errno(e),
                })?;
                if !nonblock {
                    sys::set_nonblock(fd.as_fd(), false).map_err(map_errno)?;
                }
                Ok(Reply::fd(stream_kind::PIPE, fd))
            }
            Uri::PipeServer(_) | Uri::TcpServer(_) => Err(Error::InvalidArgument),
            Uri::Dns(_) => Err(Error::NotSupported),
            Uri::Dev(_) => {
                self.log(&format!(
                    "moat: refused {} (devices are granted only by --host kvm)",
                    sanitize(&u.canonical())
                ));
                Err(Error::NotSupported)
            }
        }
    }

    fn open_file(
        &self,
        u: &Uri,
        path: &str,
        acc: u32,
        disp: u32,
        options: u32,
    ) -> R<(OwnedFd, u32)> {
        let write = acc & (access::WRITE | access::APPEND) != 0 || disp != create::OPEN_EXISTING;
        let grant = self.file_grant(u, write)?;
        let t = Target::resolve(grant, path)?;
        if options & open_option::DIRECTORY != 0 && disp != create::OPEN_EXISTING {
            let (parent, name, resolve) = t.parent()?;
            match sys::mkdirat(parent.as_fd(), &name, 0o755) {
                Ok(()) => {}
                Err(libc::EEXIST) if disp != create::CREATE_NEW => {}
                Err(e) => return Err(map_errno(e)),
            }
            let fd = sys::openat2(
                parent.as_fd(),
                &name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOCTTY,
                0,
                resolve,
            )
            .map_err(map_errno)?;
            return Ok((fd, stream_kind::DIRECTORY));
        }
        // Always open non-blocking: a FIFO planted in a granted directory
        // must not hang the monitor. Only regular files and directories
        // are passed on.
        let mut flags = acc_mode(acc) | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
        if acc & access::APPEND != 0 {
            flags |= libc::O_APPEND;
        }
        flags |= match disp {
            create::CREATE_ALWAYS => libc::O_CREAT | libc::O_TRUNC,
            create::CREATE_NEW => libc::O_CREAT | libc::O_EXCL,
            create::OPEN_ALWAYS => libc::O_CREAT,
            _ => 0,
        };
        if options & open_option::DIRECTORY != 0 {
            flags |= libc::O_DIRECTORY;
        }
        // Look before opening: an O_PATH descriptor runs no driver code, so
        // a device node in a granted directory is refused without its
        // open (tape rewind, tty, watchdog) ever running; an existing
        // regular file or directory is then reopened through that very
        // descriptor, so nothing can be swapped in between.
        let fd = match t.open(
            libc::O_PATH | libc::O_CLOEXEC | (flags & libc::O_DIRECTORY),
            0,
        ) {
            Ok(p) => {
                match sys::file_type(p.as_fd()).map_err(map_errno)? {
                    libc::S_IFREG | libc::S_IFDIR => {}
                    _ => {
                        self.log(&format!(
                            "moat: refused {} (not a regular file or directory)",
                            sanitize(&u.canonical())
                        ));
                        return Err(Error::NotSupported);
                    }
                }
                if disp == create::CREATE_NEW {
                    return Err(Error::AlreadyExists);
                }
                sys::reopen(p.as_fd(), flags & !(libc::O_CREAT | libc::O_EXCL))
                    .map_err(map_errno)?
            }
            // Not there yet: create it, exclusively, so that what we open is
            // the regular file we made (a name that appeared meanwhile is
            // refused: the picoprocess may retry).
            Err(Error::NotFound) if disp != create::OPEN_EXISTING => match t
                .open(flags | libc::O_EXCL, 0o644)
            {
                Err(Error::AlreadyExists) if disp != create::CREATE_NEW => return Err(Error::Io),
                r => r?,
            },
            Err(e) => return Err(e),
        };
        let kind = match sys::file_type(fd.as_fd()).map_err(map_errno)? {
            libc::S_IFREG => stream_kind::FILE,
            libc::S_IFDIR => stream_kind::DIRECTORY,
            _ => {
                self.log(&format!(
                    "moat: refused {} (not a regular file or directory)",
                    sanitize(&u.canonical())
                ));
                return Err(Error::NotSupported);
            }
        };
        if options & open_option::NONBLOCK == 0 {
            sys::set_nonblock(fd.as_fd(), false).map_err(map_errno)?;
        }
        Ok((fd, kind))
    }

    fn listen(&self, uri: &str) -> R<Reply> {
        let u = self.parse(uri)?;
        match &u {
            Uri::TcpServer(addr) => {
                self.check(&u, false)?;
                let l = self.session.tcp_listener(*addr).map_err(io_err)?;
                Ok(Reply::fd(
                    stream_kind::TCP_SERVER,
                    l.as_fd().try_clone_to_owned().map_err(io_err)?,
                ))
            }
            Uri::PipeServer(name) => {
                self.check(&u, false)?;
                let l = self.session.pipe_listener(name).map_err(io_err)?;
                Ok(Reply::fd(
                    stream_kind::PIPE_SERVER,
                    l.as_fd().try_clone_to_owned().map_err(io_err)?,
                ))
            }
            _ => Err(Error::InvalidArgument),
        }
    }

    fn stat(&self, uri: &str) -> R<Reply> {
        let u = self.parse(uri)?;
        let attrs = |kind, size, readable, writable, executable| {
            Ok(Reply {
                response: Response::Attrs {
                    kind,
                    size,
                    readable,
                    writable,
                    executable,
                },
                fds: Vec::new(),
            })
        };
        match &u {
            Uri::File(path) => {
                let grant = self.file_grant(&u, false)?;
                let t = Target::resolve(grant, path)?;
                let fd = t.open(libc::O_PATH | libc::O_CLOEXEC, 0)?;
                let st = sys::fstat(fd.as_fd()).map_err(map_errno)?;
                let writable = self.session.policy.check(&u, true).is_ok();
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFREG => attrs(
                        stream_kind::FILE,
                        st.st_size as u64,
                        true,
                        writable,
                        st.st_mode & 0o111 != 0,
                    ),
                    libc::S_IFDIR => attrs(stream_kind::DIRECTORY, 0, true, writable, false),
                    _ => Err(Error::NotSupported),
                }
            }
            Uri::Null => attrs(stream_kind::NULL, 0, true, true, false),
            Uri::Stdin => attrs(stream_kind::CONSOLE, 0, true, false, false),
            Uri::Stdout | Uri::Stderr => attrs(stream_kind::CONSOLE, 0, false, true, false),
            Uri::PipeServer(_) | Uri::PipeClient(_) | Uri::TcpClient(_) | Uri::TcpServer(_) => {
                self.check(&u, false)?;
                let kind = match u {
                    Uri::PipeServer(_) => stream_kind::PIPE_SERVER,
                    Uri::PipeClient(_) => stream_kind::PIPE,
                    Uri::TcpServer(_) => stream_kind::TCP_SERVER,
                    _ => stream_kind::TCP,
                };
                attrs(kind, 0, true, true, false)
            }
            Uri::Dns(_) | Uri::Dev(_) => Err(Error::NotSupported),
        }
    }

    fn writable_file(&self, uri: &str) -> R<(OwnedFd, String)> {
        let u = self.parse(uri)?;
        let Uri::File(path) = &u else {
            return Err(Error::NotSupported);
        };
        let grant = self.file_grant(&u, true)?;
        let (parent, name, _) = Target::resolve(grant, path)?.parent()?;
        Ok((parent, name))
    }

    fn rename(&self, from: &str, to: &str) -> R<()> {
        let (p1, n1) = self.writable_file(from)?;
        let (p2, n2) = self.writable_file(to)?;
        sys::renameat_noreplace(p1.as_fd(), &n1, p2.as_fd(), &n2).map_err(|e| match e {
            libc::EXDEV => Error::Io,
            e => map_errno(e),
        })
    }

    fn delete(&self, uri: &str) -> R<()> {
        let (parent, name) = self.writable_file(uri)?;
        match sys::unlinkat(parent.as_fd(), &name, 0) {
            Ok(()) => Ok(()),
            Err(libc::EISDIR) => {
                sys::unlinkat(parent.as_fd(), &name, libc::AT_REMOVEDIR).map_err(|e| match e {
                    libc::EEXIST => Error::DirectoryNotEmpty,
                    e => map_errno(e),
                })
            }
            Err(e) => Err(map_errno(e)),
        }
    }

    fn process_create(&self, uri: &str, args: Vec<String>) -> R<Reply> {
        let u = self.parse(uri)?;
        let Uri::File(path) = &u else {
            return Err(Error::InvalidArgument);
        };
        if args.len() > MAX_ARGS
            || args.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_ARGS_LEN
            || args.iter().any(|a| a.contains('\0'))
        {
            return Err(Error::InvalidArgument);
        }
        let grant = self.file_grant(&u, false)?;
        let fd = Target::resolve(grant, path)?.open(
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK,
            0,
        )?;
        if sys::file_type(fd.as_fd()).map_err(map_errno)? != libc::S_IFREG {
            return Err(Error::InvalidArgument);
        }
        let image = File::from(fd);
        let limits = self.session.policy.limits;
        if let Err(msg) = crate::monitor::check_image(&image, &limits) {
            self.log(&format!(
                "moat: [picoprocess {}] cannot start {}: {}",
                self.name,
                sanitize(&u.canonical()),
                msg
            ));
            return Err(Error::InvalidArgument);
        }
        // Reserve a slot of the tree's process limit.
        {
            let mut t = self.session.procs.lock().unwrap_or_else(|e| e.into_inner());
            if t.children >= limits.processes {
                drop(t);
                self.log(&format!(
                    "moat: [picoprocess {}] refused to start {}: the process limit ({}) is reached",
                    self.name,
                    sanitize(&u.canonical()),
                    limits.processes
                ));
                return Err(Error::LimitExceeded);
            }
            t.children += 1;
        }
        let name = path.rsplit('/').next().unwrap_or(path).to_string();
        let mut all = Vec::with_capacity(args.len() + 1);
        all.push(name.clone());
        all.extend(args);
        // Non-blocking from the start: the picoprocess may not change
        // descriptor flags itself (F_SETFL is not on its allow-list).
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| map_errno(e as i32))?;
        match crate::monitor::start(&self.session, image, name, all, Some(w), true) {
            Ok(_) => Ok(Reply::fd(0, r)),
            Err(e) => {
                self.session
                    .procs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .children -= 1;
                self.log(&format!(
                    "moat: [picoprocess {}] cannot start {}: {e}",
                    self.name,
                    sanitize(&u.canonical())
                ));
                Err(Error::Io)
            }
        }
    }
}

/// A one-line description of a request for `--trace`.
fn summary(req: &Request) -> String {
    match req {
        Request::Open {
            uri,
            access,
            create,
            options,
        } => {
            format!(
                "open {} access={access} create={create} options={options}",
                sanitize(uri)
            )
        }
        Request::Listen { uri } => format!("listen {}", sanitize(uri)),
        Request::Stat { uri } => format!("stat {}", sanitize(uri)),
        Request::Rename { from, to } => format!("rename {} {}", sanitize(from), sanitize(to)),
        Request::Delete { uri } => format!("delete {}", sanitize(uri)),
        Request::ProcessCreate { uri, args } => {
            format!("process-create {} ({} args)", sanitize(uri), args.len())
        }
        Request::Debug { .. } | Request::Report { .. } => String::new(),
    }
}

fn acc_mode(acc: u32) -> libc::c_int {
    let r = acc & access::READ != 0;
    let w = acc & (access::WRITE | access::APPEND) != 0;
    match (r, w) {
        (true, true) => libc::O_RDWR,
        (false, true) => libc::O_WRONLY,
        _ => libc::O_RDONLY,
    }
}

/// errno -> ABI error. Escape attempts refused by `RESOLVE_BENEATH`
/// (EXDEV, ELOOP) are permission errors.
pub fn map_errno(e: i32) -> Error {
    match e {
        libc::ENOENT => Error::NotFound,
        libc::EEXIST => Error::AlreadyExists,
        libc::EACCES | libc::EPERM | libc::EXDEV | libc::ELOOP | libc::EROFS => {
            Error::PermissionDenied
        }
        libc::EISDIR => Error::IsDirectory,
        libc::ENOTDIR => Error::NotDirectory,
        libc::ENOTEMPTY => Error::DirectoryNotEmpty,
        libc::ECONNREFUSED => Error::ConnectionRefused,
        libc::EMFILE | libc::ENFILE => Error::LimitExceeded,
        libc::ENAMETOOLONG | libc::EINVAL => Error::InvalidArgument,
        libc::ENOMEM => Error::NoMemory,
        _ => Error::Io,
    }
}

fn io_err(e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(n) => map_errno(n),
        None if e.kind() == std::io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
        None => Error::Io,
    }
}

/// A `file:` path resolved to where the kernel resolves it.
enum Target {
    /// `rel` (non-empty; `.` for the grant itself) beneath the grant's
    /// directory `base` (whose absolute path is `base_path`, opened with
    /// `base_resolve`).
    Beneath {
        base: OwnedFd,
        base_path: String,
        base_resolve: u64,
        rel: String,
    },
    /// The grant names a file (or something not there yet): only `name` in
    /// `parent`, no symlinks followed.
    Single { parent: OwnedFd, name: String },
}

fn split_last(p: &str) -> (&str, &str) {
    match p.rfind('/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => ("", p),
    }
}

impl Target {
    fn resolve(grant: &Grant, path: &str) -> R<Target> {
        let (base, rel) = grant.split_file(path).ok_or(Error::PermissionDenied)?;
        // A grant's real path had its symlinks resolved when it was made:
        // none may have appeared in it since. A grant of a path that did
        // not exist then: its directory as the host has it, and its own
        // name not a symlink.
        let base_resolve = if grant.real_path.is_some() {
            sys::RESOLVE_NO_SYMLINKS | sys::RESOLVE_NO_MAGICLINKS
        } else {
            sys::RESOLVE_NO_MAGICLINKS
        };
        let dir_flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let opened = if grant.real_path.is_some() || base == "/" {
            sys::openat2_abs(base, dir_flags, base_resolve)
        } else {
            let (dir, name) = split_last(base);
            let dir = if dir.is_empty() { "/" } else { dir };
            sys::openat2_abs(dir, dir_flags, base_resolve).and_then(|parent| {
                let no_links =
                    sys::RESOLVE_BENEATH | sys::RESOLVE_NO_SYMLINKS | sys::RESOLVE_NO_MAGICLINKS;
                sys::openat2(parent.as_fd(), name, dir_flags, 0, no_links)
            })
        };
        match opened {
            Ok(fd) => Ok(Target::Beneath {
                base: fd,
                base_path: base.to_string(),
                base_resolve,
                rel: if rel.is_empty() {
                    ".".into()
                } else {
                    rel.to_string()
                },
            }),
            Err(libc::ENOTDIR | libc::ENOENT) if rel.is_empty() && base != "/" => {
                let (dir, name) = split_last(base);
                let dir = if dir.is_empty() { "/" } else { dir };
                let parent = sys::openat2_abs(dir, dir_flags, base_resolve).map_err(map_errno)?;
                Ok(Target::Single {
                    parent,
                    name: name.to_string(),
                })
            }
            Err(e) => Err(map_errno(e)),
        }
    }

    /// Open the target itself.
    fn open(&self, flags: libc::c_int, mode: u32) -> R<OwnedFd> {
        let beneath = sys::RESOLVE_BENEATH | sys::RESOLVE_NO_MAGICLINKS;
        match self {
            Target::Beneath { base, rel, .. } => {
                sys::openat2(base.as_fd(), rel, flags, mode, beneath)
            }
            Target::Single { parent, name } => sys::openat2(
                parent.as_fd(),
                name,
                flags,
                mode,
                beneath | sys::RESOLVE_NO_SYMLINKS,
            ),
        }
        .map_err(map_errno)
    }

    /// The directory the target's name lives in, the name (for mkdir,
    /// unlink, rename: they act on the name, not what it points to), and
    /// the resolve flags to open that name with afterwards.
    fn parent(self) -> R<(OwnedFd, String, u64)> {
        let beneath = sys::RESOLVE_BENEATH | sys::RESOLVE_NO_MAGICLINKS;
        match self {
            // The name is all the grant covers: never follow it elsewhere.
            Target::Single { parent, name } => {
                Ok((parent, name, beneath | sys::RESOLVE_NO_SYMLINKS))
            }
            Target::Beneath {
                base_path,
                base_resolve,
                rel,
                ..
            } if rel == "." => {
                // The grant's directory itself.
                if base_path == "/" {
                    return Err(Error::PermissionDenied);
                }
                let (dir, name) = split_last(&base_path);
                let dir = if dir.is_empty() { "/" } else { dir };
                let parent = sys::openat2_abs(
                    dir,
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    base_resolve,
                )
                .map_err(map_errno)?;
                Ok((parent, name.to_string(), beneath | sys::RESOLVE_NO_SYMLINKS))
            }
            Target::Beneath { base, rel, .. } => {
                let (dir, name) = split_last(&rel);
                let parent = if dir.is_empty() {
                    base
                } else {
                    sys::openat2(
                        base.as_fd(),
                        dir,
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                        0,
                        beneath,
                    )
                    .map_err(map_errno)?
                };
                Ok((parent, name.to_string(), beneath))
            }
        }
    }
}

/// The broker's raw file-system calls. Each returns the errno on failure.
mod sys {
    use super::*;

    pub const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    pub const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    pub const RESOLVE_BENEATH: u64 = 0x08;

    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    }

    fn c(s: &str) -> Result<CString, i32> {
        CString::new(s).map_err(|_| libc::EINVAL)
    }

    fn owned(fd: RawFd) -> Result<OwnedFd, i32> {
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: the kernel just returned this new descriptor; we own it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn check(r: libc::c_int) -> Result<(), i32> {
        if r < 0 {
            Err(errno())
        } else {
            Ok(())
        }
    }

    /// `open` of an absolute path the monitor trusts (a grant's base, /dev/null).
    pub fn open_abs(path: &str, flags: libc::c_int) -> Result<OwnedFd, i32> {
        let p = c(path)?;
        // SAFETY: `p` is a NUL-terminated string alive for the call.
        owned(unsafe { libc::open(p.as_ptr(), flags, 0) })
    }

    /// `openat2` of an absolute path (a grant's base, or its parent).
    pub fn openat2_abs(path: &str, flags: libc::c_int, resolve: u64) -> Result<OwnedFd, i32> {
        if !path.starts_with('/') {
            return Err(libc::EINVAL);
        }
        openat2_raw(libc::AT_FDCWD, path, flags, 0, resolve)
    }

    /// `openat2(dir, path, {flags, mode, resolve})`.
    /// Open again, with `flags`, the file an `O_PATH` descriptor names
    /// (through its /proc/self/fd magic link, which the monitor may follow).
    pub fn reopen(p: BorrowedFd<'_>, flags: libc::c_int) -> Result<OwnedFd, i32> {
        let path =
            std::ffi::CString::new(format!("/proc/self/fd/{}", p.as_raw_fd())).expect("no NUL");
        // SAFETY: open of a NUL-terminated path; we own the result.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn openat2(
        dir: BorrowedFd<'_>,
        path: &str,
        flags: libc::c_int,
        mode: u32,
        resolve: u64,
    ) -> Result<OwnedFd, i32> {
        openat2_raw(dir.as_raw_fd(), path, flags, mode, resolve)
    }

    fn openat2_raw(
        dir: RawFd,
        path: &str,
        flags: libc::c_int,
        mode: u32,
        resolve: u64,
    ) -> Result<OwnedFd, i32> {
        let p = c(path)?;
        let how = OpenHow {
            flags: flags as u64,
            mode: if flags & libc::O_CREAT != 0 {
                mode as u64
            } else {
                0
            },
            resolve,
        };
        loop {
            // SAFETY: `dir` is AT_FDCWD or a descriptor borrowed for the
            // call; `p` and `how` are valid for the call; the kernel reads
            // `size_of::<OpenHow>()` bytes of `how`.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    dir,
                    p.as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            };
            // RESOLVE_BENEATH lookups may fail with EAGAIN when a rename raced.
            if r < 0 && matches!(errno(), libc::EAGAIN | libc::EINTR) {
                continue;
            }
            return owned(r as RawFd);
        }
    }

    pub fn mkdirat(dir: BorrowedFd<'_>, name: &str, mode: u32) -> Result<(), i32> {
        let n = c(name)?;
        // SAFETY: valid descriptor and NUL-terminated name.
        check(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode) })
    }

    pub fn unlinkat(dir: BorrowedFd<'_>, name: &str, flags: libc::c_int) -> Result<(), i32> {
        let n = c(name)?;
        // SAFETY: valid descriptor and NUL-terminated name.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) })
    }

    pub fn renameat_noreplace(
        d1: BorrowedFd<'_>,
        n1: &str,
        d2: BorrowedFd<'_>,
        n2: &str,
    ) -> Result<(), i32> {
        let (a, b) = (c(n1)?, c(n2)?);
        // SAFETY: valid descriptors and NUL-terminated names.
        check(unsafe {
            libc::renameat2(
                d1.as_raw_fd(),
                a.as_ptr(),
                d2.as_raw_fd(),
                b.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        })
    }

    pub fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat, i32> {
        // SAFETY: stat is plain data; zeroed is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor; `st` is valid for writes.
        check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        Ok(st)
    }

    pub fn file_type(fd: BorrowedFd<'_>) -> Result<libc::mode_t, i32> {
        Ok(fstat(fd)?.st_mode & libc::S_IFMT)
    }

    pub fn set_nonblock(fd: BorrowedFd<'_>, on: bool) -> Result<(), i32> {
        // SAFETY: fcntl F_GETFL/F_SETFL on a valid descriptor.
        let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        check(fl)?;
        let nfl = if on {
            fl | libc::O_NONBLOCK
        } else {
            fl & !libc::O_NONBLOCK
        };
        if nfl != fl {
            // SAFETY: as above.
            check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, nfl) })?;
        }
        Ok(())
    }

    /// Connect a non-blocking Unix stream socket to an abstract address:
    /// EAGAIN when the listener's backlog is full.
    pub fn connect_nonblocking(addr: &std::os::unix::net::SocketAddr) -> Result<OwnedFd, i32> {
        let name = addr.as_abstract_name().ok_or(libc::EINVAL)?;
        // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        if name.len() + 1 > sa.sun_path.len() {
            return Err(libc::ENAMETOOLONG);
        }
        for (i, b) in name.iter().enumerate() {
            sa.sun_path[i + 1] = *b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
        // SAFETY: plain socket creation.
        let fd = owned(unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        })?;
        // SAFETY: `sa` is a valid sockaddr_un of which `len` bytes are used.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_un as *const libc::sockaddr,
                len as u32,
            )
        };
        check(r)?;
        Ok(fd)
    }
}
