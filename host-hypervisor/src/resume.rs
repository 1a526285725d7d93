//! Starting a picoprocess from a checkpoint in the VMM (`moat restore
//! --host kvm`): its regions mapped from the file at their addresses in
//! guest RAM, its start-up block pointed at the VM's PAL table, its
//! handles made again, one vCPU per carried thread loaded with its state
//! (see `moat_host_common::freeze` and `crate::pico`'s `frozen`).
use crate::layout::TABLE;
use crate::pal::KvmPal;
use crate::pico::PicoVm;
use moat_checkpoint::Checkpoint;
use moat_host_common::freeze::restore;
use moat_host_common::pal::LinuxPal;
use moat_host_common::protocol::{self, ReportKind};
use moat_host_common::{signals, sys};
use moat_layers::checkpointer::Checkpointer;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The checkpoint cannot be restored as given: bad input, exit 2.
fn refuse(msg: &str) -> ! {
    signals::report(ReportKind::Startup, &format!("cannot restore: {msg}"));
    sys::exit_process(protocol::EXIT_BAD_INPUT)
}

/// Read the checkpoint, map its regions, point its start-up block at the
/// VM's table.
pub(crate) fn map(lin: &'static LinuxPal, fd: OwnedFd) -> Checkpoint {
    let (c, data_off) =
        restore::read(fd.as_raw_fd()).unwrap_or_else(|e| refuse(&format!("the checkpoint {e}")));
    if let Err(e) = restore::map_regions(lin, fd.as_raw_fd(), &c, data_off) {
        refuse(&e);
    }
    if let Err(e) = restore::point_startup(lin, c.startup, TABLE, moat_pal::host_kind::KVM) {
        refuse(&e);
    }
    c
}

/// Make the handles and start a vCPU per thread.
pub(crate) fn start(
    vm: &Arc<PicoVm>,
    lin: &LinuxPal,
    pal: Arc<KvmPal>,
    layer: Option<&'static Checkpointer>,
    c: &Checkpoint,
) {
    let Some(layer) = layer else {
        refuse("the VMM has no checkpoint layer")
    };
    let done = restore::make_handles(lin, layer, c).unwrap_or_else(|e| refuse(&e));
    lin.threads_live
        .fetch_add(c.threads.len() as u64, Ordering::AcqRel);
    for (i, (handle, state, param)) in restore::thread_states(c).into_iter().enumerate() {
        if let Err(e) =
            vm.clone()
                .spawn_restored(pal.clone(), handle, state, param, done[i].clone())
        {
            refuse(&format!("cannot start a thread: {e:?}"));
        }
    }
}
