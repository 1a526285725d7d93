//! The loader's raw system interface: every `unsafe` block of the loader
//! that is not about signals lives here.
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

include!(concat!(env!("OUT_DIR"), "/syscall_names.rs"));

pub fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn host_prot(p: u32) -> i32 {
    let mut r = 0;
    if p & moat_pal::prot::READ != 0 {
        r |= libc::PROT_READ;
    }
    if p & moat_pal::prot::WRITE != 0 {
        r |= libc::PROT_WRITE;
    }
    if p & moat_pal::prot::EXEC != 0 {
        r |= libc::PROT_EXEC;
    }
    r
}

/// Map fresh anonymous memory. With `addr != 0` the range must be free.
pub fn mmap_anon(addr: u64, len: u64, prot: u32) -> Result<u64, i32> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if addr != 0 {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    // SAFETY: an anonymous mapping either at a kernel-chosen address or, with
    // MAP_FIXED_NOREPLACE, only where nothing is mapped: no existing memory
    // of this process is replaced.
    let p = unsafe { libc::mmap(addr as *mut _, len as usize, host_prot(prot), flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(errno());
    }
    if addr != 0 && p as u64 != addr {
        // Old kernels ignore MAP_FIXED_NOREPLACE; never accept another address.
        // SAFETY: we just created this mapping and nothing refers to it.
        unsafe { libc::munmap(p, len as usize) };
        return Err(libc::EEXIST);
    }
    Ok(p as u64)
}

/// Map `len` bytes of `fd` at `off`.
pub fn mmap_fd(
    addr: u64,
    len: u64,
    prot: u32,
    fd: RawFd,
    off: u64,
    shared: bool,
) -> Result<u64, i32> {
    let mut flags = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    if addr != 0 {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    // SAFETY: as in mmap_anon: never replaces existing memory.
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            len as usize,
            host_prot(prot),
            flags,
            fd,
            off as i64,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(errno());
    }
    if addr != 0 && p as u64 != addr {
        // SAFETY: our own fresh mapping.
        unsafe { libc::munmap(p, len as usize) };
        return Err(libc::EEXIST);
    }
    Ok(p as u64)
}

/// Unmap guest memory. The caller has checked the range is the guest's.
pub fn munmap(addr: u64, len: u64) -> Result<(), i32> {
    // SAFETY: the range was checked against the guest region map: it is
    // guest memory the PAL itself never refers to.
    if unsafe { libc::munmap(addr as *mut _, len as usize) } != 0 {
        return Err(errno());
    }
    Ok(())
}

pub fn mprotect(addr: u64, len: u64, prot: u32) -> Result<(), i32> {
    // SAFETY: the range was checked against the guest region map.
    if unsafe { libc::mprotect(addr as *mut _, len as usize, host_prot(prot)) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// Copy `len` bytes of guest memory into a new vector. The caller checked
/// the range with the region map.
pub fn copy_in(addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: [addr, addr+len) was checked readable guest memory; the copy
    // is taken once, so a racing writer cannot change what is validated.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

/// Copy guest memory at `addr` into `out` (the caller checked the range
/// readable).
pub fn copy_in_to(addr: u64, out: &mut [u8]) {
    // SAFETY: [addr, addr+len) was checked readable guest memory; it is
    // copied once into memory of ours.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
}

/// Copy `data` out to guest memory checked writable by the caller.
pub fn copy_out(addr: u64, data: &[u8]) {
    // SAFETY: [addr, addr+len) was checked writable guest memory.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

/// Write a plain value to guest memory checked writable by the caller.
pub fn put<T: Copy>(addr: u64, v: T) {
    // SAFETY: [addr, addr+size_of T) was checked writable; unaligned write.
    unsafe { std::ptr::write_unaligned(addr as *mut T, v) };
}

/// Read a plain value from guest memory checked readable by the caller.
pub fn get<T: Copy>(addr: u64) -> T {
    // SAFETY: [addr, addr+size_of T) was checked readable; unaligned read.
    unsafe { std::ptr::read_unaligned(addr as *const T) }
}

fn ret(r: isize) -> Result<usize, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as usize)
    }
}

pub fn read(fd: RawFd, addr: u64, len: usize) -> Result<usize, i32> {
    // SAFETY: the kernel writes at most len bytes at addr, which the caller
    // checked is writable guest memory (a fault there is EFAULT, not a crash).
    ret(unsafe { libc::read(fd, addr as *mut _, len) })
}

pub fn pread(fd: RawFd, addr: u64, len: usize, off: u64) -> Result<usize, i32> {
    // SAFETY: as in read.
    ret(unsafe { libc::pread(fd, addr as *mut _, len, off as i64) })
}

pub fn write(fd: RawFd, addr: u64, len: usize) -> Result<usize, i32> {
    // SAFETY: the kernel only reads len bytes at addr (checked readable).
    ret(unsafe { libc::write(fd, addr as *const _, len) })
}

pub fn pwrite(fd: RawFd, addr: u64, len: usize, off: u64) -> Result<usize, i32> {
    // SAFETY: as in write.
    ret(unsafe { libc::pwrite(fd, addr as *const _, len, off as i64) })
}

pub fn gettid() -> i32 {
    // SAFETY: no arguments, no memory.
    unsafe { libc::gettid() }
}

/// Send `sig` to thread `tid` of this process (async-signal-safe).
pub fn signal_thread(tid: i32, sig: i32) {
    // SAFETY: a signal to a thread of this process; no memory passed.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sig) };
}

/// Send `sig` to the calling thread.
pub fn signal_self(sig: i32) {
    signal_thread(gettid(), sig);
}

/// Wait while `*w == val`, at most `limit` (or until woken).
pub fn futex_wait(w: &std::sync::atomic::AtomicU32, val: u32, limit: std::time::Duration) {
    let ts = libc::timespec {
        tv_sec: limit.as_secs() as libc::time_t,
        tv_nsec: limit.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a live atomic's address with a valid timespec;
    // the kernel only reads both.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            val,
            &ts as *const libc::timespec,
        )
    };
}

/// Wake every waiter on `w`.
pub fn futex_wake(w: &std::sync::atomic::AtomicU32) {
    // SAFETY: FUTEX_WAKE on a live atomic's address; no memory is written.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        )
    };
}

pub fn eventfd() -> Result<OwnedFd, i32> {
    // SAFETY: plain syscall; on success we own the new descriptor.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local; async-signal-safe.
    unsafe { libc::write(fd, &one as *const u64 as *const _, 8) };
}

pub fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut _, 8) };
}

/// poll() on (fd, events) pairs; returns revents per entry.
pub fn poll(fds: &[(RawFd, i16)], timeout_ms: i32) -> Result<Vec<i16>, i32> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    // SAFETY: p is a valid array of p.len() pollfds.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as _, timeout_ms) };
    if r < 0 {
        return Err(errno());
    }
    Ok(p.iter().map(|x| x.revents).collect())
}

/// Makes the open file description of `fd` non-blocking (for every
/// descriptor that shares it).
pub fn set_nonblocking(fd: RawFd) -> Result<(), i32> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| e as i32)?;
    fcntl(
        fd,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(|e| e as i32)?;
    Ok(())
}

pub fn accept(fd: RawFd, nonblock: bool) -> Result<OwnedFd, i32> {
    let mut flags = libc::SOCK_CLOEXEC;
    if nonblock {
        flags |= libc::SOCK_NONBLOCK;
    }
    loop {
        // SAFETY: no address is requested.
        let r = unsafe { libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), flags) };
        if r >= 0 {
            // SAFETY: fresh descriptor.
            return Ok(unsafe { OwnedFd::from_raw_fd(r) });
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

pub fn shutdown(fd: RawFd, how: i32) -> Result<(), i32> {
    // SAFETY: plain syscall on our descriptor.
    if unsafe { libc::shutdown(fd, how) } != 0 {
        return Err(errno());
    }
    Ok(())
}

pub fn ftruncate(fd: RawFd, len: u64) -> Result<(), i32> {
    // SAFETY: plain syscall.
    if unsafe { libc::ftruncate(fd, len as i64) } != 0 {
        return Err(errno());
    }
    Ok(())
}

pub fn fsync(fd: RawFd) -> Result<(), i32> {
    // SAFETY: plain syscall.
    if unsafe { libc::fsync(fd) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// fstat through the `fstat` system call itself (not `newfstatat`, which
/// the sandbox refuses because it takes a path).
pub fn fstat(fd: RawFd) -> Result<libc::stat, i32> {
    // SAFETY: zeroed stat is a valid value; the kernel fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out buffer.
    let r = unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) };
    if r != 0 {
        return Err(errno());
    }
    Ok(st)
}

/// Read all directory entry names of `fd` (a directory), skipping `.` and
/// `..`; directories get a trailing `/`.
pub fn read_dir(fd: RawFd) -> Result<Vec<String>, i32> {
    // SAFETY: lseek on our own descriptor.
    if unsafe { libc::lseek(fd, 0, libc::SEEK_SET) } < 0 {
        return Err(errno());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: buf is writable for buf.len() bytes.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(errno());
        }
        if n == 0 {
            break;
        }
        let mut off = 0usize;
        while off + 19 < n as usize {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name.
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let dtype = buf[off + 18];
            if reclen == 0 || off + reclen > n as usize {
                return Err(libc::EIO);
            }
            let name = &buf[off + 19..off + reclen];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if name != b"." && name != b".." {
                let mut s = String::from_utf8_lossy(name).into_owned();
                if dtype == libc::DT_DIR {
                    s.push('/');
                }
                out.push(s);
            }
            off += reclen;
        }
    }
    out.sort();
    Ok(out)
}

pub fn getrandom(buf: &mut [u8]) -> Result<(), i32> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes into the unfilled part of buf.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr() as *mut _, buf.len() - done, 0) };
        if r < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(())
}

/// Wall-clock time in microseconds (the vDSO's clock_gettime).
pub fn realtime_micros() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

pub fn exit_process(code: i32) -> ! {
    // SAFETY: ends the process at once; nothing needs unwinding.
    unsafe { libc::_exit(code) }
}

pub fn borrow(fd: &OwnedFd) -> BorrowedFd<'_> {
    // Convenience for the protocol functions.
    // SAFETY: the borrowed fd does not outlive `fd`.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

/// A program header of an object loaded in this process: its type, its
/// flags, and where it lies (`start..end`, not page-aligned).
#[derive(Debug, Clone, Copy)]
pub struct LoadedSegment {
    pub p_type: u32,
    pub p_flags: u32,
    pub start: u64,
    pub end: u64,
}

/// Every program header of every object loaded in this process (the
/// loader, its libraries and the vDSO), from the dynamic linker's list.
pub fn loaded_segments() -> Vec<LoadedSegment> {
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut libc::c_void,
    ) -> i32 {
        // SAFETY: the dynamic linker passes a valid info for the duration of
        // the call, and `data` is the Vec we passed below.
        unsafe {
            let out = &mut *(data as *mut Vec<LoadedSegment>);
            let info = &*info;
            for i in 0..info.dlpi_phnum as usize {
                let ph = &*info.dlpi_phdr.add(i);
                let start = info.dlpi_addr + ph.p_vaddr;
                out.push(LoadedSegment {
                    p_type: ph.p_type,
                    p_flags: ph.p_flags,
                    start,
                    end: start + ph.p_memsz,
                });
            }
        }
        0
    }
    let mut v: Vec<LoadedSegment> = Vec::new();
    // SAFETY: cb only touches `v` through the pointer we pass.
    unsafe { libc::dl_iterate_phdr(Some(cb), &mut v as *mut _ as *mut _) };
    v
}

/// The executable ranges of every object loaded in this process,
/// page-aligned.
pub fn pal_code_ranges() -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = loaded_segments()
        .into_iter()
        .filter(|s| s.p_type == libc::PT_LOAD && s.p_flags & libc::PF_X != 0)
        .map(|s| (s.start & !0xfff, (s.end + 0xfff) & !0xfff))
        .collect();
    // The filter tries ranges in order: the C library's first, since the
    // PAL's system calls go through its wrappers.
    let libc_addr = libc::write as *const () as u64;
    v.sort_by_key(|&(s, e)| !(s <= libc_addr && libc_addr < e));
    v
}

// ---------------------------------------------------------------- stacks

std::arch::global_asm!(
    ".globl moat_run_on_stack",
    ".type moat_run_on_stack,@function",
    "moat_run_on_stack:",
    // rdi = entry, rsi = arg, rdx = new stack top, rcx = where to save rsp
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rcx], rsp",
    "mov rsp, rdx",
    "xor ebp, ebp",
    "mov rax, rdi",
    "mov rdi, rsi",
    "call rax",
    "ud2",
    ".size moat_run_on_stack, .-moat_run_on_stack",
    ".globl moat_resume",
    ".type moat_resume,@function",
    "moat_resume:",
    // rdi = the rsp saved by moat_run_on_stack
    "mov rsp, rdi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size moat_resume, .-moat_resume",
);

unsafe extern "C" {
    fn moat_run_on_stack(entry: u64, arg: u64, stack_top: u64, save: *mut u64);
    fn moat_resume(saved: u64) -> !;
}

/// Run guest code `entry(arg)` on the guest stack ending at `stack_top`.
/// Returns when the guest thread calls [`leave_guest`] with the value
/// stored in `*save`.
///
/// # Safety
/// `entry` must be executable guest code and `stack_top` the 16-byte
/// aligned top of a mapped stack; `save` must stay valid until the return.
pub unsafe fn run_on_stack(entry: u64, arg: u64, stack_top: u64, save: *mut u64) {
    // SAFETY: per the function contract.
    unsafe { moat_run_on_stack(entry, arg, stack_top, save) }
}

/// Abandon the guest stack and return from the matching `run_on_stack`.
///
/// # Safety
/// `saved` must be the value `run_on_stack` stored for this thread, and
/// no frame between here and there may own anything that needs dropping.
pub unsafe fn leave_guest(saved: u64) -> ! {
    // SAFETY: per the function contract.
    unsafe { moat_resume(saved) }
}
