//! Tests of the exporter over a backend with an asynchronous side: a slow
//! in-memory queue that completes each request some time after it started,
//! in the order they fall due, and counts what it sees. Through a real
//! FUSE mount (they need root and /dev/fuse).
use super::{fuse_usable, MemBackend, Rng, TempDir};
use crate::export::{mount, BlockBackend, BlockQueue, Done, ReadDone};

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

enum Job {
    Read(u64, usize, ReadDone),
    Write(u64, Vec<u8>, Done),
    Flush(Done),
}

#[derive(Default)]
struct Seen {
    /// Requests started and not completed, with when each falls due.
    pending: Vec<(Instant, Job)>,
    in_flight: usize,
    max_in_flight: usize,
    /// Block ranges of the writes in flight.
    writes: Vec<(u64, u64)>,
    /// Writes started while an overlapping one was in flight (must stay 0).
    overlaps: u64,
    started: u64,
    completed: u64,
    closing: bool,
    rng: Option<Rng>,
}

/// What a [`SlowBackend`] and its queue share.
struct Slow {
    mem: Arc<MemBackend>,
    seen: Mutex<Seen>,
    changed: Condvar,
    /// Each read or write completes this long after it started, plus up
    /// to `jitter` more (so they complete out of order); a flush at once.
    latency: Duration,
    jitter: Duration,
    depth: usize,
    flushes: AtomicU64,
}

impl Slow {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    fn start(&self, job: Job) {
        let mut s = self.seen();
        let mut due = Instant::now() + self.latency;
        if matches!(job, Job::Flush(_)) {
            // Never held up: every close of the file flushes, including
            // the close of an inherited descriptor when a child of this
            // process (umount) execs, which would otherwise wait on it.
            due = Instant::now();
        } else if !self.jitter.is_zero() {
            let rng = s.rng.get_or_insert(Rng(7));
            due += self.jitter.mul_f64(rng.below(1000) as f64 / 1000.0);
        }
        if let Job::Write(offset, data, _) = &job {
            let range = (*offset, offset + data.len() as u64);
            if s.writes.iter().any(|&(a, b)| a < range.1 && range.0 < b) {
                s.overlaps += 1;
            }
            s.writes.push(range);
        }
        s.started += 1;
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        s.pending.push((due, job));
        drop(s);
        self.changed.notify_all();
    }

    /// The timer thread: completes what falls due, until closing; then
    /// fails what is left.
    fn run(&self) {
        let mut s = self.seen();
        loop {
            if s.closing {
                let left = std::mem::take(&mut s.pending);
                s.completed += left.len() as u64;
                drop(s);
                for (_, job) in left {
                    match job {
                        Job::Read(_, _, done) => done(Err(io::Error::other("closed"))),
                        Job::Write(_, _, done) | Job::Flush(done) => {
                            done(Err(io::Error::other("closed")))
                        }
                    }
                }
                return;
            }
            let now = Instant::now();
            let next = s
                .pending
                .iter()
                .enumerate()
                .min_by_key(|(_, (due, _))| *due)
                .map(|(i, (due, _))| (i, *due));
            match next {
                None => s = self.changed.wait(s).unwrap(),
                Some((_, due)) if due > now => {
                    s = self.changed.wait_timeout(s, due - now).unwrap().0;
                }
                Some((i, _)) => {
                    let (_, job) = s.pending.swap_remove(i);
                    s.in_flight -= 1;
                    s.completed += 1;
                    if let Job::Write(offset, data, _) = &job {
                        let range = (*offset, offset + data.len() as u64);
                        if let Some(w) = s.writes.iter().position(|&r| r == range) {
                            s.writes.swap_remove(w);
                        }
                    }
                    drop(s);
                    self.complete(job);
                    s = self.seen();
                }
            }
        }
    }

    fn complete(&self, job: Job) {
        match job {
            Job::Read(offset, len, done) => {
                let mut buf = vec![0; len];
                let r = self.mem.read_at(offset, &mut buf);
                done(r.map(|()| &buf[..]));
            }
            Job::Write(offset, data, done) => done(self.mem.write_at(offset, &data)),
            Job::Flush(done) => {
                self.flushes.fetch_add(1, Ordering::SeqCst);
                done(self.mem.flush());
            }
        }
    }
}

/// An in-memory backend with a slow asynchronous side.
struct SlowBackend(Arc<Slow>);

impl SlowBackend {
    fn new(capacity: usize, latency: Duration, jitter: Duration, depth: usize) -> Arc<Self> {
        Arc::new(Self(Arc::new(Slow {
            mem: MemBackend::new(capacity, 512),
            seen: Mutex::default(),
            changed: Condvar::new(),
            latency,
            jitter,
            depth,
            flushes: AtomicU64::new(0),
        })))
    }
}

impl BlockBackend for SlowBackend {
    fn capacity(&self) -> u64 {
        self.0.mem.capacity()
    }
    fn block_size(&self) -> u32 {
        self.0.mem.block_size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.mem.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.mem.write_at(offset, data)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.mem.flush()
    }
    fn queue(&self) -> io::Result<Option<Box<dyn BlockQueue>>> {
        let slow = self.0.clone();
        slow.seen().closing = false;
        let thread = std::thread::spawn(move || slow.run());
        Ok(Some(Box::new(SlowQueue(self.0.clone(), Some(thread)))))
    }
}

struct SlowQueue(Arc<Slow>, Option<JoinHandle<()>>);

impl BlockQueue for SlowQueue {
    fn depth(&self) -> usize {
        self.0.depth
    }
    fn start_read(&self, offset: u64, len: usize, done: ReadDone) {
        self.0.start(Job::Read(offset, len, done));
    }
    fn start_write(&self, offset: u64, data: &[u8], done: Done) {
        self.0.start(Job::Write(offset, data.to_vec(), done));
    }
    fn start_flush(&self, done: Done) {
        self.0.start(Job::Flush(done));
    }
}

impl Drop for SlowQueue {
    fn drop(&mut self) {
        self.0.seen().closing = true;
        self.0.changed.notify_all();
        if let Some(t) = self.1.take() {
            t.join().unwrap();
        }
    }
}

/// `n` threads read 4 KiB each at once; returns how long it took.
fn concurrent_reads(file: &std::path::Path, n: usize) -> Duration {
    let barrier = Arc::new(Barrier::new(n + 1));
    let readers: Vec<_> = (0..n)
        .map(|i| {
            let (file, barrier) = (file.to_owned(), barrier.clone());
            std::thread::spawn(move || {
                let f = OpenOptions::new().read(true).open(file).unwrap();
                let mut buf = vec![0; 4096];
                barrier.wait();
                f.read_exact_at(&mut buf, i as u64 * 4096).unwrap();
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    for r in readers {
        r.join().unwrap();
    }
    t0.elapsed()
}

/// The old design served a request per FUSE thread (4), so 32 reads of a
/// backend that takes 100 ms each took 800 ms; now they are all in flight
/// at once.
#[test]
fn concurrent_reads_are_in_flight_together() {
    if !fuse_usable() {
        return;
    }
    const READERS: usize = 32;
    let latency = Duration::from_millis(100);
    let dir = TempDir::new("inflight");
    let backend = SlowBackend::new(1 << 20, latency, Duration::ZERO, 128);
    let m = mount(backend.clone(), &dir.0, "disk").unwrap();
    let took = concurrent_reads(&m.path(), READERS);
    let max = backend.0.seen().max_in_flight;
    assert!(max > 4, "at most {max} requests were in flight");
    assert!(
        took < latency * (READERS as u32 / 4) / 2,
        "{READERS} reads of {latency:?} each took {took:?} ({max} in flight at most)"
    );
    m.unmount().unwrap();
    let s = backend.0.seen();
    assert_eq!(s.started, s.completed);
}

/// However many the kernel sends, no more than the queue's depth are in
/// flight, and every one completes.
#[test]
fn requests_in_flight_are_bounded_by_the_queue_depth() {
    if !fuse_usable() {
        return;
    }
    let dir = TempDir::new("depth");
    let backend = SlowBackend::new(1 << 20, Duration::from_millis(20), Duration::ZERO, 3);
    let m = mount(backend.clone(), &dir.0, "disk").unwrap();
    concurrent_reads(&m.path(), 24);
    assert_eq!(backend.0.seen().max_in_flight, 3);
    m.unmount().unwrap();
}

/// Threads write and read their own stripes of the file (3000 bytes each,
/// so neighbours share blocks: writes mix aligned ones, on the queue, and
/// read-modify-writes) while requests complete out of order; every thread
/// reads back what it wrote, no two overlapping writes are ever in flight,
/// and nothing is lost.
#[test]
fn queued_io_matches_a_model() {
    if !fuse_usable() {
        return;
    }
    const THREADS: u64 = 6;
    const STRIPE: u64 = 3000;
    const CAP: u64 = 256 << 10;
    let dir = TempDir::new("model");
    let backend = SlowBackend::new(
        CAP as usize,
        Duration::from_micros(200),
        Duration::from_millis(2),
        128,
    );
    let m = mount(backend.clone(), &dir.0, "disk").unwrap();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let file = m.path();
            std::thread::spawn(move || {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(file)
                    .unwrap();
                let mut rng = Rng(t);
                let mut model = vec![0u8; CAP as usize];
                let stripes: Vec<u64> = (0..CAP / STRIPE).filter(|s| s % THREADS == t).collect();
                for _ in 0..300 {
                    let s = stripes[rng.below(stripes.len() as u64) as usize] * STRIPE;
                    let at = s + rng.below(STRIPE);
                    let len = 1 + rng.below(s + STRIPE - at) as usize;
                    if rng.below(2) == 0 {
                        let mut data = vec![0; len];
                        rng.fill(&mut data);
                        f.write_all_at(&data, at).unwrap();
                        model[at as usize..at as usize + len].copy_from_slice(&data);
                    } else {
                        let mut got = vec![0; len];
                        f.read_exact_at(&mut got, at).unwrap();
                        assert!(got == model[at as usize..at as usize + len], "{at}+{len}");
                    }
                }
                f.sync_all().unwrap();
                (stripes, model)
            })
        })
        .collect();
    let mut expected = vec![0u8; CAP as usize];
    for w in workers {
        let (stripes, model) = w.join().unwrap();
        for s in stripes {
            let r = (s * STRIPE) as usize..((s + 1) * STRIPE) as usize;
            expected[r.clone()].copy_from_slice(&model[r]);
        }
    }
    m.unmount().unwrap();
    assert!(backend.0.mem.snapshot() == expected, "lost or stray writes");
    let s = backend.0.seen();
    assert_eq!(s.overlaps, 0, "overlapping writes were in flight");
    assert!(s.max_in_flight > 1, "nothing ran in parallel");
    assert!(backend.0.flushes.load(Ordering::SeqCst) >= THREADS);
}

/// A partial write of a block waits until a queued write of that block
/// has completed, then patches what it wrote.
#[test]
fn partial_write_waits_for_a_queued_write_of_its_block() {
    if !fuse_usable() {
        return;
    }
    let dir = TempDir::new("rmw");
    let backend = SlowBackend::new(1 << 16, Duration::from_millis(100), Duration::ZERO, 128);
    let m = mount(backend.clone(), &dir.0, "disk").unwrap();
    let f = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path())
            .unwrap(),
    );
    let whole = {
        let f = f.clone();
        std::thread::spawn(move || f.write_all_at(&[0xaa; 8192], 0).unwrap())
    };
    while backend.0.seen().in_flight == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    f.write_all_at(&[0x55; 10], 5000).unwrap();
    whole.join().unwrap();
    let mut expected = vec![0xaa; 8192];
    expected[5000..5010].fill(0x55);
    assert!(backend.0.mem.snapshot()[..8192] == expected[..]);
    drop(f);
    m.unmount().unwrap();
}

/// A session that ends while a request is stuck in the backend (a forced
/// unmount aborts the connection) fails it: its reader gets an error, the
/// unmount does not wait for the backend, and the queue, dropped, has
/// called every completion.
#[test]
fn an_ended_session_fails_what_is_pending() {
    if !fuse_usable() {
        return;
    }
    let dir = TempDir::new("abort");
    let backend = SlowBackend::new(1 << 16, Duration::from_secs(3600), Duration::ZERO, 128);
    let m = mount(backend.clone(), &dir.0, "disk").unwrap();
    let minor = {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(m.path()).unwrap().dev();
        libc::minor(dev)
    };
    let reader = {
        let file = m.path();
        std::thread::spawn(move || {
            let f = OpenOptions::new().read(true).open(file).unwrap();
            f.read_exact_at(&mut [0; 512], 0)
        })
    };
    while backend.0.seen().in_flight == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let t0 = Instant::now();
    // Busy (the reader has the file open): this only aborts the connection.
    let out = std::process::Command::new("umount")
        .arg("-f")
        .arg(m.mount_point())
        .output()
        .unwrap();
    eprintln!("umount -f: {out:?}");
    while !reader.is_finished() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !reader.is_finished() {
        // Unstick the reader, which would otherwise hang this process.
        let conn = format!("/sys/fs/fuse/connections/{}/abort", minor);
        let _ = std::fs::write(&conn, "1");
        panic!("the forced unmount did not end the session ({conn})");
    }
    assert!(reader.join().unwrap().is_err());
    m.unmount().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    let s = backend.0.seen();
    // The read, and flushes (closes) that completed at once.
    assert!(s.started >= 1 && s.pending.is_empty());
    assert_eq!(s.started, s.completed);
    assert!(s.closing);
}
