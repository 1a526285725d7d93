//! The FUSE file system of an export: a root directory holding one file,
//! served from a [`BlockBackend`] (the semantics are in the
//! [module documentation](super)).
//!
//! A read, an aligned write or a flush goes to the backend's
//! [`BlockQueue`] if it has one: the FUSE thread starts it and goes back
//! to the kernel, and the completion, called when the request is done,
//! answers (trimming a read to the bytes asked for) and gives back what
//! the request held (its place among those in flight, a write's range
//! lock). Otherwise, and for the read-modify-write of a partial block,
//! the FUSE thread calls the backend and waits.
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::gate::{DepthGate, RangeGuard, RangeLocks};
use super::{BlockBackend, BlockQueue, FileLayout, MAX_READ_REQUEST, MAX_WRITE};

/// How long the kernel may cache names and attributes. They never change.
const TTL: Duration = Duration::from_secs(60);

const ROOT_INO: INodeNo = INodeNo::ROOT;
const FILE_INO: INodeNo = INodeNo(2);

/// The most requests in flight on an asynchronous backend (fewer if its
/// queue is shallower). The kernel sends the loop driver's requests as
/// background requests, at most `max_background` ([`MAX_BACKGROUND`]) at
/// once, so this is never the limit for them.
const MAX_IN_FLIGHT: usize = 128;

/// The kernel's limit on background requests (the loop driver's
/// asynchronous direct I/O, readahead).
const MAX_BACKGROUND: u16 = 64;

/// The blocks a read covers, and what of them is answered.
#[derive(Debug, Clone, Copy)]
struct ReadSpan {
    /// The first block's offset.
    start: u64,
    /// The whole blocks' length.
    aligned: usize,
    /// Where the bytes asked for start in them.
    skip: usize,
    /// How many bytes are answered.
    len: usize,
}

/// A write, cut at the end of the file.
#[derive(Debug, Clone, Copy)]
struct WriteSpan {
    offset: u64,
    len: usize,
    /// The blocks it covers: `start..end` in bytes.
    start: u64,
    end: u64,
}

impl WriteSpan {
    fn aligned(&self) -> bool {
        self.start == self.offset && self.end == self.offset + self.len as u64
    }
}

/// The FUSE file system: a root directory holding one file.
pub(super) struct ExportFs {
    backend: Arc<dyn BlockBackend>,
    /// The backend's asynchronous side, if any (`None` again once the
    /// session has ended).
    queue: Option<Box<dyn BlockQueue>>,
    /// Bounds the requests in flight on `queue`.
    depth: Arc<DepthGate>,
    geometry: FileLayout,
    name: OsString,
    uid: u32,
    gid: u32,
    time: SystemTime,
    writes: Arc<RangeLocks>,
    read_only: bool,
}

impl ExportFs {
    pub(super) fn new(
        backend: Arc<dyn BlockBackend>,
        geometry: FileLayout,
        name: OsString,
        queue: Option<Box<dyn BlockQueue>>,
    ) -> Self {
        let backend_read_only = backend.read_only();
        // SAFETY: getuid and getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let depth = queue
            .as_ref()
            .map_or(1, |q| q.depth().clamp(1, MAX_IN_FLIGHT));
        Self {
            backend,
            queue,
            depth: DepthGate::new(depth),
            geometry,
            name,
            uid,
            gid,
            time: SystemTime::now(),
            writes: Arc::default(),
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

    /// The blocks a read of up to `size` bytes at `offset` covers; `None`
    /// if it reads nothing (at or past the end of the file).
    fn read_span(&self, offset: u64, size: u32) -> Result<Option<ReadSpan>, Errno> {
        if size > MAX_READ_REQUEST {
            return Err(Errno::EINVAL);
        }
        let g = self.geometry;
        if offset >= g.capacity || size == 0 {
            return Ok(None);
        }
        let len = u64::from(size).min(g.capacity - offset);
        let (start, end) = (g.align_down(offset), g.align_up(offset + len));
        // All of these are at most MAX_READ_REQUEST + 2 blocks.
        Ok(Some(ReadSpan {
            start,
            aligned: (end - start) as usize,
            skip: (offset - start) as usize,
            len: len as usize,
        }))
    }

    /// Reads up to `size` bytes at `offset`: fewer at the end of the file.
    pub(super) fn read_range(&self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let Some(span) = self.read_span(offset, size)? else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0; span.aligned];
        self.backend
            .read_at(span.start, &mut buf)
            .map_err(|_| Errno::EIO)?;
        if span.skip != 0 {
            buf.copy_within(span.skip..span.skip + span.len, 0);
        }
        buf.truncate(span.len);
        Ok(buf)
    }

    /// Starts a read on the queue; its completion answers it.
    fn start_read(&self, queue: &dyn BlockQueue, offset: u64, size: u32, reply: ReplyData) {
        let span = match self.read_span(offset, size) {
            Ok(Some(span)) => span,
            Ok(None) => return reply.data(&[]),
            Err(errno) => return reply.error(errno),
        };
        let permit = self.depth.enter();
        queue.start_read(
            span.start,
            span.aligned,
            Box::new(move |result| {
                drop(permit);
                match result.map(|b| b.get(span.skip..span.skip + span.len)) {
                    Ok(Some(data)) => reply.data(data),
                    // Fewer bytes than asked for: the backend's fault.
                    Ok(None) | Err(_) => reply.error(Errno::EIO),
                }
            }),
        );
    }

    /// What of a write of `data` at `offset` fits in the file, and the
    /// blocks it covers; `None` if it writes nothing.
    fn write_span(&self, offset: u64, data: &[u8]) -> Result<Option<WriteSpan>, Errno> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
        let g = self.geometry;
        if data.is_empty() {
            return Ok(None);
        }
        if offset >= g.capacity {
            return Err(Errno::ENOSPC);
        }
        let len = (data.len() as u64).min(g.capacity - offset);
        Ok(Some(WriteSpan {
            offset,
            len: len as usize,
            start: g.align_down(offset),
            end: g.align_up(offset + len),
        }))
    }

    /// Locks the blocks a write covers against overlapping writes.
    fn lock(&self, span: &WriteSpan) -> RangeGuard {
        let bs = self.geometry.block_size;
        self.writes.lock(span.start / bs, span.end / bs)
    }

    /// Writes `data` at `offset` on this thread; returns how much was
    /// written (less than `data.len()` only at the end of the file).
    #[cfg(test)]
    pub(super) fn write_range(&self, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let Some(span) = self.write_span(offset, data)? else {
            return Ok(0);
        };
        let _guard = self.lock(&span);
        self.write_locked(&span, &data[..span.len])
    }

    /// Writes `data` (already cut to the file) with its blocks locked.
    fn write_locked(&self, span: &WriteSpan, data: &[u8]) -> Result<usize, Errno> {
        let g = self.geometry;
        if span.aligned() {
            self.backend
                .write_at(span.offset, data)
                .map_err(|_| Errno::EIO)?;
            return Ok(data.len());
        }
        // Read-modify-write: read the partial first and last blocks, patch
        // them, write the whole aligned span at once.
        let bs = g.block_size as usize;
        let mut buf = vec![0; (span.end - span.start) as usize];
        let head_partial = span.start != span.offset;
        let tail_partial = span.end != span.offset + data.len() as u64;
        if head_partial {
            self.backend
                .read_at(span.start, &mut buf[..bs])
                .map_err(|_| Errno::EIO)?;
        }
        if tail_partial && !(head_partial && buf.len() == bs) {
            let at = buf.len() - bs;
            self.backend
                .read_at(span.end - g.block_size, &mut buf[at..])
                .map_err(|_| Errno::EIO)?;
        }
        let skip = (span.offset - span.start) as usize;
        buf[skip..skip + data.len()].copy_from_slice(data);
        self.backend
            .write_at(span.start, &buf)
            .map_err(|_| Errno::EIO)?;
        Ok(data.len())
    }

    /// Serves a write: an aligned one is started on the queue, if there is
    /// one, and answered by its completion (its blocks stay locked until
    /// then); any other is written on this thread.
    fn serve_write(&self, offset: u64, data: &[u8], reply: ReplyWrite) {
        let span = match self.write_span(offset, data) {
            Ok(Some(span)) => span,
            Ok(None) => return reply.written(0),
            Err(errno) => return reply.error(errno),
        };
        let guard = self.lock(&span);
        let data = &data[..span.len];
        // At most the request's length, which the kernel sends as a u32.
        let written = data.len() as u32;
        match &self.queue {
            Some(queue) if span.aligned() => {
                let permit = self.depth.enter();
                queue.start_write(
                    offset,
                    data,
                    Box::new(move |result| {
                        drop((guard, permit));
                        match result {
                            Ok(()) => reply.written(written),
                            Err(_) => reply.error(Errno::EIO),
                        }
                    }),
                );
            }
            _ => match self.write_locked(&span, data) {
                Ok(_) => reply.written(written),
                Err(errno) => reply.error(errno),
            },
        }
    }

    pub(super) fn flush_backend(&self) -> Result<(), Errno> {
        self.backend.flush().map_err(|_| Errno::EIO)
    }

    /// Serves `flush` and `fsync`: answered once every write answered
    /// before it started is durable.
    fn serve_flush(&self, reply: ReplyEmpty) {
        let Some(queue) = &self.queue else {
            return reply_empty(reply, self.flush_backend());
        };
        let permit = self.depth.enter();
        queue.start_flush(Box::new(move |result| {
            drop(permit);
            reply_empty(reply, result.map_err(|_| Errno::EIO));
        }));
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
        let _ = config.set_max_background(MAX_BACKGROUND);
        Ok(())
    }

    fn destroy(&mut self) {
        // The session has ended: what is still pending fails now.
        self.queue = None;
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
        if let Some(queue) = &self.queue {
            return self.start_read(&**queue, offset, size, reply);
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
        self.serve_write(offset, data, reply);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.serve_flush(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.serve_flush(reply);
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
