//! A standby driver: once there is a template (see `link`), the next
//! incarnation is restored from it ahead of time, on its own fresh
//! section, and passes its handshake before it is needed. A crash then
//! costs the old driver's exit, the contract's switch to the standby (its
//! INFO answer, copied once when it came, checked now as any handshake's)
//! and the re-issue: no process start on the way. A new standby is made
//! in the background after each switch.
//!
//! A standby is an ordinary incarnation that has not been installed: it
//! holds no client request, and nothing it writes is read before its
//! switch; one that ended meanwhile is thrown away at the switch, and the
//! restart starts a driver as without one.
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use moat_service_proto::Response;

use super::link::{end, Boot, Link, Template};
use super::region::wait_readable;
use super::{lock, Inner};
use crate::contract::BlockContract;

/// The standby, and whether one is being made.
#[derive(Default)]
pub(crate) struct Slot {
    ready: Option<Standby>,
    making: bool,
    /// The thread making one (joined at shutdown).
    maker: Option<std::thread::JoinHandle<()>>,
}

pub(crate) struct Standby {
    pub(crate) link: Link,
    /// Its answer to INFO and the bytes of its buffer.
    pub(crate) info: (Response, Vec<u8>),
}

fn slot(inner: &Inner) -> std::sync::MutexGuard<'_, Slot> {
    inner.standby.lock().unwrap_or_else(|e| e.into_inner())
}

/// Make a standby in the background, if one is wanted (a template, and
/// `Config::standby`) and none is there or on its way.
pub(crate) fn replenish(inner: &Arc<Inner>) {
    if !inner.config.standby {
        return;
    }
    let file = match &*inner.template.lock().unwrap_or_else(|e| e.into_inner()) {
        Template::Have(f, _) => f.clone(),
        _ => return,
    };
    // The slot stays locked until the maker is recorded (the maker locks
    // it only at its end).
    let mut s = slot(inner);
    if s.making || s.ready.is_some() {
        return;
    }
    s.making = true;
    let own = inner.clone();
    let spawned = std::thread::Builder::new()
        .name("moat-standby".into())
        .spawn(move || {
            let made = make(&own, file);
            let mut s = slot(&own);
            s.making = false;
            // Checked under the slot's lock, which `discard` takes after
            // the shutdown began: a standby made late is ended here.
            let closing = lock(&own.core).closing;
            match made {
                Ok(sb) if !closing => s.ready = Some(sb),
                Ok(sb) => {
                    drop(s);
                    stop(sb.link);
                }
                Err(e) => {
                    lock(&own.core).counters.last_start_failure = Some(format!("standby: {e}"));
                }
            }
        });
    match spawned {
        Ok(h) => s.maker = Some(h),
        Err(_) => s.making = false,
    }
}

fn make(inner: &Inner, file: Arc<std::fs::File>) -> std::io::Result<Standby> {
    let mut link = Link::start(&inner.spec, inner.layout, 0, 0, Boot::Template(file))?;
    match link.handshake(BlockContract::INFO, inner.config.start_timeout) {
        Ok(info) => Ok(Standby { link, info }),
        Err(e) => {
            end(link);
            Err(e)
        }
    }
}

/// The standby, if one is ready and still running.
pub(crate) fn take(inner: &Inner) -> Option<Standby> {
    let sb = slot(inner).ready.take()?;
    let [ended] = wait_readable([Some(sb.link.exit.as_fd())], Duration::ZERO);
    if ended {
        end(sb.link);
        return None;
    }
    Some(sb)
}

/// End the standby, and one being made, before returning (shutting down:
/// the core is closing, so none is made after this).
pub(crate) fn discard(inner: &Inner) {
    let (ready, maker) = {
        let mut s = slot(inner);
        (s.ready.take(), s.maker.take())
    };
    if let Some(sb) = ready {
        stop(sb.link);
    }
    if let Some(h) = maker {
        let _ = h.join();
    }
    if let Some(sb) = slot(inner).ready.take() {
        stop(sb.link);
    }
}

/// End a driver that never served, and reap it here.
fn stop(mut l: Link) {
    let _ = l.proc.kill();
    let _ = l.proc.wait();
}
