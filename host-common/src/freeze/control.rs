//! The checkpoint thread of a confined process whose picoprocess has a
//! checkpoint layer: it waits on the control socket for the monitor's
//! [`Control`] requests, freezes the picoprocess, writes it to the
//! descriptor the request carries, answers, and ends the process or lets
//! it go on.
use crate::pal::LinuxPal;
use crate::protocol::{self, Control, ControlReply};
use crate::sys;
use moat_layers::checkpointer::Checkpointer;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

/// How long the freeze waits for every thread to stop.
pub const FREEZE_LIMIT: Duration = Duration::from_secs(2);

/// Start the checkpoint thread, if the picoprocess is checkpointable (a
/// control socket came, and the stack has a checkpoint layer).
pub fn start(
    ctl: Option<OwnedFd>,
    pal: &'static LinuxPal,
    layer: Option<&'static Checkpointer>,
    args: Vec<String>,
    memory_mib: u64,
) -> Result<(), String> {
    let (Some(ctl), Some(layer)) = (ctl, layer) else {
        return Ok(());
    };
    // No name: naming a thread is a system call the sandbox refuses.
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || serve(ctl, pal, layer, args, memory_mib))
        .map(|_| ())
        .map_err(|e| format!("cannot start the checkpoint thread: {e}"))
}

fn serve(
    ctl: OwnedFd,
    pal: &'static LinuxPal,
    layer: &'static Checkpointer,
    args: Vec<String>,
    memory_mib: u64,
) {
    loop {
        let Ok((req, mut fds)) = protocol::recv::<Control>(ctl.as_fd()) else {
            // The monitor is gone (or sent nonsense): no more checkpoints.
            return;
        };
        let Control::Checkpoint(opts) = req;
        let reply = match fds.pop() {
            None => ControlReply::Failed {
                why: "no file came with the request".into(),
            },
            Some(file) => {
                let r = super::freeze_all(FREEZE_LIMIT, &|| {
                    pal.threads_live.load(std::sync::atomic::Ordering::Acquire)
                })
                .and_then(|frozen| {
                    // The map held until the memory is written.
                    let map = pal.regions.read().unwrap();
                    super::write::describe(
                        pal,
                        &map,
                        layer,
                        &frozen,
                        &args,
                        memory_mib,
                        opts.close_uncarried,
                    )
                    .and_then(|c| super::write::write(file.as_raw_fd(), &c))
                });
                match r {
                    Ok(bytes) => ControlReply::Done { bytes },
                    Err(why) => ControlReply::Failed { why },
                }
            }
        };
        let done = matches!(reply, ControlReply::Done { .. });
        let _ = protocol::send(ctl.as_fd(), &reply, &[]);
        if done && !opts.leave_running {
            sys::exit_process(0);
        }
        super::thaw_all();
    }
}
