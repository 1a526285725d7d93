//! A cgroup per picoprocess, sized from its manifest: the limits the
//! kernel enforces even on a guest that bypasses the ABI.
//!
//! The PAL counts threads, handles and memory for a guest that uses the
//! ABI; a guest that reaches the C library's `syscall()` in the loader
//! (which any image can find by walking the loader's tables) does not go
//! through it. So each confined process is moved, before it runs guest
//! code, into a cgroup of its own under the cgroup moat runs in:
//!
//! - `pids`: at most `threads` + [`TASK_OVERHEAD`] tasks (the loader's or
//!   VMM's own threads besides the guest's);
//! - `memory`: at most `memory_mib` + [`MEMORY_OVERHEAD_MIB`] MiB charged
//!   (the loader's or VMM's own memory besides the guest's), swap included
//!   where the kernel accounts it; at the limit the kernel kills the
//!   picoprocess, and the monitor reports that it was its memory limit.
//!
//! Descriptors are bounded by `RLIMIT_NOFILE` (`handles` +
//! [`moat_host_common::child::FD_OVERHEAD`]), set when the process starts.
//!
//! Both cgroup versions: v2 where the unified hierarchy has the `pids` and
//! `memory` controllers, else the v1 controllers (as on a host with v1
//! controllers and an empty unified mount). A host where moat cannot make
//! cgroups (not root and nothing delegated) is said once; the picoprocess
//! then runs with the PAL's and the rlimits' bounds only, and the test
//! suite fails under `MOAT_REQUIRE_SANDBOX=1`.
//!
//! Each group is removed once its process is reaped. Groups a crashed
//! moat left behind (named after a pid that no longer runs) are removed
//! the first time cgroups are used.
use moat_policy::Limits;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Tasks a confined process may have besides the guest's threads: the
/// loader's first thread, or the VMM's main, watchdog and device threads.
pub const TASK_OVERHEAD: u64 = 8;

/// Memory a confined process may use besides the guest's: the loader's or
/// VMM's code, heap, host stacks and buffers, and page tables.
pub const MEMORY_OVERHEAD_MIB: u64 = 48;

/// Where per-picoprocess groups are made.
#[derive(Debug)]
enum Hierarchy {
    /// Under this directory of the unified hierarchy, whose subtree has
    /// `pids` and `memory` enabled.
    V2(PathBuf),
    /// Under these directories of the v1 `pids` and `memory` hierarchies.
    V1 { pids: PathBuf, memory: PathBuf },
}

/// Whether this host can make per-picoprocess cgroups: the hierarchy, or
/// why not (once per process).
fn hierarchy() -> Result<&'static Hierarchy, &'static str> {
    static H: OnceLock<Result<Hierarchy, String>> = OnceLock::new();
    match H.get_or_init(detect) {
        Ok(h) => Ok(h),
        Err(e) => Err(e.as_str()),
    }
}

/// Why per-picoprocess cgroups are not available here, if they are not.
pub fn unavailable() -> Option<&'static str> {
    hierarchy().err()
}

/// This process's cgroup in `controller`'s hierarchy (`""` for v2), from
/// `/proc/self/cgroup`.
fn own_cgroup(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

fn detect() -> Result<Hierarchy, String> {
    let root = Path::new("/sys/fs/cgroup");
    // v2: the unified hierarchy is /sys/fs/cgroup itself and offers both.
    let v2_controllers =
        std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| v2_controllers.split_whitespace().any(|x| x == c);
    let made = if has("pids") && has("memory") {
        let own = own_cgroup("").ok_or("this process's cgroup is unknown")?;
        let dir = root.join(own.trim_start_matches('/'));
        // Per-picoprocess groups need pids and memory in this group's
        // subtree; the kernel refuses that while the group holds processes
        // (except at the root), so moat must run in a group it may nest in.
        std::fs::write(dir.join("cgroup.subtree_control"), "+pids +memory").map_err(|e| {
            format!(
                "cannot enable the pids and memory controllers below {} ({e}); run moat in a cgroup of its own it may manage (e.g. `systemd-run --scope -p Delegate=yes moat ...`)",
                dir.display()
            )
        })?;
        Hierarchy::V2(dir)
    } else {
        let dir = |ctrl: &str| -> Result<PathBuf, String> {
            let base = root.join(ctrl);
            if !base.join("cgroup.procs").exists() {
                return Err(format!(
                    "no cgroup v2 with pids and memory, and no v1 `{ctrl}` hierarchy at {}",
                    base.display()
                ));
            }
            let own = own_cgroup(ctrl)
                .ok_or_else(|| format!("this process's `{ctrl}` cgroup is unknown"))?;
            Ok(base.join(own.trim_start_matches('/')))
        };
        Hierarchy::V1 {
            pids: dir("pids")?,
            memory: dir("memory")?,
        }
    };
    // Can we make groups there? Try one.
    let probe = format!("moat-{}-probe", std::process::id());
    for d in made.dirs() {
        let p = d.join(&probe);
        std::fs::create_dir(&p)
            .and_then(|()| std::fs::remove_dir(&p))
            .map_err(|e| format!("cannot create a cgroup in {} ({e}); run moat as root, or give it a delegated cgroup", d.display()))?;
    }
    remove_stale(&made);
    Ok(made)
}

impl Hierarchy {
    fn dirs(&self) -> Vec<&Path> {
        match self {
            Hierarchy::V2(d) => vec![d],
            Hierarchy::V1 { pids, memory } => vec![pids, memory],
        }
    }
}

/// Remove the groups of moat processes that are gone (`moat-<pid>-<n>`).
fn remove_stale(h: &Hierarchy) {
    for d in h.dirs() {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("moat-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// `pids.max` and the memory limit for `limits`.
fn limit_values(limits: &Limits) -> (String, String) {
    let tasks = limits.threads.saturating_add(TASK_OVERHEAD).to_string();
    let bytes = limits
        .memory_mib
        .saturating_add(MEMORY_OVERHEAD_MIB)
        .saturating_mul(1 << 20)
        .to_string();
    (tasks, bytes)
}

/// Warm loaders' groups, made and entered on the zygotes' notices
/// ([`PicoCgroup::prepare`]); the lock also serializes every move of a
/// process into a group of this monitor.
struct PreparedGroup {
    pid: u32,
    /// The warm loader's pidfd: while it has not exited, `pid` is it.
    pidfd: std::os::fd::OwnedFd,
    key: (u64, u64),
    group: PicoCgroup,
}
struct Prepared {
    groups: Vec<PreparedGroup>,
}
static PREPARED: std::sync::Mutex<Prepared> =
    std::sync::Mutex::new(Prepared { groups: Vec::new() });

/// Whether the process behind `pidfd` still runs (a pidfd polls readable
/// once it has exited).
fn alive(pidfd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
        Ok(0)
    )
}

/// Whether `pid` is already in a group this monitor made (its
/// `/proc/PID/cgroup` names one).
fn in_a_group_of_ours(pid: u32) -> bool {
    let mine = format!("/moat-{}-g", std::process::id());
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|t| t.contains(&mine))
}

/// Remove groups whose process may still be going away, off the callers'
/// path (removal retries for up to 100 ms).
fn drop_later(groups: Vec<PicoCgroup>) {
    if groups.is_empty() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("moat-cgroup-rm".into())
        .spawn(move || drop(groups));
}

/// The cgroup(s) of one picoprocess; removed when dropped (its process
/// must be gone by then). A warm loader's group left when moat exits
/// stays until the next moat on this host removes the groups of moat
/// processes that are gone.
#[derive(Debug)]
pub struct PicoCgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
}

impl PicoCgroup {
    /// Make the groups of the picoprocess whose confined process is `pid`,
    /// sized from `limits`, and move the process into them (all its
    /// threads). `None` when this host cannot make cgroups (said once by
    /// the caller, see [`unavailable`]).
    pub fn create(pid: u32, limits: &Limits) -> Option<std::io::Result<PicoCgroup>> {
        let h = hierarchy().ok()?;
        let key = (limits.threads, limits.memory_mib);
        let mut pre = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
        let mut stale = Vec::new();
        // The warm loader handed out, already in its group: the same
        // process (its pidfd says it has not exited, so its pid was not
        // reused) with the same limits.
        if let Some(at) = pre.groups.iter().position(|e| e.pid == pid) {
            let e = pre.groups.swap_remove(at);
            if e.key == key && alive(&e.pidfd) {
                return Some(Ok(e.group));
            }
            stale.push(e.group);
        }
        // Not prepared: made and entered here, under the same lock as
        // `prepare`, which then sees the process in a group and leaves it.
        let r = Self::make(h, limits).and_then(|g| match g.enter(pid) {
            Ok(()) => Ok(g),
            Err(e) => {
                stale.push(g);
                Err(e)
            }
        });
        drop(pre);
        drop_later(stale);
        Some(r)
    }

    /// A warm loader `pid` (its `pidfd`), forked with `limits`, goes into
    /// a group of its own now, on the zygote's notice, before any spawn
    /// takes it: moving a process into a cgroup can take milliseconds (the
    /// kernel waits for an RCU grace period), which a spawn then does not
    /// wait for. A process already in a group of this monitor (a spawn
    /// took it before the notice came) is left where it is.
    pub fn prepare(pid: u32, pidfd: std::os::fd::OwnedFd, limits: &Limits) {
        let Ok(h) = hierarchy() else { return };
        let mut pre = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
        if !alive(&pidfd) || in_a_group_of_ours(pid) {
            return;
        }
        let mut stale = Vec::new();
        let Ok(g) = Self::make(h, limits) else {
            return;
        };
        if g.enter(pid).is_err() {
            stale.push(g);
        } else {
            // One per zygote at a time (a loader's and a VMM's), a few
            // more for notices of loaders killed unused: the oldest go.
            while pre.groups.len() >= 4 {
                stale.push(pre.groups.remove(0).group);
            }
            pre.groups.push(PreparedGroup {
                pid,
                pidfd,
                key: (limits.threads, limits.memory_mib),
                group: g,
            });
        }
        drop(pre);
        drop_later(stale);
    }

    /// Put `pid` in the group.
    fn enter(&self, pid: u32) -> std::io::Result<()> {
        for d in &self.dirs {
            write(d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    fn make(h: &Hierarchy, limits: &Limits) -> std::io::Result<PicoCgroup> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("moat-{}-g{n}", std::process::id());
        let (tasks, bytes) = limit_values(limits);
        let mut g = PicoCgroup {
            dirs: Vec::new(),
            v2: matches!(h, Hierarchy::V2(_)),
        };
        match h {
            Hierarchy::V2(parent) => {
                let d = parent.join(&name);
                std::fs::create_dir(&d)?;
                g.dirs.push(d.clone());
                write(&d, "pids.max", &tasks)?;
                write(&d, "memory.max", &bytes)?;
                // No swap to hide in, where the kernel accounts it.
                let _ = write(&d, "memory.swap.max", "0");
            }
            Hierarchy::V1 { pids, memory } => {
                let p = pids.join(&name);
                std::fs::create_dir(&p)?;
                g.dirs.push(p.clone());
                let m = memory.join(&name);
                std::fs::create_dir(&m)?;
                g.dirs.push(m.clone());
                write(&p, "pids.max", &tasks)?;
                write(&m, "memory.limit_in_bytes", &bytes)?;
                // Memory plus swap at the same bound: no swap to hide in
                // (the file exists only where swap is accounted).
                if m.join("memory.memsw.limit_in_bytes").exists() {
                    write(&m, "memory.memsw.limit_in_bytes", &bytes)?;
                }
            }
        }
        Ok(g)
    }

    /// Whether the kernel killed a process of this group at its memory
    /// limit.
    pub fn oom_killed(&self) -> bool {
        let (dir, file) = if self.v2 {
            (self.dirs.first(), "memory.events")
        } else {
            (self.dirs.get(1), "memory.oom_control")
        };
        let Some(text) = dir.and_then(|d| std::fs::read_to_string(d.join(file)).ok()) else {
            return false;
        };
        text.lines().any(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    }
}

impl Drop for PicoCgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            // The process is reaped; the kernel may take a moment to let
            // the group go.
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_is_read_from_proc() {
        // Every Linux process is in some cgroup of some hierarchy.
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert!(!text.is_empty());
        let first = text.lines().next().unwrap();
        let ctrl = first.split(':').nth(1).unwrap();
        let ctrl = ctrl.split(',').next().unwrap_or("");
        assert!(own_cgroup(ctrl).is_some(), "{text}");
    }
}
