//! Disk files locked while moat serves them.
//!
//! Two servers writing one disk file corrupt whatever file system is on
//! it. Whoever serves a disk (`moat serve`, or the monitor granting a
//! virtio-blk device backed by it) holds a [`DiskLock`]: an open-file-
//! description lock (`F_OFD_SETLK`) on a description of its own, a write
//! lock to serve read-write, a read lock to serve read-only. So one
//! read-write server, or any number of read-only ones, may hold a disk at
//! a time, and a second server in another process is refused with the
//! holder named.
//!
//! The lock is per process: every [`DiskLock::acquire`] of the same file
//! (same device and inode) in one process shares one description, so a
//! mediator restarting its driver, which grants the device again, does
//! not conflict with the lock `moat serve` already holds. The descriptors
//! handed to drivers and VMMs are separate, unlocked descriptions: a dying
//! VMM that still holds its copy never blocks the next one.
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// The locks this process holds, by (device, inode).
type Held = HashMap<(u64, u64), Weak<DiskLock>>;

/// A held lock on a disk file; released when the last clone is dropped.
#[derive(Debug)]
pub struct DiskLock {
    /// The locked description: the lock lives as long as it is open.
    _file: File,
    path: PathBuf,
    write: bool,
}

impl DiskLock {
    /// The locked file's path (as given to [`acquire`](Self::acquire)).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a write (read-write serving) lock.
    pub fn is_write(&self) -> bool {
        self.write
    }

    /// Lock `path` for serving, read-write (`write`) or read-only. A lock
    /// this process already holds on the same file is shared; a read-only
    /// holder asking for write access gets [`LockError::Held`] naming
    /// itself.
    pub fn acquire(path: &Path, write: bool) -> Result<Arc<DiskLock>, LockError> {
        static HELD: Mutex<Option<Held>> = Mutex::new(None);
        // A write lock needs a description open for writing.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|err| LockError::Open {
                path: path.to_path_buf(),
                err,
            })?;
        let meta = file.metadata().map_err(|err| LockError::Open {
            path: path.to_path_buf(),
            err,
        })?;
        let key = (meta.dev(), meta.ino());
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        let held = held.get_or_insert_with(HashMap::new);
        held.retain(|_, w| w.strong_count() > 0);
        if let Some(l) = held.get(&key).and_then(Weak::upgrade) {
            if l.write || !write {
                return Ok(l);
            }
            return Err(LockError::Held {
                path: path.to_path_buf(),
                holder: format!("this process (pid {}), read-only", std::process::id()),
            });
        }
        if let Err(err) = ofd_lock(&file, write) {
            if matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                return Err(LockError::Held {
                    path: path.to_path_buf(),
                    holder: holder_of(&meta).unwrap_or_else(|| "another process".into()),
                });
            }
            return Err(LockError::Lock {
                path: path.to_path_buf(),
                err,
            });
        }
        let l = Arc::new(DiskLock {
            _file: file,
            path: path.to_path_buf(),
            write,
        });
        held.insert(key, Arc::downgrade(&l));
        Ok(l)
    }
}

/// Why a disk could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("disk `{}` is already served by {holder}; stop that server first", path.display())]
    Held { path: PathBuf, holder: String },
    #[error("disk `{}`: {err}", path.display())]
    Open { path: PathBuf, err: std::io::Error },
    #[error("disk `{}`: cannot lock it: {err}", path.display())]
    Lock { path: PathBuf, err: std::io::Error },
}

fn ofd_lock(file: &File, write: bool) -> std::io::Result<()> {
    // SAFETY: flock is plain data; zeroed is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    // l_start = l_len = 0: the whole file, however it grows.
    // SAFETY: F_OFD_SETLK reads the flock we pass, which lives across the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The process holding an OFD lock on the file `meta` describes, found by
/// the `lock:` lines of `/proc/PID/fdinfo/FD` (an OFD lock reports no pid
/// of its own). `None` if none is visible to us.
fn holder_of(meta: &std::fs::Metadata) -> Option<String> {
    let dev = meta.dev();
    // /proc/locks and fdinfo print the device as hex major:minor.
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let me = std::process::id();
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            let holds = info.lines().any(|l| {
                l.starts_with("lock:")
                    && l.contains("OFDLCK")
                    && l.split_whitespace().any(|w| w == id)
            });
            if holds {
                let cmd = std::fs::read(p.path().join("cmdline"))
                    .map(|b| {
                        b.split(|&c| c == 0)
                            .filter(|a| !a.is_empty())
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                return Some(if cmd.is_empty() {
                    format!("pid {pid}")
                } else {
                    format!("pid {pid} ({cmd})")
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_in_process_and_refused_across_processes() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("disk.img");
        std::fs::write(&f, [0u8; 4096]).unwrap();
        let a = DiskLock::acquire(&f, true).unwrap();
        let b = DiskLock::acquire(&f, true).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        // Another process is refused, even a reader. The child makes raw
        // system calls only (this test process has other threads).
        let cpath = std::ffi::CString::new(f.to_str().unwrap()).unwrap();
        // SAFETY: the child only makes system calls on memory prepared
        // before the fork, then _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                let fd = libc::open(cpath.as_ptr(), libc::O_RDONLY);
                let mut fl: libc::flock = std::mem::zeroed();
                fl.l_type = libc::F_RDLCK as i16;
                let r = libc::fcntl(fd, libc::F_OFD_SETLK, &fl);
                let eagain = *libc::__errno_location() == libc::EAGAIN;
                libc::_exit(if fd >= 0 && r != 0 && eagain { 0 } else { 1 });
            }
        }
        let mut st = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0, "{st}");
        drop((a, b));
        // Released: a read lock now works (and read locks share). Another
        // test of this binary may be between fork and exec, holding a copy
        // of the locked description for a moment: allow for that.
        let t0 = std::time::Instant::now();
        let r1 = loop {
            match DiskLock::acquire(&f, false) {
                Ok(l) => break l,
                Err(e) if t0.elapsed() > std::time::Duration::from_secs(5) => panic!("{e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        let r2 = DiskLock::acquire(&f, false).unwrap();
        assert!(!r1.is_write() && Arc::ptr_eq(&r1, &r2));
        let e = DiskLock::acquire(&f, true).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
    }
}
