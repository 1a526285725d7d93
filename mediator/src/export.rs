//! The FUSE exporter: makes a mediated block service a real host object.
//!
//! [`mount`] serves a [`BlockBackend`] as the single regular file `dir/name`
//! of a FUSE mount at `dir`. `losetup` turns that file into a block device,
//! which Linux can then `mkfs` and mount like any disk:
//!
//! ```text
//! losetup --find --show --direct-io=on DIR/NAME   # -> /dev/loopN
//! mkfs.ext4 /dev/loopN && mount /dev/loopN /mnt
//! ```
//!
//! # Semantics
//!
//! * The file has mode 0600, belongs to the user that mounted it and its size
//!   is the backend's capacity, read once at mount time: it never changes.
//! * Reads and writes may come at any offset and of any length. The exporter
//!   only ever calls the backend with offsets and lengths aligned to its block
//!   size: an unaligned read reads the enclosing blocks, an unaligned write is
//!   a read-modify-write of its first and last block. Writes are serialised
//!   against overlapping writes (at block granularity), so two concurrent
//!   writes to different bytes of one block both land.
//! * A read that starts at or past the capacity returns 0 bytes; one that
//!   crosses it is short. A write that starts at or past the capacity fails
//!   with `ENOSPC`, as it would on a block device; one that crosses it is
//!   short (the part that fits is written).
//! * Every write reaches the backend before it is acknowledged; `fsync` (and
//!   `flush`, sent on each `close`) call [`BlockBackend::flush`] and only
//!   answer once it returned, so an `fsync` covers every write completed
//!   before it. The loop driver turns a block-layer flush into an `fsync`.
//! * The file is opened with `FOPEN_DIRECT_IO` (nothing is cached in the host
//!   page cache, so the loop device's I/O is not cached twice) and
//!   `FOPEN_PARALLEL_DIRECT_WRITES` (the kernel may send writes concurrently).
//! * The namespace is fixed: creating, linking, renaming or removing anything
//!   fails with `EACCES`. `setattr` accepts only what changes nothing (the
//!   same mode, owner and size); timestamps are accepted and ignored; any other
//!   change, such as a truncation, fails with `EPERM`. `fallocate` without
//!   flags (or with `FALLOC_FL_KEEP_SIZE`) inside the file succeeds, as the
//!   space always exists; hole punching and zeroing fail with `EOPNOTSUPP`
//!   (the loop driver then stops sending discards).
//! * Backend errors become `EIO`.
//! * The FUSE session runs [`MountOptions::threads`] worker threads (4 by
//!   default), so the loop device's concurrent requests are served
//!   concurrently. Requests are bounded: writes by `max_write`
//!   ([`MAX_WRITE`]), reads by the kernel's matching `max_pages` (and any
//!   read larger than [`MAX_READ_REQUEST`] is refused with `EINVAL`).
//!
//! # Requirements
//!
//! `/dev/fuse`. As root the mount is a plain `mount(2)`: no libfuse and no
//! helper binary is needed. Other users need the setuid `fusermount3` (Debian
//! and Ubuntu package `fuse3`), which fuser runs for them. Only the mounting
//! user can access the mount (there is no `allow_other`): mount as the user
//! that runs `losetup`, normally root.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

/// What the exporter needs from a block service (the mediator implements it;
/// tests use an in-memory one).
///
/// The exporter only calls [`read_at`](Self::read_at) and
/// [`write_at`](Self::write_at) with an offset and a length that are
/// multiples of [`block_size`](Self::block_size) and within
/// [`capacity`](Self::capacity). Calls may come concurrently from several
/// threads, but never two overlapping writes at once.
pub trait BlockBackend: Send + Sync + 'static {
    /// The size of the device in bytes: a multiple of the block size. It is
    /// read once, when the backend is mounted.
    fn capacity(&self) -> u64;
    /// The block size in bytes: a power of two in `512..=65536`.
    fn block_size(&self) -> u32;
    /// Fills `buf` with the bytes at `offset` (both aligned to the block size).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset` (both aligned to the block size).
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every write that has returned durable.
    fn flush(&self) -> io::Result<()>;
}

/// The largest write the kernel is asked to send in one request (1 MiB).
/// The kernel also sizes its largest direct-I/O read from it.
pub const MAX_WRITE: u32 = 1 << 20;

/// The largest read request served; larger ones fail with `EINVAL`. The
/// kernel never sends one (it caps reads at `max_pages`, derived from
/// [`MAX_WRITE`]): this bounds the memory a request can make the exporter
/// allocate whatever the kernel does.
pub const MAX_READ_REQUEST: u32 = 16 << 20;

/// How long [`Mount::unmount`] waits for the FUSE session to end after a
/// lazy unmount (the file was still in use, e.g. by a loop device that is
/// being detached and releases its file asynchronously).
const LAZY_UNMOUNT_WAIT: Duration = Duration::from_secs(2);

/// How long the kernel may cache names and attributes. They never change.
const TTL: Duration = Duration::from_secs(60);

const ROOT_INO: INodeNo = INodeNo::ROOT;
const FILE_INO: INodeNo = INodeNo(2);

/// Tunables of [`mount_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Number of threads serving FUSE requests (at least 1).
    pub threads: usize,
    /// The mount's source, as shown in `/proc/mounts` (`fsname=`).
    pub fs_name: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            threads: 4,
            fs_name: "moat-export".to_owned(),
        }
    }
}

/// Mounts `backend` as the single regular file `dir/name` (mode 0600, size =
/// capacity) in a FUSE mount at `dir`, which must exist and be empty.
///
/// Dropping the returned [`Mount`] unmounts it (lazily if busy) and joins the
/// FUSE thread. See the [module documentation](self) for the semantics.
///
/// # Errors
///
/// `InvalidInput` if the backend's geometry or `name` is invalid,
/// `NotADirectory` or `DirectoryNotEmpty` for an unusable `dir`, and any
/// error of opening `/dev/fuse` or of the mount itself.
pub fn mount(backend: Arc<dyn BlockBackend>, dir: &Path, name: &str) -> io::Result<Mount> {
    mount_with(backend, dir, name, &MountOptions::default())
}

/// [`mount`] with explicit [`MountOptions`].
///
/// # Errors
///
/// As [`mount`]; also `InvalidInput` if `options.threads` is 0.
pub fn mount_with(
    backend: Arc<dyn BlockBackend>,
    dir: &Path,
    name: &str,
    options: &MountOptions,
) -> io::Result<Mount> {
    let geometry = Geometry::of(&*backend)?;
    check_name(name)?;
    if options.threads == 0 {
        return Err(invalid_input("the FUSE session needs at least one thread"));
    }
    if options.fs_name.is_empty() || options.fs_name.contains([',', '\0']) {
        return Err(invalid_input(
            "fs_name must be non-empty, without ',' or NUL",
        ));
    }
    let dir = dir.canonicalize()?;
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ));
    }
    if std::fs::read_dir(&dir)?.next().is_some() {
        return Err(io::Error::new(
            io::ErrorKind::DirectoryNotEmpty,
            format!("{} is not empty", dir.display()),
        ));
    }

    let fs = ExportFs::new(backend, geometry, OsString::from(name));
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(options.fs_name.clone()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
        MountOption::CUSTOM(format!("max_read={MAX_WRITE}")),
    ];
    config.n_threads = Some(options.threads);
    // Mounts, and answers the kernel's INIT before returning.
    let session = fuser::Session::new(fs, &dir, &config)?;
    // If the thread cannot be started, the session is dropped, which unmounts.
    let thread = std::thread::Builder::new()
        .name("moat-export".to_owned())
        .spawn(move || session.run())?;
    Ok(Mount {
        file: dir.join(name),
        dir,
        thread: Some(thread),
    })
}

/// A mounted export: see [`mount`].
#[derive(Debug)]
#[must_use = "dropping a Mount unmounts it"]
pub struct Mount {
    dir: PathBuf,
    file: PathBuf,
    /// The thread running the FUSE session; `None` once shut down.
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Mount {
    /// The exported file: `dir/name`, with `dir` made canonical.
    pub fn path(&self) -> PathBuf {
        self.file.clone()
    }

    /// The mount point (canonical).
    pub fn mount_point(&self) -> &Path {
        &self.dir
    }

    /// Unmounts and joins the FUSE session thread, returning its error if it
    /// failed.
    ///
    /// If the file is still in use (say, by a loop device), the mount is
    /// detached lazily: it disappears from the namespace at once but is
    /// served until its last user closes it. If that does not happen within
    /// a short wait, this returns a `ResourceBusy` error and leaves the
    /// session thread to end by itself. Dropping a `Mount` does the same,
    /// ignoring errors.
    ///
    /// # Errors
    ///
    /// `ResourceBusy` as above, an error of the unmount itself, or the
    /// session's own error.
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let lazy = match detach(&self.dir, false) {
            Ok(()) => false,
            // Not mounted any more (someone else unmounted it): the session
            // has ended or is ending.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => false,
            Err(_) => {
                detach(&self.dir, true)?;
                true
            }
        };
        if lazy && !wait_finished(&thread, LAZY_UNMOUNT_WAIT) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{} is still in use: detached lazily, it is served until its last user closes it",
                    self.file.display()
                ),
            ));
        }
        thread
            .join()
            .map_err(|_| io::Error::other("the FUSE session thread panicked"))?
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Unmounts `dir`, lazily (`MNT_DETACH`) if asked. Without the right to
/// `umount(2)`, uses `fusermount3`/`fusermount -u`, as fuser mounts through
/// them in that case.
fn detach(dir: &Path, lazy: bool) -> io::Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call;
    // umount2 does not keep the pointer.
    if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let mut last = err;
    for helper in ["fusermount3", "fusermount"] {
        let mut cmd = Command::new(helper);
        cmd.args(["-u", "-q"]);
        if lazy {
            cmd.arg("-z");
        }
        cmd.arg("--").arg(dir);
        match cmd.stdin(Stdio::null()).stdout(Stdio::null()).output() {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                last = io::Error::other(format!(
                    "{helper} -u {}: {}",
                    dir.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => last = err,
        }
    }
    Err(last)
}

fn wait_finished<T>(thread: &JoinHandle<T>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

fn invalid_input(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name.contains(['/', '\0'])
    {
        return Err(invalid_input(format!(
            "{name:?} is not a valid file name (non-empty, at most 255 bytes, no '/' or NUL, not . or ..)"
        )));
    }
    Ok(())
}

/// A backend's geometry, checked.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    capacity: u64,
    block_size: u64,
}

impl Geometry {
    fn of(backend: &dyn BlockBackend) -> io::Result<Self> {
        let block_size = backend.block_size();
        let capacity = backend.capacity();
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(invalid_input(format!(
                "block size {block_size} is not a power of two in 512..=65536"
            )));
        }
        if !capacity.is_multiple_of(u64::from(block_size)) {
            return Err(invalid_input(format!(
                "capacity {capacity} is not a multiple of the block size {block_size}"
            )));
        }
        Ok(Self {
            capacity,
            block_size: u64::from(block_size),
        })
    }

    fn align_down(&self, offset: u64) -> u64 {
        offset & !(self.block_size - 1)
    }

    /// Rounds up; callers only pass offsets within the capacity, which is a
    /// multiple of the block size, so this cannot overflow.
    fn align_up(&self, offset: u64) -> u64 {
        self.align_down(offset + self.block_size - 1)
    }
}

/// Exclusive locks on ranges of blocks, held by writes.
#[derive(Debug, Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

impl RangeLocks {
    /// Waits until no held range overlaps the blocks `start..end`, then
    /// holds them until the guard is dropped.
    fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held();
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self
                .released
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
        held.push((start, end));
        RangeGuard {
            locks: self,
            range: (start, end),
        }
    }

    fn held(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held();
        // Held ranges never overlap, so this one is there exactly once.
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

/// The FUSE file system: a root directory holding one file.
struct ExportFs {
    backend: Arc<dyn BlockBackend>,
    geometry: Geometry,
    name: OsString,
    uid: u32,
    gid: u32,
    time: SystemTime,
    writes: RangeLocks,
}

impl ExportFs {
    fn new(backend: Arc<dyn BlockBackend>, geometry: Geometry, name: OsString) -> Self {
        // SAFETY: getuid and getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Self {
            backend,
            geometry,
            name,
            uid,
            gid,
            time: SystemTime::now(),
            writes: RangeLocks::default(),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0o755, 0, 2),
            FILE_INO => (FileType::RegularFile, 0o600, self.geometry.capacity, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            // The geometry checks bound the block size to 65536.
            blksize: self.geometry.block_size as u32,
            flags: 0,
        })
    }

    /// Reads up to `size` bytes at `offset`: fewer at the end of the file.
    fn read_range(&self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        if size > MAX_READ_REQUEST {
            return Err(Errno::EINVAL);
        }
        let g = self.geometry;
        if offset >= g.capacity || size == 0 {
            return Ok(Vec::new());
        }
        let len = u64::from(size).min(g.capacity - offset);
        let end = offset + len;
        let (start_al, end_al) = (g.align_down(offset), g.align_up(end));
        // All of these are at most MAX_READ_REQUEST + 2 blocks.
        let len = len as usize;
        let mut buf = vec![0; (end_al - start_al) as usize];
        self.backend
            .read_at(start_al, &mut buf)
            .map_err(|_| Errno::EIO)?;
        let skip = (offset - start_al) as usize;
        if skip != 0 {
            buf.copy_within(skip..skip + len, 0);
        }
        buf.truncate(len);
        Ok(buf)
    }

    /// Writes `data` at `offset`; returns how much was written (less than
    /// `data.len()` only at the end of the file).
    fn write_range(&self, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let g = self.geometry;
        if data.is_empty() {
            return Ok(0);
        }
        if offset >= g.capacity {
            return Err(Errno::ENOSPC);
        }
        let len = (data.len() as u64).min(g.capacity - offset);
        let data = &data[..len as usize];
        let end = offset + len;
        let (start_al, end_al) = (g.align_down(offset), g.align_up(end));
        let _guard = self
            .writes
            .lock(start_al / g.block_size, end_al / g.block_size);
        if start_al == offset && end_al == end {
            self.backend
                .write_at(offset, data)
                .map_err(|_| Errno::EIO)?;
            return Ok(data.len());
        }
        // Read-modify-write: read the partial first and last blocks, patch
        // them, write the whole aligned span at once.
        let bs = g.block_size as usize;
        let mut buf = vec![0; (end_al - start_al) as usize];
        let head_partial = start_al != offset;
        let tail_partial = end_al != end;
        if head_partial {
            self.backend
                .read_at(start_al, &mut buf[..bs])
                .map_err(|_| Errno::EIO)?;
        }
        if tail_partial && !(head_partial && buf.len() == bs) {
            let at = buf.len() - bs;
            self.backend
                .read_at(end_al - g.block_size, &mut buf[at..])
                .map_err(|_| Errno::EIO)?;
        }
        let skip = (offset - start_al) as usize;
        buf[skip..skip + data.len()].copy_from_slice(data);
        self.backend
            .write_at(start_al, &buf)
            .map_err(|_| Errno::EIO)?;
        Ok(data.len())
    }

    fn flush_backend(&self) -> Result<(), Errno> {
        self.backend.flush().map_err(|_| Errno::EIO)
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(errno) => reply.error(errno),
    }
}

impl Filesystem for ExportFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // MAX_WRITE is far below fuser's limit; should it ever not be, the
        // kernel sends writes up to that limit, which are served all the same.
        let _ = config.set_max_write(MAX_WRITE);
        // Lets the loop driver's asynchronous direct I/O have several
        // requests in flight. Without kernel support, requests are serialised.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(attr) if parent == ROOT_INO && name == self.name => {
                reply.entry(&TTL, &attr, Generation(0));
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let unchanged = mode.is_none_or(|m| m & 0o7777 == u32::from(attr.perm))
            && uid.is_none_or(|u| u == attr.uid)
            && gid.is_none_or(|g| g == attr.gid)
            && size.is_none_or(|s| ino == FILE_INO && s == attr.size);
        if unchanged {
            reply.attr(&TTL, &attr);
        } else {
            reply.error(Errno::EPERM);
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EACCES);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EACCES);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EACCES);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EACCES);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EACCES);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EACCES);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EACCES);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EACCES);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            FILE_INO => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            ROOT_INO => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EBADF);
        }
        match self.read_range(offset, size) {
            Ok(data) => reply.data(&data),
            Err(errno) => reply.error(errno),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EBADF);
        }
        match self.write_range(offset, data) {
            // At most the request's length, which the kernel sends as a u32.
            Ok(written) => reply.written(written as u32),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.flush_backend());
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.flush_backend());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            ROOT_INO => reply.opened(FileHandle(0), FopenFlags::empty()),
            FILE_INO => reply.error(Errno::ENOTDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries: [(INodeNo, FileType, &OsStr); 3] = [
            (ROOT_INO, FileType::Directory, OsStr::new(".")),
            (ROOT_INO, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, &self.name),
        ];
        // An entry's offset is the offset of the one after it.
        for (next, (ino, kind, name)) in (1u64..).zip(entries) {
            if next > offset && reply.add(ino, next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let g = self.geometry;
        // The block size is at most 65536.
        let bsize = g.block_size as u32;
        reply.statfs(g.capacity / g.block_size, 0, 0, 2, 0, bsize, 255, bsize);
    }

    // ENOSYS makes the kernel stop asking for extended attributes: there are none.
    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EBADF);
        }
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        match offset.checked_add(length) {
            Some(end) if end <= self.geometry.capacity => reply.ok(),
            _ => reply.error(Errno::ENOSPC),
        }
    }

    // ENOSYS makes the kernel fall back to generic seeking.
    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        reply.error(Errno::ENOSYS);
    }

    // ENOSYS makes the kernel fall back to reads and writes.
    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }
}

/// A mediated block device is exported as it is: every access of the
/// kernel goes through the mediator to the driver picoprocess.
impl BlockBackend for crate::block::MediatedBlock {
    fn capacity(&self) -> u64 {
        crate::block::MediatedBlock::capacity(self)
    }

    fn block_size(&self) -> u32 {
        crate::block::MediatedBlock::block_size(self)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        crate::block::MediatedBlock::read_at(self, offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        crate::block::MediatedBlock::write_at(self, offset, data)
    }

    fn flush(&self) -> std::io::Result<()> {
        crate::block::MediatedBlock::flush(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs::OpenOptions;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// An in-memory backend that fails any misaligned call.
    struct MemBackend {
        block_size: u32,
        data: Mutex<Vec<u8>>,
        flushes: AtomicU64,
        fail: AtomicBool,
        /// Widens race windows: reads sleep after copying.
        slow: AtomicBool,
    }

    impl MemBackend {
        fn new(capacity: usize, block_size: u32) -> Arc<Self> {
            Arc::new(Self {
                block_size,
                data: Mutex::new(vec![0; capacity]),
                flushes: AtomicU64::new(0),
                fail: AtomicBool::new(false),
                slow: AtomicBool::new(false),
            })
        }

        fn check(&self, offset: u64, len: usize) -> io::Result<()> {
            let bs = u64::from(self.block_size);
            assert!(
                offset.is_multiple_of(bs) && (len as u64).is_multiple_of(bs) && len > 0,
                "misaligned backend call: offset {offset}, len {len}"
            );
            assert!(offset + len as u64 <= self.capacity(), "past the end");
            if self.fail.load(Ordering::SeqCst) {
                return Err(io::Error::other("injected failure"));
            }
            Ok(())
        }

        fn snapshot(&self) -> Vec<u8> {
            self.data.lock().unwrap().clone()
        }
    }

    impl BlockBackend for MemBackend {
        fn capacity(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn block_size(&self) -> u32 {
            self.block_size
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.check(offset, buf.len())?;
            let o = offset as usize;
            buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
            if self.slow.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(())
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.check(offset, data.len())?;
            let o = offset as usize;
            self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(io::Error::other("injected failure"));
            }
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Geom(u64, u32);
    impl BlockBackend for Geom {
        fn capacity(&self) -> u64 {
            self.0
        }
        fn block_size(&self) -> u32 {
            self.1
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
            unreachable!()
        }
        fn write_at(&self, _: u64, _: &[u8]) -> io::Result<()> {
            unreachable!()
        }
        fn flush(&self) -> io::Result<()> {
            unreachable!()
        }
    }

    /// splitmix64: a small deterministic generator for the tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.next() as u8;
            }
        }
    }

    fn fs_for(backend: Arc<MemBackend>) -> ExportFs {
        let geometry = Geometry::of(&*backend).unwrap();
        ExportFs::new(backend, geometry, "disk".into())
    }

    #[test]
    fn geometry_and_name_are_checked() {
        for (cap, bs) in [(4096, 256), (4096, 1000), (1 << 20, 1 << 17), (1000, 512)] {
            let err = Geometry::of(&Geom(cap, bs)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{cap} {bs}");
        }
        assert!(Geometry::of(&Geom(0, 512)).is_ok());
        assert!(Geometry::of(&Geom(1 << 30, 65536)).is_ok());
        for name in ["", ".", "..", "a/b", "a\0b", &"x".repeat(256)] {
            assert!(check_name(name).is_err(), "{name:?}");
        }
        check_name("disk.img").unwrap();
        // Checked before anything is mounted, so this needs no privilege.
        let err = mount(Arc::new(Geom(1000, 512)), Path::new("/nonexistent"), "d").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = mount(MemBackend::new(4096, 512), Path::new("/"), "d").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::DirectoryNotEmpty);
    }

    /// Random reads and writes at any offset and length against a model.
    #[test]
    fn unaligned_io_matches_a_model() {
        for bs in [512u32, 4096, 65536] {
            let cap = 64 * bs as usize;
            let backend = MemBackend::new(cap, bs);
            let fs = fs_for(backend.clone());
            let mut model = vec![0u8; cap];
            let mut rng = Rng(u64::from(bs));
            for _ in 0..2000 {
                let offset = rng.below(cap as u64 + 2 * u64::from(bs));
                let len = match rng.below(4) {
                    0 => rng.below(16) as usize,
                    1 => bs as usize,
                    _ => rng.below(4 * u64::from(bs)) as usize,
                };
                if rng.below(2) == 0 {
                    let mut data = vec![0; len];
                    rng.fill(&mut data);
                    let res = fs.write_range(offset, &data);
                    if len == 0 {
                        assert_eq!(res, Ok(0));
                    } else if offset >= cap as u64 {
                        assert_eq!(res, Err(Errno::ENOSPC));
                    } else {
                        let n = len.min(cap - offset as usize);
                        assert_eq!(res, Ok(n));
                        model[offset as usize..offset as usize + n].copy_from_slice(&data[..n]);
                    }
                } else {
                    let got = fs.read_range(offset, len as u32).unwrap();
                    let from = (offset as usize).min(cap);
                    let to = (offset as usize + len).min(cap);
                    assert_eq!(got, &model[from..to], "read {offset}+{len}");
                }
            }
            assert_eq!(backend.snapshot(), model);
        }
    }

    #[test]
    fn huge_reads_are_refused() {
        let fs = fs_for(MemBackend::new(4096, 512));
        assert_eq!(fs.read_range(0, MAX_READ_REQUEST + 1), Err(Errno::EINVAL));
        assert_eq!(fs.read_range(0, MAX_READ_REQUEST).unwrap().len(), 4096);
    }

    /// Concurrent writes to different bytes of the same blocks all land.
    #[test]
    fn concurrent_sub_block_writes_do_not_lose_updates() {
        const THREADS: usize = 8;
        let bs = 4096u32;
        let backend = MemBackend::new(16 * bs as usize, bs);
        backend.slow.store(true, Ordering::Relaxed);
        let fs = Arc::new(fs_for(backend.clone()));
        for round in 0..10u8 {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let fs = fs.clone();
                    std::thread::spawn(move || {
                        // Thread t owns bytes [t*64, t*64+64) of every 512-byte
                        // slot; a slot's write straddles no block boundary.
                        for slot in 0..(16 * 4096 / 512) {
                            let at = slot * 512 + t as u64 * 64;
                            fs.write_range(at, &[round ^ t as u8; 64]).unwrap();
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let data = backend.snapshot();
            for slot in 0..(16 * 4096 / 512) {
                for t in 0..THREADS {
                    let at = slot * 512 + t * 64;
                    assert!(
                        data[at..at + 64].iter().all(|&b| b == round ^ t as u8),
                        "round {round}: lost write of thread {t} at {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn backend_errors_become_eio() {
        let backend = MemBackend::new(8192, 512);
        let fs = fs_for(backend.clone());
        backend.fail.store(true, Ordering::SeqCst);
        assert_eq!(fs.read_range(0, 10), Err(Errno::EIO));
        assert_eq!(fs.write_range(0, &[1; 512]), Err(Errno::EIO));
        assert_eq!(fs.write_range(3, &[1; 5]), Err(Errno::EIO));
        assert_eq!(fs.flush_backend(), Err(Errno::EIO));
    }

    // ---- Through a real FUSE mount: needs root and /dev/fuse. ----

    fn fuse_usable() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let ok = root && Path::new("/dev/fuse").exists();
        if !ok {
            let msg = "needs root and /dev/fuse";
            assert!(
                std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_none(),
                "MOAT_REQUIRE_ROOT_TOOLS is set but this test {msg}"
            );
            eprintln!("skipping: this test {msg}");
        }
        ok
    }

    /// An empty directory removed (if empty) on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "moat-export-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir(&path).unwrap();
            Self(path)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            // Never recursive: if something is still mounted here, leave it.
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn is_mount_point(path: &Path) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let path = path.to_str().unwrap();
        info.lines().any(|l| l.split(' ').nth(4) == Some(path))
    }

    #[test]
    fn fuse_file_behaves() {
        if !fuse_usable() {
            return;
        }
        let dir = TempDir::new("unit");
        let cap = 1 << 20;
        let backend = MemBackend::new(cap, 4096);
        let m = mount(backend.clone(), &dir.0, "disk").unwrap();
        let file = m.path();
        assert!(is_mount_point(m.mount_point()));

        let names: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["disk"]);
        let meta = std::fs::metadata(&file).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.len(), cap as u64);
        assert_eq!(meta.mode() & 0o7777, 0o600);

        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        let mut rng = Rng(7);
        let mut data = vec![0; 10_000];
        rng.fill(&mut data);
        f.write_all_at(&data, 1234).unwrap();
        let mut back = vec![0; 10_000];
        f.read_exact_at(&mut back, 1234).unwrap();
        assert_eq!(back, data);
        assert_eq!(&backend.snapshot()[1234..11_234], &data[..]);

        // The end of the file.
        let mut buf = [0; 100];
        assert_eq!(f.read_at(&mut buf, cap as u64 - 10).unwrap(), 10);
        assert_eq!(f.read_at(&mut buf, cap as u64).unwrap(), 0);
        assert_eq!(f.write_at(&[1; 100], cap as u64 - 10).unwrap(), 10);
        let err = f.write_at(&[1; 100], cap as u64).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));

        // fsync reaches the backend.
        let before = backend.flushes.load(Ordering::SeqCst);
        f.sync_all().unwrap();
        assert!(backend.flushes.load(Ordering::SeqCst) > before);

        // The namespace and the size are fixed.
        let err = f.set_len(100).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        f.set_len(cap as u64).unwrap();
        let err = std::fs::File::create(dir.0.join("other")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        let err = std::fs::create_dir(dir.0.join("sub")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        let err = std::fs::remove_file(&file).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        let err = std::fs::rename(&file, dir.0.join("x")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        let err = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&file)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));

        // Backend failures surface as EIO.
        backend.fail.store(true, Ordering::SeqCst);
        let err = f.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        backend.fail.store(false, Ordering::SeqCst);

        drop(f);
        m.unmount().unwrap();
        assert!(!is_mount_point(&dir.0));
    }

    #[test]
    fn drop_unmounts_and_busy_unmount_is_lazy() {
        if !fuse_usable() {
            return;
        }
        let dir = TempDir::new("drop");
        let m = mount(MemBackend::new(1 << 16, 512), &dir.0, "disk").unwrap();
        let point = m.mount_point().to_owned();
        drop(m);
        assert!(!is_mount_point(&point));

        let backend = MemBackend::new(1 << 16, 512);
        let m = mount(backend.clone(), &dir.0, "disk").unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path())
            .unwrap();
        let started = Instant::now();
        let err = m.unmount().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
        assert!(started.elapsed() < LAZY_UNMOUNT_WAIT + Duration::from_secs(2));
        assert!(!is_mount_point(&point));
        // Detached, but still served to its user.
        f.write_all_at(b"still here", 512).unwrap();
        assert_eq!(&backend.snapshot()[512..522], b"still here");
        drop(f);
    }
}
