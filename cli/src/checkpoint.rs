//! `moat checkpoint` and `moat restore`. `moat checkpoint PID FILE`
//! creates FILE itself (so the file is the caller's, made with the
//! caller's rights), connects to the control socket of `moat run` PID
//! (see `control`), and sends the request with FILE's descriptor. A
//! checkpoint that fails leaves no FILE behind.
use crate::bad_input;
use crate::control::{address, seqpacket};
use crate::run::{self, Host, RunArgs};
use clap::Args;
use moat_host_common::protocol::{self, Control, ControlReply};
use std::os::fd::{AsFd, AsRawFd};
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
    /// Carry what cannot be carried (pipes, sockets, servers, shared
    /// sections, child picoprocesses) as closed handles, instead of
    /// failing. Never a device: a picoprocess holding one cannot be
    /// checkpointed.
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

pub fn checkpoint(a: CheckpointArgs) -> i32 {
    let sock = match seqpacket() {
        Ok(s) => s,
        Err(e) => return bad_input(format!("cannot make a socket: {e}")),
    };
    let connected =
        address(a.pid).and_then(|addr| nix::sys::socket::connect(sock.as_raw_fd(), &addr));
    if connected.is_err() {
        return bad_input(format!(
            "process {} is not a `moat run --checkpointable` (nothing listens for checkpoint requests there)",
            a.pid
        ));
    }
    // The listener must be that process, run by this user (or root): an
    // abstract name can be taken by anyone first.
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let me = nix::unistd::geteuid().as_raw();
    match getsockopt(&sock, sockopt::PeerCredentials) {
        Ok(c) if c.pid() as u32 == a.pid && (c.uid() == me || c.uid() == 0) => {}
        _ => {
            return bad_input(format!(
                "the control socket of process {} is not that process's (or not its user's); refusing to hand it a file",
                a.pid
            ))
        }
    }
    let _ = setsockopt(
        &sock,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(150, 0),
    );
    let (tmp, file) = match crate::control::create_beside(&a.file) {
        Ok(v) => v,
        Err(msg) => return bad_input(msg),
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
    drop(file);
    let failed = |msg: String| {
        let _ = std::fs::remove_file(&tmp);
        bad_input(msg)
    };
    match reply {
        Ok((ControlReply::Done { bytes }, _)) => match std::fs::rename(&tmp, &a.file) {
            Ok(()) => {
                eprintln!(
                    "moat: checkpoint written to {} ({bytes} bytes)",
                    a.file.display()
                );
                0
            }
            Err(e) => failed(format!("cannot write {}: {e}", a.file.display())),
        },
        // One line, control characters escaped: the answer came through
        // another process.
        Ok((ControlReply::Failed { why }, _)) => failed(
            why.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        ),
        Ok((ControlReply::Template(_), _)) => {
            failed(format!("process {} answered out of turn", a.pid))
        }
        Err(e) => failed(format!("process {} did not answer: {e}", a.pid)),
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
        template: None,
        image: Some(a.file.display().to_string()),
        args: Vec::new(),
    })
}
