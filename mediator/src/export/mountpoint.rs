//! Checks of a mount point before an export is mounted on it, and who
//! still uses an exported file.
//!
//! A server that was killed (`SIGKILL`, a crash) cannot unmount its FUSE
//! mount: the mount stays, every access to it fails with `ENOTCONN`
//! ("Transport endpoint is not connected"), and a new server cannot mount
//! on it. [`check_mount_point`] recognises that case. A stale mount whose
//! source is moat's own (`fsname` [`FS_NAME_PREFIX`]...) has no server
//! left and serves nothing, so it is unmounted (not lazily: if something
//! still holds it, typically a loop device attached to the old export,
//! that is named instead, with the commands that clear it). A stale mount
//! of another FUSE file system is named with the command that clears it,
//! and left alone.
use std::io;
use std::path::{Component, Path, PathBuf};

/// Every export's `fsname` (its source in `/proc/self/mountinfo`) starts
/// with this.
pub const FS_NAME_PREFIX: &str = "moat-export";

/// What [`check_mount_point`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountPointState {
    /// An empty directory, ready.
    Ready,
    /// A stale export of a killed moat server was there; it is unmounted
    /// now and the directory is ready.
    ClearedStale,
}

/// Why a directory cannot be mounted on.
#[derive(Debug, thiserror::Error)]
pub enum MountPointError {
    #[error("mount point `{}`: {err}", dir.display())]
    Unusable { dir: PathBuf, err: io::Error },
    #[error("mount point `{}` is not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("mount point `{}` is not empty", dir.display())]
    NotEmpty { dir: PathBuf },
    #[error(
        "mount point `{}` holds the stale mount of a moat server that was killed, and {} still uses it; {}",
        dir.display(), users.join(", "), clear_hint(dir, users)
    )]
    StaleBusy { dir: PathBuf, users: Vec<String> },
    #[error(
        "mount point `{}` holds a {fstype} mount of `{from}` whose server is gone (\"Transport endpoint is not connected\"); it is not moat's, so it is left alone: clear it with `umount {}` (or `fusermount3 -u {}`)",
        dir.display(), dir.display(), dir.display()
    )]
    StaleForeign {
        dir: PathBuf,
        fstype: String,
        from: String,
    },
}

fn clear_hint(dir: &Path, users: &[String]) -> String {
    let loops: Vec<&String> = users
        .iter()
        .filter(|u| u.starts_with("/dev/loop"))
        .collect();
    if loops.is_empty() {
        return format!(
            "close what has `{}` open, then `umount {}`",
            dir.display(),
            dir.display()
        );
    }
    let detach: Vec<String> = loops.iter().map(|l| format!("losetup -d {l}")).collect();
    format!(
        "unmount what is mounted from {}, then `{}` and `umount {}`",
        loops
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        detach.join("; "),
        dir.display()
    )
}

/// Checks that `dir` can be mounted on: an existing, empty directory. A
/// stale mount a killed moat server left there is cleared (see the
/// module documentation).
pub fn check_mount_point(dir: &Path) -> Result<MountPointState, MountPointError> {
    let unusable = |err| MountPointError::Unusable {
        dir: dir.to_path_buf(),
        err,
    };
    match std::fs::read_dir(dir) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(MountPointError::NotEmpty {
                    dir: dir.to_path_buf(),
                });
            }
            Ok(MountPointState::Ready)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Err(MountPointError::NotADirectory {
            dir: dir.to_path_buf(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let abs = absolute(dir).map_err(unusable)?;
            let Some((fstype, source)) = mount_at(&abs) else {
                return Err(unusable(e));
            };
            if !(fstype.starts_with("fuse") && source.starts_with(FS_NAME_PREFIX)) {
                return Err(MountPointError::StaleForeign {
                    dir: abs,
                    fstype,
                    from: source,
                });
            }
            if super::detach(&abs, false).is_ok() {
                // The directory under it must be usable too.
                return match check_mount_point(&abs)? {
                    MountPointState::Ready => Ok(MountPointState::ClearedStale),
                    s => Ok(s),
                };
            }
            let mut users = loop_devices_under(&abs);
            if users.is_empty() {
                users.push("a process".into());
            }
            Err(MountPointError::StaleBusy { dir: abs, users })
        }
        Err(e) => Err(unusable(e)),
    }
}

/// `path` made absolute without touching it (a dead FUSE mount cannot be
/// `stat`ed, so `canonicalize` fails on it): joined to the working
/// directory, `.` and `..` resolved lexically.
fn absolute(path: &Path) -> io::Result<PathBuf> {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    Ok(out)
}

/// The file-system type and source of the mount at `dir` (the last one, if
/// several are stacked), from `/proc/self/mountinfo`.
fn mount_at(dir: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = dir.to_str()?;
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < dash + 3 || fields.len() < 5 {
            continue;
        }
        if unescape(fields[4]) == want {
            found = Some((unescape(fields[dash + 1]), unescape(fields[dash + 2])));
        }
    }
    found
}

/// Undo mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct.iter().fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The loop devices whose backing file is `file` (`/dev/loopN`, from
/// `/sys/block/loopN/loop/backing_file`).
pub fn loop_devices_of(file: &Path) -> Vec<String> {
    loop_devices_matching(|backing| backing == file)
}

/// The loop devices whose backing file is in or below `dir`.
fn loop_devices_under(dir: &Path) -> Vec<String> {
    loop_devices_matching(|backing| backing.starts_with(dir))
}

fn loop_devices_matching(want: impl Fn(&Path) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(blocks) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for b in blocks.flatten() {
        let name = b.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(b.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim_end_matches('\n');
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
        if want(Path::new(backing)) {
            out.push(format!("/dev/{name}"));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"plain"), "plain");
        assert_eq!(unescape(r"end\04"), r"end\04");
    }

    #[test]
    fn absolute_is_lexical() {
        assert_eq!(
            absolute(Path::new("/a/b/../c/./d")).unwrap(),
            PathBuf::from("/a/c/d")
        );
    }

    #[test]
    fn plain_directories() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(check_mount_point(d.path()).unwrap(), MountPointState::Ready);
        std::fs::write(d.path().join("x"), b"").unwrap();
        assert!(matches!(
            check_mount_point(d.path()),
            Err(MountPointError::NotEmpty { .. })
        ));
        assert!(matches!(
            check_mount_point(&d.path().join("x")),
            Err(MountPointError::NotADirectory { .. })
        ));
        assert!(matches!(
            check_mount_point(&d.path().join("nope")),
            Err(MountPointError::Unusable { .. })
        ));
    }
}
