//! The stream calls: files, pipes, sockets and the console, as descriptors
//! the monitor brokered (opening, attributes by URI, rename and delete go
//! to it) or that this PAL holds (reads, writes, maps, attributes by
//! handle, shutdowns). Shared sections are `section`'s, dispatched from
//! here by the stream's `section` part.
use super::LinuxPal;
use crate::errno::to_pal as map_errno;
use crate::objects::{Object, StreamObj};
use crate::protocol::{Request, Response};
use crate::sys;
use moat_pal::host::{GuestIn, GuestOut};
use moat_pal::host_calls::StreamCalls;
use moat_pal::memory::RegionKind;
use moat_pal::uri::Uri;
use moat_pal::validate::{self, PAGE};
use moat_pal::{
    access, delete, limits, open_option, prot, stream_kind, Error, ImageInfo, PalResult,
    StreamAttributes,
};
use std::os::fd::AsRawFd;
use std::sync::Mutex;

/// The `StreamObj` inside an object `LinuxPal::stream` returned.
fn inner(o: &Object) -> &StreamObj {
    match o {
        Object::Stream(s) => s,
        _ => unreachable!("LinuxPal::stream returns streams only"),
    }
}

impl LinuxPal {
    /// DkStreamOpen of a URI already copied in and parsed (a host that
    /// serves some schemes itself looks at it first).
    pub fn open_uri(&self, u: Uri, acc: u32, cr: u32, options: u32) -> PalResult<u64> {
        validate::check_access(acc)?;
        validate::check_create(cr)?;
        validate::check_options(options)?;
        let nonblock = options & open_option::NONBLOCK != 0;
        let (fd, kind) = match &u {
            Uri::Dev(_) | Uri::Dns(_) => return Err(Error::NotSupported),
            Uri::PipeServer(_) | Uri::TcpServer(_) => self.open_server(&u, nonblock)?,
            Uri::Shm(_) => return self.open_section(&u, acc, cr, options),
            _ => self.ask_fd(&Request::Open {
                uri: u.canonical(),
                access: acc,
                create: cr,
                options,
            })?,
        };
        self.insert(Object::Stream(StreamObj {
            fd,
            kind,
            uri: Mutex::new(u.canonical()),
            readable: acc & access::READ != 0,
            writable: acc & (access::WRITE | access::APPEND) != 0,
            append: acc & access::APPEND != 0,
            device: None,
            section: None,
        }))
    }

    /// DkStreamAttributesQuery of a URI already copied in and parsed.
    pub fn attributes_of_uri(&self, u: Uri) -> PalResult<StreamAttributes> {
        if matches!(u, Uri::Dev(_) | Uri::Dns(_)) {
            return Err(Error::NotSupported);
        }
        match self.ask(&Request::Stat { uri: u.canonical() })? {
            (
                Response::Attrs {
                    kind,
                    size,
                    readable,
                    writable,
                    executable,
                },
                _,
            ) => Ok(StreamAttributes {
                kind,
                size,
                readable: readable as u32,
                writable: writable as u32,
                executable: executable as u32,
                ..Default::default()
            }),
            _ => Err(Error::Io),
        }
    }
}

impl StreamCalls for LinuxPal {
    fn stream_open(&self, uri: GuestIn, acc: u32, cr: u32, options: u32) -> PalResult<u64> {
        let u = self.uri_in(uri)?;
        self.open_uri(u, acc, cr, options)
    }

    fn stream_read(&self, stream: u64, offset: u64, buf: GuestOut) -> PalResult<u64> {
        let o = self.stream(stream)?;
        let s = inner(&o);
        let n = validate::check_io_len(buf.len())?;
        if s.section.is_some() {
            return Err(Error::NotSupported);
        }
        if s.kind == stream_kind::DIRECTORY {
            return Err(Error::IsDirectory);
        }
        if !s.readable {
            return Err(Error::PermissionDenied);
        }
        if n == 0 {
            return Ok(0);
        }
        let fd = s.fd.as_raw_fd();
        loop {
            let r = if s.seekable() {
                if offset > i64::MAX as u64 {
                    return Err(Error::InvalidArgument);
                }
                sys::pread(fd, buf.addr(), n, offset)
            } else {
                sys::read(fd, buf.addr(), n)
            };
            match r {
                Ok(v) => return Ok(v as u64),
                Err(libc::EINTR) => continue,
                Err(libc::ECONNRESET) => return Ok(0),
                Err(e) => return Err(map_errno(e)),
            }
        }
    }

    fn stream_write(&self, stream: u64, offset: u64, buf: GuestIn) -> PalResult<u64> {
        let o = self.stream(stream)?;
        let s = inner(&o);
        let n = validate::check_io_len(buf.len())?;
        if s.section.is_some() {
            return Err(Error::NotSupported);
        }
        if s.kind == stream_kind::DIRECTORY {
            return Err(Error::IsDirectory);
        }
        if !s.writable {
            return Err(Error::PermissionDenied);
        }
        if n == 0 {
            return Ok(0);
        }
        let fd = s.fd.as_raw_fd();
        loop {
            let r = if s.seekable() && !s.append {
                if offset > i64::MAX as u64 {
                    return Err(Error::InvalidArgument);
                }
                sys::pwrite(fd, buf.addr(), n, offset)
            } else {
                sys::write(fd, buf.addr(), n)
            };
            match r {
                Ok(v) => return Ok(v as u64),
                Err(libc::EINTR) => continue,
                Err(e) => return Err(map_errno(e)),
            }
        }
    }

    fn stream_map(&self, stream: u64, addr: u64, p: u32, offset: u64, size: u64) -> PalResult<u64> {
        let o = self.stream(stream)?;
        let s = inner(&o);
        validate::check_prot(p)?;
        if p == 0
            || size == 0
            || !size.is_multiple_of(PAGE)
            || !offset.is_multiple_of(PAGE)
            || !addr.is_multiple_of(PAGE)
        {
            return Err(Error::InvalidArgument);
        }
        if let Some(sec) = &s.section {
            return self.section_map(s, sec, addr, p, offset, size);
        }
        if s.kind != stream_kind::FILE {
            return Err(Error::WrongHandleKind);
        }
        if (p & prot::READ != 0 && !s.readable) || (p & prot::WRITE != 0 && !s.writable) {
            return Err(Error::PermissionDenied);
        }
        if offset > i64::MAX as u64 {
            return Err(Error::InvalidArgument);
        }
        let (mut r, addr) = self.reserve(addr, size)?;
        let shared = p & prot::WRITE != 0;
        let got = match sys::mmap_fd(addr, size, p, s.fd.as_raw_fd(), offset, shared) {
            Ok(a) => a,
            Err(libc::EACCES) => return Err(Error::PermissionDenied),
            Err(libc::EEXIST) => return Err(Error::AlreadyExists),
            Err(e) => return Err(map_errno(e)),
        };
        if let Err(e) = r.insert(got, size, p, RegionKind::Mapped) {
            let _ = sys::munmap(got, size);
            return Err(e);
        }
        Ok(got)
    }

    fn stream_map_pe_binary(&self, stream: u64) -> PalResult<ImageInfo> {
        let o = self.stream(stream)?;
        let s = inner(&o);
        if s.kind != stream_kind::FILE {
            return Err(Error::WrongHandleKind);
        }
        if !s.readable {
            return Err(Error::PermissionDenied);
        }
        let img = crate::image::load_from_fd(&self.regions, self.mem_limit, s.fd.as_raw_fd())?;
        Ok(ImageInfo {
            base: img.base,
            size: img.end - img.base,
            entry: img.entry,
        })
    }

    fn stream_unmap(&self, addr: u64, size: u64) -> PalResult<()> {
        validate::check_page_range(addr, size)?;
        let mut r = self.regions.write().unwrap();
        if !r.covered_by(addr, size, RegionKind::Mapped)
            && !r.covered_by(addr, size, RegionKind::Section)
            && !r.covered_by(addr, size, RegionKind::Image)
        {
            return Err(Error::BadAddress);
        }
        if sys::munmap(addr, size).is_err() {
            return Err(Error::InvalidArgument);
        }
        r.remove(addr, size);
        Ok(())
    }

    fn stream_set_length(&self, stream: u64, length: u64) -> PalResult<()> {
        let o = self.stream(stream)?;
        let s = inner(&o);
        if let Some(sec) = &s.section {
            return self.section_set_length(s, sec, length);
        }
        if s.kind != stream_kind::FILE {
            return Err(Error::WrongHandleKind);
        }
        if length > 1 << 46 {
            return Err(Error::InvalidArgument);
        }
        if !s.writable {
            return Err(Error::PermissionDenied);
        }
        sys::ftruncate(s.fd.as_raw_fd(), length).map_err(map_errno)
    }

    fn stream_flush(&self, stream: u64) -> PalResult<()> {
        let o = self.stream(stream)?;
        let s = inner(&o);
        if let Some(sec) = &s.section {
            self.section_ring(sec);
            return Ok(());
        }
        if s.kind == stream_kind::FILE && s.writable {
            sys::fsync(s.fd.as_raw_fd()).map_err(map_errno)?;
        }
        Ok(())
    }

    fn stream_delete(&self, stream: u64, which: u32) -> PalResult<()> {
        let o = self.stream(stream)?;
        let s = inner(&o);
        match s.kind {
            stream_kind::FILE | stream_kind::DIRECTORY => {
                if which != delete::ALL {
                    return Err(Error::InvalidArgument);
                }
                let uri = s.uri.lock().unwrap().clone();
                self.ask(&Request::Delete { uri })?;
                Ok(())
            }
            stream_kind::PIPE | stream_kind::TCP => {
                let how = match which {
                    delete::ALL => libc::SHUT_RDWR,
                    delete::READ_SIDE => libc::SHUT_RD,
                    delete::WRITE_SIDE => libc::SHUT_WR,
                    _ => return Err(Error::InvalidArgument),
                };
                sys::shutdown(s.fd.as_raw_fd(), how).map_err(map_errno)
            }
            _ => Err(Error::WrongHandleKind),
        }
    }

    fn stream_get_event(&self, stream: u64) -> PalResult<u64> {
        let o = self.stream(stream)?;
        if inner(&o).section.is_some() {
            return self.section_event(inner(&o));
        }
        let dup = inner(&o).fd.try_clone().map_err(|_| Error::LimitExceeded)?;
        self.insert(Object::Readiness(dup))
    }

    fn stream_rename(&self, stream: u64, new_uri: GuestIn) -> PalResult<()> {
        let o = self.stream(stream)?;
        let s = inner(&o);
        if s.kind != stream_kind::FILE && s.kind != stream_kind::DIRECTORY {
            return Err(Error::WrongHandleKind);
        }
        let to = self.uri_in(new_uri)?;
        if !matches!(to, Uri::File(_)) {
            return Err(Error::InvalidUri);
        }
        let to = to.canonical();
        let mut cur = s.uri.lock().unwrap();
        self.ask(&Request::Rename {
            from: cur.clone(),
            to: to.clone(),
        })?;
        *cur = to;
        Ok(())
    }

    fn stream_enumerate_children(
        &self,
        stream: u64,
        buf: GuestOut,
        cursor: u64,
    ) -> PalResult<(u64, u64)> {
        let o = self.stream(stream)?;
        let s = inner(&o);
        if s.kind != stream_kind::DIRECTORY {
            return Err(Error::NotDirectory);
        }
        let len = buf.len();
        if !(256..=limits::MAX_IO_LEN).contains(&len) {
            return Err(Error::InvalidArgument);
        }
        let names = sys::read_dir(s.fd.as_raw_fd()).map_err(map_errno)?;
        let mut out = Vec::new();
        let mut next = cursor;
        for name in names.iter().skip(cursor.min(usize::MAX as u64) as usize) {
            if out.len() + name.len() + 1 > len as usize {
                break;
            }
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            next += 1;
        }
        if out.is_empty() && (cursor as usize) < names.len() {
            // A single name longer than the buffer.
            return Err(Error::InvalidArgument);
        }
        sys::copy_out(buf.addr(), &out);
        Ok((out.len() as u64, next))
    }

    fn stream_attributes_query(&self, uri: GuestIn) -> PalResult<StreamAttributes> {
        let u = self.uri_in(uri)?;
        self.attributes_of_uri(u)
    }

    fn stream_attributes_query_by_handle(&self, stream: u64) -> PalResult<StreamAttributes> {
        let o = self.stream(stream)?;
        let s = inner(&o);
        match &s.section {
            Some(sec) => self.section_attrs(s, sec),
            None => self.stream_attrs(s),
        }
    }
}
