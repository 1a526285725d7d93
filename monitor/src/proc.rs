//! One started picoprocess, as the monitor keeps it: its pid and pidfd,
//! its exit once reaped, the disks it holds locked.
use crate::error::Exit;
use crate::process;
use moat_host_common::protocol::ReportKind;

/// The report a picoprocess leaves, shared by its broker and its waiter.
pub type ReportSlot = Arc<Mutex<Option<(ReportKind, String)>>>;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};

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
