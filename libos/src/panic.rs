//! Panics end the picoprocess with exit code 101 after reporting
//! `panicked at FILE:LINE: MESSAGE` on stderr.
use core::fmt::Write;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

/// Exit code of a panicked picoprocess.
pub const EXIT_PANIC: i32 = 101;

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::SeqCst) {
        // A panic while reporting a panic (or two threads at once): just go.
        crate::process::exit_now(EXIT_PANIC);
    }
    crate::io::try_flush_stdout();
    let mut out = crate::io::StderrBuf::new();
    let _ = match info.location() {
        Some(l) => writeln!(
            out,
            "panicked at {}:{}: {}",
            l.file(),
            l.line(),
            info.message()
        ),
        None => writeln!(out, "panicked: {}", info.message()),
    };
    out.flush();
    crate::process::exit_now(EXIT_PANIC)
}
