//! The control socket of a `moat run --checkpointable`: it listens on
//! the abstract Unix socket `moat-run-<its pid>` (SOCK_SEQPACKET) for
//! `moat checkpoint`'s requests, and answers only a peer of its own user
//! (or root).
use moat_host_common::protocol::{self, Control, ControlReply};
use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType, UnixAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// The abstract socket address of `moat run` process `pid`.
pub(crate) fn address(pid: u32) -> nix::Result<UnixAddr> {
    UnixAddr::new_abstract(format!("moat-run-{pid}").as_bytes())
}

/// A close-on-exec SOCK_SEQPACKET Unix socket.
pub(crate) fn seqpacket() -> nix::Result<OwnedFd> {
    sock::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// `moat run --checkpointable`: serve checkpoint requests for `c` on a
/// thread of its own, for as long as the process lives.
pub fn listen(c: moat_monitor::Controller) -> Result<(), String> {
    let s = seqpacket().map_err(|e| format!("cannot make the control socket: {e}"))?;
    address(std::process::id())
        .and_then(|a| sock::bind(s.as_raw_fd(), &a))
        .and_then(|()| sock::listen(&s, sock::Backlog::new(4).unwrap_or(sock::Backlog::MAXCONN)))
        .map_err(|e| format!("cannot listen for checkpoint requests: {e}"))?;
    std::thread::Builder::new()
        .name("moat-control".into())
        .spawn(move || loop {
            let Ok(fd) = sock::accept4(s.as_raw_fd(), SockFlag::SOCK_CLOEXEC) else {
                continue;
            };
            // SAFETY: a fresh descriptor from accept4, owned by nobody else.
            let conn = unsafe { OwnedFd::from_raw_fd(fd) };
            // A peer that connects and says nothing does not hold the
            // next one up for long.
            let _ = sock::setsockopt(
                &conn,
                sock::sockopt::ReceiveTimeout,
                &nix::sys::time::TimeVal::new(5, 0),
            );
            serve_one(&c, &conn);
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the control thread: {e}"))
}

fn serve_one(c: &moat_monitor::Controller, conn: &OwnedFd) {
    let me = nix::unistd::geteuid().as_raw();
    let peer = sock::getsockopt(conn, sock::sockopt::PeerCredentials).map(|c| c.uid());
    let reply = match peer {
        Ok(uid) if uid == me || uid == 0 => match protocol::recv::<Control>(conn.as_fd()) {
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

/// A new, empty file beside `path` to write a checkpoint into, renamed
/// over `path` once whole: a failure leaves `path` as it was, and
/// picoprocesses restored from the old file (which map it) keep it.
pub(crate) fn create_beside(
    path: &std::path::Path,
) -> Result<(std::path::PathBuf, std::fs::File), String> {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Err(format!("cannot write {}: not a file name", path.display()));
    };
    let tmp = path.with_file_name(format!(".{name}.moat-{}.tmp", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok((tmp, file))
}
