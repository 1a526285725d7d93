//! Writing a frozen picoprocess down: its regions (the bytes straight
//! from guest memory, pages of zeros left as holes), its handles (what
//! the checkpoint layer says each was made as, with the state the host's
//! objects hold), its threads as frozen. Anything that cannot be carried
//! fails the checkpoint with what it is.
use super::Frozen;
use crate::objects::{Object, SyncKind};
use crate::pal::LinuxPal;
use crate::sys;
use moat_checkpoint::{Checkpoint, Handle, Held, Region, RegionKind, PAGE};
use moat_layers::checkpointer::{Checkpointer, Made};
use moat_pal::memory::RegionKind as Kind;
use moat_pal::{prot, stream_kind};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

/// Describe the frozen picoprocess (threads from [`super::freeze_all`]),
/// its regions as `map` has them (the caller holds the map until the
/// memory is written, so that no thread ending meanwhile unmaps a stack
/// the writer reads).
pub fn describe(
    pal: &LinuxPal,
    map: &moat_pal::memory::RegionMap,
    layer: &Checkpointer,
    frozen: &[Frozen],
    args: &[String],
    memory_mib: u64,
    close_uncarried: bool,
) -> Result<Checkpoint, String> {
    // Regions, except the signal stacks (the host's, made again).
    let alts: Vec<(u64, u64)> = frozen.iter().map(|f| f.alt).collect();
    let mut regions = Vec::new();
    let mut data = 0u64;
    for (start, r) in map.iter() {
        let len = r.end - start;
        if alts.iter().any(|&(a, l)| start >= a && start < a + l) {
            continue;
        }
        let kind = match r.kind {
            Kind::Image => RegionKind::Image,
            Kind::Alloc => RegionKind::Alloc,
            Kind::Stack => RegionKind::Stack,
            Kind::Host => RegionKind::Host,
            Kind::Mapped => {
                return Err(format!(
                    "the file mapped at {start:#x} cannot be carried (unmap it first)"
                ))
            }
            Kind::Section => {
                return Err(format!(
                    "the shared section mapped at {start:#x} cannot be carried"
                ))
            }
        };
        regions.push(Region {
            start,
            len,
            prot: r.prot,
            kind,
            data,
        });
        data += len;
    }
    // Threads: the first one first.
    let mut order: Vec<&Frozen> = frozen.iter().collect();
    order.sort_by_key(|f| f.handle.map_or(0, |h| h + 1));
    if order.first().is_none_or(|f| f.handle.is_some()) {
        return Err("the first thread has ended; a picoprocess whose first thread ended cannot be carried yet".into());
    }
    let threads: Vec<moat_checkpoint::Thread> = order.iter().map(|f| f.thread.clone()).collect();
    let index = |h: u64| {
        order
            .iter()
            .position(|f| f.handle == Some(h))
            .map(|i| i as u32)
    };
    // Handles.
    let entries = pal.handles.lock().unwrap().entries();
    let mut handles = Vec::with_capacity(entries.len());
    for (h, refs, o) in entries {
        let made = layer.held(h).map(|(m, _)| m);
        let held: Result<Held, String> = (|| {
            Ok(match (&*o, made) {
            (Object::Stream(s), Some(Made::Stream { uri, access, options })) => match s.kind {
                stream_kind::FILE | stream_kind::DIRECTORY => {
                    let st = sys::fstat(s.fd.as_raw_fd())
                        .map_err(|e| format!("cannot look at {uri}: errno {e}"))?;
                    Held::File {
                        uri,
                        access,
                        options,
                        directory: s.kind == stream_kind::DIRECTORY,
                        size: st.st_size as u64,
                        mtime_ns: mtime_ns(&st),
                    }
                }
                stream_kind::CONSOLE | stream_kind::NULL => Held::Console { uri, access },
                _ => {
                    return Err(format!(
                        "handle {h:#x} ({uri}) cannot be carried: pipes, sockets, servers, devices and shared sections stay with the host; close it first"
                    ))
                }
            },
            (Object::Sync(s), _) => match s.kind {
                SyncKind::Notification => Held::NotificationEvent { set: s.count() > 0 },
                SyncKind::Synchronization => Held::SynchronizationEvent { set: s.count() > 0 },
                SyncKind::Semaphore => Held::Semaphore {
                    count: s.count(),
                    max: s.max(),
                },
            },
            (Object::Thread(_), _) => Held::Thread { thread: index(h) },
            // Devices are never carried, not even as closed: their I/O
            // may still write guest memory while it is read.
            (Object::Stream(s), _) if s.kind == stream_kind::DEVICE => {
                return Err(format!(
                    "handle {h:#x} is a device, which cannot be carried; a picoprocess holding one cannot be checkpointed"
                ))
            }
            (Object::Process(_), _) => {
                return Err(format!(
                    "handle {h:#x} is a child picoprocess, which cannot be carried"
                ))
            }
            _ => {
                return Err(format!(
                    "handle {h:#x} cannot be carried (a stream's event or a doorbell)"
                ))
            }
        })
        })();
        let held = match held {
            Ok(held) => held,
            // Carried as closed: left out (never a device).
            Err(e) if close_uncarried && !e.contains("is a device") => continue,
            Err(e) => {
                return Err(format!(
                    "{e} (or checkpoint with --close-uncarried to carry it as closed)"
                ))
            }
        };
        handles.push(Handle {
            handle: h,
            refs,
            held,
        });
    }
    let abort = layer.abort_events();
    let abort_events = match abort.last() {
        Some(&e) if e != 0 => vec![e],
        _ => Vec::new(),
    };
    Ok(Checkpoint {
        args: args.to_vec(),
        memory_mib,
        threads_limit: pal.max_threads,
        handles_limit: pal.handles.lock().unwrap().capacity() as u64,
        startup: pal.startup.load(std::sync::atomic::Ordering::Acquire),
        regions,
        handles,
        threads,
        abort_events,
    })
}

/// Write `c` to `fd` (empty, writable): each region's bytes at its
/// offset while their checksum is taken (runs of pages that are not all
/// zeros in one write each; zero pages stay holes), then the front
/// (header and meta, which hold the checksum), then the length.
pub fn write(fd: RawFd, c: &Checkpoint) -> Result<u64, String> {
    let data_len: u64 = c.regions.iter().map(|r| r.len).sum();
    // Holes must read as zeros: whatever the file held goes.
    sys::ftruncate(fd, 0).map_err(|e| format!("cannot write the checkpoint: errno {e}"))?;
    // The front's length does not depend on the checksum.
    let data_off = moat_checkpoint::encode_front(c, data_len, 0)?.len() as u64;
    let io = |e: i32| format!("cannot write the checkpoint: errno {e}");
    let mut sum = Sum::start();
    for r in &c.regions {
        let unreadable = r.prot & prot::READ == 0;
        let readable = !unreadable || sys::mprotect(r.start, r.len, prot::READ).is_ok();
        let mut at = 0u64;
        let mut result = Ok(());
        while at < r.len && result.is_ok() {
            let n = (r.len - at).min(CHUNK) as usize;
            let chunk: &[u8] = if readable {
                // SAFETY: [start, start+len) is a region of the guest's,
                // readable (made so above), mapped while the map is not
                // changed (every guest thread is stopped, and only they
                // change it); nothing writes it meanwhile: the guest's
                // threads are stopped and a picoprocess whose devices
                // could write it is not carried (`describe` refused it).
                unsafe { std::slice::from_raw_parts((r.start + at) as *const u8, n) }
            } else {
                // Left as zeros.
                &ZEROS[..n]
            };
            sum.update(chunk);
            result = write_runs(fd, chunk, data_off + r.data + at);
            at += n as u64;
        }
        if unreadable && readable {
            // The summer has read it before it is closed again.
            sum.sync();
            let _ = sys::mprotect(r.start, r.len, r.prot);
        }
        result.map_err(io)?;
    }
    let crc = sum.finish().ok_or("the checksum thread ended")?;
    let front = moat_checkpoint::encode_front(c, data_len, crc)?;
    pwrite_all(fd, &front, 0).map_err(io)?;
    sys::ftruncate(fd, data_off + data_len).map_err(io)?;
    Ok(data_off + data_len)
}

/// Bytes checked and written at a time.
const CHUNK: u64 = 1 << 20;

/// A chunk of zeros, for what cannot be read.
static ZEROS: [u8; CHUNK as usize] = [0; CHUNK as usize];

/// What the checksum thread is asked.
enum Job {
    /// Bytes of guest memory (see `write` for why they stay put).
    Bytes(&'static [u8]),
    Sync(Sender<()>),
    Finish,
}

/// The checksum thread: the data's CRC-32 taken beside the writes (the
/// frozen picoprocess leaves a core idle), started once per process
/// ([`start_summer`]) so that a checkpoint does not pay for a thread.
struct Summer {
    jobs: Sender<Job>,
    done: Receiver<u32>,
}

static SUMMER: OnceLock<Mutex<Summer>> = OnceLock::new();

/// Start the checksum thread (a checkpointable process, once).
pub fn start_summer() -> Result<(), String> {
    let (jobs, rx) = channel::<Job>();
    let (tx, done) = channel();
    std::thread::Builder::new()
        .stack_size(64 << 10)
        .spawn(move || {
            let mut crc = moat_checkpoint::DataCrc::default();
            for job in rx {
                match job {
                    Job::Bytes(b) => crc.update(b),
                    Job::Sync(ack) => {
                        let _ = ack.send(());
                    }
                    Job::Finish => {
                        if tx.send(std::mem::take(&mut crc).finish()).is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the checksum thread: {e}"))?;
    let _ = SUMMER.set(Mutex::new(Summer { jobs, done }));
    Ok(())
}

/// The data's checksum as one checkpoint is written: on the checksum
/// thread where there is one, else here.
/// Dropped unfinished (a write failed), it waits until the thread is done
/// with what it was sent: the bytes are the guest's, which goes on.
enum Sum {
    There(std::sync::MutexGuard<'static, Summer>, bool),
    Here(moat_checkpoint::DataCrc),
}

impl Sum {
    fn start() -> Sum {
        match SUMMER.get() {
            Some(m) => Sum::There(m.lock().unwrap_or_else(|e| e.into_inner()), false),
            None => Sum::Here(Default::default()),
        }
    }

    /// Take `b` in (it must stay as it is until `sync` or `finish`).
    fn update(&mut self, b: &[u8]) {
        match self {
            Sum::Here(c) => c.update(b),
            Sum::There(s, _) => {
                // SAFETY: (lifetime only) `b` is guest memory of a frozen
                // picoprocess, or `ZEROS`; the writer does not change or
                // unmap it before `finish` (or `sync`) has the thread done
                // with it, and holds the region map until then.
                let b: &'static [u8] = unsafe { std::mem::transmute::<&[u8], &'static [u8]>(b) };
                let _ = s.jobs.send(Job::Bytes(b));
            }
        }
    }

    /// Wait until what was sent has been read.
    fn sync(&mut self) {
        if let Sum::There(s, _) = self {
            let (ack, wait) = channel();
            if s.jobs.send(Job::Sync(ack)).is_ok() {
                let _ = wait.recv();
            }
        }
    }

    fn finish(mut self) -> Option<u32> {
        match &mut self {
            Sum::Here(c) => Some(std::mem::take(c).finish()),
            Sum::There(s, finished) => {
                *finished = true;
                s.jobs.send(Job::Finish).ok()?;
                s.done.recv().ok()
            }
        }
    }
}

impl Drop for Sum {
    fn drop(&mut self) {
        if let Sum::There(s, finished) = self {
            if !*finished && s.jobs.send(Job::Finish).is_ok() {
                let _ = s.done.recv();
            }
        }
    }
}

/// Write the pages of `chunk` that are not all zeros at `off` onward, a
/// run of them at a time.
fn write_runs(fd: RawFd, chunk: &[u8], off: u64) -> Result<(), i32> {
    let page = PAGE as usize;
    let is_zero = |p: &[u8]| {
        let (head, words, tail) = {
            // SAFETY: any bytes are valid u64s; align_to only reinterprets.
            unsafe { p.align_to::<u64>() }
        };
        head.iter().all(|&b| b == 0)
            && words.iter().all(|&w| w == 0)
            && tail.iter().all(|&b| b == 0)
    };
    let mut i = 0;
    while i < chunk.len() {
        if is_zero(&chunk[i..(i + page).min(chunk.len())]) {
            i += page;
            continue;
        }
        let start = i;
        while i < chunk.len() && !is_zero(&chunk[i..(i + page).min(chunk.len())]) {
            i += page;
        }
        let end = i.min(chunk.len());
        pwrite_all(fd, &chunk[start..end], off + start as u64)?;
    }
    Ok(())
}

fn pwrite_all(fd: RawFd, mut b: &[u8], mut at: u64) -> Result<(), i32> {
    while !b.is_empty() {
        let n = sys::pwrite(fd, b.as_ptr() as u64, b.len(), at)?;
        if n == 0 {
            return Err(libc::EIO);
        }
        b = &b[n..];
        at += n as u64;
    }
    Ok(())
}

/// A file's modification time in nanoseconds (saturating).
pub(crate) fn mtime_ns(st: &libc::stat) -> i64 {
    st.st_mtime
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_mtime_nsec)
}
