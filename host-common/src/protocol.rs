//! The wire between a picoprocess's loader and its monitor.
//!
//! One `SOCK_SEQPACKET` socket (descriptor 3 in the loader): each message
//! is one packet of at most [`MAX_MSG`] bytes, `postcard`-encoded, with up
//! to [`MAX_FDS`] descriptors attached as `SCM_RIGHTS`. The monitor sends
//! one [`Config`] first; then the loader sends [`Request`]s and the monitor
//! answers each (but `Debug` and `Report`) with one [`Response`]. The monitor treats everything it
//! receives as hostile: a malformed packet ends the picoprocess.
use moat_policy::Limits;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub const MAX_MSG: usize = 64 * 1024;
/// The image and up to [`moat_policy::device::MAX_DEVICES`] device backing files.
pub const MAX_FDS: usize = 16;
/// The loader's descriptor for the monitor socket.
pub const MONITOR_FD: RawFd = 3;

/// The VMM's descriptor for `/dev/kvm` (the monitor opens it: inside the
/// sandbox's user namespace the device node is out of reach).
pub const KVM_FD: RawFd = 4;

/// Exit code: the command line, manifest or image was not usable.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code: moat itself failed to start the sandbox.
pub const EXIT_HOST_FAILURE: i32 = 125;
/// Exit code: the picoprocess made a system call outside the allow-list
/// (128 + SIGSYS), or broke the loader protocol.
pub const EXIT_SANDBOX_VIOLATION: i32 = 159;

/// A zygote's set-up pipe, kept open across `execve`: it closes it once
/// its empty mount namespace is made (see `crate::mountns`), or writes
/// the failed stage and errno there first.
pub const SETUP_FD: RawFd = 5;

/// Sent once by the monitor, with the image descriptor attached, then the
/// statistics page's if [`Config::stats`], then the devices' backing
/// files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// Arguments, the image name first.
    pub args: Vec<String>,
    pub limits: Limits,
    /// A trace layer outermost (`--trace`).
    pub trace: bool,
    /// The trace ring, attached after the statistics page (when the stack
    /// has a trace layer).
    pub trace_ring: Option<moat_layers::TraceSetup>,
    /// The layers between the guest and the PAL, outermost first (after
    /// the trace layer of `trace`); see `moat_layers`.
    pub layers: Vec<moat_layers::LayerName>,
    /// The policy's `[[remap]]` mappings (for the `remap` layer).
    pub remaps: Vec<moat_policy::remap::Remap>,
    /// Devices granted (kvm only). Those with a file (a backing file the
    /// monitor opened, or a descriptor the embedder handed over) have its
    /// descriptor attached after the image's, in this order.
    pub devices: Vec<moat_policy::DeviceSpec>,
    /// Parallel to `devices`: whether a descriptor is attached for it.
    pub device_files: Vec<bool>,
    /// A statistics page is attached (kvm only; see `crate::vmstats`).
    pub stats: bool,
    /// The checkpoint layer is in the stack: a control socket is attached
    /// last, on which the monitor asks for checkpoints ([`Control`]).
    pub checkpoint: bool,
    /// The first descriptor is a checkpoint to restore, not an image.
    pub restore: bool,
    /// Take a template at the first stream open (see
    /// `moat_layers::checkpointer`), written to a descriptor attached
    /// after the control socket; answered on the control socket with
    /// [`ControlReply::Template`], unasked.
    pub template: bool,
}

/// What the monitor asks of a picoprocess with a checkpoint layer, on its
/// control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Control {
    /// Freeze, write the checkpoint to the attached descriptor (empty,
    /// writable), then end (or go on). Answer: [`ControlReply`].
    Checkpoint(CheckpointOptions),
}

/// How a checkpoint is taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOptions {
    /// The picoprocess goes on after the checkpoint (it ends by default).
    pub leave_running: bool,
    /// Handles that cannot be carried (pipes, sockets, servers, shared
    /// sections, child picoprocesses, stream events) are carried as
    /// closed: the restored picoprocess gets BadHandle for them. By
    /// default the checkpoint fails, naming the first. Devices are never
    /// carried, even so.
    pub close_uncarried: bool,
}

/// The answer to a [`Control`] request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlReply {
    /// Written: the file's length.
    Done { bytes: u64 },
    /// Not written; the picoprocess goes on. Why, in one line.
    Failed { why: String },
    /// The template [`Config::template`] asked for: its length, or why
    /// it was not written (the picoprocess goes on either way).
    Template(Result<u64, String>),
}

/// What the loader asks of the monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Open a stream (not servers). Answer: `Fd` with one descriptor.
    Open {
        uri: String,
        access: u32,
        create: u32,
        options: u32,
    },
    /// Create (or join) a `pipe.server:`/`tcp.server:` listener. Answer:
    /// `Fd` with the listening socket.
    Listen { uri: String },
    /// Attributes of a URI. Answer: `Attrs`.
    Stat { uri: String },
    /// Rename `from` to `to` (both `file:`). Answer: `Ok`.
    Rename { from: String, to: String },
    /// Delete a `file:` object. Answer: `Ok`.
    Delete { uri: String },
    /// Start a child picoprocess from a `file:` image with the caller's
    /// grants. Answer: `Fd` with the read end of a pipe that receives the
    /// child's exit code (4 bytes, i32 little-endian) when it ends.
    ProcessCreate { uri: String, args: Vec<String> },
    /// DkDebugStringPrint. No answer.
    Debug { text: String },
    /// The picoprocess is about to end abnormally; `text` says why. No
    /// answer: the loader exits right after sending it.
    Report { kind: ReportKind, text: String },
    // New variants go last: `signals::encode_report` writes `Report`'s
    // index by hand.
    /// Size the shared section `uri` (`shm:`) once, to `size` bytes.
    /// Answer: `Memory` with its memory (read-write) attached.
    SectionSize { uri: String, size: u64 },
    /// The memory of the shared section `uri`, read-write if `write` (the
    /// grant is checked again). Answer: `Memory`, with the memory attached
    /// once the section is sized.
    SectionMemory { uri: String, write: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportKind {
    /// A refused system call (seccomp).
    Violation,
    /// An exception no handler took.
    Exception,
    /// The loader could not start the image.
    Startup,
    /// A limit the kernel enforces ended it (its memory, in its cgroup).
    Limit,
}

/// What the monitor answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Ok,
    /// Descriptor(s) attached; `kind` is a `stream_kind` value.
    Fd {
        kind: u32,
    },
    Attrs {
        kind: u32,
        size: u64,
        readable: bool,
        writable: bool,
        executable: bool,
    },
    /// A shared section opened (`Open` of `shm:`): whether this open made
    /// it (the creator side) and its size (0: not sized yet). Attached:
    /// the creator side's doorbell, the other side's, then its memory if
    /// it is sized (read-only unless the open asked for WRITE).
    Section {
        size: u64,
        creator: bool,
    },
    /// A section's memory: its size; attached, once sized, its memory.
    Memory {
        size: u64,
    },
    /// A `moat_pal::Error` code (positive).
    Err {
        code: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("peer closed the connection")]
    Closed,
    #[error("socket error: {0}")]
    Io(#[from] nix::Error),
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("message too large")]
    TooLarge,
    /// A zero-length message (told apart from end-of-file by the sender's
    /// credentials, which only a message carries: see [`recv_from`]).
    #[error("an empty message")]
    Empty,
}

/// `SO_PASSRIGHTS` (Linux 6.16): off, a socket refuses descriptors, and
/// whoever sends it one (`SCM_RIGHTS`) gets `EPERM`. Accepted sockets
/// inherit it from their listener.
pub const SO_PASSRIGHTS: libc::c_int = 83;

/// Make `sock` refuse descriptors (every socket a picoprocess holds that
/// another picoprocess can reach: see [`SO_PASSRIGHTS`]). `Ok(false)` if
/// the kernel predates the option (then only the monitor's attribution of
/// messages, [`recv_from`], keeps a passed monitor channel from speaking
/// for its owner).
pub fn refuse_descriptors(sock: BorrowedFd<'_>) -> std::io::Result<bool> {
    let off: libc::c_int = 0;
    // SAFETY: setsockopt reads an int from a local that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            &off as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOPROTOOPT) {
        return Ok(false);
    }
    Err(e)
}

/// Have every message `sock` receives carry its sender's credentials
/// (`SO_PASSCRED`), for [`recv_from`].
pub fn pass_credentials(sock: BorrowedFd<'_>) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a local that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One message as the monitor receives it: what it says, the descriptors
/// attached, and the process that sent it (its pid in the receiver's pid
/// namespace, when the socket passes credentials).
#[derive(Debug)]
pub struct Received<T> {
    pub msg: T,
    pub fds: Vec<OwnedFd>,
    pub sender: Option<i32>,
}

/// A connected `SOCK_SEQPACKET` pair, both ends close-on-exec: the
/// monitor socket of a loader, or a zygote reply socket.
pub fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair just created both descriptors; we are their only owner.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Send `msg` with `fds` attached.
pub fn send<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[RawFd]) -> Result<(), WireError> {
    let buf = postcard::to_allocvec(msg).map_err(|e| WireError::Decode(e.to_string()))?;
    if buf.len() > MAX_MSG || fds.len() > MAX_FDS {
        return Err(WireError::TooLarge);
    }
    let iov = [IoSlice::new(&buf)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => return Ok(()),
        }
    }
}

/// Receive one message and the descriptors attached to it. Descriptors
/// come with close-on-exec set.
pub fn recv<T: DeserializeOwned>(sock: BorrowedFd<'_>) -> Result<(T, Vec<OwnedFd>), WireError> {
    // One receive buffer per thread, allocated (and its pages touched) once:
    // a warm loader pays for it before it is handed out.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_MSG]);
    }
    BUF.with(|b| recv_into(sock, &mut b.borrow_mut()))
        .map(|r| (r.msg, r.fds))
}

/// Receive one message, with its sender when `sock` passes credentials
/// ([`pass_credentials`]). A zero-length message is [`WireError::Empty`],
/// not end-of-file: a message carries credentials, end-of-file none.
pub fn recv_from<T: DeserializeOwned>(sock: BorrowedFd<'_>) -> Result<Received<T>, WireError> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_MSG]);
    }
    BUF.with(|b| recv_into(sock, &mut b.borrow_mut()))
}

fn recv_into<T: DeserializeOwned>(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<Received<T>, WireError> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS], libc::ucred);
    let mut resets = 0;
    let (n, fds, sender, creds, truncated) = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::Error::EINTR) => continue,
            // A peer that closed with our messages unread leaves a one-shot
            // ECONNRESET ahead of the messages it sent before closing (its
            // last report): read on, to those and then end-of-file.
            Err(nix::Error::ECONNRESET) if resets < 2 => {
                resets += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
            Ok(m) => {
                let mut fds = Vec::new();
                let mut sender = None;
                let mut creds = false;
                for c in m.cmsgs()? {
                    match c {
                        ControlMessageOwned::ScmRights(v) => {
                            for fd in v {
                                // SAFETY: the kernel just installed this descriptor for us; nobody else owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                        // Pid 0: sent before the receiver passed credentials
                        // (the kernel recorded none): not attributed.
                        ControlMessageOwned::ScmCredentials(c) => {
                            sender = Some(c.pid()).filter(|&p| p != 0);
                            creds = true;
                        }
                        _ => {}
                    }
                }
                let trunc = m
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (m.bytes, fds, sender, creds, trunc);
            }
        }
    };
    if n == 0 {
        return Err(if creds {
            WireError::Empty
        } else {
            WireError::Closed
        });
    }
    if truncated {
        return Err(WireError::TooLarge);
    }
    let msg = decode(&buf[..n])?;
    Ok(Received { msg, fds, sender })
}

/// Decode the bytes of one received message, as [`recv`] does: the
/// monitor's entry point for what a confined process sends, without a
/// socket (the fuzz targets call it with arbitrary bytes).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_MSG {
        return Err(WireError::TooLarge);
    }
    postcard::from_bytes(bytes).map_err(|e| WireError::Decode(e.to_string()))
}

/// Monitor -> zygote (descriptor 3 of `moat-loader --zygote`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ZygoteRequest {
    /// Hand out a loader with these limits (a warm one if it has one).
    /// Attached: the socket to send the answer (`Spawned` or `Failed`) on,
    /// so it goes straight to the thread that asked.
    Spawn { id: u64, limits: Limits },
}

/// Zygote -> monitor: `Exited` on the control socket, the others on a
/// request's reply socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ZygoteEvent {
    /// The loader runs, sandboxed, waiting for its [`Config`]; attached:
    /// its pidfd, then the monitor's end of its socket. `pid` is in the
    /// zygote's pid namespace.
    Spawned { id: u64, pid: i32 },
    /// The loader could not be started: what the child was doing, and errno.
    Failed { id: u64, stage: u8, errno: i32 },
    /// A loader ended (`signal` 0: exited with `code`).
    /// A loader handed out for request `id` ended (`signal` 0: exited
    /// with `code`). Only handed-out loaders are reported.
    Exited { id: u64, code: i32, signal: i32 },
    /// A warm loader was forked ahead of need, with these limits;
    /// attached: its pidfd. The monitor puts it in its cgroup now, off
    /// the spawn's path (moving a process between cgroups can take
    /// milliseconds).
    Warm { limits: moat_policy::Limits },
}
