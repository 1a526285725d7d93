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
//! sends it the configuration ([`Config`](moat_host_common::protocol::Config)) with the image descriptor, and runs a monitor
//! thread that answers the loader's requests through the
//! [`Broker`](crate::broker::Broker) until the loader's socket closes. A
//! waiter thread reaps the loader and turns its status into an [`Exit`].
use crate::error::{Error, Exit};
use crate::image_check::check_image;
use crate::monitor::start;
use crate::proc::Proc;
use crate::session::{Console, LogSink, Session};
use crate::shm::{HostSection, Section};
pub use moat_host_common::protocol::CheckpointOptions;
use moat_policy::{Access, Limits, Policy};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A picoprocess to start: image, arguments, grants, console. A builder.
#[derive(Debug)]
pub struct Sandbox {
    image: PathBuf,
    args: Vec<String>,
    policy: Policy,
    stdio: [Stdio; 3],
    log: LogSink,
    trace: Option<crate::trace::TraceOptions>,
    layers: Vec<moat_layers::LayerName>,
    host: crate::Host,
    /// Host sections to give the session before the picoprocess starts.
    sections: Vec<(String, Arc<Section>, u64)>,
    /// `image` is a checkpoint to restore ([`Sandbox::restore`]).
    restore: bool,
    /// Where to write a template ([`Sandbox::template`]).
    template: Option<File>,
    /// Descriptors handed to devices ([`Sandbox::device_file`]).
    device_files: Vec<(String, File)>,
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
            trace: None,
            layers: Vec::new(),
            host: crate::Host::Linux,
            restore: false,
            sections: Vec::new(),
            template: None,
            device_files: Vec::new(),
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
        self.trace = on.then(crate::trace::TraceOptions::default);
        self
    }

    /// Trace every ABI call through a trace layer outermost (and, when
    /// the lines go to the log, every brokered request): records in a
    /// ring the monitor drains, decoded to the log or saved to
    /// `options.file` (see [`crate::trace`]).
    pub fn trace_with(mut self, options: crate::trace::TraceOptions) -> Self {
        self.trace = Some(options);
        self
    }

    /// The options of the trace layers the stack names
    /// ([`Sandbox::layers`]), without adding one on top.
    pub fn trace_ring(mut self, options: crate::trace::TraceOptions) -> Self {
        self.trace = Some(crate::trace::TraceOptions {
            outermost: false,
            ..options
        });
        self
    }

    /// Stack `layers` between the picoprocess (and its children) and the
    /// PAL, outermost first, on either host: the same layer code runs
    /// above both PALs. Layers run inside the confined process, so a stack
    /// is made of the layers moat has ([`LayerName`](moat_layers::LayerName));
    /// at most [`MAX_LAYERS`](moat_layers::MAX_LAYERS).
    pub fn layers(mut self, layers: &[moat_layers::LayerName]) -> Self {
        self.layers = layers.to_vec();
        self
    }

    /// Give the session the host's shared section `section` as
    /// `shm:NAME` before the picoprocess starts (the host is its creator
    /// side; see [`crate::shm`]). The picoprocess still needs a grant for
    /// `shm:NAME` to open it.
    pub fn section(mut self, name: &str, section: &HostSection) -> Result<Self, Error> {
        crate::shm::check_name(name)?;
        self.sections
            .push((name.to_string(), section.shared().clone(), section.len()));
        Ok(self)
    }

    /// A picoprocess restored from the checkpoint at `path` (`moat
    /// checkpoint`): it goes on where it was frozen, on this sandbox's
    /// host, with this sandbox's grants (a checkpoint carries none: every
    /// file it held is opened again under them) and console. Its limits
    /// must be at least those it ran with. It can be checkpointed again.
    pub fn restore(path: impl AsRef<Path>) -> Self {
        let mut s = Sandbox::new(path);
        s.restore = true;
        s.layers.push(moat_layers::LayerName::Checkpoint);
        s
    }

    /// Make the picoprocess checkpointable: a checkpoint layer innermost
    /// in its stack, and a control socket for [`Picoprocess::checkpoint`].
    pub fn checkpointable(mut self) -> Self {
        if !self.layers.contains(&moat_layers::LayerName::Checkpoint) {
            self.layers.push(moat_layers::LayerName::Checkpoint);
        }
        self
    }

    /// Take a template of the picoprocess: a checkpoint written to `file`
    /// (empty, writable) at its first `DkStreamOpen`, before that open is
    /// made, while it goes on (see [`Picoprocess::template_written`]).
    /// What it holds then is what it built before opening anything but
    /// its console; each [`Sandbox::restore`] of the file starts there,
    /// its memory mapped copy-on-write from the file, and makes that
    /// open under its own grants (a fresh section, another file). Makes
    /// the picoprocess [`checkpointable`](Sandbox::checkpointable). Not
    /// with [`Sandbox::restore`]: a template is taken from an image.
    pub fn template(mut self, file: File) -> Self {
        self.template = Some(file);
        self.checkpointable()
    }

    /// Hand the device `name` (declared in the policy; kvm only) an open
    /// descriptor: a `virtio-net` device's wire (a TAP interface's, opened
    /// without `IFF_VNET_HDR`; it needs one), or a `uart` device's line
    /// (bytes the UART transmits are written to it, bytes read from it
    /// are received; without one the line is the console). The
    /// picoprocess gets its own copy; the caller may keep `file`'s other
    /// copies, so the wire outlives the picoprocess. The copies share one
    /// open file description: a virtio-net device makes it non-blocking
    /// for every holder.
    pub fn device_file(mut self, name: &str, file: File) -> Self {
        self.device_files.push((name.to_owned(), file));
        self
    }

    /// Check the image and start the picoprocess.
    pub fn spawn(mut self) -> Result<Picoprocess, Error> {
        if self.restore && self.template.is_some() {
            return Err(Error::BadInput(
                "a template is taken from an image, not from a restore".into(),
            ));
        }
        self.policy.limits.validate()?;
        let shown = self.image.display().to_string();
        let image = File::open(&self.image).map_err(|e| Error::Image {
            path: shown.clone(),
            msg: format!("cannot open: {e}"),
        })?;
        let (name, args) = if self.restore {
            if !self.layers.contains(&moat_layers::LayerName::Checkpoint) {
                self.layers.push(moat_layers::LayerName::Checkpoint);
            }
            let c = crate::checkpoint_file::check(&image, &self.policy)
                .map_err(|msg| Error::BadInput(format!("{shown} {msg}")))?;
            (c.args[0].clone(), c.args)
        } else {
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
            (name, args)
        };
        let restore = self.restore;
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
        if self.layers.len() > moat_layers::MAX_LAYERS {
            return Err(Error::BadInput(format!(
                "{} layers; a stack holds at most {}",
                self.layers.len(),
                moat_layers::MAX_LAYERS
            )));
        }
        let session = Session::on_host(
            self.host,
            self.policy,
            self.log,
            self.trace,
            self.layers,
            console,
        )?;
        for (name, section, len) in self.sections {
            session.attach(&name, section, len)?;
        }
        let root = start(
            &session,
            image,
            name,
            args,
            None,
            false,
            crate::monitor::Origin {
                restore,
                template: self.template,
                device_files: self.device_files,
            },
        )?;
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

/// A handle that asks a checkpointable picoprocess for checkpoints from
/// any thread ([`Picoprocess::controller`]).
#[derive(Clone)]
pub struct Controller(Arc<Proc>);

impl Controller {
    /// As [`Picoprocess::template_written`].
    pub fn template_written(&self, limit: std::time::Duration) -> Result<Option<u64>, Error> {
        self.0.template_written(limit).map_err(|why| {
            Error::BadInput(format!("no template: {}", crate::session::sanitize(&why)))
        })
    }

    /// As [`Picoprocess::checkpoint`].
    pub fn checkpoint(&self, file: &File, opts: CheckpointOptions) -> Result<u64, Error> {
        self.0.checkpoint(file, opts).map_err(|why| {
            Error::BadInput(format!(
                "cannot checkpoint the picoprocess: {}",
                crate::session::sanitize(&why)
            ))
        })
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

    /// What its VMM has counted so far (`--host kvm` only): VM exits by
    /// reason, and the work of its virtio-blk I/O threads. Readable after
    /// it ended too (the last counts stay).
    pub fn vm_stats(&self) -> Option<moat_host_common::vmstats::VmStats> {
        self.root.vm_stats()
    }

    /// A handle that can kill this picoprocess from any thread, while
    /// another waits for it (through its pidfd: never a reused pid).
    pub fn killer(&self) -> Killer {
        Killer(self.root.clone())
    }

    /// A descriptor that becomes readable once the picoprocess has ended
    /// (a duplicate of its pidfd), to wait for its end with `poll(2)`
    /// beside other things. Reading it is not reaping it: call
    /// [`Picoprocess::wait`] for that.
    pub fn exit_fd(&self) -> Result<OwnedFd, Error> {
        self.root
            .pidfd
            .try_clone()
            .map_err(|e| Error::io("cannot duplicate the picoprocess's pidfd", e))
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

    /// A handle for checkpoints from another thread while one waits.
    pub fn controller(&self) -> Controller {
        Controller(self.root.clone())
    }

    /// Freeze the picoprocess and write it to `file` (empty, writable; see
    /// `moat_checkpoint`); then it ends (exit 0), or goes on with
    /// `opts.leave_running`. Returns the file's length. Fails (the picoprocess
    /// going on) if it was not made [`Sandbox::checkpointable`], holds
    /// what cannot be carried, or does not stop in time; the error says
    /// which.
    pub fn checkpoint(&self, file: &File, opts: CheckpointOptions) -> Result<u64, Error> {
        self.controller().checkpoint(file, opts)
    }

    /// The template [`Sandbox::template`] asked for: its length once
    /// written, `None` if it is not within `limit` (the picoprocess has
    /// not opened a stream yet). Fails if it was not asked for, could
    /// not be written (the picoprocess goes on), or the picoprocess
    /// ended first.
    pub fn template_written(&self, limit: std::time::Duration) -> Result<Option<u64>, Error> {
        self.root.template_written(limit).map_err(|why| {
            Error::BadInput(format!("no template: {}", crate::session::sanitize(&why)))
        })
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

    /// Make a shared section of `size` bytes and give it to this
    /// picoprocess's session as `shm:NAME` (see
    /// [`Session::shm_create`]): the host's side of it.
    pub fn shm_create(&self, name: &str, size: u64) -> Result<HostSection, Error> {
        self.session.shm_create(name, size)
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
