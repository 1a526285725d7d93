//! Starting a picoprocess from a checkpoint (`moat restore`): its regions
//! mapped from the file, its start-up block pointed at this loader's PAL
//! table, its handles made again, its threads started from their carried
//! state (see `moat_host_common::freeze`).
use super::fail;

/// The checkpoint cannot be restored as given (a changed file, a grant
/// missing, limits too small): bad input, exit 2.
fn refuse(msg: &str) -> ! {
    moat_host_common::signals::report(moat_host_common::protocol::ReportKind::Startup, msg);
    sys::exit_process(moat_host_common::protocol::EXIT_BAD_INPUT)
}
use moat_checkpoint::Checkpoint;
use moat_host_common::freeze::{self, restore};
use moat_host_common::pal::LinuxPal;
use moat_host_common::sys;
use moat_layers::checkpointer::Checkpointer;
use moat_pal::{PalTable, StartupBlock};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;

/// Read the checkpoint and map its regions.
pub(crate) fn map(pal: &'static LinuxPal, fd: OwnedFd) -> (Checkpoint, u64) {
    let (c, data_off) = restore::read(fd.as_raw_fd())
        .unwrap_or_else(|e| refuse(&format!("cannot restore: the checkpoint {e}")));
    if let Err(e) = restore::map_regions(pal, fd.as_raw_fd(), &c, data_off) {
        refuse(&format!("cannot restore: {e}"));
    }
    let startup = c.startup;
    (c, startup)
}

/// Make the handles and start the threads; this thread becomes the
/// first one.
pub(crate) fn start(
    pal: &'static LinuxPal,
    layer: Option<&'static Checkpointer>,
    c: Checkpoint,
    startup: u64,
    table: &'static PalTable,
) -> ! {
    let Some(layer) = layer else {
        fail("cannot restore: the loader has no checkpoint layer")
    };
    // This loader's table and host in the carried start-up block.
    if pal
        .check_w(startup, std::mem::size_of::<StartupBlock>() as u64)
        .is_err()
    {
        fail("cannot restore: the start-up block is not writable guest memory");
    }
    let field = |off: usize| startup + off as u64;
    sys::put(
        field(std::mem::offset_of!(StartupBlock, table)),
        table as *const PalTable,
    );
    sys::put(
        field(std::mem::offset_of!(StartupBlock, host_kind)),
        moat_pal::host_kind::LINUX,
    );
    pal.startup.store(startup, Ordering::Release);
    let done = restore::make_handles(pal, layer, &c)
        .unwrap_or_else(|e| refuse(&format!("cannot restore: {e}")));
    let handle_of = |i: usize| {
        c.handles.iter().find_map(|h| match h.held {
            moat_checkpoint::Held::Thread { thread: Some(t) } if t as usize == i => Some(h.handle),
            _ => None,
        })
    };
    pal.threads_live
        .fetch_add(c.threads.len() as u64, Ordering::AcqRel);
    let mut first = None;
    for (i, t) in c.threads.iter().enumerate() {
        let state = freeze::Saved {
            regs: t.regs,
            fpu: {
                let mut b = Box::new([0u8; moat_checkpoint::MAX_FPU]);
                b[..t.fpu.len()].copy_from_slice(&t.fpu);
                b
            },
            fpu_len: t.fpu.len(),
            restart: t.restart,
            load: true,
        };
        if i == 0 {
            first = Some((state, t.param));
            continue;
        }
        let handle = handle_of(i);
        let done = done[i].clone();
        let param = t.param;
        let spawned = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || pal.run_restored_thread(handle, state, param, done));
        if spawned.is_err() {
            fail("cannot restore: cannot start a thread");
        }
    }
    let Some((state, param)) = first else {
        fail("cannot restore: no first thread")
    };
    pal.run_restored_thread(None, state, param, None);
    loop {
        std::thread::park();
    }
}
