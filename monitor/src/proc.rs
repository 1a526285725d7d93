//! One started picoprocess, as the monitor keeps it: its pid and pidfd,
//! its exit once reaped, the disks it holds locked, its VMM's statistics
//! page.
use crate::error::Exit;
use crate::process;
use moat_host_common::protocol::ReportKind;

/// The report a picoprocess leaves, shared by its broker and its waiter.
pub type ReportSlot = Arc<Mutex<Option<(ReportKind, String)>>>;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};

/// How long a checkpoint may take before its picoprocess is given up on
/// (the control socket's receive timeout).
pub(crate) const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// One running (or ended) picoprocess of a session.
pub(crate) struct Proc {
    pub(crate) pid: u32,
    pub(crate) name: String,
    pub(crate) pidfd: OwnedFd,
    pub(crate) exit: Mutex<Option<Exit>>,
    pub(crate) ended: Condvar,
    /// The report of its abnormal end, if any: its own (sent by its loader)
    /// or the monitor's (a protocol violation). The first one stays.
    pub(crate) report: ReportSlot,
    /// Its cgroup (None where the host cannot make them); removed once it
    /// is reaped.
    pub(crate) cgroup: Mutex<Option<crate::cgroup::PicoCgroup>>,
    /// The disks its devices are backed by, locked while it runs.
    pub(crate) _disks: Vec<Arc<crate::disklock::DiskLock>>,
    /// The statistics page its VMM counts in (kvm only).
    pub(crate) stats: Option<crate::shm::HostSection>,
    /// Set once its process is reaped: its trace drain takes what is left
    /// and ends.
    pub(crate) gone: Arc<std::sync::atomic::AtomicBool>,
    /// The thread draining its trace ring, joined before its exit is
    /// published, so every record is out when a waiter returns.
    pub(crate) trace_drain: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The monitor's end of its control socket (a checkpointable root).
    pub(crate) control: Mutex<Option<OwnedFd>>,
    /// The template it was asked to take (its answer comes on the control
    /// socket, unasked).
    pub(crate) template: Mutex<Template>,
}

/// Where a picoprocess's template stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Template {
    /// None was asked for.
    None,
    /// Asked for; its answer has not been read.
    Pending,
    /// Its answer: the length written, or why not.
    Answered(Result<u64, String>),
}

impl Proc {
    /// End it for breaking the protocol: `text` is its report (unless it
    /// already sent one), its exit code 159.
    pub(crate) fn violation(&self, text: String) {
        {
            let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some((ReportKind::Violation, text));
            }
        }
        let _ = self.signal(libc::SIGKILL);
    }

    pub(crate) fn signal(&self, sig: libc::c_int) -> std::io::Result<()> {
        process::signal_pidfd(&self.pidfd, sig)
    }

    /// What its VMM has counted so far (kvm only). The page outlives the
    /// VMM, so the last counts stay readable after it ended.
    pub(crate) fn vm_stats(&self) -> Option<moat_host_common::vmstats::VmStats> {
        let page = self.stats.as_ref()?;
        let mut s = moat_host_common::vmstats::VmStats::default();
        for (i, c) in s.counts.iter_mut().enumerate() {
            *c = page
                .atomic_u64(8 * i as u64)
                .map_or(0, |a| a.load(std::sync::atomic::Ordering::Relaxed));
        }
        Some(s)
    }

    /// Ask it to write a checkpoint to `file` (empty, writable) and end,
    /// or go on (`opts`): the file's length, or why not.
    pub(crate) fn checkpoint(
        &self,
        file: &std::fs::File,
        opts: moat_host_common::protocol::CheckpointOptions,
    ) -> Result<u64, String> {
        use moat_host_common::protocol::{self, Control, ControlReply};
        use std::os::fd::{AsFd, AsRawFd};
        let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sock) = c.as_ref() else {
            return Err("it was not started checkpointable (moat run --checkpointable, or the `checkpoint` layer), or its control channel was closed after a checkpoint that did not answer".into());
        };
        protocol::send(
            sock.as_fd(),
            &Control::Checkpoint(opts),
            &[file.as_raw_fd()],
        )
        .map_err(|e| format!("it cannot be reached: {e}"))?;
        // The confined process answers (its word is hostile input: one
        // line, escaped); one that does not answer within the socket's
        // timeout loses its control channel, so that a late answer is
        // never taken for the next request's. A template's answer may
        // come first (unasked): it is kept.
        let reply = loop {
            match protocol::recv::<ControlReply>(sock.as_fd()) {
                Ok((ControlReply::Template(r), _)) => {
                    let mut t = self.template.lock().unwrap_or_else(|e| e.into_inner());
                    if *t != Template::Pending {
                        break Ok((ControlReply::Template(r), Vec::new()));
                    }
                    *t = Template::Answered(r);
                }
                other => break other,
            }
        };
        match reply {
            Ok((ControlReply::Done { bytes }, _)) => Ok(bytes),
            Ok((ControlReply::Failed { why }, _)) => Err(why),
            Ok((ControlReply::Template(_), _)) => {
                *c = None;
                Err("it answered out of turn; no more checkpoints of it".into())
            }
            Err(protocol::WireError::Io(nix::Error::EAGAIN)) => {
                *c = None;
                Err(format!(
                    "it did not answer within {} s; no more checkpoints of it",
                    CONTROL_TIMEOUT.as_secs()
                ))
            }
            Err(e) => Err(format!("it ended before the checkpoint was written ({e})")),
        }
    }

    /// As `Picoprocess::template_written`.
    pub(crate) fn template_written(
        &self,
        limit: std::time::Duration,
    ) -> Result<Option<u64>, String> {
        let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let t = self
            .template
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match t {
            Template::None => Err("none was asked for".into()),
            Template::Answered(r) => r.map(Some),
            Template::Pending => self.read_template(&mut c, limit),
        }
    }

    /// Wait up to `limit` for the template's answer on the control socket
    /// `c` (held locked), and keep it.
    fn read_template(
        &self,
        c: &mut Option<OwnedFd>,
        limit: std::time::Duration,
    ) -> Result<Option<u64>, String> {
        use moat_host_common::protocol::{self, ControlReply};
        use std::os::fd::AsFd;
        let Some(sock) = c.as_ref() else {
            return Err("its control channel is closed".into());
        };
        let ms = limit.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [nix::poll::PollFd::new(
            sock.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(
            &mut fds,
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
        ) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
        let r = match protocol::recv::<ControlReply>(sock.as_fd()) {
            Ok((ControlReply::Template(r), _)) => r,
            Ok(_) => {
                *c = None;
                Err("it answered out of turn; no more checkpoints of it".into())
            }
            Err(e) => Err(format!("it ended before the template was written ({e})")),
        };
        *self.template.lock().unwrap_or_else(|e| e.into_inner()) = Template::Answered(r.clone());
        r.map(Some)
    }

    pub(crate) fn wait(&self) -> Exit {
        let mut e = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(x) = &*e {
                return x.clone();
            }
            e = self.ended.wait(e).unwrap_or_else(|e| e.into_inner());
        }
    }
}
