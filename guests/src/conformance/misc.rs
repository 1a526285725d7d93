//! Time, random bits, instruction cache, debug print, and the calls that
//! host-linux does not support.
use moat_libos::moat_pal::{host_kind, Error};
use moat_libos::Pal;

use super::{ensure, err, ok, p, Case, Ctx, R};

pub const CASES: &[Case] = &[
    ("time_plausible_monotonic", time_plausible_monotonic),
    ("random_bits", random_bits),
    ("icache_flush", icache_flush),
    ("debug_string_print", debug_string_print),
    (
        "not_supported_and_undeclared_devices",
        not_supported_and_undeclared_devices,
    ),
];

fn time_plausible_monotonic(_: &Ctx) -> R {
    let t0 = ok(p().dk_system_time_query(), "time")?;
    // 2020-01-01 .. 2200-01-01 in microseconds since the epoch.
    ensure!(t0 > 1_577_836_800_000_000, "time {} is before 2020", t0);
    ensure!(t0 < 7_258_118_400_000_000, "time {} is after 2200", t0);
    let mut last = t0;
    for _ in 0..1000 {
        let t = ok(p().dk_system_time_query(), "time")?;
        ensure!(t + 1_000 >= last, "time went back from {} to {}", last, t);
        last = t;
    }
    Ok(())
}

fn random_bits(_: &Ctx) -> R {
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    let n = ok(p().dk_random_bits_read(a.as_mut_ptr(), 32), "read 32")?;
    ensure!(n == 32, "returned {} (expected 32)", n);
    ok(p().dk_random_bits_read(b.as_mut_ptr(), 32), "read 32 again")?;
    ensure!(a != b, "two reads of 32 random bytes are equal");
    ensure!(a != [0u8; 32], "random bytes all zero");
    let n = ok(p().dk_random_bits_read(a.as_mut_ptr(), 0), "read 0")?;
    ensure!(n == 0, "len 0 returned {}", n);
    let mut big = alloc::vec![0u8; 100_000];
    let n = ok(
        p().dk_random_bits_read(big.as_mut_ptr(), big.len() as u64),
        "read 100000",
    )?;
    ensure!(n == 100_000, "returned {} (expected 100000)", n);
    Ok(())
}

fn icache_flush(_: &Ctx) -> R {
    let a = ok(p().dk_virtual_memory_alloc(0, 8192, 3), "alloc")?;
    let r1 = p().dk_instruction_cache_flush(a, 8192);
    let r2 = p().dk_instruction_cache_flush(a + 100, 10);
    ok(p().dk_virtual_memory_free(a, 8192), "free")?;
    ok(r1, "flush 2 pages")?;
    ok(r2, "flush 10 bytes inside")?;
    let code = icache_flush as fn(&Ctx) -> R as usize as u64;
    ok(
        p().dk_instruction_cache_flush(code, 64),
        "flush the image's own code",
    )?;
    err(
        p().dk_instruction_cache_flush(a, 4096),
        Error::BadAddress,
        "flush freed memory",
    )
}

fn debug_string_print(_: &Ctx) -> R {
    let m = "moat conformance: DkDebugStringPrint works\n";
    let r = ok(
        p().dk_debug_string_print(m.as_ptr(), m.len() as u64),
        "print",
    )?;
    ensure!(r == 0, "returned {}", r);
    Ok(())
}

/// Input and frame buffers are not offered by any host. `dev:` streams
/// are not supported on linux; on kvm an undeclared device is not found.
fn not_supported_and_undeclared_devices(ctx: &Ctx) -> R {
    let mut buf = [0u8; 64];
    let ns = Error::NotSupported;
    err(
        p().dk_input_event_read(buf.as_mut_ptr(), 64),
        ns,
        "DkInputEventRead",
    )?;
    let fb = ok(p().dk_virtual_memory_alloc(0, 4096, 3), "alloc")?;
    let r = p().dk_frame_buffer_export(fb, 32, 32);
    ok(p().dk_virtual_memory_free(fb, 4096), "free")?;
    err(r, ns, "DkFrameBufferExport")?;
    err(
        p().dk_frame_buffer_notify_update(0, 0, 1, 1),
        ns,
        "DkFrameBufferNotifyUpdate",
    )?;
    let uri = "dev:blk0";
    let mut h = 0u64;
    let want = if ctx.host_kind == host_kind::LINUX {
        ns
    } else {
        Error::NotFound
    };
    err(
        p().dk_stream_open(uri.as_ptr(), uri.len() as u64, 3, 0, 0, &mut h),
        want,
        "DkStreamOpen(dev:blk0)",
    )
}
