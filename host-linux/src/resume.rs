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
use moat_host_common::freeze::restore;
use moat_host_common::pal::LinuxPal;
use moat_host_common::sys;
use moat_layers::checkpointer::Checkpointer;
use moat_pal::PalTable;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;

/// Read the checkpoint and map its regions.
pub(crate) fn map(pal: &'static LinuxPal, fd: OwnedFd) -> Checkpoint {
    let (c, data_off) = restore::read(fd.as_raw_fd())
        .unwrap_or_else(|e| refuse(&format!("cannot restore: the checkpoint {e}")));
    if let Err(e) = restore::map_regions(pal, fd.as_raw_fd(), &c, data_off) {
        refuse(&format!("cannot restore: {e}"));
    }
    c
}

/// Make the handles and start the threads; this thread becomes the
/// first one.
pub(crate) fn start(
    pal: &'static LinuxPal,
    layer: Option<&'static Checkpointer>,
    c: Checkpoint,
    table: &'static PalTable,
) -> ! {
    let Some(layer) = layer else {
        fail("cannot restore: the loader has no checkpoint layer")
    };
    // This loader's table and host in the carried start-up block.
    if let Err(e) = restore::point_startup(
        pal,
        c.startup,
        table as *const PalTable as u64,
        moat_pal::host_kind::LINUX,
    ) {
        refuse(&format!("cannot restore: {e}"));
    }
    let done = restore::make_handles(pal, layer, &c)
        .unwrap_or_else(|e| refuse(&format!("cannot restore: {e}")));
    pal.threads_live
        .fetch_add(c.threads.len() as u64, Ordering::AcqRel);
    let mut first = None;
    for (i, (handle, state, param)) in restore::thread_states(&c).into_iter().enumerate() {
        if i == 0 {
            first = Some((state, param));
            continue;
        }
        let done = done[i].clone();
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
