//! A standby driver, for any mediated class (a disk's, a NIC's: an
//! [`Owner`]): once there is a template (see `link`), the next
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_service_proto::ring::Layout;
use moat_service_proto::{Request, Response};

use super::link::{end, Boot, Link, Template};
use super::region::wait_readable;
use super::{lock, DriverSpec, Inner};
use crate::contract::BlockContract;

/// What a standby needs of the engine it stands by for (a disk's, a
/// NIC's). None of these may take a lock the engine holds while it calls
/// [`replenish`], [`take`] or [`discard`].
pub(crate) trait Owner: Send + Sync + 'static {
    fn slot(&self) -> &Mutex<Slot>;
    fn spec(&self) -> &DriverSpec;
    fn layout(&self) -> Layout;
    fn start_timeout(&self) -> Duration;
    /// The class's INFO request (id 0).
    fn info(&self) -> Request;
    /// A standby is wanted at all (`Config::standby`).
    fn wanted(&self) -> bool;
    /// Shutting down: a standby made now is ended, not kept.
    fn closing(&self) -> bool;
    /// A standby could not be made.
    fn failed(&self, why: String);
}

impl Owner for Inner {
    fn slot(&self) -> &Mutex<Slot> {
        &self.standby
    }
    fn spec(&self) -> &DriverSpec {
        &self.spec
    }
    fn layout(&self) -> Layout {
        self.layout
    }
    fn start_timeout(&self) -> Duration {
        self.config.start_timeout
    }
    fn info(&self) -> Request {
        BlockContract::INFO
    }
    fn wanted(&self) -> bool {
        self.config.standby
    }
    fn closing(&self) -> bool {
        lock(&self.core).closing
    }
    fn failed(&self, why: String) {
        lock(&self.core).counters.last_start_failure = Some(format!("standby: {why}"));
    }
}

/// The disk's template, if there is one to make a standby from.
pub(crate) fn template_of(inner: &Inner) -> Option<Arc<std::fs::File>> {
    match &*inner.template.lock().unwrap_or_else(|e| e.into_inner()) {
        Template::Have(f, _) => Some(f.clone()),
        _ => None,
    }
}

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

fn slot<O: Owner>(o: &O) -> std::sync::MutexGuard<'_, Slot> {
    o.slot().lock().unwrap_or_else(|e| e.into_inner())
}

/// Make a standby from `template` in the background, if one is wanted
/// and none is there or on its way.
pub(crate) fn replenish<O: Owner>(o: &Arc<O>, template: Option<Arc<std::fs::File>>) {
    let Some(file) = template.filter(|_| o.wanted()) else {
        return;
    };
    // The slot stays locked until the maker is recorded (the maker locks
    // it only at its end).
    let mut s = slot(&**o);
    if s.making || s.ready.is_some() {
        return;
    }
    s.making = true;
    let own = o.clone();
    let spawned = std::thread::Builder::new()
        .name("moat-standby".into())
        .spawn(move || {
            let made = make(&*own, file);
            let mut s = slot(&*own);
            s.making = false;
            // Checked under the slot's lock, which `discard` takes after
            // the shutdown began: a standby made late is ended here.
            let closing = own.closing();
            match made {
                Ok(sb) if !closing => s.ready = Some(sb),
                Ok(sb) => {
                    drop(s);
                    stop(sb.link);
                }
                Err(e) => {
                    drop(s);
                    own.failed(e.to_string());
                }
            }
        });
    match spawned {
        Ok(h) => s.maker = Some(h),
        Err(_) => s.making = false,
    }
}

fn make<O: Owner>(o: &O, file: Arc<std::fs::File>) -> std::io::Result<Standby> {
    let mut link = Link::start(o.spec(), o.layout(), 0, 0, Boot::Template(file))?;
    match link.handshake(o.info(), o.start_timeout()) {
        Ok(info) => Ok(Standby { link, info }),
        Err(e) => {
            end(link);
            Err(e)
        }
    }
}

/// The standby, if one is ready and still running.
pub(crate) fn take<O: Owner>(o: &O) -> Option<Standby> {
    let sb = slot(o).ready.take()?;
    let [ended] = wait_readable([Some(sb.link.exit.as_fd())], Duration::ZERO);
    if ended {
        end(sb.link);
        return None;
    }
    Some(sb)
}

/// End the standby, and one being made, before returning (shutting down:
/// `closing` already says so, so none is kept after this).
pub(crate) fn discard<O: Owner>(o: &O) {
    let (ready, maker) = {
        let mut s = slot(o);
        (s.ready.take(), s.maker.take())
    };
    if let Some(sb) = ready {
        stop(sb.link);
    }
    if let Some(h) = maker {
        let _ = h.join();
    }
    if let Some(sb) = slot(o).ready.take() {
        stop(sb.link);
    }
}

/// End a driver that never served, and reap it here.
fn stop(mut l: Link) {
    let _ = l.proc.kill();
    let _ = l.proc.wait();
}
