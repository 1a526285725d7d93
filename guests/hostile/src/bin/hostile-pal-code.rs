//! Attacks through the PAL's own code: the guest finds the loader's C
//! library (see `gadget.rs`) and makes system calls through it, past the
//! seccomp filter's instruction-pointer check. One mode per attack (the
//! first argument); each prints `REFUSED ...` for what the host refused,
//! `ESCAPED ...` (exit 42) for what got through, or is ended by the host.
//! On kvm every mode that needs the C library ends with exit 3 and `NO C
//! LIBRARY in reach of the guest`.
#![no_std]
#![no_main]
extern crate alloc;

#[path = "../common.rs"]
mod common;
#[path = "../gadget.rs"]
mod gadget;

use alloc::format;
use common::{escaped, ESCAPED};
use gadget::Libc;
use moat_libos::{pal, println, Pal};

moat_libos::entry!(main);

// x86-64 system call numbers.
const SYS_CLOSE: i64 = 3;
const SYS_FSTAT: i64 = 5;
const SYS_MMAP: i64 = 9;
const SYS_MPROTECT: i64 = 10;
const SYS_MUNMAP: i64 = 11;
const SYS_MREMAP: i64 = 25;
const SYS_NANOSLEEP: i64 = 35;
const SYS_GETPID: i64 = 39;
const SYS_SENDTO: i64 = 44;
const SYS_SENDMSG: i64 = 46;
const SYS_SETSOCKOPT: i64 = 54;
const SYS_FORK: i64 = 57;
const SYS_KILL: i64 = 62;
const SYS_PTRACE: i64 = 101;
const SYS_OPENAT: i64 = 257;
const SYS_EVENTFD2: i64 = 290;
const SYS_MSEAL: i64 = 462;

const PROT_READ: i64 = 1;
const PROT_WRITE: i64 = 2;
const PROT_EXEC: i64 = 4;
const MAP_PRIVATE: i64 = 0x02;
const MAP_FIXED: i64 = 0x10;
const MAP_ANON: i64 = 0x20;
const MREMAP_MAYMOVE: i64 = 1;
const MREMAP_FIXED: i64 = 2;
const EPERM: i64 = 1;
const EMFILE: i64 = 24;
const EAGAIN: i64 = 11;

fn errno_name(e: i64) -> &'static str {
    match -e {
        1 => "EPERM",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        22 => "EINVAL",
        24 => "EMFILE",
        _ => "another error",
    }
}

/// Sleep via the C library (guest code may not make system calls itself).
fn sleep_ms(c: &Libc, ms: i64) {
    let ts = [ms / 1000, (ms % 1000) * 1_000_000];
    c.sys(SYS_NANOSLEEP, [ts.as_ptr() as i64, 0, 0, 0, 0, 0]);
}

/// After an attack the host must end the picoprocess for: wait to be
/// ended; still running after that is an escape.
fn await_end(c: &Libc, what: &str) -> i32 {
    sleep_ms(c, 10_000);
    escaped(&format!("{what}: still running 10 s later"))
}

/// An attempt that must fail with `EPERM` (sealed memory, or a socket that
/// refuses descriptors).
fn expect_eperm(what: &str, r: i64) -> i32 {
    if r == -EPERM {
        println!("REFUSED {what}: EPERM");
        0
    } else if r < 0 {
        println!("REFUSED {what} but not as sealed: {}", errno_name(r));
        5
    } else {
        escaped(&format!("{what} returned {r}"))
    }
}

fn page_of(a: u64) -> i64 {
    (a & !0xfff) as i64
}

fn main() -> i32 {
    let mode = common::arg(1);
    match mode.as_str() {
        "log-flood" => return log_flood(),
        "receiver" => return receiver(),
        "worker" => return worker(),
        _ => {}
    }
    let c = gadget::find_or_exit();
    match mode.as_str() {
        "find" => {
            let pid = c.sys(SYS_GETPID, [0; 6]);
            println!("the gadget works: getpid() = {pid}");
            0
        }
        "open-file" => {
            let path = b"/etc/passwd\0";
            let r = c.sys(SYS_OPENAT, [-100, path.as_ptr() as i64, 0, 0, 0, 0]);
            escaped(&format!("openat(/etc/passwd) returned {r}"))
        }
        "patch-code" => {
            let r = c.sys(
                SYS_MPROTECT,
                [page_of(c.text), 4096, PROT_READ | PROT_WRITE, 0, 0, 0],
            );
            if r == 0 {
                // SAFETY: deliberately hostile: patching the PAL's text.
                unsafe { (c.text as *mut u8).write_volatile(0xcc) };
                return ESCAPED;
            }
            expect_eperm("mprotect of the loader's text", r)
        }
        "unmap-code" => expect_eperm(
            "munmap of the loader's text",
            c.sys(SYS_MUNMAP, [page_of(c.text), 4096, 0, 0, 0, 0]),
        ),
        "remap-code" => expect_eperm(
            "mremap of the loader's text",
            c.sys(SYS_MREMAP, [page_of(c.text), 4096, 8192, 1, 0, 0]),
        ),
        "remap-onto-code" => {
            // A page of our own, moved over the loader's text.
            let p = c.sys(
                SYS_MMAP,
                [
                    0,
                    4096,
                    PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANON,
                    -1,
                    0,
                ],
            );
            if p < 0 {
                println!("cannot map a page: {}", errno_name(p));
                return 6;
            }
            expect_eperm(
                "mremap onto the loader's text",
                c.sys(
                    SYS_MREMAP,
                    [
                        p,
                        4096,
                        4096,
                        MREMAP_MAYMOVE | MREMAP_FIXED,
                        page_of(c.text),
                        0,
                    ],
                ),
            )
        }
        "map-over-code" => expect_eperm(
            "mmap over the loader's text",
            c.sys(
                SYS_MMAP,
                [
                    page_of(c.text),
                    4096,
                    PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANON | MAP_FIXED,
                    -1,
                    0,
                ],
            ),
        ),
        "patch-table" => expect_eperm(
            "mprotect of the PAL table",
            c.sys(
                SYS_MPROTECT,
                [page_of(c.table), 4096, PROT_READ | PROT_WRITE, 0, 0, 0],
            ),
        ),
        "write-table" => {
            // SAFETY: deliberately hostile: the table is read-only.
            unsafe { (c.table as *mut u64).write_volatile(0) };
            escaped("wrote into the PAL table")
        }
        "wx-mmap" => {
            let r = c.sys(
                SYS_MMAP,
                [
                    0,
                    4096,
                    PROT_READ | PROT_WRITE | PROT_EXEC,
                    MAP_PRIVATE | MAP_ANON,
                    -1,
                    0,
                ],
            );
            escaped(&format!("mmap W+X returned {r:#x}"))
        }
        "mseal-other" => {
            let buf = alloc::vec![0u8; 8192];
            let r = c.sys(
                SYS_MSEAL,
                [page_of(buf.as_ptr() as u64 + 4095), 4096, 0, 0, 0, 0],
            );
            escaped(&format!("mseal of guest memory returned {r}"))
        }
        "kill-zygote" => {
            let r = c.sys(SYS_KILL, [1, 9, 0, 0, 0, 0]);
            escaped(&format!("kill(1) returned {r}"))
        }
        "fork" => {
            let r = c.sys(SYS_FORK, [0; 6]);
            escaped(&format!("fork returned {r}"))
        }
        "ptrace" => {
            let r = c.sys(SYS_PTRACE, [16, 1, 0, 0, 0, 0]);
            escaped(&format!("ptrace returned {r}"))
        }
        "setsockopt" => {
            let on: i32 = 1;
            let r = c.sys(SYS_SETSOCKOPT, [3, 1, 83, &on as *const i32 as i64, 4, 0]);
            escaped(&format!("setsockopt(SO_PASSRIGHTS) returned {r}"))
        }
        "threads" => threads(&c),
        "handles" => handles(&c),
        "memory" => memory(&c, common::arg(2).parse().unwrap_or(512)),
        "empty-message" => {
            c.sys(SYS_SENDTO, [3, 1, 0, 0, 0, 0]);
            await_end(&c, "an empty message to the monitor")
        }
        "garbage-message" => {
            let junk = [0xffu8; 16];
            c.sys(SYS_SENDTO, [3, junk.as_ptr() as i64, 16, 0, 0, 0]);
            await_end(&c, "a malformed message to the monitor")
        }
        "fd-to-monitor" => {
            let r = send_fd(&c, 3, 0);
            println!("sendmsg with a descriptor on the monitor channel: {r}");
            await_end(&c, "a descriptor sent to the monitor")
        }
        "close-channel" => {
            c.sys(SYS_CLOSE, [3, 0, 0, 0, 0, 0]);
            await_end(&c, "closing the monitor channel")
        }
        "pass-fd" => pass_fd(&c),
        "siblings" => siblings(),
        other => {
            println!("unknown mode `{other}`");
            2
        }
    }
}

/// Threads by the C library's `pthread_create`, past the PAL's count:
/// only the kernel (its cgroup's `pids.max`) stops them.
fn threads(c: &Libc) -> i32 {
    extern "C" fn idle(arg: *mut u8) -> *mut u8 {
        let c = Libc {
            syscall: arg as u64,
            errno_location: 0,
            pthread_create: 0,
            loader_base: 0,
            text: 0,
            table: 0,
        };
        loop {
            let ts = [1i64, 0];
            c.sys(SYS_NANOSLEEP, [ts.as_ptr() as i64, 0, 0, 0, 0, 0]);
        }
    }
    if c.pthread_create == 0 {
        return escaped("no pthread_create to try");
    }
    type Create =
        extern "C" fn(*mut u64, *const u8, extern "C" fn(*mut u8) -> *mut u8, *mut u8) -> i32;
    // SAFETY: the C library's pthread_create, called as declared; the
    // attack under test.
    let create: Create = unsafe { core::mem::transmute::<u64, Create>(c.pthread_create) };
    let mut n = 0;
    let err = loop {
        let mut tid = 0u64;
        let r = create(&mut tid, core::ptr::null(), idle, c.syscall as *mut u8);
        if r != 0 {
            break r;
        }
        n += 1;
        if n >= 100_000 {
            break 0;
        }
    };
    println!("threads created past the PAL: {n} (then error {err})");
    if err == EAGAIN as i32 {
        0
    } else {
        4
    }
}

/// Descriptors by raw `eventfd2`, past the PAL's handle count: only
/// `RLIMIT_NOFILE` stops them.
fn handles(c: &Libc) -> i32 {
    let mut n = 0;
    let err = loop {
        let r = c.sys(SYS_EVENTFD2, [0, 0o2000000, 0, 0, 0, 0]);
        if r < 0 {
            break r;
        }
        n += 1;
        if n >= 1_000_000 {
            break 0;
        }
    };
    println!(
        "descriptors opened past the PAL: {n} (then {})",
        errno_name(err)
    );
    if err == -EMFILE {
        0
    } else {
        4
    }
}

/// Memory by raw `mmap`, past the PAL's account, touched page by page:
/// only the kernel (its cgroup's memory limit) stops it.
fn memory(c: &Libc, mib: i64) -> i32 {
    let len = mib << 20;
    let a = c.sys(
        SYS_MMAP,
        [
            0,
            len,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANON,
            -1,
            0,
        ],
    );
    if a < 0 {
        println!("REFUSED mmap of {mib} MiB: {}", errno_name(a));
        return 0;
    }
    let mut at = 0;
    while at < len {
        // SAFETY: inside the mapping just made; the attack under test.
        unsafe { ((a + at) as *mut u8).write_volatile(1) };
        at += 4096;
        if at % (16 << 20) == 0 {
            println!("touched {} MiB", at >> 20);
            moat_libos::io::try_flush_stdout();
        }
    }
    escaped(&format!("touched {mib} MiB past the memory limit"))
}

/// `sendmsg(sock, "x")` with descriptor `fd` attached (SCM_RIGHTS).
fn send_fd(c: &Libc, sock: i64, fd: i32) -> i64 {
    #[repr(C)]
    struct IoVec {
        base: *const u8,
        len: usize,
    }
    #[repr(C)]
    struct MsgHdr {
        name: *const u8,
        namelen: u32,
        iov: *const IoVec,
        iovlen: usize,
        control: *const u8,
        controllen: usize,
        flags: i32,
    }
    let byte = b"x";
    let iov = IoVec {
        base: byte.as_ptr(),
        len: 1,
    };
    // cmsghdr { len: u64, level: i32, type: i32 } + one int, padded.
    let mut cmsg = [0u8; 24];
    cmsg[0..8].copy_from_slice(&20u64.to_ne_bytes());
    cmsg[8..12].copy_from_slice(&1i32.to_ne_bytes()); // SOL_SOCKET
    cmsg[12..16].copy_from_slice(&1i32.to_ne_bytes()); // SCM_RIGHTS
    cmsg[16..20].copy_from_slice(&fd.to_ne_bytes());
    let msg = MsgHdr {
        name: core::ptr::null(),
        namelen: 0,
        iov: &iov,
        iovlen: 1,
        control: cmsg.as_ptr(),
        controllen: 24,
        flags: 0,
    };
    c.sys(
        SYS_SENDMSG,
        [sock, &msg as *const MsgHdr as i64, 0, 0, 0, 0],
    )
}

/// The monitor channel (descriptor 3) sent to another picoprocess over a
/// pipe: every socket the guest holds besides its channel refuses it.
fn pass_fd(c: &Libc) -> i32 {
    let image = common::arg(2);
    let child = match moat_libos::process::spawn(&image, &["receiver"]) {
        Ok(ch) => ch,
        Err(e) => {
            println!("cannot start the receiver: {}", e.name());
            return 4;
        }
    };
    let pipe = match common::open("pipe.server:moat-pass", common::WR, 0, 0) {
        Ok(h) => h,
        Err(e) => {
            println!("cannot open the pipe: {}", e.name());
            return 4;
        }
    };
    let mut refused = 0;
    for fd in 4..256i64 {
        let mut st = [0u8; 144];
        if c.sys(SYS_FSTAT, [fd, st.as_mut_ptr() as i64, 0, 0, 0, 0]) != 0 {
            continue;
        }
        let mode = u32::from_ne_bytes([st[24], st[25], st[26], st[27]]);
        if mode & 0o170000 != 0o140000 {
            continue; // not a socket
        }
        let r = send_fd(c, fd, 3);
        if r >= 0 {
            return escaped(&format!(
                "the monitor channel went out over descriptor {fd}"
            ));
        }
        if r == -EPERM {
            refused += 1;
        }
    }
    println!("REFUSED passing the monitor channel over {refused} pipe socket(s): EPERM");
    let _ = pal().dk_object_close(pipe);
    let code = child.wait().unwrap_or(-1);
    println!("the receiver ended with {code}");
    if refused > 0 {
        0
    } else {
        4
    }
}

/// The other end of `pass-fd`: connects and waits for the pipe to close.
fn receiver() -> i32 {
    let Ok(h) = common::open("pipe.client:moat-pass", common::WR, 0, 0) else {
        return 4;
    };
    let mut b = [0u8; 8];
    let _ = pal().dk_stream_read(h, 0, b.as_mut_ptr(), 8);
    0
}

/// A picoprocess that uses all its ABI threads, then exits 0: run beside a
/// sibling that exhausts the kernel's task limit (see `siblings`).
fn worker() -> i32 {
    let n = common::arg(2).parse::<usize>().unwrap_or(4);
    let hs: alloc::vec::Vec<_> = (0..n)
        .map(|i| moat_libos::thread::spawn(move || i * 2))
        .collect();
    let mut sum = 0;
    for h in hs {
        match h.join() {
            Ok(v) => sum += v,
            Err(e) => {
                println!("worker: a thread failed: {}", e.name());
                return 4;
            }
        }
    }
    println!("worker: {n} threads ran ({sum})");
    0
}

/// Two children of one session: one takes every task the kernel lets it
/// (`threads`), then the other uses its own ABI threads and must not be
/// starved by its sibling.
fn siblings() -> i32 {
    let image = common::arg(2);
    let threads = common::arg(3);
    let Ok(hog) = moat_libos::process::spawn(&image, &["threads"]) else {
        return 4;
    };
    // Let the hog reach its limit.
    moat_libos::thread::sleep_micros(1_000_000);
    let Ok(w) = moat_libos::process::spawn(&image, &["worker", &threads]) else {
        return 4;
    };
    let code = w.wait().unwrap_or(-1);
    println!("the worker beside the hog ended with {code}");
    drop(hog);
    if code == 0 {
        0
    } else {
        4
    }
}

/// Refused opens, thousands of them: the host's log must stay bounded.
fn log_flood() -> i32 {
    let mut refused = 0;
    for i in 0..5000 {
        if common::open(&format!("file:/moat-flood-{i}"), common::RD, 0, 0).is_err() {
            refused += 1;
        }
    }
    println!("REFUSED {refused} opens");
    0
}
