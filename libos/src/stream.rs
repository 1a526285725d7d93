//! Streams: files, directories, pipes, sockets, consoles and devices, named
//! by URI and owned as [`Stream`].
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use moat_pal::{access, create, delete, limits, open_option, StreamAttributes};

use crate::io::{Read, Write};
use crate::sync::Event;
use crate::{raw, Result};

/// An open stream; closed on drop.
///
/// `read`/`write` (the [`Read`]/[`Write`] traits) work at a position that
/// advances with each call: files are read and written there, other streams
/// ignore it. `read_at`/`write_at` take the offset explicitly.
#[derive(Debug)]
pub struct Stream {
    handle: u64,
    pos: u64,
}

/// Largest single transfer (the ABI's limit).
const MAX_IO: usize = limits::MAX_IO_LEN as usize;

impl Stream {
    /// DkStreamOpen: `access` bits from `moat_pal::access`, `create` from
    /// `moat_pal::create`, `options` from `moat_pal::open_option`.
    pub fn open(uri: &str, access: u32, create: u32, options: u32) -> Result<Stream> {
        Ok(Stream {
            handle: raw::stream_open(uri, access, create, options)?,
            pos: 0,
        })
    }

    /// Open an existing stream for reading.
    pub fn open_read(uri: &str) -> Result<Stream> {
        Self::open(uri, access::READ, create::OPEN_EXISTING, 0)
    }

    /// Create (or truncate) a file for reading and writing.
    pub fn create(uri: &str) -> Result<Stream> {
        Self::open(uri, access::READ | access::WRITE, create::CREATE_ALWAYS, 0)
    }

    /// Open a directory (existing).
    pub fn open_dir(uri: &str) -> Result<Stream> {
        Self::open(
            uri,
            access::READ,
            create::OPEN_EXISTING,
            open_option::DIRECTORY,
        )
    }

    /// Take ownership of a handle.
    ///
    /// # Safety
    /// `handle` must be a stream handle nobody else closes.
    pub unsafe fn from_raw(handle: u64) -> Stream {
        Stream { handle, pos: 0 }
    }

    /// Give up ownership of the handle without closing it.
    pub fn into_raw(self) -> u64 {
        let h = self.handle;
        core::mem::forget(self);
        h
    }

    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// The position `read`/`write` use.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn seek(&mut self, pos: u64) {
        self.pos = pos;
    }

    /// DkStreamRead at `offset` (at most the ABI's maximum length per call).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let n = buf.len().min(MAX_IO);
        raw::stream_read(self.handle, offset, &mut buf[..n])
    }

    /// DkStreamWrite at `offset` (at most the ABI's maximum length per call).
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<usize> {
        let n = buf.len().min(MAX_IO);
        raw::stream_write(self.handle, offset, &buf[..n])
    }

    /// Write all of `buf` at `offset`.
    pub fn write_all_at(&self, mut offset: u64, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            match self.write_at(offset, buf)? {
                0 => return Err(crate::Error::Io),
                n => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    /// Read at the position and advance it; `Ok(0)` at end of stream.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = self.read_at(self.pos, buf)?;
        self.pos += n as u64;
        Ok(n)
    }

    /// Write at the position and advance it.
    pub fn write(&mut self, buf: &[u8]) -> Result<usize> {
        let n = self.write_at(self.pos, buf)?;
        self.pos += n as u64;
        Ok(n)
    }

    /// Write all of `buf` at the position.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        Write::write_all(self, buf)
    }

    /// DkStreamFlush.
    pub fn flush(&self) -> Result<()> {
        raw::stream_flush(self.handle).map(|_| ())
    }

    /// DkStreamSetLength.
    pub fn set_length(&self, length: u64) -> Result<()> {
        raw::stream_set_length(self.handle, length).map(|_| ())
    }

    /// DkStreamDelete with `which` from `moat_pal::delete`: files and
    /// directories are removed (the handle stays usable until dropped);
    /// connections are shut down in one or both directions.
    pub fn delete(&self, which: u32) -> Result<()> {
        raw::stream_delete(self.handle, which).map(|_| ())
    }

    /// Remove the named file or directory (DkStreamDelete ALL).
    pub fn remove(&self) -> Result<()> {
        self.delete(delete::ALL)
    }

    /// DkStreamRename.
    pub fn rename(&self, new_uri: &str) -> Result<()> {
        raw::stream_rename(self.handle, new_uri).map(|_| ())
    }

    /// DkStreamAttributesQueryByHandle.
    pub fn attributes(&self) -> Result<StreamAttributes> {
        raw::stream_attributes_query_by_handle(self.handle)
    }

    /// All children of a directory (directories end in `/`).
    pub fn children(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut cursor = 0u64;
        loop {
            let n = raw::stream_enumerate_children(self.handle, &mut buf, &mut cursor)?;
            if n == 0 {
                return Ok(out);
            }
            for name in buf[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
                out.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }

    /// DkStreamGetEvent: an event signalled while the stream is readable.
    pub fn get_event(&self) -> Result<Event> {
        let h = raw::stream_get_event(self.handle)?;
        // SAFETY: a fresh event handle we own.
        Ok(unsafe { Event::from_raw(h) })
    }

    /// DkStreamMap: map `size` bytes at `offset`; returns the address.
    pub fn map(&self, addr: u64, prot: u32, offset: u64, size: u64) -> Result<u64> {
        raw::stream_map(self.handle, addr, prot, offset, size)
    }

    /// Read from the current position to the end.
    pub fn read_to_vec(&mut self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.read_to_end(&mut v)?;
        Ok(v)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        Stream::read(self, buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> Result<usize> {
        Stream::write(self, buf)
    }

    fn flush(&mut self) -> Result<()> {
        Stream::flush(self)
    }
}

impl fmt::Write for Stream {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        Stream::write_all(self, s.as_bytes()).map_err(|_| fmt::Error)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = raw::object_close(self.handle);
    }
}
