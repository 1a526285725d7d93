//! Tracing, the monitor's side: a trace ring per picoprocess whose stack
//! has a trace layer (`moat_layers::tracer` writes it in the confined
//! process), drained by a thread of the monitor, decoded into strace-like
//! lines on the session's log or saved, as read, into a binary trace file
//! that `moat trace FILE` decodes later ([`mod@file`], [`decode`]).
//!
//! Nothing is lost silently: in the default mode a full ring drops records
//! and the drain says how many and where (`... 12 records dropped here`);
//! in lossless mode ([`TraceOptions::lossless`]) the guest waits for room
//! instead. A record claimed and never written (a thread killed in a call)
//! or one that does not decode (a guest scribbled on the ring) is named as
//! such.
use crate::shm::HostSection;
use moat_layers::ring::{self, Consumer};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod decode;
pub mod file;

/// How a session traces (`moat run --trace[=...]`, `Sandbox::trace_with`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceOptions {
    /// Producers wait for room rather than drop records.
    pub lossless: bool,
    /// Save the records here (binary; `moat trace FILE` decodes it)
    /// instead of writing lines to the log.
    pub file: Option<PathBuf>,
    /// Bit `nr - 1`: call `nr` is traced (see [`parse_filter`]).
    pub filter: u64,
    /// The ring's capacity in records (a power of two).
    pub records: u64,
    /// A trace layer on top of the stack (`--trace`); false when only
    /// the stack names trace layers (`--layer count,trace`), which these
    /// options then configure.
    pub outermost: bool,
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions {
            lossless: false,
            file: None,
            filter: moat_layers::tracer::ALL_CALLS,
            records: ring::DEFAULT_RECORDS,
            outermost: true,
        }
    }
}

impl TraceOptions {
    /// `--trace`'s value: `lossless`, a file, or both (`lossless,FILE`).
    pub fn parse(spec: Option<&str>) -> Result<TraceOptions, String> {
        let mut o = TraceOptions::default();
        for part in spec.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
            if part == "lossless" {
                o.lossless = true;
            } else if o.file.is_none() {
                o.file = Some(PathBuf::from(part));
            } else {
                return Err(format!(
                    "--trace={}: one file at most (`lossless`, `FILE` or `lossless,FILE`; a file named lossless is ./lossless)",
                    spec.unwrap_or("")
                ));
            }
        }
        Ok(o)
    }
}

/// A call filter from names and groups (`DkStreamOpen,sync`): bit
/// `nr - 1` for each call named or in a group named.
pub fn parse_filter(list: &str) -> Result<u64, String> {
    let mut mask = 0u64;
    for w in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let mut hit = false;
        for (i, (name, group)) in moat_pal::CALL_NAMES
            .iter()
            .zip(moat_pal::layer::CALL_GROUPS.iter())
            .enumerate()
        {
            if *name == w || *group == w {
                mask |= 1 << i;
                hit = true;
            }
        }
        if !hit {
            return Err(format!(
                "--trace-filter: `{w}` is neither a call (DkStreamOpen, ...) nor a group (memory, threads, sync, process, streams, other)"
            ));
        }
    }
    if mask == 0 {
        return Err("--trace-filter: no call named".into());
    }
    Ok(mask)
}

/// Where a session's drained records go.
pub(crate) enum Sink {
    /// Decoded lines on the session's log (each line handed to this).
    Log(Arc<dyn Fn(&str) + Send + Sync>),
    /// The trace file, shared by the picoprocesses of the session.
    File(Arc<Mutex<file::Writer>>),
}

/// A picoprocess's ring, made before it starts.
pub(crate) struct Ring {
    pub(crate) section: HostSection,
    pub(crate) records: u64,
}

impl Ring {
    pub(crate) fn new(o: &TraceOptions) -> Result<Ring, crate::Error> {
        ring::check_records(o.records).map_err(crate::Error::BadInput)?;
        let size = ring::ring_bytes(o.records).next_multiple_of(4096);
        let section = HostSection::new(size)?;
        // Touch every page here, so the ring's memory is the monitor's,
        // not counted against the picoprocess's memory limit.
        for w in section.words().iter().step_by(512) {
            w.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        ring::init(section.words(), o.records, o.lossless);
        Ok(Ring {
            section,
            records: o.records,
        })
    }
}

/// Drain `ring` until `ended` says the picoprocess is gone, then once
/// more; on a thread of its own.
pub(crate) fn spawn_drain(
    ring: Ring,
    name: String,
    pid: u32,
    sink: Sink,
    ended: Box<dyn Fn() -> bool + Send>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("moat-trace-{pid}"))
        .spawn(move || {
            let Ok(mut c) = Consumer::new(ring.section.words(), ring.records) else {
                return;
            };
            let mut dec = decode::Decoder::default();
            let mut items = Vec::with_capacity(1024);
            let mut idle = Duration::from_micros(100);
            loop {
                let done = ended();
                let n = match &sink {
                    Sink::Log(log) => {
                        items.clear();
                        let n = c.poll(&mut items, 4096, done);
                        for it in &items {
                            log(&format!("[picoprocess {name}] trace: {}", dec.item(it)));
                        }
                        n
                    }
                    // Saved as read: no decoding on the way.
                    Sink::File(f) => {
                        let mut w = f.lock().unwrap_or_else(|e| e.into_inner());
                        c.poll_raw(4096, done, |raw| match raw {
                            ring::Raw::Slot(words) => w.slot(pid, words),
                            ring::Raw::Item(it) => w.item(pid, &it),
                        })
                    }
                };
                if n == 0 {
                    if done {
                        break;
                    }
                    std::thread::sleep(idle);
                    idle = (idle * 2).min(Duration::from_millis(2));
                } else {
                    idle = Duration::from_micros(100);
                }
            }
            if let Sink::File(f) = &sink {
                if let Err(e) = f.lock().unwrap_or_else(|e| e.into_inner()).flush() {
                    log_error(&format!(
                        "moat: [picoprocess {name}] the trace file is incomplete: {e}"
                    ));
                }
            }
        })
}

/// A line about the trace itself, where the monitor's own messages go.
fn log_error(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
