//! The FUSE file system of an export: a root directory holding one file,
//! served from a [`BlockBackend`] (the semantics are in the
//! [module documentation](super)).
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::{BlockBackend, FileLayout, MAX_READ_REQUEST, MAX_WRITE};

/// How long the kernel may cache names and attributes. They never change.
const TTL: Duration = Duration::from_secs(60);

const ROOT_INO: INodeNo = INodeNo::ROOT;
const FILE_INO: INodeNo = INodeNo(2);

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
pub(super) struct ExportFs {
    backend: Arc<dyn BlockBackend>,
    geometry: FileLayout,
    name: OsString,
    uid: u32,
    gid: u32,
    time: SystemTime,
    writes: RangeLocks,
    read_only: bool,
}

impl ExportFs {
    pub(super) fn new(
        backend: Arc<dyn BlockBackend>,
        geometry: FileLayout,
        name: OsString,
    ) -> Self {
        let backend_read_only = backend.read_only();
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
            read_only: backend_read_only,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0o755, 0, 2),
            FILE_INO if self.read_only => (FileType::RegularFile, 0o400, self.geometry.capacity, 1),
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
    pub(super) fn read_range(&self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
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
    pub(super) fn write_range(&self, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
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

    pub(super) fn flush_backend(&self) -> Result<(), Errno> {
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

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.read_only && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
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
