//! `moat checkpoint` and `moat restore`, and the control socket of a
//! `moat run --checkpointable` they talk to.
//!
//! A checkpointable `moat run` listens on the abstract Unix socket
//! `moat-run-<its pid>` (SOCK_SEQPACKET). `moat checkpoint PID FILE`
//! creates FILE itself (so the file is the caller's, made with the
//! caller's rights), connects, and sends the request with FILE's
//! descriptor; `moat run` answers only a peer of its own user (or root).
//! A checkpoint that fails leaves no FILE behind.
use crate::bad_input;
use crate::run::{self, Host, RunArgs};
use clap::Args;
use moat_host_common::protocol::{self, Control, ControlReply};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// The pid of the `moat run --checkpointable` process.
    #[arg(value_name = "MOAT_PID")]
    pub pid: u32,
    /// Where to write the checkpoint (created, or replaced).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Let the picoprocess go on after the checkpoint (it ends by default).
    #[arg(long = "leave-running")]
    pub leave_running: bool,
    /// Carry what cannot be carried (pipes, sockets, servers, devices,
    /// child picoprocesses) as closed handles, instead of failing.
    #[arg(long = "close-uncarried")]
    pub close_uncarried: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The host to restore on (either; the checkpoint may come from the
    /// other one).
    #[arg(long, value_enum, default_value_t = Host::Linux)]
    pub host: Host,
    /// A manifest (TOML) with grants and limits.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Grant reading and writing below URI_PREFIX (repeatable): a
    /// checkpoint carries no grants; each file it held is opened again.
    #[arg(long, value_name = "URI_PREFIX")]
    pub allow: Vec<String>,
    /// Grant reading below URI_PREFIX (repeatable).
    #[arg(long = "allow-ro", value_name = "URI_PREFIX")]
    pub allow_ro: Vec<String>,
    /// The checkpoint (`moat checkpoint`).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The abstract socket name of `moat run` process `pid`.
fn socket_name(pid: u32) -> String {
    format!("moat-run-{pid}")
}

fn abstract_addr(name: &str) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // Abstract: a NUL first, then the name (not NUL-terminated).
    for (i, b) in name.bytes().enumerate().take(a.sun_path.len() - 1) {
        a.sun_path[i + 1] = b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    (a, len as libc::socklen_t)
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); on success we own the descriptor.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `moat run --checkpointable`: serve checkpoint requests for `c` on a
/// thread of its own, for as long as the process lives.
pub fn listen(c: moat_monitor::Controller) -> Result<(), String> {
    let sock = seqpacket().map_err(|e| format!("cannot make the control socket: {e}"))?;
    let (addr, len) = abstract_addr(&socket_name(std::process::id()));
    // SAFETY: bind/listen on our socket with a valid address of `len` bytes.
    let ok = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        ) == 0
            && libc::listen(sock.as_raw_fd(), 4) == 0
    };
    if !ok {
        return Err(format!(
            "cannot listen for checkpoint requests: {}",
            std::io::Error::last_os_error()
        ));
    }
    std::thread::Builder::new()
        .name("moat-control".into())
        .spawn(move || loop {
            // SAFETY: accept4 on our listening socket; no address wanted.
            let fd = unsafe {
                libc::accept4(
                    sock.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                continue;
            }
            // SAFETY: a fresh descriptor from accept4.
            let conn = unsafe { OwnedFd::from_raw_fd(fd) };
            serve_one(&c, &conn);
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the control thread: {e}"))
}

/// The peer's uid.
fn peer_uid(conn: &OwnedFd) -> Option<u32> {
    // SAFETY: a zeroed ucred is valid; getsockopt fills it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED into a ucred of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

fn serve_one(c: &moat_monitor::Controller, conn: &OwnedFd) {
    // SAFETY: no arguments.
    let me = unsafe { libc::geteuid() };
    let reply = match peer_uid(conn) {
        Some(uid) if uid == me || uid == 0 => match protocol::recv::<Control>(conn.as_fd()) {
            Ok((Control::Checkpoint(opts), mut fds)) if fds.len() == 1 => {
                let file = std::fs::File::from(fds.remove(0));
                match c.checkpoint(&file, opts) {
                    Ok(bytes) => ControlReply::Done { bytes },
                    Err(e) => ControlReply::Failed { why: e.to_string() },
                }
            }
            _ => ControlReply::Failed {
                why: "a malformed request".into(),
            },
        },
        _ => ControlReply::Failed {
            why: "only its own user (or root) may checkpoint a picoprocess".into(),
        },
    };
    let _ = protocol::send(conn.as_fd(), &reply, &[]);
}

pub fn checkpoint(a: CheckpointArgs) -> i32 {
    let sock = match seqpacket() {
        Ok(s) => s,
        Err(e) => return bad_input(format!("cannot make a socket: {e}")),
    };
    let (addr, len) = abstract_addr(&socket_name(a.pid));
    // SAFETY: connect our socket to a valid address of `len` bytes.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    };
    if r != 0 {
        return bad_input(format!(
            "process {} is not a `moat run --checkpointable` (nothing listens for checkpoint requests there)",
            a.pid
        ));
    }
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&a.file)
    {
        Ok(f) => f,
        Err(e) => return bad_input(format!("cannot write {}: {e}", a.file.display())),
    };
    let sent = protocol::send(
        sock.as_fd(),
        &Control::Checkpoint(protocol::CheckpointOptions {
            leave_running: a.leave_running,
            close_uncarried: a.close_uncarried,
        }),
        &[file.as_raw_fd()],
    );
    let reply = sent
        .map_err(|e| e.to_string())
        .and_then(|()| protocol::recv::<ControlReply>(sock.as_fd()).map_err(|e| e.to_string()));
    match reply {
        Ok((ControlReply::Done { bytes }, _)) => {
            eprintln!(
                "moat: checkpoint written to {} ({bytes} bytes)",
                a.file.display()
            );
            0
        }
        Ok((ControlReply::Failed { why }, _)) => {
            let _ = std::fs::remove_file(&a.file);
            bad_input(why)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&a.file);
            bad_input(format!("process {} did not answer: {e}", a.pid))
        }
    }
}

pub fn restore(a: RestoreArgs) -> i32 {
    run::main(RunArgs {
        host: a.host,
        manifest: a.manifest,
        allow: a.allow,
        allow_ro: a.allow_ro,
        devices: Vec::new(),
        trace: None,
        trace_filter: None,
        trace_ring: None,
        layer: None,
        checkpointable: true,
        restore: true,
        image: Some(a.file.display().to_string()),
        args: Vec::new(),
    })
}
