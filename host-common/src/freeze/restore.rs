//! Rebuilding a picoprocess from a checkpoint in a fresh confined
//! process: its regions mapped from the file (private and lazy: a page is
//! read when first touched, copied when first written), its handles under
//! the same numbers (files opened again through the monitor, under the
//! grants of this run, and checked to be the files they were), its
//! threads started from their carried state.
use crate::objects::{Object, SyncKind, SyncObj, ThreadObj};
use crate::pal::LinuxPal;
use crate::sys;
use moat_checkpoint::{Checkpoint, Held, RegionKind};
use moat_layers::checkpointer::{Checkpointer, Made};
use moat_pal::memory::RegionKind as Kind;
use moat_pal::uri::Uri;
use moat_pal::{access, Error};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

/// Read and check the checkpoint in `fd` (the monitor checked it too;
/// this process trusts nothing it did not check itself).
pub fn read(fd: RawFd) -> Result<(Checkpoint, u64), String> {
    let len = sys::fstat(fd)
        .map_err(|e| format!("cannot look at the checkpoint: errno {e}"))?
        .st_size as u64;
    let mut head = [0u8; moat_checkpoint::HEADER];
    read_at(fd, &mut head, 0)?;
    let h = moat_checkpoint::parse_header(&head, len)?;
    let mut meta = vec![0u8; h.meta_len as usize];
    read_at(fd, &mut meta, h.meta_off)?;
    let c = moat_checkpoint::decode_meta(&h, &meta)?;
    Ok((c, h.data_off))
}

fn read_at(fd: RawFd, b: &mut [u8], at: u64) -> Result<(), String> {
    match sys::pread(fd, b.as_mut_ptr() as u64, b.len(), at) {
        Ok(n) if n == b.len() => Ok(()),
        _ => Err("the checkpoint is truncated".into()),
    }
}

/// Map the regions (into the window already set on `pal`'s map).
pub fn map_regions(pal: &LinuxPal, fd: RawFd, c: &Checkpoint, data_off: u64) -> Result<(), String> {
    let mut map = pal.regions.write().unwrap();
    let total: u64 = c.regions.iter().map(|r| r.len).sum();
    if total > pal.mem_limit {
        return Err(format!(
            "the checkpoint holds {} MiB of memory; this run's limit is {} MiB (raise memory_mib)",
            total >> 20,
            pal.mem_limit >> 20
        ));
    }
    for r in &c.regions {
        if map.overlaps(r.start, r.start + r.len) {
            return Err(format!(
                "the region at {:#x} (+{:#x}) does not fit this run's guest window (give it the limits it ran with)",
                r.start, r.len
            ));
        }
        sys::mmap_fd(r.start, r.len, r.prot, fd, data_off + r.data, false)
            .map_err(|e| format!("cannot map the region at {:#x}: errno {e}", r.start))?;
        let kind = match r.kind {
            RegionKind::Image => Kind::Image,
            RegionKind::Alloc => Kind::Alloc,
            RegionKind::Stack => Kind::Stack,
            RegionKind::Host => Kind::Host,
        };
        map.insert(r.start, r.len, r.prot, kind)
            .map_err(|e| format!("the region at {:#x}: {e:?}", r.start))?;
    }
    Ok(())
}

/// Make the handles again under their numbers, and tell the checkpoint
/// layer what each is (so this picoprocess can be checkpointed again).
/// Returns each carried thread's completion object (index: thread).
pub fn make_handles(
    pal: &LinuxPal,
    layer: &Checkpointer,
    c: &Checkpoint,
) -> Result<Vec<Option<Arc<Object>>>, String> {
    let mut done: Vec<Option<Arc<Object>>> = vec![None; c.threads.len()];
    for h in &c.handles {
        let (obj, made) = match &h.held {
            Held::File {
                uri,
                access: acc,
                options,
                size,
                mtime_ns,
                ..
            } => {
                let o = reopen(pal, uri, *acc, *options)?;
                if let Object::Stream(s) = &*o {
                    let st = sys::fstat(s.fd.as_raw_fd())
                        .map_err(|e| format!("cannot look at {uri}: errno {e}"))?;
                    let m = super::write::mtime_ns(&st);
                    if st.st_size as u64 != *size || m != *mtime_ns {
                        return Err(format!(
                            "{uri} changed since the checkpoint (its size or modification time differs); restore needs the files as they were"
                        ));
                    }
                }
                (o, stream(uri, *acc, *options))
            }
            Held::Console { uri, access: acc } => {
                (reopen(pal, uri, *acc, 0)?, stream(uri, *acc, 0))
            }
            Held::NotificationEvent { set } => (
                sync(SyncKind::Notification, *set as u32, 1)?,
                Made::NotificationEvent,
            ),
            Held::SynchronizationEvent { set } => (
                sync(SyncKind::Synchronization, *set as u32, 1)?,
                Made::SynchronizationEvent,
            ),
            Held::Semaphore { count, max } => (
                sync(SyncKind::Semaphore, *count, *max)?,
                Made::Semaphore { max: *max },
            ),
            Held::Thread { thread } => {
                let fd = sys::eventfd().map_err(|e| format!("eventfd: errno {e}"))?;
                if thread.is_none() {
                    sys::eventfd_signal(fd.as_raw_fd());
                }
                let o = Arc::new(Object::Thread(ThreadObj { done: fd }));
                if let Some(t) = thread {
                    done[*t as usize] = Some(o.clone());
                }
                (o, Made::Thread)
            }
        };
        pal.handles
            .lock()
            .unwrap()
            .insert_at(h.handle, h.refs, obj)
            .map_err(|e| {
                format!(
                    "handle {:#x} cannot be made again ({e:?}); raise handles",
                    h.handle
                )
            })?;
        layer.restored(h.handle, made, h.refs);
    }
    if let Some(&e) = c.abort_events.last() {
        use moat_pal::host_calls::SyncCalls;
        pal.abort_event_register(e)
            .map_err(|err| format!("the abort event cannot be registered again: {err:?}"))?;
        layer.restored_abort(e);
    }
    Ok(done)
}

fn stream(uri: &str, acc: u32, options: u32) -> Made {
    Made::Stream {
        uri: uri.to_string(),
        access: acc,
        options,
    }
}

fn sync(kind: SyncKind, initial: u32, max: u32) -> Result<Arc<Object>, String> {
    SyncObj::new(kind, initial, max)
        .map(|s| Arc::new(Object::Sync(s)))
        .map_err(|e| format!("cannot make an event again: {e:?}"))
}

/// Open `uri` again through the monitor (the grants of this run), never
/// creating it.
fn reopen(pal: &LinuxPal, uri: &str, acc: u32, options: u32) -> Result<Arc<Object>, String> {
    let u = Uri::parse_bytes(uri.as_bytes()).map_err(|_| format!("{uri} is not a URI"))?;
    let h = pal.open_uri(u, acc, 0, options).map_err(|e| match e {
        Error::PermissionDenied => format!(
            "{uri} is not granted to this run; give it the grants it ran with (--allow{})",
            if acc & (access::WRITE | access::APPEND) != 0 {
                ""
            } else {
                "-ro"
            }
        ),
        Error::NotFound => format!("{uri} is gone since the checkpoint"),
        e => format!("{uri} cannot be opened again: {e:?}"),
    })?;
    match pal.close_handle(h) {
        Ok(Some(o)) => Ok(o),
        _ => Err(format!("{uri} cannot be opened again")),
    }
}

/// Point the carried start-up block at this host's PAL table and kind,
/// and record it as the picoprocess's.
pub fn point_startup(
    pal: &LinuxPal,
    startup: u64,
    table: u64,
    host_kind: u32,
) -> Result<(), String> {
    use moat_pal::StartupBlock;
    if pal
        .check_w(startup, std::mem::size_of::<StartupBlock>() as u64)
        .is_err()
    {
        return Err("the start-up block is not writable guest memory".into());
    }
    sys::put(
        startup + std::mem::offset_of!(StartupBlock, table) as u64,
        table,
    );
    sys::put(
        startup + std::mem::offset_of!(StartupBlock, host_kind) as u64,
        host_kind,
    );
    pal.startup
        .store(startup, std::sync::atomic::Ordering::Release);
    Ok(())
}

/// Each carried thread as it starts again: its handle (`None`: the
/// first), its state, its parameter; the first thread first.
pub fn thread_states(c: &Checkpoint) -> Vec<(Option<u64>, super::Saved, u64)> {
    c.threads
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let handle = c.handles.iter().find_map(|h| match h.held {
                Held::Thread { thread: Some(n) } if n as usize == i => Some(h.handle),
                _ => None,
            });
            let mut fpu = Box::new([0u8; moat_checkpoint::MAX_FPU]);
            fpu[..t.fpu.len()].copy_from_slice(&t.fpu);
            let saved = super::Saved {
                regs: t.regs,
                fpu,
                fpu_len: t.fpu.len(),
                restart: t.restart,
                load: true,
            };
            (handle, saved, t.param)
        })
        .collect()
}
