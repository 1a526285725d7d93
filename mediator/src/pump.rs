//! What the engines of the streaming classes share (a NIC's, [`crate::net`],
//! and a serial line's, [`crate::serial`]): the one pump thread per device
//! that takes the driver's answers, checks each with the class's
//! contract, lends and sends what is queued, watches the deadlines and the
//! driver's end, and replaces the driver on a fault ([`run`]); and the
//! start of an incarnation with the template and the INFO handshake
//! ([`start`]). Each engine supplies its class's parts through
//! [`Pumped`]; the block engine has its own supervisor (a disk's requests
//! are re-issued, not lost or re-lent).
//!
//! The pump holds the engine's lock while it works and releases it only
//! to sleep (on the engine's wake-up bell, the section's doorbell and the
//! driver's exit together, 50 ms at most).

use std::os::fd::AsFd;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use moat_service_proto::ring::Layout;
use moat_service_proto::{Request, Response};

use crate::block::link::{end, Boot, Link, Template};
use crate::block::region::{wait_readable, Bell};
use crate::block::DriverSpec;
use crate::contract::Violation;

/// An engine the pump runs.
pub(crate) trait Pumped: Send + Sync + 'static {
    /// What the engine's lock guards.
    type Core: Send;
    /// The engine's state, locked.
    fn core(&self) -> MutexGuard<'_, Self::Core>;
    /// Rung when there is something for the pump (a client's data, a
    /// kill, the shutdown).
    fn wake(&self) -> &Bell;
    /// Shutting down: the pump ends.
    fn closing(&self) -> bool;
    /// The ring's depth (answers taken at most per look).
    fn depth(&self) -> u32;
    /// The live driver.
    fn link(c: &mut Self::Core) -> &mut Option<Link>;
    /// The engine gave up: the pump ends.
    fn stopped(c: &Self::Core) -> bool;
    /// Takes one answer of the driver, checked by the contract.
    fn answer(&self, c: &mut Self::Core, a: Response, now: Instant) -> Result<(), Violation>;
    /// A request in flight is past its deadline.
    fn expired(c: &mut Self::Core, now: Instant) -> bool;
    /// Counts a fault of the driver.
    fn violation(c: &mut Self::Core, kind: &'static str);
    /// Replaces the driver after a fault seen at `t0`.
    fn restart(self: &Arc<Self>, c: &mut Self::Core, t0: Instant);
    /// Lends buffers and sends what the client queued.
    fn refill(&self, c: &mut Self::Core, now: Instant);
    /// The pump ends: the last driver is to be ended.
    fn finish(&self, c: &mut Self::Core);
}

/// The pump thread's loop (see the module docs).
pub(crate) fn run<E: Pumped>(e: Arc<E>) {
    loop {
        let now = Instant::now();
        let (region, exit) = {
            let mut c = e.core();
            if e.closing() || E::stopped(&c) {
                break;
            }
            let mut answers = Vec::new();
            let mut fault: Option<&'static str> = None;
            if let Some(link) = E::link(&mut c).as_mut() {
                let took = link.ring.take(e.depth(), |a| {
                    answers.push(a);
                    true
                });
                if took.is_err() {
                    fault = Some("bad_index");
                }
            }
            for a in answers {
                if fault.is_some() {
                    break;
                }
                let r = match a {
                    Ok(a) => e.answer(&mut c, a, now),
                    Err(err) => Err(Violation::from(err)),
                };
                if let Err(v) = r {
                    fault = Some(v.kind());
                }
            }
            if fault.is_none() && E::expired(&mut c, now) {
                fault = Some(Violation::Deadline.kind());
            }
            if let Some(kind) = fault {
                E::violation(&mut c, kind);
                e.restart(&mut c, now);
                continue;
            }
            e.refill(&mut c, now);
            let Some(link) = E::link(&mut c).as_mut() else {
                break;
            };
            if link.ring.publish() {
                link.region.kick();
            }
            if !link.ring.prepare_sleep() {
                continue;
            }
            (link.region.clone(), link.exit.clone())
        };
        let [woke, rang, ended] = wait_readable(
            [Some(e.wake().fd()), Some(region.bell()), Some(exit.as_fd())],
            Duration::from_millis(50),
        );
        let mut c = e.core();
        if let Some(l) = E::link(&mut c).as_ref() {
            l.ring.awake();
        }
        if woke {
            e.wake().reset();
        }
        if rang {
            region.reset_bell();
        }
        let same = E::link(&mut c)
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(&l.exit, &exit));
        if ended && same {
            E::violation(&mut c, "crash");
            e.restart(&mut c, Instant::now());
        }
    }
    let mut c = e.core();
    e.finish(&mut c);
}

/// How to start an incarnation (see [`start`]).
pub(crate) struct Start<'a> {
    pub(crate) spec: &'a DriverSpec,
    pub(crate) layout: Layout,
    pub(crate) generation: u64,
    pub(crate) info: Request,
    pub(crate) timeout: Duration,
}

/// Starts incarnation `s.generation`: restored from the template if there
/// is one, else booted from the image (taking a template if one is
/// wanted); then sends INFO and has `check` judge the answer (its header
/// and payload). A template that was to blame for a failure, or that could
/// not be taken, is given up: `template` says so from then on, and
/// `given_up` why. `ending` sees an incarnation that failed its handshake
/// before it is ended. Returns the incarnation and whether it came from
/// the template.
pub(crate) fn start(
    s: Start<'_>,
    template: &mut Template,
    given_up: &mut Option<String>,
    check: impl FnOnce(&Response, &[u8]) -> Result<(), String>,
    ending: impl FnOnce(&Link),
) -> std::io::Result<(Link, bool)> {
    let boot = Boot::next(template)?;
    let restored = matches!(boot, Boot::Template(_));
    let taking = match &boot {
        Boot::Image(Some(f)) => Some(f.try_clone()?),
        _ => None,
    };
    fn give_up(template: &mut Template, given_up: &mut Option<String>, why: String) {
        *template = Template::Off(Some(why.clone()));
        *given_up = Some(why);
    }
    let mut link = match Link::start(s.spec, s.layout, s.generation, s.generation - 1, boot) {
        Ok(l) => l,
        Err(e) => {
            if restored {
                give_up(template, given_up, format!("a start from it failed: {e}"));
            }
            return Err(e);
        }
    };
    let checked = link.handshake(s.info, s.timeout).and_then(|(resp, bytes)| {
        check(&resp, &bytes).map_err(|v| std::io::Error::other(format!("driver handshake: {v}")))
    });
    if let Err(e) = checked {
        ending(&link);
        end(link);
        if restored || taking.is_some() {
            give_up(template, given_up, format!("a start with it failed: {e}"));
        }
        return Err(e);
    }
    if let Some(file) = taking {
        match Template::taken(&link, file) {
            Template::Off(Some(why)) => give_up(template, given_up, why),
            t => *template = t,
        }
    }
    Ok((link, restored))
}

/// The back-off before a restart. `moved`: the driver moved something
/// (or was killed from outside) since the last restart, which resets the
/// count of restarts in a row without progress; otherwise the count grows
/// and the restart waits 10 ms doubling (640 ms at most). `Err(n)`: `n`
/// restarts in a row moved nothing, `max` or more: give up.
pub(crate) fn back_off(barren: &mut u32, moved: bool, max: u32) -> Result<(), u32> {
    if moved {
        *barren = 0;
        return Ok(());
    }
    *barren += 1;
    if *barren >= max {
        return Err(*barren);
    }
    std::thread::sleep(Duration::from_millis(10 << (*barren).min(6)));
    Ok(())
}

/// Runs `start` until a driver comes up, backing off between failures as
/// [`back_off`] does. `Ok(true)`: started; `Ok(false)`: `closing` cut it
/// short (no failure of the device); `Err`: `max` starts failed, the last
/// one's error.
pub(crate) fn start_retrying(
    max: u32,
    closing: impl Fn() -> bool,
    mut start: impl FnMut() -> std::io::Result<()>,
) -> std::io::Result<bool> {
    let mut failed = 0u32;
    loop {
        let Err(e) = start() else {
            return Ok(true);
        };
        failed += 1;
        if closing() {
            return Ok(false);
        }
        if failed >= max {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(10 << failed.min(6)));
    }
}
