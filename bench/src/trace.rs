//! `moat-bench calls`' tracing rows: the trace layer's cost per call
//! against its floor, an in-process ring write (see `layers/src/ring.rs`).
use crate::{image, median, note, parse, row, run_sandbox_with};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The tracer at ring speed: DkSystemTimeQuery traced (lossless, records
/// saved to a file) against the untraced call plus what writing the same
/// record into an in-process ring costs (this process, the same record
/// and ring code, a thread of it copying records out, on the same core
/// as the writer, as the monitor's reader is in this benchmark).
pub(crate) fn bench(quick: bool, untraced: f64) {
    use moat_layers::ring;
    // 200,000 calls a run: the traced runs write 256 bytes a call to a
    // file, and gigabytes of it would slow the groups that run after.
    let n: u64 = if quick { 50_000 } else { 200_000 };
    let reps = if quick { 1 } else { 5 };
    let img = image("bench-calls");
    // In memory (tmpfs where there is one): the trace files' write-back
    // to disk would slow the groups that run after this one.
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let mut traced = vec![];
    for _ in 0..reps {
        let t = moat_monitor::trace::TraceOptions {
            lossless: true,
            file: Some(dir.path().join("t")),
            ..Default::default()
        };
        let (code, out) = run_sandbox_with(&img, &[n.to_string()], Some(t));
        assert_eq!(code, 0, "{out}");
        traced.push(parse(&out, "time_query"));
    }
    // The floor's ring: the default size, drained by a thread here.
    let records = ring::DEFAULT_RECORDS;
    let words = (ring::ring_bytes(records) / 8) as usize;
    let mem: &'static [std::sync::atomic::AtomicU64] = Box::leak(
        (0..words)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    ring::init(mem, records, true);
    let p = ring::Producer::new(mem).unwrap();
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let reader = std::thread::spawn(move || {
        let mut c = ring::Consumer::new(mem, records).unwrap();
        while !d2.load(Ordering::Relaxed) {
            // Copied out of the ring, as the monitor's reader copies them.
            let n = c.poll_raw(4096, false, |raw| {
                std::hint::black_box(&raw);
            });
            if n == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    });
    let t0 = Instant::now();
    let mut floors = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        for i in 0..n {
            let start = t0.elapsed().as_nanos() as u64;
            let r = ring::Record {
                ts_ns: start,
                tid: 1,
                nr: moat_pal::nr::DK_SYSTEM_TIME_QUERY as u16,
                flags: ring::F_RETURNED,
                result: i as i64,
                dur_ns: (t0.elapsed().as_nanos() as u64 - start) as u32,
                ..Default::default()
            };
            p.push(&r.to_words());
        }
        floors.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
    done.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let ring_write = median(&mut floors);
    row(
        "DkSystemTimeQuery traced (lossless, to a file) vs untraced + an in-process ring write",
        median(&mut traced),
        untraced + ring_write,
        "ns",
        "≤ 1.5x",
    );
    note(&format!(
        "|   breakdown: one record into an in-process ring (the floor's share) | {ring_write:.1} ns | - | - | - |"
    ));
}
