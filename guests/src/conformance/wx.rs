//! W^X: memory protections hold inside the picoprocess on every host.
//! Data does not execute (freshly allocated, read-only, on the stack),
//! code and read-only memory do not take writes (the image's text, an RX
//! region, a region made read-only), freed memory is gone; and the
//! changes a JIT makes (write, protect RX, run, protect RW, rewrite) take
//! effect at once. Each fault is observed through the exception upcall,
//! which must report a MEMORY_FAULT at the exact address. These run last,
//! with the exception cases.
use core::sync::atomic::{AtomicU64, Ordering};

use moat_libos::moat_pal::{exception_disposition, exception_kind, prot};
use moat_libos::{exception, ExceptionInfo, Pal};

use super::{ensure, ok, p, Case, Ctx, Fail, R};

pub const CASES: &[Case] = &[
    ("wx_exec_data_faults", exec_data_faults),
    ("wx_exec_stack_faults", exec_stack_faults),
    ("wx_exec_readonly_faults", exec_readonly_faults),
    ("wx_write_text_faults", write_text_faults),
    ("wx_write_rx_faults", write_rx_faults),
    ("wx_write_readonly_faults", write_readonly_faults),
    ("wx_protect_back_to_rw_writes", protect_back_to_rw_writes),
    ("wx_jit_write_protect_run", jit_write_protect_run),
    ("wx_read_freed_faults", read_freed_faults),
];

const PAGE: u64 = 4096;
const RW: u32 = prot::READ | prot::WRITE;
const RX: u32 = prot::READ | prot::EXEC;

static RECOVER: AtomicU64 = AtomicU64::new(0);
static SEEN_KIND: AtomicU64 = AtomicU64::new(0);
static SEEN_ADDR: AtomicU64 = AtomicU64::new(0);

/// Records the fault and resumes at the recovery label the probe set.
fn handler(info: &mut ExceptionInfo) -> u32 {
    SEEN_KIND.store(u64::from(info.kind), Ordering::SeqCst);
    SEEN_ADDR.store(info.fault_addr, Ordering::SeqCst);
    let to = RECOVER.swap(0, Ordering::SeqCst);
    if info.kind == exception_kind::MEMORY_FAULT && to != 0 {
        info.rip = to;
        exception_disposition::RESUME
    } else {
        exception_disposition::TERMINATE
    }
}

/// Run `probe` with [`handler`] installed; the old handler comes back.
fn with_handler<T>(probe: impl FnOnce() -> T) -> T {
    SEEN_KIND.store(0, Ordering::SeqCst);
    SEEN_ADDR.store(0, Ordering::SeqCst);
    let old = exception::set_handler(handler);
    let r = probe();
    match old {
        Some(h) => {
            exception::set_handler(h);
        }
        None => {
            exception::clear_handler();
        }
    }
    r
}

/// Jump to `code` with rcx holding the way back; eax is 0 on the way in.
/// Ok(eax) if it ran and came back, Err(()) if it faulted.
fn try_exec(code: u64) -> Result<u32, ()> {
    let faulted: u64;
    let eax: u64;
    // SAFETY: the code at `code` (ours: `mov eax, imm; jmp rcx` or
    // `jmp rcx`) returns through rcx to label 3; if fetching it faults,
    // the handler resumes at label 2 with the same registers. No stack is
    // touched.
    unsafe {
        core::arch::asm!(
            "lea {tmp}, [rip + 2f]",
            "mov qword ptr [{slot}], {tmp}",
            "lea rcx, [rip + 3f]",
            "mov {flag}, 1",
            "xor eax, eax",
            "jmp {code}",
            "3:",
            "mov {flag}, 0",
            "2:",
            slot = in(reg) RECOVER.as_ptr(),
            code = in(reg) code,
            tmp = out(reg) _,
            flag = out(reg) faulted,
            out("rcx") _,
            out("rax") eax,
            options(nostack),
        );
    }
    RECOVER.store(0, Ordering::SeqCst);
    if faulted == 1 {
        Err(())
    } else {
        Ok(eax as u32)
    }
}

/// Write `v` to `addr`; whether it faulted.
fn try_write(addr: u64, v: u8) -> bool {
    let faulted: u64;
    // SAFETY: a one-byte store that either lands or faults; on a fault the
    // handler resumes at label 2 with the same registers.
    unsafe {
        core::arch::asm!(
            "lea {tmp}, [rip + 2f]",
            "mov qword ptr [{slot}], {tmp}",
            "mov {flag}, 1",
            "mov byte ptr [{addr}], {v}",
            "mov {flag}, 0",
            "2:",
            slot = in(reg) RECOVER.as_ptr(),
            addr = in(reg) addr,
            v = in(reg_byte) v,
            tmp = out(reg) _,
            flag = out(reg) faulted,
            options(nostack),
        );
    }
    RECOVER.store(0, Ordering::SeqCst);
    faulted == 1
}

/// Read the byte at `addr`; None if it faulted.
fn try_read(addr: u64) -> Option<u8> {
    let faulted: u64;
    let v: u64;
    // SAFETY: a one-byte load that either happens or faults; on a fault
    // the handler resumes at label 2 with the same registers.
    unsafe {
        core::arch::asm!(
            "lea {tmp}, [rip + 2f]",
            "mov qword ptr [{slot}], {tmp}",
            "mov {flag}, 1",
            "xor {v:e}, {v:e}",
            "mov {v:l}, byte ptr [{addr}]",
            "mov {flag}, 0",
            "2:",
            slot = in(reg) RECOVER.as_ptr(),
            addr = in(reg) addr,
            tmp = out(reg) _,
            flag = out(reg) faulted,
            v = out(reg) v,
            options(nostack),
        );
    }
    RECOVER.store(0, Ordering::SeqCst);
    (faulted == 0).then_some(v as u8)
}

/// The handler saw a memory fault at `addr`.
fn saw_fault_at(addr: u64, what: &str) -> R {
    let kind = SEEN_KIND.load(Ordering::SeqCst);
    ensure!(
        kind == u64::from(exception_kind::MEMORY_FAULT),
        "{}: handler saw kind {} (expected MEMORY_FAULT)",
        what,
        kind
    );
    let at = SEEN_ADDR.load(Ordering::SeqCst);
    ensure!(
        at == addr,
        "{}: handler saw fault_addr {:#x} (expected {:#x})",
        what,
        at,
        addr
    );
    Ok(())
}

/// `mov eax, v; jmp rcx`
fn code_returning(v: u32) -> [u8; 7] {
    let b = v.to_le_bytes();
    [0xb8, b[0], b[1], b[2], b[3], 0xff, 0xe1]
}

/// A fresh page of `prot`, freed on drop.
struct Page(u64);

impl Page {
    fn new(pr: u32) -> Result<Page, Fail> {
        Ok(Page(ok(p().dk_virtual_memory_alloc(0, PAGE, pr), "alloc")?))
    }

    fn protect(&self, pr: u32, what: &str) -> R {
        ok(p().dk_virtual_memory_protect(self.0, PAGE, pr), what).map(|_| ())
    }

    fn put(&self, bytes: &[u8]) {
        // SAFETY: our page, read-write when this is called.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0 as *mut u8, bytes.len()) };
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        let _ = p().dk_virtual_memory_free(self.0, PAGE);
    }
}

fn exec_data_faults(_: &Ctx) -> R {
    let pg = Page::new(RW)?;
    pg.put(&code_returning(7));
    let r = with_handler(|| try_exec(pg.0));
    ensure!(r.is_err(), "code in read-write memory ran ({:?})", r);
    saw_fault_at(pg.0, "execute RW")
}

fn exec_stack_faults(_: &Ctx) -> R {
    let code = core::hint::black_box(code_returning(9));
    let at = code.as_ptr() as u64;
    let r = with_handler(|| try_exec(at));
    ensure!(r.is_err(), "code on the stack ran ({:?})", r);
    saw_fault_at(at, "execute on the stack")
}

fn exec_readonly_faults(_: &Ctx) -> R {
    let pg = Page::new(RW)?;
    pg.put(&code_returning(7));
    pg.protect(prot::READ, "protect R")?;
    let r = with_handler(|| try_exec(pg.0));
    ensure!(r.is_err(), "code in read-only memory ran ({:?})", r);
    saw_fault_at(pg.0, "execute R")
}

fn write_text_faults(_: &Ctx) -> R {
    // A byte of this very function's code, written with its own value (so
    // a host that let it through would still run on).
    let at = write_text_faults as *const () as u64;
    let Some(v) = try_read(at) else {
        return Err(Fail::Fail(alloc::format!(
            "cannot read the text at {at:#x}"
        )));
    };
    let faulted = with_handler(|| try_write(at, v));
    ensure!(
        faulted,
        "a write to the image's text at {:#x} went through",
        at
    );
    saw_fault_at(at, "write text")
}

fn write_rx_faults(_: &Ctx) -> R {
    let pg = Page::new(RW)?;
    pg.put(&code_returning(5));
    pg.protect(RX, "protect RX")?;
    let faulted = with_handler(|| try_write(pg.0 + 1, 0x90));
    ensure!(faulted, "a write to RX memory went through");
    saw_fault_at(pg.0 + 1, "write RX")?;
    let r = with_handler(|| try_exec(pg.0));
    ensure!(r == Ok(5), "the RX code did not run as written ({:?})", r);
    Ok(())
}

fn write_readonly_faults(_: &Ctx) -> R {
    let pg = Page::new(RW)?;
    pg.put(&[0x5a]);
    pg.protect(prot::READ, "protect R")?;
    let faulted = with_handler(|| try_write(pg.0 + 100, 1));
    ensure!(faulted, "a write to memory made read-only went through");
    saw_fault_at(pg.0 + 100, "write R")?;
    let v = with_handler(|| try_read(pg.0));
    ensure!(v == Some(0x5a), "read-only memory reads {:?}", v);
    Ok(())
}

fn protect_back_to_rw_writes(_: &Ctx) -> R {
    let pg = Page::new(RW)?;
    pg.protect(prot::READ, "protect R")?;
    ensure!(
        with_handler(|| try_write(pg.0, 1)),
        "a write to read-only memory went through"
    );
    pg.protect(RW, "protect back to RW")?;
    let faulted = with_handler(|| try_write(pg.0 + 8, 0xa5));
    ensure!(!faulted, "a write after protecting back to RW faulted");
    let v = with_handler(|| try_read(pg.0 + 8));
    ensure!(v == Some(0xa5), "read back {:?}", v);
    Ok(())
}

fn jit_write_protect_run(_: &Ctx) -> R {
    let pg = Page::new(RW)?;
    for round in 1..=3u32 {
        pg.put(&code_returning(0x1000 + round));
        pg.protect(RX, "protect RX")?;
        let r = with_handler(|| try_exec(pg.0));
        ensure!(
            r == Ok(0x1000 + round),
            "round {}: the fresh code returned {:?}",
            round,
            r
        );
        pg.protect(RW, "protect RW")?;
        let r = with_handler(|| try_exec(pg.0));
        ensure!(r.is_err(), "round {}: RW code ran ({:?})", round, r);
    }
    Ok(())
}

fn read_freed_faults(_: &Ctx) -> R {
    let a = ok(p().dk_virtual_memory_alloc(0, 2 * PAGE, RW), "alloc")?;
    ok(p().dk_virtual_memory_free(a + PAGE, PAGE), "free")?;
    let gone = with_handler(|| try_read(a + PAGE + 16));
    let kept = with_handler(|| try_read(a + 16));
    let _ = p().dk_virtual_memory_free(a, PAGE);
    ensure!(gone.is_none(), "freed memory still reads {:?}", gone);
    ensure!(kept == Some(0), "the page kept reads {:?}", kept);
    Ok(())
}
