//! The trace ring: fixed-size binary records in memory the monitor shares
//! with the confined process, written by the trace layer (many guest
//! threads: [`Producer`]) and drained by the monitor ([`Consumer`]) with
//! no system call or message per record.
//!
//! Layout, in little-endian u64 words, every access an atomic one (both
//! sides are separate processes; a guest on host-linux shares the
//! producer's address space and may scribble on any of it):
//!
//! - header, 64 words: `MAGIC`, capacity (records, a power of two), flags
//!   ([`FLAG_LOSSLESS`]); `head` (word 8, producers' claim counter),
//!   `tail` (word 16, the consumer's position), `dropped` (word 24,
//!   records a producer did not write because the ring was full);
//! - `capacity` slots of [`RECORD_WORDS`] words. Slot word 0 is the
//!   sequence: `pos + 1` once the record claimed at `pos` is complete.
//!
//! A producer claims a position with a compare-and-swap on `head` while
//! `head - tail < capacity`, writes words 1.., then publishes the
//! sequence (release). When the ring is full it either counts the record
//! in `dropped` and goes on (the default) or waits for room (lossless:
//! the guest slows to the reader's pace, nothing is lost). The consumer
//! owns `tail`: it reads the slot at its own `tail`, takes it when the
//! sequence says it is complete (acquire), copies it once, then decodes
//! the copy, so nothing a producer writes later changes what was read.
//!
//! The consumer never trusts the ring: positions are taken modulo the
//! capacity it chose, a record that does not decode is reported as
//! scribbled, a claimed slot never completed (a thread killed in the
//! middle, or a guest that claims and stops) is skipped as lost after a
//! second or at the end, and `dropped` going backwards is ignored. A
//! wrong ring costs the trace, never the host.
use std::sync::atomic::{AtomicU64, Ordering};

/// `MOATTRC1`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MOATTRC1");
/// Words per record slot (256 bytes).
pub const RECORD_WORDS: usize = 32;
/// Words of the header.
pub const HEADER_WORDS: usize = 64;
/// Bytes of an argument a record carries at most.
pub const DATA_BYTES: usize = 160;
/// Slot words before the data.
const DATA_AT: usize = RECORD_WORDS - DATA_BYTES / 8;
/// Ring capacities allowed (records).
pub const MIN_RECORDS: u64 = 64;
pub const MAX_RECORDS: u64 = 1 << 20;
/// The default capacity: 16384 records, 4 MiB.
pub const DEFAULT_RECORDS: u64 = 16384;
/// Header flag: producers wait for room instead of dropping.
pub const FLAG_LOSSLESS: u64 = 1;

const H_MAGIC: usize = 0;
const H_CAP: usize = 1;
const H_FLAGS: usize = 2;
const H_HEAD: usize = 8;
const H_TAIL: usize = 16;
const H_DROPPED: usize = 24;

/// Record flag: the call returned (`result` and `dur_ns` are valid).
pub const F_RETURNED: u8 = 1;
/// Record flag: `data` is a prefix of a longer argument.
pub const F_TRUNCATED: u8 = 2;
/// Record flag: `out` holds the value the call wrote out.
pub const F_OUT: u8 = 4;
/// Record flag: `data` is what the call wrote (a read), not what it got.
pub const F_DATA_OUT: u8 = 8;
/// Record flag: the host served the call itself (kvm: a raised
/// exception); the result is not known to the layers.
pub const F_HOST_SERVED: u8 = 16;

/// The ring's size in bytes for `records` records.
pub fn ring_bytes(records: u64) -> u64 {
    (HEADER_WORDS as u64 + records * RECORD_WORDS as u64) * 8
}

/// Whether `records` is a capacity the ring takes, or what is wrong.
pub fn check_records(records: u64) -> Result<(), String> {
    if !records.is_power_of_two() || !(MIN_RECORDS..=MAX_RECORDS).contains(&records) {
        return Err(format!(
            "a trace ring of {records} records: give a power of two from {MIN_RECORDS} to {MAX_RECORDS}"
        ));
    }
    Ok(())
}

/// Write a fresh header into `mem` (the monitor, before the process
/// starts).
pub fn init(mem: &[AtomicU64], records: u64, lossless: bool) {
    mem[H_MAGIC].store(MAGIC, Ordering::Relaxed);
    mem[H_CAP].store(records, Ordering::Relaxed);
    mem[H_FLAGS].store(if lossless { FLAG_LOSSLESS } else { 0 }, Ordering::Relaxed);
    mem[H_HEAD].store(0, Ordering::Relaxed);
    mem[H_TAIL].store(0, Ordering::Relaxed);
    mem[H_DROPPED].store(0, Ordering::Release);
}

/// One call, as the trace layer saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Nanoseconds since the picoprocess's tracer started, at the call.
    pub ts_ns: u64,
    /// How long the call took (with [`F_RETURNED`]).
    pub dur_ns: u32,
    /// The guest thread (1 for the first, in order of first call).
    pub tid: u32,
    /// The call number.
    pub nr: u16,
    /// Which trace layer of the stack wrote it (0: the outermost).
    pub layer: u8,
    /// `F_*` flags.
    pub flags: u8,
    pub result: i64,
    /// The argument words, as the guest passed them.
    pub args: [u64; 6],
    /// The value written out (a new handle, an exit code), with [`F_OUT`].
    pub out: u64,
    /// The index of the argument whose bytes `data` holds.
    pub data_arg: u8,
    /// A bounded copy of that argument's bytes.
    pub data: Vec<u8>,
}

impl Record {
    /// Words 1.. of a slot (word 0 is the sequence).
    pub fn to_words(&self) -> [u64; RECORD_WORDS] {
        let mut w = [0u64; RECORD_WORDS];
        let n = self.data.len().min(DATA_BYTES);
        w[1] = self.ts_ns;
        w[2] = self.dur_ns as u64 | (self.tid as u64) << 32;
        w[3] = self.nr as u64
            | (self.layer as u64) << 16
            | (self.flags as u64) << 24
            | (n as u64) << 32
            | (self.data_arg as u64) << 48;
        w[4] = self.result as u64;
        w[5..11].copy_from_slice(&self.args);
        w[11] = self.out;
        for (i, chunk) in self.data[..n].chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            w[DATA_AT + i] = u64::from_le_bytes(b);
        }
        w
    }

    /// A record from a slot's words, checked: a call number the ABI has,
    /// data within the slot.
    pub fn from_words(w: &[u64; RECORD_WORDS]) -> Result<Record, &'static str> {
        let nr = (w[3] & 0xffff) as u16;
        if nr == 0 || nr as usize > moat_pal::CALL_NAMES.len() {
            return Err("a call number the ABI does not have");
        }
        let n = ((w[3] >> 32) & 0xffff) as usize;
        if n > DATA_BYTES {
            return Err("more data than a record holds");
        }
        let data_arg = ((w[3] >> 48) & 0xff) as u8;
        if data_arg > 5 {
            return Err("data of an argument the call does not have");
        }
        let mut data = Vec::with_capacity(n);
        for i in 0..n.div_ceil(8) {
            data.extend_from_slice(&w[DATA_AT + i].to_le_bytes());
        }
        data.truncate(n);
        let mut args = [0u64; 6];
        args.copy_from_slice(&w[5..11]);
        Ok(Record {
            ts_ns: w[1],
            dur_ns: w[2] as u32,
            tid: (w[2] >> 32) as u32,
            nr,
            layer: (w[3] >> 16) as u8,
            flags: (w[3] >> 24) as u8,
            result: w[4] as i64,
            args,
            out: w[11],
            data_arg,
            data,
        })
    }
}

/// The writing side, in the confined process.
pub struct Producer {
    mem: &'static [AtomicU64],
    cap: u64,
    lossless: bool,
}

impl Producer {
    /// Over a ring the monitor made: its header is read once, here (before
    /// any guest code runs), and checked against the memory's size.
    pub fn new(mem: &'static [AtomicU64]) -> Result<Producer, String> {
        if mem.len() < HEADER_WORDS || mem[H_MAGIC].load(Ordering::Acquire) != MAGIC {
            return Err("the trace ring has no header".into());
        }
        let cap = mem[H_CAP].load(Ordering::Relaxed);
        check_records(cap)?;
        if (mem.len() as u64) < ring_bytes(cap) / 8 {
            return Err("the trace ring is smaller than its header says".into());
        }
        Ok(Producer {
            mem,
            cap,
            lossless: mem[H_FLAGS].load(Ordering::Relaxed) & FLAG_LOSSLESS != 0,
        })
    }

    /// Append one record (words 1..; word 0 is set here). Returns false
    /// when it was dropped.
    pub fn push(&self, words: &[u64; RECORD_WORDS]) -> bool {
        let (head, tail) = (&self.mem[H_HEAD], &self.mem[H_TAIL]);
        let mut pos = head.load(Ordering::Relaxed);
        let mut waited = 0u32;
        loop {
            let t = tail.load(Ordering::Acquire);
            if pos.wrapping_sub(t) >= self.cap {
                if !self.lossless {
                    self.mem[H_DROPPED].fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                // Wait for the reader: spin a little, then sleep.
                waited += 1;
                if waited < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                pos = head.load(Ordering::Relaxed);
                continue;
            }
            match head.compare_exchange_weak(
                pos,
                pos.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(p) => pos = p,
            }
        }
        let base = HEADER_WORDS + (pos & (self.cap - 1)) as usize * RECORD_WORDS;
        let slot = &self.mem[base..base + RECORD_WORDS];
        for (s, w) in slot.iter().zip(words.iter()).skip(1) {
            s.store(*w, Ordering::Relaxed);
        }
        slot[0].store(pos.wrapping_add(1), Ordering::Release);
        true
    }
}

/// What the consumer takes from the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Record(Record),
    /// This many records were dropped (the ring was full) since the last
    /// item: the trace has a gap here.
    Dropped(u64),
    /// A slot that was claimed and never completed, or did not decode
    /// (the reason): skipped.
    Lost(&'static str),
}

/// What [`Consumer::poll_raw`] hands over.
pub enum Raw<'a> {
    /// A complete slot's words, not yet checked.
    Slot(&'a [u64; RECORD_WORDS]),
    /// Anything else.
    Item(Item),
}

/// The reading side, in the monitor.
pub struct Consumer<'a> {
    mem: &'a [AtomicU64],
    cap: u64,
    tail: u64,
    dropped_seen: u64,
    /// The position waited on, and since when.
    stalled: Option<(u64, std::time::Instant)>,
}

/// How long a claimed slot may stay incomplete before it is skipped.
const STALL: std::time::Duration = std::time::Duration::from_secs(1);

impl<'a> Consumer<'a> {
    /// Over a ring this side initialised with `records` slots (the
    /// capacity is ours, never read back from the ring).
    pub fn new(mem: &'a [AtomicU64], records: u64) -> Result<Consumer<'a>, String> {
        check_records(records)?;
        if (mem.len() as u64) < ring_bytes(records) / 8 {
            return Err("the trace ring is smaller than its capacity".into());
        }
        Ok(Consumer {
            mem,
            cap: records,
            tail: 0,
            dropped_seen: 0,
            stalled: None,
        })
    }

    /// Take what is ready, at most `max` slots, into `out`. `last`: the
    /// producer is gone, so an incomplete slot will never complete.
    /// Returns how many items were added.
    pub fn poll(&mut self, out: &mut Vec<Item>, max: usize, last: bool) -> usize {
        self.poll_raw(max, last, |raw| {
            out.push(match raw {
                Raw::Slot(w) => match Record::from_words(w) {
                    Ok(r) => Item::Record(r),
                    Err(why) => Item::Lost(why),
                },
                Raw::Item(i) => i,
            })
        })
    }

    /// [`Consumer::poll`] without decoding: each complete slot's words as
    /// copied (word 0 zero; check them with [`Record::from_words`] before
    /// use), for a reader that saves them as they are.
    pub fn poll_raw(&mut self, max: usize, last: bool, mut f: impl FnMut(Raw<'_>)) -> usize {
        let mut n = 0;
        // Only ever up: a counter that goes back (scribbled) is ignored
        // until it passes what was reported.
        let dropped = self.mem[H_DROPPED].load(Ordering::Relaxed);
        if dropped > self.dropped_seen {
            f(Raw::Item(Item::Dropped(dropped - self.dropped_seen)));
            n += 1;
            self.dropped_seen = dropped;
        }
        for _ in 0..max {
            let base = HEADER_WORDS + (self.tail & (self.cap - 1)) as usize * RECORD_WORDS;
            let slot = &self.mem[base..base + RECORD_WORDS];
            if slot[0].load(Ordering::Acquire) == self.tail.wrapping_add(1) {
                let mut w = [0u64; RECORD_WORDS];
                for (d, s) in w.iter_mut().zip(slot.iter()).skip(1) {
                    *d = s.load(Ordering::Relaxed);
                }
                // Still the same record? (A producer that claimed this
                // slot's next turn writes it only after `tail` moves, so a
                // changed sequence means a writer that does not follow the
                // protocol: the copy may be torn.)
                std::sync::atomic::fence(Ordering::Acquire);
                let torn = slot[0].load(Ordering::Relaxed) != self.tail.wrapping_add(1);
                // Copied: the slot may be reused from here on.
                self.advance();
                if torn {
                    f(Raw::Item(Item::Lost(
                        "a record overwritten while it was read",
                    )));
                } else {
                    f(Raw::Slot(&w));
                }
                n += 1;
                continue;
            }
            // Not complete: is anything claimed at all?
            let claimed = self.mem[H_HEAD]
                .load(Ordering::Acquire)
                .wrapping_sub(self.tail);
            if claimed == 0 || claimed > self.cap {
                break;
            }
            let stuck = match self.stalled {
                Some((pos, since)) if pos == self.tail => since.elapsed() >= STALL,
                _ => {
                    self.stalled = Some((self.tail, std::time::Instant::now()));
                    false
                }
            };
            if last || stuck {
                f(Raw::Item(Item::Lost("a record claimed and never written")));
                n += 1;
                self.advance();
                continue;
            }
            break;
        }
        n
    }

    fn advance(&mut self) {
        self.tail = self.tail.wrapping_add(1);
        self.stalled = None;
        self.mem[H_TAIL].store(self.tail, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(records: u64, lossless: bool) -> &'static [AtomicU64] {
        let words = (ring_bytes(records) / 8) as usize;
        let mem: &'static [AtomicU64] = Box::leak(
            (0..words)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        init(mem, records, lossless);
        mem
    }

    fn rec(i: u64) -> Record {
        Record {
            ts_ns: i,
            nr: 1 + (i % 40) as u16,
            flags: F_RETURNED,
            result: i as i64,
            data: format!("file:/x/{i}").into_bytes(),
            ..Default::default()
        }
    }

    #[test]
    fn records_round_trip_and_drops_are_counted() {
        let mem = ring(64, false);
        let p = Producer::new(mem).unwrap();
        let mut c = Consumer::new(mem, 64).unwrap();
        for i in 0..100 {
            p.push(&rec(i).to_words());
        }
        let mut out = Vec::new();
        c.poll(&mut out, 1000, false);
        assert_eq!(out[0], Item::Dropped(36));
        let got: Vec<Record> = out[1..]
            .iter()
            .map(|i| match i {
                Item::Record(r) => r.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, (0..64).map(rec).collect::<Vec<_>>());
        // Room again.
        assert!(p.push(&rec(7).to_words()));
    }

    #[test]
    fn lossless_producers_wait_and_lose_nothing() {
        let mem = ring(64, true);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let p = Producer::new(mem).unwrap();
                    for i in 0..5000u64 {
                        assert!(p.push(&rec(t * 10_000 + i).to_words()));
                    }
                })
            })
            .collect();
        let mut c = Consumer::new(mem, 64).unwrap();
        let mut seen = Vec::new();
        let mut out = Vec::new();
        while seen.len() < 20_000 {
            out.clear();
            c.poll(&mut out, 100, false);
            for i in &out {
                match i {
                    Item::Record(r) => seen.push(r.ts_ns),
                    other => panic!("{other:?}"),
                }
            }
        }
        threads.into_iter().for_each(|t| t.join().unwrap());
        seen.sort();
        let want: Vec<u64> = (0..4)
            .flat_map(|t| (0..5000).map(move |i| t * 10_000 + i))
            .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn a_scribbled_ring_costs_the_trace_not_the_reader() {
        let mem = ring(64, false);
        let mut c = Consumer::new(mem, 64).unwrap();
        // Garbage everywhere, as a guest sharing the producer's memory
        // could write it.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for w in mem.iter() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.store(x, Ordering::Relaxed);
        }
        let mut out = Vec::new();
        for _ in 0..10 {
            c.poll(&mut out, 1000, true);
        }
        // Slots that look complete at our tail decode or are reported;
        // a claimed-but-garbage head is bounded by the capacity.
        assert!(out.len() <= 10 * (1000 + 1));
        // A claim that never completes is skipped at the end.
        let mem = ring(64, false);
        let mut c = Consumer::new(mem, 64).unwrap();
        mem[H_HEAD].store(1, Ordering::Relaxed);
        let mut out = Vec::new();
        assert_eq!(c.poll(&mut out, 10, false), 0);
        c.poll(&mut out, 10, true);
        assert_eq!(out, vec![Item::Lost("a record claimed and never written")]);
        // A record with a bad call number.
        let p = Producer::new(mem).unwrap();
        let mut w = rec(1).to_words();
        w[3] = (w[3] & !0xffff) | 999;
        p.push(&w);
        out.clear();
        c.poll(&mut out, 10, false);
        assert_eq!(out, vec![Item::Lost("a call number the ABI does not have")]);
    }
}
