//! Where the loader and VMM binaries are, and starting one for a
//! picoprocess: from a zygote (the default), or with `MOAT_NO_ZYGOTE=1` in
//! fresh namespaces of its own.
use moat_policy::Limits;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::process::{SpawnError, Spawned, Status};
use crate::spawn;

/// Where the loader binary is: `$MOAT_LOADER`, else `moat-loader` next to
/// the running executable, else in its parent directory (tests run from
/// `target/debug/deps`).
pub fn loader_path() -> Result<PathBuf, SpawnError> {
    find_binary("moat-loader", "MOAT_LOADER").map_err(SpawnError::NoLoader)
}

/// Where the KVM host's VMM binary is: `$MOAT_VMM`, else `moat-vmm` found
/// as the loader is.
pub fn vmm_path() -> Result<PathBuf, SpawnError> {
    find_binary("moat-vmm", "MOAT_VMM").map_err(SpawnError::NoVmm)
}

fn find_binary(name: &str, var: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(format!("{var}={}", p.display()));
    }
    let exe = std::env::current_exe().map_err(|e| format!("(current executable unknown: {e})"))?;
    let mut looked = Vec::new();
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let cand = d.join(name);
        if cand.is_file() {
            return Ok(cand);
        }
        looked.push(d.display().to_string());
        dir = d.parent();
    }
    Err(looked.join(", "))
}

/// Start `loader` in new namespaces with `limits` applied as rlimits.
///
/// Loaders start from the zygote (one per host process, in the sandbox
/// namespaces; see `moat_host_common::zygote`), which saves creating namespaces per
/// picoprocess. `MOAT_NO_ZYGOTE=1` creates fresh namespaces for every
/// loader instead.
pub fn spawn_loader(loader: &Path, limits: &Limits) -> Result<Spawned, SpawnError> {
    if std::env::var_os("MOAT_NO_ZYGOTE").is_some() {
        return spawn::fresh(loader, limits, false);
    }
    crate::zygote_client::spawn(loader, limits, false)
}

/// Start a VMM (`moat-vmm`, the KVM host) with `/dev/kvm` as descriptor
/// [`KVM_FD`](moat_host_common::protocol::KVM_FD) and the monitor socket as 3: from the VMM zygote (a warm
/// VMM, its VM already created), or with `MOAT_NO_ZYGOTE=1` in fresh
/// namespaces.
pub fn spawn_vmm(vmm: &Path, limits: &Limits) -> Result<Spawned, SpawnError> {
    let (vmm, mut limits) = (vmm.to_path_buf(), *limits);
    // The VMM's vCPU watchdog ends a runaway guest at the CPU-time limit
    // with a report; the kernel's limit stays as the backstop.
    if limits.cpu_seconds != 0 {
        limits.cpu_seconds += 2;
    }
    if std::env::var_os("MOAT_NO_ZYGOTE").is_none() {
        return crate::zygote_client::spawn(&vmm, &limits, true);
    }
    spawn::fresh(&vmm, &limits, true)
}

/// Wait for a loader: our own child (reaped here), or one the zygote
/// started (whose status the zygote reports).
pub fn wait_process(pidfd: &OwnedFd, pid: u32) -> Result<Status, std::io::Error> {
    match crate::process::wait_pidfd(pidfd) {
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
            Ok(crate::zygote_client::wait_exit(pid as i32))
        }
        r => r,
    }
}
