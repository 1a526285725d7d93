//! Typing numbered lines into a serial line whose far end echoes them, and
//! judging what came back: the check shared by the mediator's serial tests
//! and `moat serve --pty`'s.
//!
//! [`type_lines`] types each line once, then reads until its echo has come
//! back whole (after a newline, ending in one). An echo lost in a driver's
//! replacement (the documented loss: bytes the driver or the UART held)
//! never comes: after `per_line` the line is typed again, and counted as
//! retyped. [`Typed::check`] then reads the whole stream back: every line
//! came back, in order; a line that is not exactly one typed line is
//! damaged, and a damaged line may only be what loss, at-least-once
//! writes and retyping can make of the typed text around it (bytes of
//! those lines, in order, each line at most three times): never a byte
//! nobody typed, never one out of order.
use std::time::{Duration, Instant};

/// Line `i`'s text, its newline included: numbered, of varied length.
pub fn line(i: usize) -> String {
    let fill: String = (0..(i * 7) % 40)
        .map(|k| (b'a' + ((i + k) % 26) as u8) as char)
        .collect();
    format!("line {i:04} {fill}\n")
}

/// What came back from typing.
#[derive(Debug, Default)]
pub struct Typed {
    /// Lines typed (the first `lines` of [`line()`]).
    pub lines: usize,
    /// Every byte read, in order.
    pub received: Vec<u8>,
    /// Lines typed again because their echo did not come.
    pub retyped: usize,
    /// Bytes typed, retyping included.
    pub bytes_typed: usize,
}

/// Types lines `0..n` one at a time with `write`, reading echoes with
/// `read` (bytes into the buffer, waiting up to the duration; 0 if none
/// came); retypes a line whose echo has not come back whole within
/// `per_line`, at most `max_tries` times in all. `between` runs after
/// each line's echo (to kill a driver, say).
pub fn type_lines(
    n: usize,
    per_line: Duration,
    max_tries: usize,
    mut write: impl FnMut(&[u8]),
    mut read: impl FnMut(&mut [u8], Duration) -> usize,
    mut between: impl FnMut(usize),
) -> Typed {
    let mut t = Typed {
        lines: n,
        ..Typed::default()
    };
    // Where the search for the next echo starts (at the newline that must
    // come before it; the stream starts as if after one).
    let mut mark = 0usize;
    let mut buf = [0u8; 512];
    for i in 0..n {
        let want = format!("\n{}", line(i));
        let mut tries = 0;
        'typing: loop {
            assert!(
                tries < max_tries,
                "line {i} did not come back after {tries} tries; received so far: {:?}",
                String::from_utf8_lossy(&t.received)
            );
            if tries > 0 {
                t.retyped += 1;
            }
            tries += 1;
            write(&want.as_bytes()[1..]);
            t.bytes_typed += want.len() - 1;
            let until = Instant::now() + per_line;
            loop {
                let mut seen = vec![b'\n'];
                seen.extend_from_slice(&t.received);
                if let Some(at) = find(&seen[mark..], want.as_bytes()) {
                    // Past the echo, less its final newline (the next
                    // echo's first).
                    mark += at + want.len() - 1;
                    break 'typing;
                }
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let got = read(&mut buf, left.min(Duration::from_millis(100)));
                t.received.extend_from_slice(&buf[..got]);
            }
        }
        between(i);
    }
    t
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `small`'s bytes appear in `big` in the same order.
fn subsequence(small: &[u8], big: &[u8]) -> bool {
    let mut it = big.iter();
    small.iter().all(|b| it.any(|c| c == b))
}

/// What [`Typed::check`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Lines that came back whole (a line typed again may come back
    /// twice).
    pub whole: usize,
    /// Lines damaged by loss or a doubled write.
    pub damaged: usize,
}

impl Typed {
    /// Checks the stream read back (see the module docs); panics saying
    /// what is wrong.
    pub fn check(&self) -> Verdict {
        let text = &self.received;
        let mut parts: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
        // What follows the last newline is not a line yet.
        parts.pop();
        let mut last: Option<usize> = None;
        let mut seen = vec![false; self.lines];
        let mut damaged = Vec::new();
        let mut whole = 0;
        for (k, p) in parts.iter().enumerate() {
            let number = std::str::from_utf8(p)
                .ok()
                .and_then(|s| s.get(5..9))
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|&i| i < self.lines && line(i).as_bytes()[..line(i).len() - 1] == **p);
            match number {
                Some(i) => {
                    assert!(
                        last.is_none_or(|l| i >= l),
                        "line {i} came back after line {} (line {k} of the stream)",
                        last.unwrap_or(0)
                    );
                    assert!(
                        last.is_none_or(|l| i <= l + 1),
                        "line {i} came back before line {}: nothing is typed before its echo",
                        last.map_or(0, |l| l + 1)
                    );
                    seen[i] = true;
                    last = Some(i);
                    whole += 1;
                }
                None => damaged.push((k, last)),
            }
        }
        for (k, before) in &damaged {
            // Bytes of the lines around it, each at most three times (a
            // doubled write, a retyped line), in order.
            let from = before.unwrap_or(0);
            let mut around = Vec::new();
            for i in from..(from + 3).min(self.lines) {
                let l = line(i);
                let l = &l.as_bytes()[..l.len() - 1];
                for _ in 0..3 {
                    around.extend_from_slice(l);
                }
            }
            assert!(
                subsequence(parts[*k], &around),
                "line {k} of the stream, {:?}, is not what loss or a doubled write makes of the lines typed around it: corrupted",
                String::from_utf8_lossy(parts[*k])
            );
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            panic!("line {i} never came back whole");
        }
        Verdict {
            whole,
            damaged: damaged.len(),
        }
    }
}
