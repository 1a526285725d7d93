//! Real block devices and file systems for tests that need root: loop
//! devices, ext4 mounts, the tools that make them, and a check that the
//! machine has them.
//!
//! Needs root, `/dev/fuse`, `/dev/loop-control`, `losetup`, `mount` and
//! `umount` (util-linux), `mkfs.ext4`, `fsck.ext4` and `dumpe2fs`
//! (e2fsprogs). Without them a test skips, unless `MOAT_REQUIRE_ROOT_TOOLS`
//! is set (as in CI), when it fails. Every mount and loop device made here
//! is held by a guard that undoes it, so a failing test leaves none behind.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one tool may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Why this machine cannot run root tests, if it cannot.
pub fn missing_prerequisites() -> Option<String> {
    if !is_root() {
        return Some("not root".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("no {dev}"));
        }
    }
    for tool in [
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "dumpe2fs",
        "mount",
        "umount",
        "sync",
    ] {
        if find_tool(tool).is_none() {
            return Some(format!("no {tool} (packages util-linux, e2fsprogs, mount)"));
        }
    }
    None
}

/// Whether root tests can run here: `false` (and a note) if not, a panic
/// if not and `MOAT_REQUIRE_ROOT_TOOLS` is set.
pub fn root_tools(what: &str) -> bool {
    match missing_prerequisites() {
        None => true,
        Some(why) => {
            assert!(
                std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_none(),
                "MOAT_REQUIRE_ROOT_TOOLS is set but {what} cannot run: {why}"
            );
            eprintln!("skipping {what}: {why}");
            false
        }
    }
}

pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs a tool, killing it after a generous timeout.
pub fn run(tool: &str, args: &[&str]) -> Output {
    let exe = find_tool(tool).unwrap_or_else(|| panic!("{tool} not found"));
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{tool} {args:?} timed out: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Runs a tool that must succeed; returns its standard output.
pub fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop device, detached on drop.
pub struct LoopDev {
    pub dev: String,
    attached: bool,
}

impl LoopDev {
    /// Attaches `file`, with direct I/O if the kernel accepts it.
    pub fn attach(file: &Path) -> (Self, bool) {
        let file = file.to_str().unwrap();
        for direct_io in [true, false] {
            let mut args = vec!["--find", "--show"];
            if direct_io {
                args.push("--direct-io=on");
            }
            args.push(file);
            let out = run("losetup", &args);
            if out.status.success() {
                let dev = String::from_utf8(out.stdout).unwrap().trim().to_owned();
                assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
                return (
                    Self {
                        dev,
                        attached: true,
                    },
                    direct_io,
                );
            }
            eprintln!(
                "losetup {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        panic!("losetup could not attach {file}");
    }

    /// The device's name without `/dev/` (`loop3`).
    pub fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }

    pub fn sysfs(&self, attr: &str) -> Option<String> {
        std::fs::read_to_string(format!("/sys/block/{}/loop/{attr}", self.name()))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// Detaches and waits until the device has let go of its file (the
    /// kernel may finish the detach asynchronously).
    pub fn detach(&mut self) -> bool {
        if !std::mem::take(&mut self.attached) {
            return true;
        }
        let out = run("losetup", &["-d", &self.dev]);
        if !out.status.success() {
            eprintln!(
                "losetup -d {}: {}",
                self.dev,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let started = Instant::now();
        let mut reported = false;
        while self.sysfs("backing_file").is_some() {
            if started.elapsed() > Duration::from_secs(30) {
                return false;
            }
            if !reported && started.elapsed() > Duration::from_secs(1) {
                reported = true;
                eprintln!(
                    "{} is still attached after 1 s; opened by: {:?}",
                    self.dev,
                    holders(&self.dev)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        self.detach();
    }
}

/// The processes that have `dev` open (for diagnostics).
pub fn holders(dev: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new(dev)))
        {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!(
                "{} {}",
                p.file_name().to_string_lossy(),
                comm.trim()
            ));
        }
    }
    found
}

/// A mounted file system, unmounted on drop.
pub struct FsMount {
    dir: PathBuf,
    mounted: bool,
}

impl FsMount {
    /// Mounts the ext4 on `dev` at `dir`.
    pub fn ext4(dev: &str, dir: &Path) -> Self {
        run_ok("mount", &["-t", "ext4", dev, dir.to_str().unwrap()]);
        Self {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts (it must succeed).
    pub fn unmount(&mut self) {
        if std::mem::take(&mut self.mounted) {
            run_ok("umount", &[self.dir.to_str().unwrap()]);
        }
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        let dir = self.dir.to_str().unwrap().to_owned();
        if std::mem::take(&mut self.mounted) && !run("umount", &[&dir]).status.success() {
            let _ = run("umount", &["-l", &dir]);
        }
    }
}

/// Whether the kernel still holds the block device `dev` for a file
/// system: an exclusive open fails while any superblock uses it.
pub fn held_by_a_file_system(dev: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
        .is_err()
}

/// Whether `dumpe2fs -h` says the ext4 in `image` was unmounted cleanly:
/// state `clean` and no journal left to replay (`needs_recovery`).
pub fn ext4_clean_without_replay(image: &Path) -> Result<(), String> {
    let out = run_ok("dumpe2fs", &["-h", image.to_str().unwrap()]);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let state = field("Filesystem state:");
    let features = field("Filesystem features:");
    if state != "clean" || features.split_whitespace().any(|f| f == "needs_recovery") {
        return Err(format!("state `{state}`, features `{features}`"));
    }
    Ok(())
}
