//! The checkpoint thread of a confined process whose picoprocess has a
//! checkpoint layer: it waits on the control socket for the monitor's
//! [`Control`] requests, freezes the picoprocess, writes it to the
//! descriptor the request carries, answers, and ends the process or lets
//! it go on. With a template asked for ([`Config::template`]), it also
//! waits for the layer to ring that the first stream open has come, and
//! writes the template then.
use crate::pal::LinuxPal;
use crate::protocol::{self, Config, Control, ControlReply};
use crate::sys;
use moat_layers::checkpointer::Checkpointer;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// How long the freeze waits for every thread to stop.
pub const FREEZE_LIMIT: Duration = Duration::from_secs(2);

/// The control socket (last of the configuration's descriptors) and the
/// template's file (after it), as the configuration says they come.
pub fn take_fds(
    cfg: &Config,
    fds: &mut Vec<OwnedFd>,
) -> Result<(Option<OwnedFd>, Option<OwnedFd>), String> {
    if cfg.template && !cfg.checkpoint {
        return Err("a template needs a checkpoint layer and a control socket".into());
    }
    let template = match cfg.template {
        false => None,
        true => Some(fds.pop().ok_or("the monitor sent no template file")?),
    };
    let ctl = match cfg.checkpoint {
        false => None,
        true => Some(fds.pop().ok_or("the monitor sent no control socket")?),
    };
    Ok((ctl, template))
}

/// What the checkpoint thread needs of its process.
struct Served {
    pal: &'static LinuxPal,
    layer: &'static Checkpointer,
    args: Vec<String>,
    memory_mib: u64,
}

/// Start the checkpoint thread, if the picoprocess is checkpointable (a
/// control socket came, and the stack has a checkpoint layer); with
/// `template`, the layer is armed before any guest code runs.
pub fn start(
    ctl: Option<OwnedFd>,
    template: Option<OwnedFd>,
    pal: &'static LinuxPal,
    layer: Option<&'static Checkpointer>,
    args: Vec<String>,
    memory_mib: u64,
) -> Result<(), String> {
    let (Some(ctl), Some(layer)) = (ctl, layer) else {
        return Ok(());
    };
    super::write::start_summer()?;
    let template = match template {
        Some(file) => {
            let bell = super::template_bell()?;
            layer.arm_template();
            Some((file, bell))
        }
        None => None,
    };
    let s = Served {
        pal,
        layer,
        args,
        memory_mib,
    };
    // No name: naming a thread is a system call the sandbox refuses.
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || serve(ctl, template, s))
        .map(|_| ())
        .map_err(|e| format!("cannot start the checkpoint thread: {e}"))
}

fn serve(ctl: OwnedFd, mut template: Option<(OwnedFd, RawFd)>, s: Served) {
    loop {
        if let Some((file, bell)) = &template {
            let ready = sys::poll(
                &[(ctl.as_raw_fd(), libc::POLLIN), (*bell, libc::POLLIN)],
                -1,
            );
            match ready {
                Err(libc::EINTR) => continue,
                Ok(r) if r[1] != 0 => {
                    sys::eventfd_drain(*bell);
                    // The layer began the freeze; the picoprocess goes on
                    // after it whatever happens.
                    let r = write_checkpoint(&s, file.as_raw_fd(), false);
                    super::thaw_all();
                    template = None;
                    let _ = protocol::send(ctl.as_fd(), &ControlReply::Template(r), &[]);
                    continue;
                }
                Ok(r) if r[0] != 0 => {}
                Ok(_) => continue,
                Err(_) => return super::coordinator_gone(),
            }
        }
        let Ok((req, mut fds)) = protocol::recv::<Control>(ctl.as_fd()) else {
            // The monitor is gone (or sent nonsense): no more checkpoints
            // or templates.
            return super::coordinator_gone();
        };
        let Control::Checkpoint(opts) = req;
        let reply = match fds.pop() {
            None => ControlReply::Failed {
                why: "no file came with the request".into(),
            },
            Some(file) => match write_checkpoint(&s, file.as_raw_fd(), opts.close_uncarried) {
                Ok(bytes) => ControlReply::Done { bytes },
                Err(why) => ControlReply::Failed { why },
            },
        };
        // A first open that came during this checkpoint rang for the
        // template and is carried as making that open: the picoprocess is
        // frozen just as a template wants it, so it is written now (after
        // the thaw the open would be made for real).
        if let Some((file, bell)) = &template {
            let rung = sys::poll(&[(*bell, libc::POLLIN)], 0).is_ok_and(|r| r[0] != 0);
            if rung {
                sys::eventfd_drain(*bell);
                let r = write_checkpoint(&s, file.as_raw_fd(), false);
                let _ = protocol::send(ctl.as_fd(), &ControlReply::Template(r), &[]);
                template = None;
            }
        }
        let done = matches!(reply, ControlReply::Done { .. });
        let _ = protocol::send(ctl.as_fd(), &reply, &[]);
        if done && !opts.leave_running {
            sys::exit_process(0);
        }
        super::thaw_all();
    }
}

/// Freeze every thread and write the picoprocess to `file`; its length.
/// The threads stay stopped.
fn write_checkpoint(s: &Served, file: RawFd, close_uncarried: bool) -> Result<u64, String> {
    let frozen = super::freeze_all(FREEZE_LIMIT, &|| {
        s.pal
            .threads_live
            .load(std::sync::atomic::Ordering::Acquire)
    })?;
    // The map held until the memory is written.
    let map = s.pal.regions.read().unwrap();
    let c = super::write::describe(
        s.pal,
        &map,
        s.layer,
        &frozen,
        &s.args,
        s.memory_mib,
        close_uncarried,
    )?;
    super::write::write(file, &c)
}
