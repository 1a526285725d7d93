//! The binary trace file (`moat run --trace=FILE`), decoded by `moat
//! trace FILE`: a 24-byte header (`MOATTRC1`, version 1, the block size
//! 256), then one 256-byte block per item, little-endian u64 words. Word
//! 0 of a block is its kind (low 32 bits: 1 a record, 2 records dropped,
//! 3 a record lost) and the picoprocess's pid (high 32 bits); a record's
//! block holds the ring slot's words 1..32 as read, a dropped block the
//! count in word 1, a lost block the reason's index in word 1.
//!
//! Reading treats the file as hostile input: a wrong header is refused
//! with what it is, a short last block ends the trace with a note, and
//! each record is checked as the ring's consumer checks one.
use moat_layers::ring::{Item, Record, RECORD_WORDS};
use std::io::{BufWriter, Read, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"MOATTRC1";
const VERSION: u64 = 1;
const BLOCK: usize = RECORD_WORDS * 8;

const K_RECORD: u64 = 1;
const K_DROPPED: u64 = 2;
const K_LOST: u64 = 3;

/// Reasons a record is lost, by index in the file.
const LOST: [&str; 5] = [
    "a record claimed and never written",
    "a record overwritten while it was read",
    "a call number the ABI does not have",
    "more data than a record holds",
    "data of an argument the call does not have",
];

/// Appends items to a trace file.
pub struct Writer {
    out: BufWriter<std::fs::File>,
    failed: bool,
}

impl Writer {
    /// Create (or truncate) `path` and write the header.
    pub fn create(path: &Path) -> std::io::Result<Writer> {
        let f = std::fs::File::create(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&(BLOCK as u64).to_le_bytes())?;
        Ok(Writer { out, failed: false })
    }

    /// Append one item of picoprocess `pid`. A write error stops the file
    /// (reported once by [`Writer::flush`]), never the picoprocess.
    pub fn item(&mut self, pid: u32, it: &Item) {
        let mut w = [0u64; RECORD_WORDS];
        let kind = match it {
            Item::Record(r) => {
                w = r.to_words();
                K_RECORD
            }
            Item::Dropped(n) => {
                w[1] = *n;
                K_DROPPED
            }
            Item::Lost(why) => {
                w[1] = LOST.iter().position(|l| l == why).unwrap_or(0) as u64;
                K_LOST
            }
        };
        self.block(kind, pid, &w);
    }

    /// Append a ring slot's words as read (checked when the file is read).
    pub fn slot(&mut self, pid: u32, words: &[u64; RECORD_WORDS]) {
        self.block(K_RECORD, pid, words);
    }

    /// One block: `kind` and `pid` in word 0, then words 1.. of `w`.
    fn block(&mut self, kind: u64, pid: u32, w: &[u64; RECORD_WORDS]) {
        if self.failed {
            return;
        }
        let mut b = [0u8; BLOCK];
        b[..8].copy_from_slice(&(kind | (pid as u64) << 32).to_le_bytes());
        for (i, x) in w.iter().enumerate().skip(1) {
            b[i * 8..i * 8 + 8].copy_from_slice(&x.to_le_bytes());
        }
        if self.out.write_all(&b).is_err() {
            self.failed = true;
        }
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.failed {
            return Err(std::io::Error::other("a write to the trace file failed"));
        }
        self.out.flush()
    }
}

/// Read a trace file: each item with its picoprocess's pid, in order.
/// Errors say what is wrong with the file.
pub fn read(path: &Path) -> Result<Vec<(u32, Item)>, String> {
    let shown = path.display();
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot open the trace `{shown}`: {e}"))?;
    let mut head = [0u8; 24];
    f.read_exact(&mut head)
        .map_err(|_| format!("`{shown}` is not a moat trace (shorter than its header)"))?;
    if &head[..8] != MAGIC {
        return Err(format!(
            "`{shown}` is not a moat trace (it does not start with MOATTRC1; make one with `moat run --trace=FILE`)"
        ));
    }
    let ver = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    let block = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
    if ver != VERSION || block != BLOCK as u64 {
        return Err(format!(
            "`{shown}` is a moat trace of version {ver} with {block}-byte blocks; this moat reads version {VERSION} with {BLOCK}-byte blocks"
        ));
    }
    let mut items = Vec::new();
    let mut b = [0u8; BLOCK];
    loop {
        let mut got = 0;
        while got < BLOCK {
            match f.read(&mut b[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Err(format!("cannot read `{shown}`: {e}")),
            }
        }
        if got == 0 {
            break;
        }
        if got < BLOCK {
            items.push((0, Item::Lost("the file ends inside a block")));
            break;
        }
        let mut w = [0u64; RECORD_WORDS];
        for (i, x) in w.iter_mut().enumerate() {
            *x = u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        }
        let pid = (w[0] >> 32) as u32;
        let item = match w[0] & 0xffff_ffff {
            K_RECORD => match Record::from_words(&w) {
                Ok(r) => Item::Record(r),
                Err(why) => Item::Lost(why),
            },
            K_DROPPED => Item::Dropped(w[1]),
            K_LOST => Item::Lost(LOST.get(w[1] as usize).copied().unwrap_or(LOST[0])),
            _ => Item::Lost("a block of a kind this moat does not know"),
        };
        items.push((pid, item));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_file_reads_back_and_a_bad_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        let mut w = Writer::create(&p).unwrap();
        let r = Record {
            nr: 1,
            flags: moat_layers::ring::F_RETURNED,
            data: b"abc".to_vec(),
            ..Default::default()
        };
        w.item(7, &Item::Record(r.clone()));
        w.item(7, &Item::Dropped(3));
        w.item(8, &Item::Lost(LOST[0]));
        w.flush().unwrap();
        drop(w);
        assert_eq!(
            read(&p).unwrap(),
            vec![
                (7, Item::Record(r)),
                (7, Item::Dropped(3)),
                (8, Item::Lost(LOST[0]))
            ]
        );
        // Cut inside the last block.
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let items = read(&p).unwrap();
        assert_eq!(
            items.last().unwrap().1,
            Item::Lost("the file ends inside a block")
        );
        std::fs::write(&p, b"not a trace at all, really").unwrap();
        assert!(read(&p).unwrap_err().contains("not a moat trace"));
    }
}
