//! Attacks on the protections inside the kvm host's VM (the same attacks
//! fault on linux, where the host kernel's page tables hold):
//!
//! - `exec-data`: write `ret` into fresh read-write memory and call it;
//! - `exec-static`: call into the image's own writable data;
//! - `write-text`: write into the image's own code;
//! - `write ADDR` / `read ADDR` / `exec ADDR`: touch the VM's own memory
//!   at ADDR (hex): page tables, GDT, IDT, exception stubs, the task-state
//!   area, the page-table pool;
//! - `priv NAME`: a privileged instruction at CPL 3 (`lgdt`, `lidt`,
//!   `ltr`, `cr3`, `cr0`, `wrmsr`, `invlpg`, `cli`);
//! - `race-exec`: a second thread runs code in an RX page while the first
//!   protects it RW: the running thread must fault (every vCPU sees the
//!   change before the call returns);
//! - `race-free`: a second thread reads a page while the first frees it.
//!
//! Each prints the address it attacks as `target ADDR` first. Every
//! attack must end the picoprocess with a fault report; one that lets
//! the image go on prints `ESCAPED ...` and exits 42.
#![no_std]
#![no_main]
extern crate alloc;

#[path = "../common.rs"]
mod common;

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use moat_libos::moat_pal::prot;
use moat_libos::{pal, println, Pal};

moat_libos::entry!(main);

const PAGE: u64 = 4096;

fn target(addr: u64) {
    println!("target {addr:#x}");
    moat_libos::io::try_flush_stdout();
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or(0)
}

fn alloc(p: u32) -> u64 {
    let a = pal().dk_virtual_memory_alloc(0, PAGE, p);
    assert!(a > 0, "alloc: {a}");
    a as u64
}

fn call(addr: u64) {
    // SAFETY: deliberately hostile: `addr` holds `ret` or must fault.
    unsafe { asm!("call {a}", a = in(reg) addr, clobber_abi("C")) };
}

static mut DATA: [u8; 64] = [0xc3; 64];

fn exec_data() -> i32 {
    let a = alloc(common::RW);
    // SAFETY: our fresh read-write page.
    unsafe { (a as *mut u8).write_volatile(0xc3) };
    target(a);
    call(a);
    common::escaped(&alloc::format!("executed read-write memory at {a:#x}"))
}

fn exec_static() -> i32 {
    let a = &raw const DATA as u64;
    target(a);
    call(a);
    common::escaped(&alloc::format!("executed the image's data at {a:#x}"))
}

fn write_text() -> i32 {
    let a = write_text as *const () as u64;
    target(a);
    // SAFETY: deliberately hostile: the image's code must not take writes.
    unsafe {
        let v = (a as *const u8).read_volatile();
        (a as *mut u8).write_volatile(v);
    }
    common::escaped(&alloc::format!("wrote the image's code at {a:#x}"))
}

fn touch(how: &str, a: u64) -> i32 {
    target(a);
    // SAFETY: deliberately hostile: the VM's own memory must fault.
    unsafe {
        match how {
            "write" => (a as *mut u64).write_volatile(0x9090_9090_9090_9090),
            "read" => {
                let v = (a as *const u64).read_volatile();
                println!("read {v:#x}");
            }
            _ => call(a),
        }
    }
    common::escaped(&alloc::format!("{how} of {a:#x} went through"))
}

fn privileged(name: &str) -> i32 {
    let desc = [0u8; 16];
    let d = desc.as_ptr();
    println!("trying {name}");
    moat_libos::io::try_flush_stdout();
    // SAFETY: deliberately hostile: each needs CPL 0 and must fault.
    unsafe {
        match name {
            "lgdt" => asm!("lgdt [{d}]", d = in(reg) d),
            "lidt" => asm!("lidt [{d}]", d = in(reg) d),
            "ltr" => asm!("ltr {s:x}", s = in(reg) 0x28u64),
            "cr3" => asm!("mov cr3, {v}", v = in(reg) 0x1000u64),
            "cr0" => asm!("mov {v}, cr0", "and {v}, -2", "mov cr0, {v}", v = out(reg) _),
            "wrmsr" => asm!("wrmsr", in("ecx") 0xc000_0082u32, in("eax") 0u32, in("edx") 0u32),
            "invlpg" => asm!("invlpg [{d}]", d = in(reg) d),
            "cli" => asm!("cli", "cli"),
            _ => return 2,
        }
    }
    common::escaped(&alloc::format!("{name} at CPL 3 went through"))
}

static PAGE_AT: AtomicU64 = AtomicU64::new(0);
static SPINS: AtomicU64 = AtomicU64::new(0);

fn exec_spinner() {
    let a = PAGE_AT.load(Ordering::SeqCst);
    loop {
        call(a);
        SPINS.fetch_add(1, Ordering::SeqCst);
    }
}

fn read_spinner() {
    let a = PAGE_AT.load(Ordering::SeqCst);
    loop {
        // SAFETY: deliberately hostile: the page is freed under us.
        unsafe { core::hint::black_box((a as *const u8).read_volatile()) };
        SPINS.fetch_add(1, Ordering::SeqCst);
    }
}

/// Start `spin` on a second thread, let it run, then take the page away
/// with `revoke`; the spinning thread must fault at once.
fn race(spin: fn(), revoke: impl FnOnce(u64) -> i64, what: &str) -> i32 {
    let a = PAGE_AT.load(Ordering::SeqCst);
    target(a);
    if moat_libos::thread::try_spawn(spin).is_err() {
        println!("no second thread");
        return 2;
    }
    while SPINS.load(Ordering::SeqCst) < 1000 {
        let _ = pal().dk_thread_yield_execution();
    }
    let r = revoke(a);
    let at = SPINS.load(Ordering::SeqCst);
    // The fault ends the picoprocess; give it the time it needs.
    let _ = pal().dk_thread_delay_execution(2_000_000);
    let later = SPINS.load(Ordering::SeqCst);
    common::escaped(&alloc::format!(
        "{what} (call returned {r}): the other thread went on from {at} to {later}"
    ))
}

fn race_exec() -> i32 {
    let a = alloc(common::RW);
    // SAFETY: our fresh read-write page.
    unsafe { (a as *mut u8).write_volatile(0xc3) };
    assert_eq!(
        pal().dk_virtual_memory_protect(a, PAGE, prot::READ | prot::EXEC),
        0
    );
    PAGE_AT.store(a, Ordering::SeqCst);
    race(
        exec_spinner,
        |a| pal().dk_virtual_memory_protect(a, PAGE, common::RW),
        "code ran after its page became RW",
    )
}

fn race_free() -> i32 {
    PAGE_AT.store(alloc(common::RW), Ordering::SeqCst);
    race(
        read_spinner,
        |a| pal().dk_virtual_memory_free(a, PAGE),
        "a freed page was still read",
    )
}

fn main() -> i32 {
    match common::arg(1).as_str() {
        "exec-data" => exec_data(),
        "exec-static" => exec_static(),
        "write-text" => write_text(),
        m @ ("write" | "read" | "exec") => touch(m, hex(&common::arg(2))),
        "priv" => privileged(&common::arg(2)),
        "race-exec" => race_exec(),
        "race-free" => race_free(),
        m => {
            println!("unknown mode {m}");
            2
        }
    }
}
