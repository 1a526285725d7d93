//! The empty mount namespace every process that runs guest code lives in.
//!
//! A zygote, a loader or a VMM started without a zygote makes its own
//! mount namespace *after* `execve`, never before, and leaves nothing in
//! it but an empty, read-only tmpfs root. The order matters. A mount
//! namespace made inside an unprivileged user namespace copies the host's
//! whole mount table, and the kernel locks every copied mount to its
//! parent; lazily detaching the old root then keeps all of them connected
//! for as long as anything references the old root. Had the process been
//! exec'd inside the new namespace, its executable, its dynamic linker and
//! its C library would be mapped from those copies and would reference
//! them until it ended: every file system the host had mounted when moat
//! started would stay alive after the host unmounted it (`umount` returns
//! 0, the superblock stays, unsynced data is written when moat ends, or
//! lost if the device is gone by then).
//!
//! Exec'd first, the process maps its program from the *host's* mounts;
//! the copies are referenced only by its root and working directory,
//! which [`enter_empty`] moves to the new tmpfs before it detaches the old
//! root. Nothing references the copied tree after that, so the kernel
//! frees it at once, and with it every locked mount. (Descriptors a
//! process inherits were opened in the host's namespace and reference the
//! host's mounts, not the copies.)
use std::ffi::CString;

/// Why [`enter_empty`] failed: the step, and the OS error number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountNsError {
    pub what: &'static str,
    pub errno: i32,
}

impl std::fmt::Display for MountNsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            self.what,
            std::io::Error::from_raw_os_error(self.errno)
        )
    }
}

/// Make a new mount namespace whose root is an empty, read-only tmpfs, and
/// drop every other mount. Needs `CAP_SYS_ADMIN` in the process's user
/// namespace (uid 0 there after `execve`). Call it single-threaded, before
/// anything opens a path: nothing here needs one afterwards (loaders are
/// forked, not exec'd, and get files as descriptors).
pub fn enter_empty() -> Result<(), MountNsError> {
    let err = |what: &'static str| MountNsError {
        what,
        errno: std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    };
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (root, proc_, old, tmpfs) = (c("/"), c("/proc"), c("old"), c("tmpfs"));
    // SAFETY: plain mount-namespace system calls with valid C strings; the
    // caller is single-threaded and the namespace is its own.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(err("creating a mount namespace"));
        }
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(err("making mounts private"));
        }
        // Any directory will do as the new root's mount point.
        let opts = c("size=16k,mode=0700");
        if libc::mount(
            tmpfs.as_ptr(),
            proc_.as_ptr(),
            tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            opts.as_ptr() as *const libc::c_void,
        ) != 0
        {
            return Err(err("mounting an empty root"));
        }
        if libc::chdir(proc_.as_ptr()) != 0 || libc::mkdir(old.as_ptr(), 0o700) != 0 {
            return Err(err("preparing the empty root"));
        }
        let dot = c(".");
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old.as_ptr()) != 0 {
            return Err(err("pivot_root"));
        }
        if libc::chdir(root.as_ptr()) != 0 {
            return Err(err("entering the empty root"));
        }
        let old_abs = c("/old");
        if libc::umount2(old_abs.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(err("dropping the host's mounts"));
        }
        libc::rmdir(old_abs.as_ptr());
        // Read-only from now on.
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            return Err(err("making the empty root read-only"));
        }
    }
    Ok(())
}

/// For a process exec'd by the monitor with a set-up pipe on
/// [`SETUP_FD`](crate::protocol::SETUP_FD) (a zygote): enter the empty
/// mount namespace, then close the pipe, which tells the monitor the
/// process is ready; on failure write the stage and errno there (as a
/// child that failed before `execve` does) and exit.
pub fn enter_empty_or_report() {
    let fd = crate::protocol::SETUP_FD;
    match enter_empty() {
        Ok(()) => {
            // SAFETY: closing our own set-up pipe.
            unsafe { libc::close(fd) };
        }
        Err(e) => {
            let mut msg = [crate::child::STAGE_MOUNT_NS, 0, 0, 0, 0];
            msg[1..].copy_from_slice(&e.errno.to_ne_bytes());
            // SAFETY: writing a local buffer to our own pipe, then exiting.
            unsafe {
                libc::write(fd, msg.as_ptr() as *const libc::c_void, msg.len());
                libc::_exit(crate::child::CHILD_SETUP_FAILED);
            }
        }
    }
}
