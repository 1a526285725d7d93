//! The synchronisation calls: events and semaphores (eventfd-backed, so a
//! wait on any object is one `poll`), and the abort event the host's stop
//! request sets.
use super::{LinuxPal, MAX_ABORT_REGISTRATIONS};
use crate::errno::to_pal as map_errno;
use crate::objects::{Object, SyncKind, SyncObj};
use crate::{signals, sys};
use moat_pal::host_calls::SyncCalls;
use moat_pal::{Error, PalResult};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The events a call on an event handle accepts.
const EVENTS: &[SyncKind] = &[SyncKind::Notification, SyncKind::Synchronization];

/// The `SyncObj` inside an object `LinuxPal::sync` returned.
fn inner(o: &Object) -> &SyncObj {
    match o {
        Object::Sync(s) => s,
        _ => unreachable!("LinuxPal::sync returns sync objects only"),
    }
}

impl LinuxPal {
    /// A doorbell handle (a shared section's event); `None` for any
    /// other object (the event calls then take events).
    fn doorbell(&self, h: u64) -> PalResult<Option<Arc<Object>>> {
        let o = self.obj(h)?;
        Ok(matches!(&*o, Object::Doorbell(_)).then_some(o))
    }
}

impl SyncCalls for LinuxPal {
    fn notification_event_create(&self, initial: u32) -> PalResult<u64> {
        if initial > 1 {
            return Err(Error::InvalidArgument);
        }
        let o = SyncObj::new(SyncKind::Notification, initial, 1)?;
        self.insert(Object::Sync(o))
    }

    fn synchronization_event_create(&self, initial: u32) -> PalResult<u64> {
        if initial > 1 {
            return Err(Error::InvalidArgument);
        }
        let o = SyncObj::new(SyncKind::Synchronization, initial, 1)?;
        self.insert(Object::Sync(o))
    }

    fn semaphore_create(&self, initial: u32, max: u32) -> PalResult<u64> {
        if max == 0 || initial > max {
            return Err(Error::InvalidArgument);
        }
        let o = SyncObj::new(SyncKind::Semaphore, initial, max)?;
        self.insert(Object::Sync(o))
    }

    fn semaphore_release(&self, semaphore: u64, count: u32) -> PalResult<u64> {
        let o = self.sync(semaphore, &[SyncKind::Semaphore])?;
        if count == 0 {
            return Err(Error::InvalidArgument);
        }
        Ok(inner(&o).release(count)? as u64)
    }

    fn semaphore_peek(&self, semaphore: u64) -> PalResult<u64> {
        let o = self.sync(semaphore, &[SyncKind::Semaphore])?;
        Ok(inner(&o).count() as u64)
    }

    fn event_set(&self, event: u64) -> PalResult<()> {
        if let Some(d) = self.doorbell(event)? {
            sys::eventfd_signal(d.wait_fd());
            return Ok(());
        }
        let o = self.sync(event, EVENTS)?;
        inner(&o).set();
        Ok(())
    }

    fn event_clear(&self, event: u64) -> PalResult<()> {
        if let Some(d) = self.doorbell(event)? {
            crate::objects::doorbell_take(d.wait_fd());
            return Ok(());
        }
        let o = self.sync(event, EVENTS)?;
        inner(&o).clear();
        Ok(())
    }

    fn event_peek(&self, event: u64) -> PalResult<u64> {
        if let Some(d) = self.doorbell(event)? {
            let rung = sys::poll(&[(d.wait_fd(), libc::POLLIN)], 0).map_err(map_errno)?;
            return Ok((rung[0] & libc::POLLIN != 0) as u64);
        }
        let o = self.sync(event, EVENTS)?;
        Ok((inner(&o).count() > 0) as u64)
    }

    fn objects_wait_any(&self, handles: &[u64], timeout_micros: i64) -> PalResult<u64> {
        if handles.is_empty() || timeout_micros < -1 {
            return Err(Error::InvalidArgument);
        }
        let objs = handles
            .iter()
            .map(|&h| self.obj(h))
            .collect::<PalResult<Vec<_>>>()?;
        let deadline = (timeout_micros >= 0)
            .then(|| Instant::now() + Duration::from_micros(timeout_micros as u64));
        let mut fds: Vec<(RawFd, i16)> = objs.iter().map(|o| (o.wait_fd(), libc::POLLIN)).collect();
        // With freezing on, a freeze cuts the wait short: TimedOut, which
        // the checkpoint layer carries as the wait with the time left. Not
        // a poll (nothing to cut), nor a wait inside an exception upcall
        // (the freeze waits for the upcall to end).
        let wake =
            crate::freeze::wake_fd().filter(|_| timeout_micros != 0 && !signals::in_upcall());
        if let Some(w) = wake {
            fds.push((w, libc::POLLIN));
        }
        loop {
            if wake.is_some() && crate::freeze::freezing() {
                return Err(Error::TimedOut);
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so a short timeout does not spin.
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };
            let rev = match sys::poll(&fds, ms) {
                Ok(r) => r,
                Err(libc::EINTR) => continue,
                Err(e) => return Err(map_errno(e)),
            };
            for (i, r) in rev.iter().enumerate().take(objs.len()) {
                if *r == 0 {
                    continue;
                }
                if objs[i].try_acquire() {
                    return Ok(i as u64);
                }
            }
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    return Err(Error::TimedOut);
                }
            }
        }
    }

    fn abort_event_register(&self, event: u64) -> PalResult<()> {
        use std::sync::atomic::Ordering::Release;
        let mut kept = self.abort_event.lock().unwrap();
        if event == 0 {
            signals::ABORT_EVENT.store(std::ptr::null_mut(), Release);
            return Ok(());
        }
        let o = self.sync(event, EVENTS)?;
        // The signal handler may hold a pointer to any event ever
        // registered, so they are kept for the life of the process
        // (bounded: a guest re-registering without end is refused).
        let known = kept.iter().any(|k| Arc::ptr_eq(k, &o));
        if !known && kept.len() >= MAX_ABORT_REGISTRATIONS {
            return Err(Error::LimitExceeded);
        }
        signals::ABORT_EVENT.store(inner(&o) as *const SyncObj as *mut SyncObj, Release);
        if !known {
            kept.push(o);
        }
        Ok(())
    }
}
