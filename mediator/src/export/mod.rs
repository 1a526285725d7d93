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
//!   `flush`, sent on each `close`) flush the backend and only answer once
//!   that is done, so an `fsync` covers every write acknowledged before it.
//!   The loop driver turns a block-layer flush into an `fsync`.
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
//! * Requests are large and many at once: writes up to `max_write`
//!   ([`MAX_WRITE`], 1 MiB), reads up to the kernel's matching `max_pages`
//!   (any read larger than [`MAX_READ_REQUEST`] is refused with `EINVAL`),
//!   and the loop driver's asynchronous direct I/O keeps up to 64 of them
//!   in flight (`FUSE_ASYNC_DIO`, `max_background`).
//!
//! # Requests in flight
//!
//! The FUSE session runs [`MountOptions::threads`] threads (4 by default)
//! that read the kernel's requests. A backend with an asynchronous side
//! ([`BlockBackend::queue`], the mediated device's) keeps many requests in
//! flight without a thread each: a FUSE thread starts a read, an aligned
//! write or a flush on the [`BlockQueue`] and goes back to the kernel at
//! once; the request's completion, called by the queue when it is done,
//! answers the kernel (fuser's replies may be answered from any thread).
//! For the mediated device (`mediated.rs`) the FUSE thread puts the
//! request into the mediator's ring itself and hands its ticket to one
//! completion thread, which waits for whichever completes first, as the
//! client that polls the mediator's completion ring, and answers.
//!
//! * At most the queue's depth (the mediator's `max_in_flight`, and at
//!   most 128) requests are in flight; a FUSE thread with one more waits
//!   for a place (back-pressure: the kernel then queues its requests).
//! * A write holds its blocks' range lock from before it starts until its
//!   completion, so two overlapping writes are never at the backend at
//!   once. A write that is not block-aligned is a read-modify-write done
//!   on the FUSE thread, synchronously, under the same lock.
//! * `fsync` and `flush` start a flush after every write they must cover
//!   has completed (a write is acknowledged only once completed).
//! * When the session ends (unmounted, or the connection aborted), the
//!   queue is dropped, which fails every completion still pending (their
//!   answers can reach nobody any more): nothing waits on the backend, and
//!   no reply is left unanswered (fuser also answers `EIO` for a reply
//!   dropped unanswered).
//!
//! Without an asynchronous side (the tests' in-memory backends), each
//! request is a synchronous call of the backend on the FUSE thread that
//! received it, so at most [`MountOptions::threads`] are in flight.
//!
//! On the 2-core machine this was measured on (fio 4 KiB random reads at
//! queue depth 32 through a loop device), 1, 2, 4 or 8 FUSE threads and a
//! mediator spin of 20 to 200 µs served about the same within the noise
//! (8 threads and no spin served less), so the defaults stayed 4 threads
//! and the mediator's 50 µs.
//!
//! # Requirements
//!
//! `/dev/fuse`. As root the mount is a plain `mount(2)`: no libfuse and no
//! helper binary is needed. Other users need the setuid `fusermount3` (Debian
//! and Ubuntu package `fuse3`), which fuser runs for them. Only the mounting
//! user can access the mount (there is no `allow_other`): mount as the user
//! that runs `losetup`, normally root.

mod fs;
mod gate;
mod mediated;
mod mountpoint;
#[cfg(test)]
mod tests;

pub use mountpoint::{
    check_mount_point, loop_devices_of, MountPointError, MountPointState, FS_NAME_PREFIX,
};

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::MountOption;

use fs::ExportFs;

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
    /// Whether the device refuses writes. Read once, when the backend is
    /// mounted: the file is then mode 0400 in a read-only mount, and
    /// writes fail with `EROFS` before they reach the backend.
    fn read_only(&self) -> bool {
        false
    }
    /// The backend's asynchronous side, if it has one: the exporter then
    /// starts reads, aligned writes and flushes there and answers the
    /// kernel when they complete, so that many are in flight at once
    /// without a thread each (see the [module documentation](self)).
    /// Called once per mount; the queue is dropped when the FUSE session
    /// ends. Without one (the default), every request is a call of the
    /// synchronous methods on the FUSE thread that received it.
    ///
    /// # Errors
    ///
    /// Starting the queue failed; the mount then fails with this error.
    fn queue(&self) -> io::Result<Option<Box<dyn BlockQueue>>> {
        Ok(None)
    }
}

/// What a [`BlockQueue`] calls when a write or a flush is done, with its
/// result.
pub type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// What a [`BlockQueue`] calls when a read is done: with the bytes read
/// (as many as were asked for), or the error.
pub type ReadDone = Box<dyn FnOnce(io::Result<&[u8]>) + Send>;

/// The asynchronous side of a [`BlockBackend`] ([`BlockBackend::queue`]).
///
/// A request is started here and the call returns at once; the queue calls
/// the request's completion exactly once when it is done, from any thread
/// (including the caller's, at once, for a request that cannot start).
/// A completion answers the kernel and returns; it never waits on the
/// queue. The exporter calls with the same alignment as on the synchronous
/// side, never has more than [`depth`](Self::depth) requests started and
/// not completed, and never two overlapping writes. Dropping the queue
/// calls every completion still pending (with an error if its request is
/// not done) before it returns.
pub trait BlockQueue: Send + Sync {
    /// How many requests the queue takes at once.
    fn depth(&self) -> usize;
    /// Starts reading `len` bytes at `offset`.
    fn start_read(&self, offset: u64, len: usize, done: ReadDone);
    /// Starts writing `data` at `offset` (the bytes are copied before this
    /// returns).
    fn start_write(&self, offset: u64, data: &[u8], done: Done);
    /// Starts a flush: it makes durable every write whose completion was
    /// called before it started.
    fn start_flush(&self, done: Done);
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
            fs_name: FS_NAME_PREFIX.to_owned(),
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
    let geometry = FileLayout::of(&*backend)?;
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

    let read_only = backend.read_only();
    let queue = backend.queue()?;
    let fs = ExportFs::new(backend, geometry, OsString::from(name), queue);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
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

    /// Unmounts if nothing uses the exported file: `Ok(true)` once it is
    /// unmounted and its session has ended, `Ok(false)` if the file is in
    /// use (by a loop device, or a process that has it open), in which case
    /// nothing changes and the export goes on serving. This is the orderly
    /// stop: call it again until it returns `true`.
    ///
    /// # Errors
    ///
    /// An error of the unmount other than "busy", or the session's own error.
    pub fn try_unmount(&mut self) -> io::Result<bool> {
        let Some(thread) = self.thread.as_ref() else {
            return Ok(true);
        };
        match detach(&self.dir, false) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => return Ok(false),
            // Not mounted any more (someone else unmounted it): the session
            // has ended or is ending.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {}
            Err(err) => return Err(err),
        }
        // Unmounted: the kernel ends the session (it answers nothing after
        // the last user has gone, so this does not wait on a user).
        let _ = wait_finished(thread, LAZY_UNMOUNT_WAIT);
        let thread = self.thread.take().expect("checked above");
        if !thread.is_finished() {
            return Err(io::Error::other(
                "the FUSE session did not end after the unmount",
            ));
        }
        thread
            .join()
            .map_err(|_| io::Error::other("the FUSE session thread panicked"))?
            .map(|()| true)
    }

    /// Who uses the exported file, as far as can be seen: the loop devices
    /// attached to it.
    pub fn users(&self) -> Vec<String> {
        loop_devices_of(&self.file)
    }

    /// Unmounts and joins the FUSE session thread, returning its error if it
    /// failed.
    ///
    /// If the file is still in use (say, by a loop device), the mount is
    /// detached lazily: it disappears from the namespace at once but is
    /// served, for as long as this process runs, until its last user closes
    /// it. If that does not happen within a short wait, this returns a
    /// `ResourceBusy` error and leaves the session thread to end by itself.
    /// Dropping a `Mount` does the same, ignoring errors. (An orderly stop
    /// that never breaks a user is [`try_unmount`](Self::try_unmount).)
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
                    "{} is still in use: detached lazily, it is served (while this process runs) until its last user closes it",
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
struct FileLayout {
    capacity: u64,
    block_size: u64,
}

impl FileLayout {
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
