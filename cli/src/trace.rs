//! `moat trace FILE [--filter CALLS]`: decode a binary trace saved by
//! `moat run --trace=FILE` into the lines `moat run --trace` prints.
use clap::Args;
use moat_layers::ring::Item;
use moat_monitor::trace::{decode::Decoder, file, parse_filter};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// The trace file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Only these calls: names (DkStreamOpen) and groups (memory, threads,
    /// sync, process, streams, other), comma-separated.
    #[arg(long, value_name = "CALLS")]
    pub filter: Option<String>,
}

pub fn main(a: TraceArgs) -> i32 {
    let filter = match a.filter.as_deref().map(parse_filter).transpose() {
        Ok(f) => f,
        Err(e) => return crate::bad_input(e.replacen("--trace-filter", "--filter", 1)),
    };
    let items = match file::read(&a.file) {
        Ok(i) => i,
        Err(e) => return crate::bad_input(e),
    };
    let many = items
        .iter()
        .map(|(pid, _)| *pid)
        .collect::<std::collections::HashSet<_>>()
        .len()
        > 1;
    // Each picoprocess's handles are its own.
    let mut decoders: HashMap<u32, Decoder> = HashMap::new();
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    for (pid, it) in &items {
        let dec = decoders.entry(*pid).or_default();
        let line = dec.item(it);
        let shown = match (it, filter) {
            (Item::Record(r), Some(f)) => f & (1u64 << (r.nr - 1)) != 0,
            _ => true,
        };
        if !shown {
            continue;
        }
        let r = if many {
            writeln!(out, "[{pid}] {line}")
        } else {
            writeln!(out, "{line}")
        };
        if r.is_err() {
            return 0;
        }
    }
    let _ = out.flush();
    0
}
