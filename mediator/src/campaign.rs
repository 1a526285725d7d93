//! The fault campaign: a seeded, reproducible workload through the
//! mediator while the driver misbehaves on purpose, with every byte
//! checked.
//!
//! The driver picoprocess injects faults of the chosen kinds (crashes,
//! hangs, double and wrong completions, bad lengths and statuses, memory
//! exhaustion, floods); optionally the campaign also kills it from outside.
//! The workload keeps a model of the disk: each write stamps its blocks
//! with a fresh version, each read is compared with the model, so a lost,
//! duplicated, reordered or misplaced write shows up as a mismatch. A
//! request that takes longer than `hang_after` counts as a hang.
use crate::block::{Config, Counters, DriverSpec, FaultPlan, MediatedBlock};
use std::collections::HashMap;
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

/// Run the campaign; `progress` is called with (faults seen, target).
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
    let mut model: HashMap<u64, u64> = HashMap::new();
    let mut rng = c.seed | 1;
    let mut version = 0u64;
    let mut r = Report::default();
    let t0 = Instant::now();
    let mut buf = vec![0u8; (8 * bs) as usize];
    let mut want = vec![0u8; bs as usize];
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
        if c.kill_every != 0 && r.requests % c.kill_every == c.kill_every - 1 {
            dev.kill_driver();
        }
        let start = xorshift(&mut rng) % blocks;
        let n = (1 + xorshift(&mut rng) % 8).min(blocks - start);
        let io = &mut buf[..(n * bs) as usize];
        let t = Instant::now();
        let write = xorshift(&mut rng).is_multiple_of(2);
        let res = if write {
            version += 1;
            for (k, chunk) in io.chunks_exact_mut(bs as usize).enumerate() {
                fill(chunk, start + k as u64, version);
            }
            let res = dev.write_at(start * bs, io);
            if res.is_ok() {
                for k in 0..n {
                    model.insert(start + k, version);
                }
            }
            res
        } else {
            let res = dev.read_at(start * bs, io);
            if res.is_ok() {
                for (k, chunk) in io.chunks_exact(bs as usize).enumerate() {
                    let b = start + k as u64;
                    // A block never written holds whatever the disk held.
                    if let Some(&v) = model.get(&b) {
                        fill(&mut want, b, v);
                        if chunk != &want[..] {
                            r.mismatches += 1;
                        }
                    }
                }
            }
            res
        };
        r.requests += 1;
        if t.elapsed() > c.hang_after {
            r.hangs += 1;
        }
        if res.is_err() {
            r.errors += 1;
        }
    }
    r.elapsed = t0.elapsed();
    r.counters = dev.counters();
    r.faults = r.counters.faults();
    dev.shutdown();
    Ok(r)
}
