//! Reaching the host's C library from guest code, as a hostile guest on
//! host-linux can: the PAL table the host hands over points into the
//! loader's text; below it, page by page, is the loader's ELF header; its
//! dynamic section names the relocations; the one for `syscall` leads to
//! the GOT slot that holds the C library's `syscall()`. Calling it makes
//! system calls from PAL code, past the seccomp filter's instruction-
//! pointer check: what is left to hold is the allow-list, Landlock, the
//! namespaces, the broker, the cgroups and the sealed code.
//!
//! On kvm there is no C library in the VM: [`find`] says so.
#![allow(dead_code)]
use moat_libos::println;

/// The C library functions a hostile guest uses.
pub struct Libc {
    pub syscall: u64,
    pub errno_location: u64,
    pub pthread_create: u64,
    /// The loader's ELF header (where its text starts, near enough).
    pub loader_base: u64,
    /// An address in the loader's text (a PAL table function).
    pub text: u64,
    /// The PAL table's address.
    pub table: u64,
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the caller walks mapped memory of this process (the loader's
    // image, its dynamic section, its GOT): a bad address faults the
    // picoprocess, which is an outcome the tests accept.
    unsafe { (addr as *const T).read_unaligned() }
}

/// Find the loader's C library (`None` on kvm, or if anything is not as
/// expected).
pub fn find() -> Option<Libc> {
    let sb = moat_libos::boot::startup_ptr();
    if sb.is_null() {
        return None;
    }
    // SAFETY: set by start-up from the host's block.
    let sb = unsafe { &*sb };
    if sb.host_kind != moat_libos::moat_pal::host_kind::LINUX {
        return None;
    }
    let table = sb.table as u64;
    let text = moat_libos::boot::pal_table().dk_system_time_query as usize as u64;
    // The loader's ELF header: the first page below its text that starts
    // with the ELF magic (its segments are mapped contiguously).
    let mut base = text & !0xfff;
    let mut steps = 0;
    while read::<[u8; 4]>(base) != *b"\x7fELF" {
        base -= 0x1000;
        steps += 1;
        if steps > 1 << 16 {
            return None;
        }
    }
    let phoff: u64 = read(base + 0x20);
    let phentsize: u16 = read(base + 0x36);
    let phnum: u16 = read(base + 0x38);
    let mut dynamic = None;
    for i in 0..phnum as u64 {
        let ph = base + phoff + i * phentsize as u64;
        let p_type: u32 = read(ph);
        if p_type == 2 {
            dynamic = Some(base + read::<u64>(ph + 16));
        }
    }
    let dynamic = dynamic?;
    let abs = |v: u64| if v < base { base + v } else { v };
    let (mut strtab, mut symtab) = (0, 0);
    let mut relas: [(u64, u64); 2] = [(0, 0); 2];
    let mut d = dynamic;
    loop {
        let tag: i64 = read(d);
        let val: u64 = read(d + 8);
        match tag {
            0 => break,
            5 => strtab = abs(val),
            6 => symtab = abs(val),
            7 => relas[0].0 = abs(val),
            8 => relas[0].1 = val,
            23 => relas[1].0 = abs(val),
            2 => relas[1].1 = val,
            _ => {}
        }
        d += 16;
    }
    if strtab == 0 || symtab == 0 {
        return None;
    }
    let lookup = |want: &[u8]| -> Option<u64> {
        for &(at, size) in &relas {
            let mut r = at;
            while at != 0 && r < at + size {
                let offset: u64 = read(r);
                let info: u64 = read(r + 8);
                let sym = info >> 32;
                if sym != 0 {
                    let name_off: u32 = read(symtab + sym * 24);
                    let name = strtab + name_off as u64;
                    let matches = want
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| read::<u8>(name + i as u64) == b);
                    if matches && read::<u8>(name + want.len() as u64) == 0 {
                        return Some(read::<u64>(base + offset));
                    }
                }
                r += 24;
            }
        }
        None
    };
    Some(Libc {
        syscall: lookup(b"syscall")?,
        errno_location: lookup(b"__errno_location")?,
        pthread_create: lookup(b"pthread_create").unwrap_or(0),
        loader_base: base,
        text,
        table,
    })
}

impl Libc {
    /// `syscall(nr, a...)` through the C library: the result, or `-errno`.
    pub fn sys(&self, nr: i64, a: [i64; 6]) -> i64 {
        type F = extern "C" fn(i64, i64, i64, i64, i64, i64, i64) -> i64;
        // SAFETY: `syscall` is the C library's variadic `long syscall(long,
        // ...)`; called with seven integer words, as the x86-64 ABI passes
        // them. This is the attack under test.
        let f: F = unsafe { core::mem::transmute::<u64, F>(self.syscall) };
        let r = f(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
        if r == -1 {
            -(self.errno() as i64)
        } else {
            r
        }
    }

    fn errno(&self) -> i32 {
        type F = extern "C" fn() -> *mut i32;
        // SAFETY: the C library's `__errno_location`; this thread is one of
        // the loader's threads, so its thread-local errno exists.
        let f: F = unsafe { core::mem::transmute::<u64, F>(self.errno_location) };
        // SAFETY: as above: a valid pointer to this thread's errno.
        unsafe { *f() }
    }
}

/// Find the C library or end: on kvm, with exit code 3 and a line saying
/// there is none to reach (what the tests expect there).
pub fn find_or_exit() -> Libc {
    match find() {
        Some(l) => {
            println!(
                "found the loader at {:#x}, the C library's syscall() at {:#x}",
                l.loader_base, l.syscall
            );
            moat_libos::io::try_flush_stdout();
            l
        }
        None => {
            println!("NO C LIBRARY in reach of the guest");
            moat_libos::process::exit(3)
        }
    }
}
