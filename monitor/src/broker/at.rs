//! The broker's raw file-system calls, relative to a directory
//! descriptor (`openat2`, `mkdirat`, `unlinkat`, `renameat2`, ...). Each
//! returns the errno on failure.
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;

pub const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
pub const RESOLVE_NO_SYMLINKS: u64 = 0x04;
pub const RESOLVE_BENEATH: u64 = 0x08;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn c(s: &str) -> Result<CString, i32> {
    CString::new(s).map_err(|_| libc::EINVAL)
}

fn owned(fd: RawFd) -> Result<OwnedFd, i32> {
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(r: libc::c_int) -> Result<(), i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// `open` of an absolute path the monitor trusts (a grant's base, /dev/null).
pub fn open_abs(path: &str, flags: libc::c_int) -> Result<OwnedFd, i32> {
    let p = c(path)?;
    // SAFETY: `p` is a NUL-terminated string alive for the call.
    owned(unsafe { libc::open(p.as_ptr(), flags, 0) })
}

/// `openat2` of an absolute path (a grant's base, or its parent).
pub fn openat2_abs(path: &str, flags: libc::c_int, resolve: u64) -> Result<OwnedFd, i32> {
    if !path.starts_with('/') {
        return Err(libc::EINVAL);
    }
    openat2_raw(libc::AT_FDCWD, path, flags, 0, resolve)
}

/// `openat2(dir, path, {flags, mode, resolve})`.
/// Open again, with `flags`, the file an `O_PATH` descriptor names
/// (through its /proc/self/fd magic link, which the monitor may follow).
pub fn reopen(p: BorrowedFd<'_>, flags: libc::c_int) -> Result<OwnedFd, i32> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", p.as_raw_fd())).expect("no NUL");
    // SAFETY: open of a NUL-terminated path; we own the result.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &str,
    flags: libc::c_int,
    mode: u32,
    resolve: u64,
) -> Result<OwnedFd, i32> {
    openat2_raw(dir.as_raw_fd(), path, flags, mode, resolve)
}

fn openat2_raw(
    dir: RawFd,
    path: &str,
    flags: libc::c_int,
    mode: u32,
    resolve: u64,
) -> Result<OwnedFd, i32> {
    let p = c(path)?;
    let how = OpenHow {
        flags: flags as u64,
        mode: if flags & libc::O_CREAT != 0 {
            mode as u64
        } else {
            0
        },
        resolve,
    };
    loop {
        // SAFETY: `dir` is AT_FDCWD or a descriptor borrowed for the
        // call; `p` and `how` are valid for the call; the kernel reads
        // `size_of::<OpenHow>()` bytes of `how`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                p.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        // RESOLVE_BENEATH lookups may fail with EAGAIN when a rename raced.
        if r < 0 && matches!(errno(), libc::EAGAIN | libc::EINTR) {
            continue;
        }
        return owned(r as RawFd);
    }
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &str, mode: u32) -> Result<(), i32> {
    let n = c(name)?;
    // SAFETY: valid descriptor and NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode) })
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &str, flags: libc::c_int) -> Result<(), i32> {
    let n = c(name)?;
    // SAFETY: valid descriptor and NUL-terminated name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) })
}

pub fn renameat_noreplace(
    d1: BorrowedFd<'_>,
    n1: &str,
    d2: BorrowedFd<'_>,
    n2: &str,
) -> Result<(), i32> {
    let (a, b) = (c(n1)?, c(n2)?);
    // SAFETY: valid descriptors and NUL-terminated names.
    check(unsafe {
        libc::renameat2(
            d1.as_raw_fd(),
            a.as_ptr(),
            d2.as_raw_fd(),
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    })
}

pub fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat, i32> {
    // SAFETY: stat is plain data; zeroed is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor; `st` is valid for writes.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub fn file_type(fd: BorrowedFd<'_>) -> Result<libc::mode_t, i32> {
    Ok(fstat(fd)?.st_mode & libc::S_IFMT)
}

pub fn set_nonblock(fd: BorrowedFd<'_>, on: bool) -> Result<(), i32> {
    // SAFETY: fcntl F_GETFL/F_SETFL on a valid descriptor.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    check(fl)?;
    let nfl = if on {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    if nfl != fl {
        // SAFETY: as above.
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, nfl) })?;
    }
    Ok(())
}

/// Connect a non-blocking Unix stream socket to an abstract address:
/// EAGAIN when the listener's backlog is full. `before` runs on the new
/// socket before it connects (the peer may send the moment it is
/// connected, so what must hold for what it sends is set there).
pub fn connect_nonblocking(
    addr: &std::os::unix::net::SocketAddr,
    before: impl FnOnce(BorrowedFd<'_>) -> Result<(), i32>,
) -> Result<OwnedFd, i32> {
    let name = addr.as_abstract_name().ok_or(libc::EINVAL)?;
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if name.len() + 1 > sa.sun_path.len() {
        return Err(libc::ENAMETOOLONG);
    }
    for (i, b) in name.iter().enumerate() {
        sa.sun_path[i + 1] = *b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    // SAFETY: plain socket creation.
    let fd = owned(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    before(fd.as_fd())?;
    // SAFETY: `sa` is a valid sockaddr_un of which `len` bytes are used.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_un as *const libc::sockaddr,
            len as u32,
        )
    };
    check(r)?;
    Ok(fd)
}
