//! The supervisor thread: what no client waits for. It sleeps until the
//! next thing it knows of (the earliest deadline in flight, the circuit's
//! retry time, the end of a drain), the driver's doorbell (rung only when
//! no client polls), the driver's exit, or a word from the engine (a
//! violation, a shutdown); never on a fixed tick. It ends the incarnations
//! the engine gave up on, starts the next, and on shutdown drains what is
//! in flight, then ends the driver.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::link::{end, Boot, Link, Template};
use super::region::{wait_readable, Region};
use super::{io_err, lock, Inner};
use crate::contract::{Contract, Violation};

/// Starts an incarnation and runs its handshake; the contract decides.
pub(crate) fn start_incarnation(inner: &Inner) -> std::io::Result<Link> {
    let (generation, incarnation, info) = {
        let mut c = lock(&inner.core);
        c.generation += 1;
        c.incarnations += 1;
        (c.generation, c.incarnations - 1, c.contract.info_request())
    };
    let boot = Boot::next(&inner.template.lock().unwrap_or_else(|e| e.into_inner()))?;
    let (taking, restored) = match &boot {
        Boot::Image(t) => (t.as_ref().map(|f| f.try_clone()).transpose()?, false),
        Boot::Template(_) => (None, true),
    };
    let started = Link::start(&inner.spec, inner.layout, generation, incarnation, boot);
    let mut link = match started {
        Ok(l) => l,
        Err(e) if restored => {
            give_up_template(
                inner,
                format!("a start from it failed: {e}"),
                TEMPLATE_TRIES,
            );
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let checked = link
        .handshake(info, inner.config.start_timeout)
        .and_then(|(resp, bytes)| {
            lock(&inner.core)
                .contract
                .check_info(&resp, &bytes)
                .map_err(|v| io_err(format!("driver handshake: {v}")))
        });
    match checked {
        Ok(_) => {
            if restored {
                lock(&inner.core).counters.from_template += 1;
                if let Template::Have(_, failed) =
                    &mut *inner.template.lock().unwrap_or_else(|e| e.into_inner())
                {
                    *failed = 0;
                }
            }
            if let Some(file) = taking {
                keep_template(inner, &link, file);
            }
            Ok(link)
        }
        Err(e) => {
            // A template that failed or did not come (it stalled the
            // driver, say) counts against templates.
            if taking.is_some() {
                let why = match link.proc.template_written(Duration::ZERO) {
                    Ok(Some(_)) => None,
                    Ok(None) => Some("not written before the handshake failed".to_string()),
                    Err(why) => Some(why.to_string()),
                };
                if let Some(why) = why {
                    give_up_template(inner, why, TEMPLATE_TRIES);
                }
            }
            end(link);
            if restored {
                give_up_template(
                    inner,
                    format!("a start from it failed: {e}"),
                    TEMPLATE_TRIES,
                );
            }
            Err(e)
        }
    }
}

/// The incarnation `link`, booted to take a template into `file`, has
/// passed its handshake: its template was written before it opened its
/// section, so its answer is there (or never comes).
fn keep_template(inner: &Inner, link: &Link, file: std::fs::File) {
    let t = Template::taken(link, file);
    if let Template::Off(why) = &t {
        lock(&inner.core).counters.template = why.clone();
    }
    *inner.template.lock().unwrap_or_else(|e| e.into_inner()) = t;
}

/// Ends the incarnations given up on and waits (up to `limit`) until each
/// has exited: nothing a killed driver was still doing (a write inside the
/// kernel) may land after what is re-issued to the next one. Whether they
/// all exited.
fn end_and_wait(dead: Vec<Link>, limit: Duration) -> bool {
    for l in &dead {
        l.proc.killer().kill();
    }
    let until = Instant::now() + limit;
    let mut all = true;
    for l in &dead {
        let left = until.saturating_duration_since(Instant::now());
        all &= wait_readable([Some(l.exit.as_fd())], left)[0];
    }
    for l in dead {
        end(l);
    }
    all
}

/// Starts from the template that may fail in a row (a kill during the
/// handshake, a passing lack of memory) before it is given up.
const TEMPLATE_TRIES: u32 = 3;

/// A start from (or to take) the template failed: after `tries` in a
/// row, drivers boot from now on.
fn give_up_template(inner: &Inner, why: String, tries: u32) {
    let mut t = inner.template.lock().unwrap_or_else(|e| e.into_inner());
    if let Template::Have(_, failed) | Template::Wanted(failed) = &mut *t {
        *failed += 1;
        if *failed < tries {
            return;
        }
    }
    lock(&inner.core).counters.template = Some(why.clone());
    *t = Template::Off(Some(why));
}

/// Switches to the standby driver, if one is ready: installed as the
/// next incarnation once the contract accepted its INFO answer.
fn promote(inner: &Arc<Inner>, t0: Instant) -> bool {
    let Some(sb) = super::standby::take(&**inner) else {
        return false;
    };
    let mut c = lock(&inner.core);
    if c.closing {
        drop(c);
        end(sb.link);
        return false;
    }
    let _ = c.contract.info_request();
    if let Err(v) = c.contract.check_info(&sb.info.0, &sb.info.1) {
        c.counters.last_start_failure = Some(format!("standby handshake: {v}"));
        drop(c);
        end(sb.link);
        return false;
    }
    c.generation += 1;
    c.incarnations += 1;
    let mut link = sb.link;
    link.generation = c.generation;
    c.counters.restarts += 1;
    c.counters.from_template += 1;
    c.counters.from_standby += 1;
    c.install(link, Instant::now());
    super::record_recovery(&mut c.counters.recovery, t0.elapsed());
    drop(c);
    super::standby::replenish(inner, super::standby::template_of(inner));
    true
}

pub(crate) fn run(inner: Arc<Inner>) {
    let mut drain_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let (timeout, region, exit): (Duration, Option<Arc<Region>>, Option<Arc<OwnedFd>>) = {
            let mut c = lock(&inner.core);
            if c.closing {
                let until = *drain_until.get_or_insert(now + c.config.deadline);
                if c.contract.in_flight_len() == 0 || now >= until || c.link.is_none() {
                    break;
                }
            }
            // Answers nobody has taken yet count before any deadline.
            c.reap(now);
            if c.contract.expired(now).is_some() {
                c.violation(Violation::Deadline.kind());
            }
            if !c.dead.is_empty() {
                let dead = std::mem::take(&mut c.dead);
                let limit = c.config.deadline;
                drop(c);
                if !end_and_wait(dead, limit) {
                    // A killed driver still in the kernel: what it was
                    // doing may yet land, so nothing is re-issued; its
                    // clients fail, and the next driver starts later.
                    lock(&inner.core).open_circuit(Instant::now());
                    continue;
                }
                restart(&inner, now);
                continue;
            }
            if c.circuit_open_until.is_some_and(|t| now >= t) {
                c.circuit_open_until = None;
                c.failed_restarts = 0;
                if c.link.is_none() {
                    drop(c);
                    restart(&inner, now);
                    continue;
                }
            }
            // Clients sleep and nobody polls: the driver is to ring.
            if !c.poller && c.sleepers > 0 {
                c.make_idle(now);
            }
            let mut next = now + c.config.deadline;
            for t in [
                c.contract.next_deadline(),
                c.circuit_open_until,
                drain_until,
            ]
            .into_iter()
            .flatten()
            {
                next = next.min(t);
            }
            let (region, exit) = match c.link.as_ref() {
                Some(l) => (Some(l.region.clone()), Some(l.exit.clone())),
                None => (None, None),
            };
            // Just past the deadline, so that it has passed when checked.
            (
                next.saturating_duration_since(now) + Duration::from_micros(100),
                region,
                exit,
            )
        };
        let [control, rang, ended] = wait_readable(
            [
                Some(inner.control.fd()),
                region.as_deref().map(Region::bell),
                exit.as_deref().map(|e| e.as_fd()),
            ],
            timeout,
        );
        if control {
            inner.control.reset();
        }
        let now = Instant::now();
        let mut c = lock(&inner.core);
        if rang {
            if let Some(r) = &region {
                r.reset_bell();
            }
            c.counters.bells += 1;
            c.reap(now);
        }
        // The exit of the incarnation that is still live (not one the
        // engine gave up on meanwhile): a crash. What it published before
        // it died is not looked at.
        if ended {
            let same = match (&c.link, &exit) {
                (Some(l), Some(e)) => Arc::ptr_eq(&l.exit, e),
                _ => false,
            };
            if same {
                c.violation("crash");
            }
        }
    }
    // Shut down: the driver is ended, what did not finish fails.
    super::standby::discard(&*inner);
    let mut c = lock(&inner.core);
    let live = c.link.take();
    let dead = std::mem::take(&mut c.dead);
    c.fail_everything("the mediator shut down before the driver answered");
    drop(c);
    for l in live.into_iter().chain(dead) {
        let mut l = l;
        let _ = l.proc.kill();
        let _ = l.proc.wait();
    }
}

/// Replaces the driver: starts incarnations (backing off) until one passes
/// its handshake, then re-issues on it what was in flight; opens the
/// circuit after too many starts in a row without progress.
fn restart(inner: &Arc<Inner>, t0: Instant) {
    {
        let mut c = lock(&inner.core);
        if c.closing {
            return;
        }
        // A driver that failed with nothing to do, or after completing
        // something, is no sign of a request that kills every driver.
        if c.progress || c.contract.in_flight_len() == 0 {
            c.failed_restarts = 0;
        } else {
            c.failed_restarts += 1;
        }
    }
    loop {
        {
            let mut c = lock(&inner.core);
            if c.closing {
                return;
            }
            if c.failed_restarts >= c.config.max_failed_restarts {
                c.open_circuit(Instant::now());
                return;
            }
        }
        if promote(inner, t0) {
            return;
        }
        lock(&inner.core).counters.restarts += 1;
        let t = Instant::now();
        match start_incarnation(inner) {
            Ok(link) => {
                let mut c = lock(&inner.core);
                let now = Instant::now();
                c.install(link, now);
                super::record_recovery(&mut c.counters.recovery, t0.elapsed());
                drop(c);
                super::standby::replenish(inner, super::standby::template_of(inner));
                return;
            }
            Err(e) => {
                let backoff = {
                    let mut c = lock(&inner.core);
                    c.counters.failed_starts += 1;
                    c.counters.last_start_failure = Some(format!("{e} (after {:?})", t.elapsed()));
                    c.failed_restarts += 1;
                    Duration::from_millis(10u64 << c.failed_restarts.min(6))
                };
                std::thread::sleep(backoff);
            }
        }
    }
}
