//! The monitor's side of every loader request, with the [`Policy`](moat_policy::Policy) as the
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
//! pipe and TCP listeners, shared sections, the process count); a
//! [`Broker`] is one picoprocess's view of it. Shared sections (`shm:`)
//! are `section`'s.
mod at;
mod resolve;
mod section;

use crate::session::sanitize;
pub use crate::session::{Console, LogSink, ReportSlot, Session, MAX_LISTENERS};
use moat_host_common::errno::to_pal as map_errno;
use moat_host_common::protocol::{ReportKind, Request, Response};
use moat_pal::uri::Uri;
use moat_pal::{access, create, open_option, stream_kind, Error};
use moat_policy::Grant;
use resolve::Target;
use std::fs::File;
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

/// How the broker starts a child picoprocess (the monitor's start, handed
/// in by the monitor so that the broker does not depend on it): the image,
/// the child's name, its arguments (its name first) and the descriptor its
/// exit code is written to. Errors are one line for the log.
pub type StartChild = fn(&Arc<Session>, File, String, Vec<String>, OwnedFd) -> Result<(), String>;

/// Most bytes of arguments a child picoprocess may be given (the ABI's limit).
pub const MAX_ARGS_LEN: usize = moat_pal::limits::MAX_ARGS_LEN as usize;
/// Most arguments a child picoprocess may be given.
pub const MAX_ARGS: usize = 4096;
/// How long the monitor tries to connect a `tcp.client:` stream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

/// One picoprocess's broker.
pub struct Broker {
    session: Arc<Session>,
    /// How to start children (`None`: ProcessCreate is not supported).
    start_child: Option<StartChild>,
    name: String,
    report: ReportSlot,
    /// DkDebugStringPrint bytes logged so far.
    debug_bytes: u64,
    /// Refusal and debug lines it may still log now (see [`LOG_BURST`]).
    lines: std::sync::Mutex<LineBudget>,
}

/// Most debug output one picoprocess may put in the host's log.
pub const DEBUG_BUDGET: u64 = 1 << 20;

/// Refusal and debug lines one picoprocess may log at once; after that,
/// [`LOG_LINES_PER_SECOND`]. Lines over the rate are counted and summed
/// up in one "N more lines suppressed" line (when logging resumes, and
/// when the picoprocess ends), so a guest cannot flood the host's log.
pub const LOG_BURST: f64 = 64.0;
/// See [`LOG_BURST`].
pub const LOG_LINES_PER_SECOND: f64 = 10.0;

/// A token bucket of log lines.
#[derive(Debug)]
struct LineBudget {
    tokens: f64,
    at: std::time::Instant,
    suppressed: u64,
}

impl LineBudget {
    fn new() -> LineBudget {
        LineBudget {
            tokens: LOG_BURST,
            at: std::time::Instant::now(),
            suppressed: 0,
        }
    }

    /// Whether one more line may go out now; if it may, how many were
    /// suppressed before it (to say so first).
    fn take(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * LOG_LINES_PER_SECOND;
        self.tokens = (self.tokens + refill).min(LOG_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

pub(crate) type R<T> = Result<T, Error>;

impl Broker {
    /// A broker for the picoprocess `name` in `session`.
    pub fn new(session: Arc<Session>, name: impl Into<String>) -> Broker {
        Broker {
            debug_bytes: 0,
            session,
            start_child: None,
            name: sanitize(&name.into()),
            report: Arc::new(std::sync::Mutex::new(None)),
            lines: std::sync::Mutex::new(LineBudget::new()),
        }
    }

    /// Keep the picoprocess's report in `slot` (shared with whoever reaps it).
    pub fn with_report_slot(mut self, slot: ReportSlot) -> Broker {
        self.report = slot;
        self
    }

    /// Let this broker start child picoprocesses with `start`.
    pub fn with_start_child(mut self, start: StartChild) -> Broker {
        self.start_child = Some(start);
        self
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

    /// Log a refusal or debug line, within the picoprocess's line budget.
    fn log(&self, line: &str) {
        let mut b = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        match b.take() {
            None => {}
            Some(0) => self.session.log().line(line),
            Some(n) => {
                self.session.log().line(&self.suppressed_line(n));
                self.session.log().line(line);
            }
        }
    }

    fn suppressed_line(&self, n: u64) -> String {
        format!(
            "[picoprocess {}] {n} more lines suppressed (refusals and debug output are limited to {LOG_LINES_PER_SECOND} lines a second after {LOG_BURST})",
            self.name
        )
    }

    /// Handle one request. `None` for requests that take no answer
    /// (`Debug`, `Report`).
    pub fn handle(&mut self, req: Request) -> Option<Reply> {
        let what = if self.session.trace() {
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
            Request::SectionSize { uri, size } => self.section_size(&uri, size),
            Request::SectionMemory { uri, write } => self.section_memory(&uri, write),
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
                Response::Section { size, creator } => {
                    format!("section (size {size}, creator side: {creator})")
                }
                Response::Memory { size } => format!("memory (size {size})"),
                Response::Err { code } => match Error::from_code(-(*code as i64)) {
                    Some(e) => format!("{e:?}"),
                    None => format!("error {code}"),
                },
            };
            // --trace asked for every line: not rate-limited.
            self.session
                .log()
                .line(&format!("[picoprocess {}] {what} -> {res}", self.name));
        }
        Some(reply)
    }

    fn parse(&self, uri: &str) -> R<Uri> {
        Uri::parse_bytes(uri.as_bytes())
    }

    /// The policy check; a refusal is logged with what to grant.
    fn check(&self, uri: &Uri, write: bool) -> R<Option<&Grant>> {
        self.session.policy().check(uri, write).map_err(|r| {
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

    /// The grant that lets a `file:` URI through, as the directory to
    /// resolve it beneath (narrowed to a mapping's target where it lies in
    /// one: [`moat_policy::Policy::resolve_in`]).
    fn file_grant(&self, uri: &Uri, write: bool) -> R<&Grant> {
        let g = self.check(uri, write)?.ok_or(Error::PermissionDenied)?;
        Ok(self.session.policy().resolve_in(uri, g))
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
                let fd = at::open_abs("/dev/null", mode | libc::O_CLOEXEC | libc::O_NOCTTY)
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
                // No descriptor reaches a picoprocess through a pipe: set
                // before the connection exists, as the server may send at once.
                let fd = at::connect_nonblocking(&addr, |s| {
                    self.session
                        .refuse_descriptors(s)
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
                })
                .map_err(|e| match e {
                    libc::EAGAIN => Error::LimitExceeded,
                    e => map_errno(e),
                })?;
                if !nonblock {
                    at::set_nonblock(fd.as_fd(), false).map_err(map_errno)?;
                }
                Ok(Reply::fd(stream_kind::PIPE, fd))
            }
            Uri::PipeServer(_) | Uri::TcpServer(_) => Err(Error::InvalidArgument),
            Uri::Shm(name) => self.open_section(&u, name, acc, disp, options),
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
            match at::mkdirat(parent.as_fd(), &name, 0o755) {
                Ok(()) => {}
                Err(libc::EEXIST) if disp != create::CREATE_NEW => {}
                Err(e) => return Err(map_errno(e)),
            }
            let fd = at::openat2(
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
                match at::file_type(p.as_fd()).map_err(map_errno)? {
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
                at::reopen(p.as_fd(), flags & !(libc::O_CREAT | libc::O_EXCL)).map_err(map_errno)?
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
        let kind = match at::file_type(fd.as_fd()).map_err(map_errno)? {
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
            at::set_nonblock(fd.as_fd(), false).map_err(map_errno)?;
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
                let st = at::fstat(fd.as_fd()).map_err(map_errno)?;
                let writable = self.session.policy().check(&u, true).is_ok();
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
            Uri::Shm(name) => self.stat_section(&u, name),
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
        at::renameat_noreplace(p1.as_fd(), &n1, p2.as_fd(), &n2).map_err(|e| match e {
            libc::EXDEV => Error::Io,
            e => map_errno(e),
        })
    }

    fn delete(&self, uri: &str) -> R<()> {
        let (parent, name) = self.writable_file(uri)?;
        match at::unlinkat(parent.as_fd(), &name, 0) {
            Ok(()) => Ok(()),
            Err(libc::EISDIR) => {
                at::unlinkat(parent.as_fd(), &name, libc::AT_REMOVEDIR).map_err(|e| match e {
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
        if at::file_type(fd.as_fd()).map_err(map_errno)? != libc::S_IFREG {
            return Err(Error::InvalidArgument);
        }
        let image = File::from(fd);
        let limits = self.session.policy().limits;
        if let Err(msg) = crate::image_check::check_image(&image, &limits) {
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
        let Some(start) = self.start_child else {
            self.session
                .procs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .children -= 1;
            return Err(Error::NotSupported);
        };
        match start(&self.session, image, name, all, w) {
            Ok(()) => Ok(Reply::fd(0, r)),
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
        Request::SectionSize { uri, size } => format!("section-size {} {size}", sanitize(uri)),
        Request::SectionMemory { uri, write } => {
            format!("section-memory {} write={write}", sanitize(uri))
        }
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

pub(crate) fn io_err(e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(n) => map_errno(n),
        None if e.kind() == std::io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
        None => Error::Io,
    }
}

impl Broker {
    /// The picoprocess's channel is done: sum up what its line budget
    /// suppressed (before its end is reported, so the summary is in the
    /// log by the time anyone waiting learns of the end).
    pub fn finish(&mut self) {
        let n = self
            .lines
            .get_mut()
            .map(|b| std::mem::take(&mut b.suppressed))
            .unwrap_or_default();
        if n > 0 {
            self.session.log().line(&self.suppressed_line(n));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.finish();
    }
}
