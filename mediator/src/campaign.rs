//! The fault campaign: a seeded, reproducible workload through the
//! mediator while the driver misbehaves on purpose, with every byte
//! checked.
//!
//! The driver picoprocess injects faults of the chosen kinds (crashes,
//! hangs, double and wrong completions, bad lengths and statuses, memory
//! exhaustion, floods, and on the rings bad indices, buffers outside the
//! pool or not its own, answers published before they are written);
//! optionally the campaign also kills it from outside. The workload keeps
//! many requests in flight (32 by default).
//! The workload keeps a model of the disk: each write stamps its blocks
//! with a fresh version, each read is compared with the model, so a lost,
//! duplicated, reordered or misplaced write shows up as a mismatch. A
//! write that fails (only while the circuit is open) may or may not have
//! reached the disk: its blocks may hold the old or the new version until
//! a read or a successful write settles them. A request that takes longer
//! than `hang_after` counts as a hang.
use crate::block::{Config, Counters, DriverSpec, FaultPlan, MediatedBlock, Ticket};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone)]
pub struct Campaign {
    pub driver: DriverSpec,
    pub config: Config,
    /// Stop once the mediator has seen this many faults.
    pub faults: u64,
    pub seed: u64,
    /// Probability of a driver fault per request, per million.
    pub per_million: u32,
    /// Fault kinds (`moat_libos::service::fault::NAMES`, comma-separated, or `all`).
    pub kinds: String,
    /// Also kill the driver from outside every this many requests (0: never).
    pub kill_every: u64,
    /// A request slower than this is a hang.
    pub hang_after: Duration,
    /// Give up after this long.
    pub time_limit: Duration,
    /// Requests the workload keeps in flight (from one thread, submit and
    /// wait).
    pub depth: usize,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub requests: u64,
    pub faults: u64,
    /// Requests that failed with an error (allowed only while the circuit
    /// is open; a campaign at sane fault rates should see 0).
    pub errors: u64,
    /// Requests slower than `hang_after`.
    pub hangs: u64,
    /// Reads that did not return the last data written.
    pub mismatches: u64,
    pub counters: Counters,
    pub elapsed: Duration,
    /// The time limit ended the run before the fault count was reached.
    pub timed_out: bool,
}

impl Report {
    /// Everything a correct mediator guarantees: no hang, no error, no
    /// mismatch (lost or duplicated completions show up as mismatches or
    /// hangs).
    pub fn clean(&self) -> bool {
        self.hangs == 0
            && self.errors == 0
            && self.mismatches == 0
            && self.counters.duplicate_completions == 0
            && !self.timed_out
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The content of block `b` at version `v`: 8-byte words of (b, v, i).
fn fill(buf: &mut [u8], block: u64, version: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let x = block
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(version.wrapping_mul(0xbf58_476d_1ce4_e5b9))
            .wrapping_add(i as u64);
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// One request of the workload, in flight.
struct Op {
    ticket: Ticket,
    write: bool,
    start: u64,
    n: u64,
    /// A write's version (one entry); a read's possible versions per block
    /// (empty: never written, anything goes).
    versions: Vec<Vec<u64>>,
    submitted: Instant,
}

/// Which blocks the requests in flight cover: readers, and whether a
/// writer does.
#[derive(Default)]
struct Busy(HashMap<u64, (u32, bool)>);

impl Busy {
    fn conflicts(&self, start: u64, n: u64, write: bool) -> bool {
        (start..start + n).any(|b| match self.0.get(&b) {
            Some(&(readers, writer)) => writer || (write && readers > 0),
            None => false,
        })
    }

    fn add(&mut self, start: u64, n: u64, write: bool) {
        for b in start..start + n {
            let e = self.0.entry(b).or_default();
            if write {
                e.1 = true;
            } else {
                e.0 += 1;
            }
        }
    }

    fn remove(&mut self, start: u64, n: u64, write: bool) {
        for b in start..start + n {
            if let Some(e) = self.0.get_mut(&b) {
                if write {
                    e.1 = false;
                } else {
                    e.0 -= 1;
                }
                if *e == (0, false) {
                    self.0.remove(&b);
                }
            }
        }
    }
}

/// Run the campaign; `progress` is called with (faults seen, target).
///
/// The workload keeps up to [`Campaign::depth`] requests in flight. Two
/// requests in flight never overlap where one of them writes (a disk does
/// not order concurrent writes to a block), so every read has one right
/// answer: the model as it was when the read was submitted.
pub fn run(c: &Campaign, mut progress: impl FnMut(u64, u64)) -> std::io::Result<Report> {
    let mut spec = c.driver.clone();
    spec.faults = Some(FaultPlan {
        seed: c.seed,
        per_million: c.per_million,
        kinds: c.kinds.clone(),
    });
    let dev = MediatedBlock::start(spec, c.config.clone())?;
    let bs = dev.block_size() as u64;
    // The workload uses the first 4 MiB (or the whole disk if smaller).
    let blocks = (dev.capacity() / bs).min((4 << 20) / bs);
    let depth = c.depth.max(1);
    // Each block's possible versions (one, unless a failed write left it
    // undecided); absent: never written.
    let mut model: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut rng = c.seed | 1;
    let mut version = 0u64;
    let mut r = Report::default();
    let t0 = Instant::now();
    let mut io = vec![0u8; (8 * bs) as usize];
    let mut want = vec![0u8; bs as usize];
    let mut flight: VecDeque<Op> = VecDeque::with_capacity(depth);
    let mut busy = Busy::default();
    // Collects the oldest request and checks it.
    let mut finish =
        |op: Op, model: &mut HashMap<u64, Vec<u64>>, busy: &mut Busy, r: &mut Report| {
            let len = (op.n * bs) as usize;
            let res = if op.write {
                let res = dev.wait(op.ticket);
                let v = op.versions[0][0];
                for k in 0..op.n {
                    let b = op.start + k;
                    if res.is_ok() {
                        model.insert(b, vec![v]);
                    } else if let Some(possible) = model.get_mut(&b) {
                        possible.push(v);
                    }
                }
                res
            } else {
                let res = dev.wait_read(op.ticket, &mut io[..len]);
                if res.is_ok() {
                    for (k, chunk) in io[..len].chunks_exact(bs as usize).enumerate() {
                        let b = op.start + k as u64;
                        let possible = &op.versions[k];
                        let found = possible.iter().find(|&&v| {
                            fill(&mut want, b, v);
                            chunk == &want[..]
                        });
                        match found {
                            // No write to the block was in flight with this
                            // read: what it read settles an undecided block.
                            Some(&v) if possible.len() > 1 => {
                                model.insert(b, vec![v]);
                            }
                            Some(_) => {}
                            None if possible.is_empty() => {}
                            None => r.mismatches += 1,
                        }
                    }
                }
                res
            };
            busy.remove(op.start, op.n, op.write);
            r.requests += 1;
            if op.submitted.elapsed() > c.hang_after {
                r.hangs += 1;
            }
            if res.is_err() {
                r.errors += 1;
            }
        };
    let mut data = vec![0u8; (8 * bs) as usize];
    let mut submitted = 0u64;
    loop {
        let seen = dev.counters().faults();
        progress(seen.min(c.faults), c.faults);
        if seen >= c.faults {
            break;
        }
        if t0.elapsed() > c.time_limit {
            r.timed_out = true;
            break;
        }
        if c.kill_every != 0 && submitted % c.kill_every == c.kill_every - 1 {
            dev.kill_driver();
        }
        let start = xorshift(&mut rng) % blocks;
        let n = (1 + xorshift(&mut rng) % 8).min(blocks - start);
        let write = xorshift(&mut rng).is_multiple_of(2);
        while flight.len() >= depth || busy.conflicts(start, n, write) {
            let Some(op) = flight.pop_front() else { break };
            finish(op, &mut model, &mut busy, &mut r);
        }
        let len = (n * bs) as usize;
        let submitted_at = Instant::now();
        let (ticket, versions) = if write {
            version += 1;
            for (k, chunk) in data[..len].chunks_exact_mut(bs as usize).enumerate() {
                fill(chunk, start + k as u64, version);
            }
            (
                dev.submit_write(start * bs, &data[..len]),
                vec![vec![version]],
            )
        } else {
            let v = (start..start + n)
                .map(|b| model.get(&b).cloned().unwrap_or_default())
                .collect();
            (dev.submit_read(start * bs, len), v)
        };
        submitted += 1;
        match ticket {
            Ok(ticket) => {
                busy.add(start, n, write);
                flight.push_back(Op {
                    ticket,
                    write,
                    start,
                    n,
                    versions,
                    submitted: submitted_at,
                });
            }
            Err(_) => {
                r.requests += 1;
                r.errors += 1;
            }
        }
    }
    while let Some(op) = flight.pop_front() {
        finish(op, &mut model, &mut busy, &mut r);
    }
    r.elapsed = t0.elapsed();
    r.counters = dev.counters();
    r.faults = r.counters.faults();
    dev.shutdown();
    Ok(r)
}
