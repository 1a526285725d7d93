//! DkVirtualMemoryAlloc / Free / Protect.
use moat_libos::moat_pal::{prot, Error};
use moat_libos::Pal;

use super::{ensure, err, err_any, ok, p, Case, Ctx, R};

pub const CASES: &[Case] = &[
    ("mem_alloc_free_roundtrip", alloc_free_roundtrip),
    ("mem_alloc_zero_size", alloc_zero_size),
    ("mem_alloc_unaligned_size", alloc_unaligned_size),
    ("mem_alloc_unaligned_addr", alloc_unaligned_addr),
    ("mem_alloc_wx_refused", alloc_wx_refused),
    ("mem_alloc_fixed_address", alloc_fixed_address),
    ("mem_alloc_fixed_in_use", alloc_fixed_in_use),
    ("mem_alloc_huge", alloc_huge),
    ("mem_protect_roundtrip", protect_roundtrip),
    ("mem_protect_bad_args", protect_bad_args),
    ("mem_free_bad_args", free_bad_args),
    ("mem_free_unmapped", free_unmapped),
];

const PAGE: u64 = 4096;
const RW: u32 = prot::READ | prot::WRITE;

fn alloc_free_roundtrip(_: &Ctx) -> R {
    let a = ok(
        p().dk_virtual_memory_alloc(0, 4 * PAGE, RW),
        "alloc 4 pages RW",
    )?;
    ensure!(a != 0 && a % PAGE == 0, "address {:#x} not page-aligned", a);
    let s = a as *mut u8;
    // SAFETY: the host just gave us 4 pages of read-write memory.
    unsafe {
        for i in (0..4 * PAGE as usize).step_by(509) {
            ensure!(s.add(i).read_volatile() == 0, "memory not zeroed at +{}", i);
            s.add(i).write_volatile(i as u8 ^ 0x5a);
        }
        for i in (0..4 * PAGE as usize).step_by(509) {
            ensure!(
                s.add(i).read_volatile() == i as u8 ^ 0x5a,
                "readback at +{}",
                i
            );
        }
    }
    ok(p().dk_virtual_memory_free(a, 4 * PAGE), "free")?;
    // Partial free of a fresh allocation works page by page.
    let b = ok(
        p().dk_virtual_memory_alloc(0, 2 * PAGE, prot::READ),
        "alloc 2 pages R",
    )?;
    ok(
        p().dk_virtual_memory_free(b + PAGE, PAGE),
        "free second page",
    )?;
    ok(p().dk_virtual_memory_free(b, PAGE), "free first page")?;
    Ok(())
}

fn alloc_zero_size(_: &Ctx) -> R {
    err(
        p().dk_virtual_memory_alloc(0, 0, RW),
        Error::InvalidArgument,
        "alloc size 0",
    )
}

fn alloc_unaligned_size(_: &Ctx) -> R {
    err(
        p().dk_virtual_memory_alloc(0, PAGE + 1, RW),
        Error::InvalidArgument,
        "alloc 4097",
    )?;
    err(
        p().dk_virtual_memory_alloc(0, 100, RW),
        Error::InvalidArgument,
        "alloc 100",
    )
}

fn alloc_unaligned_addr(_: &Ctx) -> R {
    err(
        p().dk_virtual_memory_alloc(0x7000_0000_1001, PAGE, RW),
        Error::InvalidArgument,
        "alloc at unaligned address",
    )
}

fn alloc_wx_refused(_: &Ctx) -> R {
    err(
        p().dk_virtual_memory_alloc(0, PAGE, prot::WRITE | prot::EXEC),
        Error::InvalidArgument,
        "alloc W|X",
    )?;
    err(
        p().dk_virtual_memory_alloc(0, PAGE, prot::READ | prot::WRITE | prot::EXEC),
        Error::InvalidArgument,
        "alloc R|W|X",
    )?;
    // R|X alone is fine.
    let a = ok(
        p().dk_virtual_memory_alloc(0, PAGE, prot::READ | prot::EXEC),
        "alloc R|X",
    )?;
    ok(p().dk_virtual_memory_free(a, PAGE), "free")?;
    Ok(())
}

fn alloc_fixed_address(_: &Ctx) -> R {
    // Find a free spot by allocating and freeing, then ask for it exactly.
    let a = ok(p().dk_virtual_memory_alloc(0, 2 * PAGE, RW), "alloc")?;
    ok(p().dk_virtual_memory_free(a, 2 * PAGE), "free")?;
    let b = ok(
        p().dk_virtual_memory_alloc(a, 2 * PAGE, RW),
        "alloc at the freed address",
    )?;
    ensure!(b == a, "asked for {:#x}, got {:#x}", a, b);
    ok(p().dk_virtual_memory_free(b, 2 * PAGE), "free")?;
    Ok(())
}

fn alloc_fixed_in_use(_: &Ctx) -> R {
    let a = ok(p().dk_virtual_memory_alloc(0, PAGE, RW), "alloc")?;
    let r = p().dk_virtual_memory_alloc(a, PAGE, RW);
    ok(p().dk_virtual_memory_free(a, PAGE), "free")?;
    err(r, Error::AlreadyExists, "alloc over an existing allocation")
}

fn alloc_huge(_: &Ctx) -> R {
    err_any(
        p().dk_virtual_memory_alloc(0, 1 << 46, RW),
        &[Error::NoMemory, Error::InvalidArgument],
        "alloc 64 TiB",
    )
}

fn protect_roundtrip(_: &Ctx) -> R {
    let a = ok(p().dk_virtual_memory_alloc(0, 2 * PAGE, RW), "alloc")?;
    let s = a as *mut u8;
    // SAFETY: fresh read-write memory.
    unsafe { s.write_volatile(42) };
    ok(
        p().dk_virtual_memory_protect(a, 2 * PAGE, prot::READ),
        "protect R",
    )?;
    // SAFETY: still readable.
    let v = unsafe { s.read_volatile() };
    ensure!(v == 42, "content lost after protect R");
    err(
        p().dk_virtual_memory_protect(a, PAGE, prot::WRITE | prot::EXEC),
        Error::InvalidArgument,
        "protect W|X",
    )?;
    ok(
        p().dk_virtual_memory_protect(a, PAGE, RW),
        "protect first page RW again",
    )?;
    // SAFETY: read-write again.
    let v = unsafe {
        s.write_volatile(43);
        s.read_volatile()
    };
    ensure!(v == 43, "write after protect RW");
    ok(
        p().dk_virtual_memory_protect(a + PAGE, PAGE, prot::READ | prot::EXEC),
        "protect R|X",
    )?;
    ok(p().dk_virtual_memory_free(a, 2 * PAGE), "free")?;
    Ok(())
}

fn protect_bad_args(_: &Ctx) -> R {
    let a = ok(p().dk_virtual_memory_alloc(0, 2 * PAGE, RW), "alloc")?;
    let r1 = p().dk_virtual_memory_protect(a + 1, PAGE, prot::READ);
    let r2 = p().dk_virtual_memory_protect(a, 0, prot::READ);
    let r3 = p().dk_virtual_memory_protect(a, PAGE + 7, prot::READ);
    ok(p().dk_virtual_memory_free(a, 2 * PAGE), "free")?;
    err(r1, Error::InvalidArgument, "protect unaligned address")?;
    err(r2, Error::InvalidArgument, "protect size 0")?;
    err(r3, Error::InvalidArgument, "protect unaligned size")?;
    // Memory that was freed, or never allocated.
    err(
        p().dk_virtual_memory_protect(a, PAGE, prot::READ),
        Error::BadAddress,
        "protect freed memory",
    )?;
    // An address no picoprocess can have: either error fits the spec.
    err_any(
        p().dk_virtual_memory_protect(0xffff_8000_0000_0000, PAGE, prot::READ),
        &[Error::BadAddress, Error::InvalidArgument],
        "protect kernel address",
    )
}

fn free_bad_args(_: &Ctx) -> R {
    let a = ok(p().dk_virtual_memory_alloc(0, PAGE, RW), "alloc")?;
    let r1 = p().dk_virtual_memory_free(a + 8, PAGE);
    let r2 = p().dk_virtual_memory_free(a, 0);
    let r3 = p().dk_virtual_memory_free(a, 12);
    ok(p().dk_virtual_memory_free(a, PAGE), "free")?;
    err(r1, Error::InvalidArgument, "free unaligned address")?;
    err(r2, Error::InvalidArgument, "free size 0")?;
    err(r3, Error::InvalidArgument, "free unaligned size")
}

fn free_unmapped(_: &Ctx) -> R {
    let a = ok(p().dk_virtual_memory_alloc(0, PAGE, RW), "alloc")?;
    ok(p().dk_virtual_memory_free(a, PAGE), "free")?;
    err(
        p().dk_virtual_memory_free(a, PAGE),
        Error::BadAddress,
        "free twice",
    )?;
    // The image itself was not obtained from DkVirtualMemoryAlloc.
    let code = free_unmapped as fn(&Ctx) -> R as usize as u64 & !(PAGE - 1);
    err(
        p().dk_virtual_memory_free(code, PAGE),
        Error::BadAddress,
        "free the image's code",
    )
}
