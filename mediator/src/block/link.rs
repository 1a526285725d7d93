//! One driver incarnation and the section it serves on: start the driver
//! picoprocess, create and lay out a fresh shared section for it (a dead
//! driver's section is never used again), and run the INFO handshake on
//! it. The engine installs a [`Link`] only after its handshake passed.
//!
//! Templates: an incarnation booted from the image while a template is
//! wanted takes one (`Sandbox::template`: at its first stream open, before
//! it opened its file, device or section), into a memory file the
//! mediator keeps; later incarnations are restored from it (memory
//! mapped copy-on-write, a warm loader or VMM), and make that open again
//! under their own grants, on their own fresh section.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_monitor::{Picoprocess, Sandbox, Stdio};
use moat_service_proto::ring::{Layout, Submitter};
use moat_service_proto::{op, Request, Response};

use super::region::{wait_readable, Region};
use super::{io_err, DriverSpec, SECTION};
use crate::contract::INFO_LEN;

/// Ends an incarnation: killed now, reaped off this thread.
pub(crate) fn end(mut link: Link) {
    let _ = link.proc.kill();
    std::thread::spawn(move || {
        let _ = link.proc.wait();
    });
}

/// The driver's template.
pub(crate) enum Template {
    /// The next incarnation booted takes one; `failed` tries so far in a
    /// row.
    Wanted(u32),
    /// Taken: later incarnations start from it; `failed` starts from it
    /// in a row.
    Have(Arc<File>, u32),
    /// None (not wanted, or given up: why).
    Off(Option<String>),
}

impl Template {
    /// What becomes of the template that `link`, booted to take one into
    /// `file`, was asked for, once its handshake passed: the template was
    /// written before the driver opened anything but its console, so its
    /// answer is there (or never comes). Sealed, or given up saying why.
    pub(crate) fn taken(link: &Link, file: File) -> Template {
        match link.proc.template_written(Duration::from_secs(1)) {
            Ok(Some(_)) => match seal(&file) {
                Ok(()) => Template::Have(Arc::new(file), 0),
                Err(e) => Template::Off(Some(format!("cannot seal it: {e}"))),
            },
            Ok(None) => Template::Off(Some("not written within 1 s of the handshake".into())),
            Err(e) => Template::Off(Some(e.to_string())),
        }
    }
}

/// Seal a template the driver has written: from now on nobody changes
/// it, the driver that wrote it (which keeps serving, and could have kept
/// the descriptor) included. Fails if someone maps it shared and
/// writable.
pub(crate) fn seal(file: &File) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(())
}

/// How an incarnation starts.
pub(crate) enum Boot {
    /// From the image; taking a template into the file, if given.
    Image(Option<File>),
    /// From the template.
    Template(Arc<File>),
}

impl Boot {
    /// How the next incarnation starts, given the template's state.
    pub(crate) fn next(t: &Template) -> std::io::Result<Boot> {
        Ok(match t {
            Template::Have(f, _) => Boot::Template(f.clone()),
            Template::Wanted(_) => {
                use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
                let f = memfd_create(
                    c"moat-driver-template",
                    MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
                )?;
                Boot::Image(Some(File::from(f)))
            }
            Template::Off(_) => Boot::Image(None),
        })
    }
}

/// A live driver incarnation: its process, its section and doorbells, and
/// the buffers of the section no request holds.
pub(crate) struct Link {
    /// Which incarnation (1 for the first driver).
    pub(crate) generation: u64,
    pub(crate) ring: Submitter,
    pub(crate) region: Arc<Region>,
    /// Buffers free for new requests.
    pub(crate) free: Vec<u32>,
    /// The part each buffer is issued for (by buffer index).
    pub(crate) owners: Vec<Option<u64>>,
    /// Readable once the driver has ended.
    pub(crate) exit: Arc<OwnedFd>,
    pub(crate) proc: Picoprocess,
}

impl Link {
    /// Starts incarnation `generation` of the driver (its `incarnation`-th
    /// start, which picks its fault seed) on a new section laid out as
    /// `layout` says.
    pub(crate) fn start(
        spec: &DriverSpec,
        layout: Layout,
        generation: u64,
        incarnation: u64,
        boot: Boot,
    ) -> std::io::Result<Link> {
        let mut args = spec.args.clone();
        if let Some(f) = &spec.faults {
            args.push(format!(
                "{}:{}:{}",
                f.seed.wrapping_add(incarnation),
                f.per_million,
                f.kinds
            ));
        }
        let console = if spec.console {
            Stdio::Inherit
        } else {
            Stdio::Null
        };
        // The section is laid out before the driver can see it.
        let region = Arc::new(Region::new(layout)?);
        let ring = Submitter::create(region.section(), layout)
            .map_err(|e| io_err(format!("cannot lay the section out: {e:?}")))?;
        // A template is held open until the driver has started from it:
        // its path is ours only while it is.
        let mut _held = None;
        let sb = match boot {
            Boot::Image(None) => Sandbox::new(&spec.image).args(args),
            Boot::Image(Some(file)) => Sandbox::new(&spec.image).args(args).template(file),
            Boot::Template(file) => {
                let sb = Sandbox::restore(format!("/proc/self/fd/{}", file.as_raw_fd()));
                _held = Some(file);
                sb
            }
        };
        let mut sb = sb
            .policy(spec.policy.clone())
            .host(spec.host)
            .section(SECTION, region.host())
            .map_err(|e| io_err(format!("the driver's section: {e}")))?
            .stdin(Stdio::Null)
            .stdout(console)
            .stderr(console);
        for (name, file) in &spec.files {
            let copy = file
                .try_clone()
                .map_err(|e| io_err(format!("device `{name}`'s descriptor: {e}")))?;
            sb = sb.device_file(name, copy);
        }
        if !spec.console {
            sb = sb.log(moat_monitor::LogSink::Callback(Arc::new(|_| {})));
        }
        let proc = sb
            .spawn()
            .map_err(|e| io_err(format!("cannot start the driver: {e}")))?;
        let exit = Arc::new(
            proc.exit_fd()
                .map_err(|e| io_err(format!("the driver's exit: {e}")))?,
        );
        let link = Link {
            generation,
            ring,
            region,
            free: (0..layout.depth).rev().collect(),
            owners: vec![None; layout.depth as usize],
            exit,
            proc,
        };
        Ok(link)
    }

    /// Sends INFO (id 0) and waits up to `timeout` for its answer; returns
    /// the answer and the bytes of its buffer (at most [`INFO_LEN`]), for
    /// the contract to check. Fails if the driver ends, answers in another
    /// buffer or breaks the ring.
    pub(crate) fn handshake(
        &mut self,
        info: Request,
        timeout: Duration,
    ) -> std::io::Result<(Response, Vec<u8>)> {
        debug_assert_eq!(info.op, op::INFO);
        let buf = self.free.pop().expect("a fresh section has free buffers");
        self.ring.push(&Request { buf, ..info });
        if self.ring.publish() {
            self.region.kick();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut answer = None;
            self.ring
                .take(1, |a| {
                    answer = Some(a);
                    false
                })
                .map_err(|e| io_err(format!("driver handshake: a broken ring ({e:?})")))?;
            if let Some(a) = answer {
                let a =
                    a.map_err(|e| io_err(format!("driver handshake: a malformed answer ({e:?})")))?;
                if a.buf != buf {
                    return Err(io_err(format!(
                        "driver handshake: the answer names buffer {}, not the request's {buf}",
                        a.buf
                    )));
                }
                let mut bytes = vec![0u8; (a.len as usize).min(INFO_LEN as usize)];
                self.region.read_buf(buf, &mut bytes);
                self.free.push(buf);
                return Ok((a, bytes));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io_err(
                    "the driver did not answer INFO (its geometry, interface or readiness) in time",
                ));
            }
            if !self.ring.prepare_sleep() {
                continue;
            }
            let [rang, ended] =
                wait_readable([Some(self.region.bell()), Some(self.exit.as_fd())], left);
            self.ring.awake();
            if rang {
                self.region.reset_bell();
            }
            if ended {
                return Err(io_err("the driver ended before answering INFO"));
            }
        }
    }
}
