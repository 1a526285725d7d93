//! Byte I/O traits and the standard streams.
//!
//! `stdout:` is line-buffered behind a lock (flushed at every newline, when
//! the buffer fills, and at exit); `stderr:` is unbuffered; `stdin:` is read
//! as it comes. Each is opened on first use.
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use moat_pal::{access, create, limits};

use crate::sync::Mutex;
use crate::{raw, Error, Result};

/// Something bytes can be read from.
pub trait Read {
    /// Read up to `buf.len()` bytes; `Ok(0)` means end of stream (or an
    /// empty `buf`).
    fn read(&mut self, buf: &mut [u8]) -> Result<usize>;

    /// Fill `buf` completely; `Err(Io)` if the stream ends first.
    fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<()> {
        while !buf.is_empty() {
            match self.read(buf)? {
                0 => return Err(Error::Io),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    /// Read until end of stream, appending to `out`; returns the bytes read.
    fn read_to_end(&mut self, out: &mut Vec<u8>) -> Result<usize> {
        let start = out.len();
        let mut chunk = [0u8; 4096];
        loop {
            match self.read(&mut chunk)? {
                0 => return Ok(out.len() - start),
                n => out.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Something bytes can be written to.
pub trait Write {
    /// Write some of `buf`; returns how much.
    fn write(&mut self, buf: &[u8]) -> Result<usize>;

    /// Deliver anything buffered.
    fn flush(&mut self) -> Result<()>;

    /// Write all of `buf`; `Err(Io)` if the stream accepts nothing.
    fn write_all(&mut self, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            match self.write(buf)? {
                0 => return Err(Error::Io),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }
}

impl<R: Read + ?Sized> Read for &mut R {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        (**self).read(buf)
    }
}

impl<W: Write + ?Sized> Write for &mut W {
    fn write(&mut self, buf: &[u8]) -> Result<usize> {
        (**self).write(buf)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
}

impl Read for &[u8] {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = buf.len().min(self.len());
        buf[..n].copy_from_slice(&self[..n]);
        *self = &self[n..];
        Ok(n)
    }
}

impl Write for Vec<u8> {
    fn write(&mut self, buf: &[u8]) -> Result<usize> {
        self.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Copy `r` to `w` until `r` ends; returns the bytes copied.
pub fn copy<R: Read + ?Sized, W: Write + ?Sized>(r: &mut R, w: &mut W) -> Result<u64> {
    let mut buf = [0u8; 8192];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

// ------------------------------------------------------------------ handles

/// A console stream handle opened on first use and kept for the process.
struct LazyHandle {
    handle: AtomicU64,
    uri: &'static str,
    access: u32,
}

impl LazyHandle {
    const fn new(uri: &'static str, access: u32) -> Self {
        LazyHandle {
            handle: AtomicU64::new(0),
            uri,
            access,
        }
    }

    fn get(&self) -> Result<u64> {
        let h = self.handle.load(Ordering::Acquire);
        if h != 0 {
            return Ok(h);
        }
        let new = raw::stream_open(self.uri, self.access, create::OPEN_EXISTING, 0)?;
        match self
            .handle
            .compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(new),
            Err(other) => {
                let _ = raw::object_close(new);
                Ok(other)
            }
        }
    }
}

static STDIN_H: LazyHandle = LazyHandle::new("stdin:", access::READ);
static STDOUT_H: LazyHandle = LazyHandle::new("stdout:", access::WRITE);
static STDERR_H: LazyHandle = LazyHandle::new("stderr:", access::WRITE);

fn write_all_handle(h: u64, mut buf: &[u8]) -> Result<()> {
    let max = limits::MAX_IO_LEN as usize;
    while !buf.is_empty() {
        let n = buf.len().min(max);
        match raw::stream_write(h, 0, &buf[..n])? {
            0 => return Err(Error::Io),
            w => buf = &buf[w..],
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ stdout

const STDOUT_BUF: usize = 1024;

struct LineBuf {
    buf: [u8; STDOUT_BUF],
    len: usize,
}

impl LineBuf {
    fn flush(&mut self) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let r = STDOUT_H
            .get()
            .and_then(|h| write_all_handle(h, &self.buf[..self.len]));
        // Drop the bytes even on failure: retrying a broken stdout for ever
        // helps nobody.
        self.len = 0;
        r
    }

    fn push(&mut self, data: &[u8]) -> Result<()> {
        if data.len() > STDOUT_BUF - self.len {
            self.flush()?;
        }
        if data.len() >= STDOUT_BUF {
            STDOUT_H.get().and_then(|h| write_all_handle(h, data))?;
        } else {
            self.buf[self.len..self.len + data.len()].copy_from_slice(data);
            self.len += data.len();
            if data.contains(&b'\n') {
                self.flush()?;
            }
        }
        Ok(())
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes()).map_err(|_| fmt::Error)
    }
}

static STDOUT: Mutex<LineBuf> = Mutex::new(LineBuf {
    buf: [0; STDOUT_BUF],
    len: 0,
});

/// The picoprocess's standard output (line-buffered).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stdout;

/// The picoprocess's standard error (unbuffered).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

/// The picoprocess's standard input.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stdin;

pub fn stdout() -> Stdout {
    Stdout
}

pub fn stderr() -> Stderr {
    Stderr
}

pub fn stdin() -> Stdin {
    Stdin
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> Result<usize> {
        STDOUT.lock().push(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<()> {
        STDOUT.lock().flush()
    }
}

impl fmt::Write for Stdout {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        Write::write_all(self, s.as_bytes()).map_err(|_| fmt::Error)
    }
}

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> Result<usize> {
        write_all_handle(STDERR_H.get()?, buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

impl fmt::Write for Stderr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        Write::write_all(self, s.as_bytes()).map_err(|_| fmt::Error)
    }
}

impl Read for Stdin {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = buf.len().min(limits::MAX_IO_LEN as usize);
        raw::stream_read(STDIN_H.get()?, 0, &mut buf[..n])
    }
}

impl Stdin {
    /// The `stdin:` handle (opened on first use).
    pub fn handle(&self) -> Result<u64> {
        STDIN_H.get()
    }
}

impl Stdout {
    /// The `stdout:` handle (opened on first use). Writes through it bypass
    /// the buffer.
    pub fn handle(&self) -> Result<u64> {
        STDOUT_H.get()
    }
}

impl Stderr {
    /// The `stderr:` handle (opened on first use).
    pub fn handle(&self) -> Result<u64> {
        STDERR_H.get()
    }
}

/// Flush stdout if nobody holds its lock (for exits and panics, which must
/// not wait on a lock their own thread may hold).
pub fn try_flush_stdout() {
    if let Some(mut g) = STDOUT.try_lock() {
        let _ = g.flush();
    }
}

// ------------------------------------------------------------------ macros' back ends

/// Formats into a stack buffer and writes it to stderr in pieces, without
/// allocating (usable from the panic handler).
pub(crate) struct StderrBuf {
    buf: [u8; 512],
    len: usize,
}

impl StderrBuf {
    pub(crate) const fn new() -> Self {
        StderrBuf {
            buf: [0; 512],
            len: 0,
        }
    }

    pub(crate) fn flush(&mut self) {
        if self.len > 0 {
            let data = &self.buf[..self.len];
            if STDERR_H
                .get()
                .and_then(|h| write_all_handle(h, data))
                .is_err()
            {
                crate::debug::print_bytes(data);
            }
            self.len = 0;
        }
    }
}

impl fmt::Write for StderrBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &c in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = c;
            self.len += 1;
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let mut g = STDOUT.lock();
    let _ = fmt::write(&mut *g, args);
}

#[doc(hidden)]
pub fn _print_nl(args: fmt::Arguments<'_>) {
    let mut g = STDOUT.lock();
    let _ = fmt::write(&mut *g, args);
    let _ = g.push(b"\n");
}

#[doc(hidden)]
pub fn _eprint(args: fmt::Arguments<'_>) {
    let mut b = StderrBuf::new();
    let _ = fmt::write(&mut b, args);
    b.flush();
}

#[doc(hidden)]
pub fn _eprint_nl(args: fmt::Arguments<'_>) {
    let mut b = StderrBuf::new();
    let _ = fmt::write(&mut b, args);
    let _ = fmt::Write::write_str(&mut b, "\n");
    b.flush();
}
