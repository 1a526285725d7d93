//! Trace records as strace-like lines:
//!
//! ```text
//! +0.000412 t1 DkStreamOpen("file:/tmp/x", access=READ|WRITE, create=OPEN_ALWAYS, options=0) = 0, stream=0x100000004 <3.1us>
//! +0.000431 t1 DkStreamWrite(stream=0x100000004<"file:/tmp/x">, offset=0, "hello\n") = 6 <1.2us>
//! +0.000440 t1 DkStreamOpen("file:/etc", access=READ, create=OPEN_EXISTING, options=0) = -5 PermissionDenied <20.4us>
//! ... 12 records dropped here (the reader fell behind; --trace=lossless waits instead)
//! ```
//!
//! Byte strings (URIs, what was written or read) are quoted with escapes,
//! `...` when cut at the record's bound; flags and access modes by name;
//! handles with what they were opened as (the decoder follows opens,
//! creations and closes); errors by name; the call's duration. Pointers
//! the record does not follow stay addresses; a length that describes a
//! string shown is left out.
use moat_layers::ring::{self, Item, Record};
use moat_pal::layer::{arg, ARGS, ARG_NAMES};
use moat_pal::{access, create, nr, open_option, prot, CALL_NAMES};
use std::collections::HashMap;
use std::fmt::Write;

/// Decoding state: what each handle was opened as.
#[derive(Default)]
pub struct Decoder {
    labels: HashMap<u64, String>,
}

fn flags(v: u64, names: &[(u32, &str)], zero: &str) -> String {
    if v == 0 {
        return zero.into();
    }
    let mut out = Vec::new();
    let mut rest = v;
    for &(bit, n) in names {
        if v & bit as u64 != 0 {
            out.push(n.to_string());
            rest &= !(bit as u64);
        }
    }
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    out.join("|")
}

/// Bytes as a quoted string with escapes.
pub fn quote(b: &[u8], cut: bool) -> String {
    let mut s = String::with_capacity(b.len() + 2);
    s.push('"');
    for &c in b {
        match c {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(c as char),
            _ => {
                let _ = write!(s, "\\x{c:02x}");
            }
        }
    }
    s.push('"');
    if cut {
        s.push_str("...");
    }
    s
}

fn result(r: i64, n: u16) -> String {
    if r < 0 {
        let name = moat_pal::Error::from_code(r).map_or("unknown error", |e| e.name());
        return format!("{r} {name}");
    }
    if n as u32 == nr::DK_VIRTUAL_MEMORY_ALLOC || n as u32 == nr::DK_STREAM_MAP || r > 0xffff {
        format!("{r:#x}")
    } else {
        r.to_string()
    }
}

impl Decoder {
    /// One item as a line (without the picoprocess prefix).
    pub fn item(&mut self, it: &Item) -> String {
        match it {
            Item::Record(r) => self.record(r),
            Item::Dropped(n) => format!(
                "... {n} record{} dropped here (the reader fell behind; --trace=lossless waits instead)",
                if *n == 1 { "" } else { "s" }
            ),
            Item::Lost(why) => format!("... a record was lost here: {why}"),
        }
    }

    fn handle(&self, h: u64) -> String {
        match self.labels.get(&h) {
            Some(l) => format!("{h:#x}<{l}>"),
            None => format!("{h:#x}"),
        }
    }

    /// A record as a line.
    pub fn record(&mut self, r: &Record) -> String {
        let i = r.nr as usize - 1;
        let name = CALL_NAMES[i];
        let names = ARG_NAMES[i];
        let layout = ARGS[i];
        let has_data = !r.data.is_empty();
        // Length arguments of the string shown are left out.
        let hidden_len = if has_data {
            Some((layout[r.data_arg as usize] >> 4) as usize)
        } else {
            None
        };
        let mut parts = Vec::new();
        let mut outs = Vec::new();
        for (k, &an) in names.iter().enumerate() {
            let v = r.args[k];
            let kind = layout[k] & 0xf;
            if Some(k) == hidden_len {
                continue;
            }
            let text = match kind {
                arg::BYTES_IN | arg::BYTES_OUT if has_data && r.data_arg as usize == k => {
                    quote(&r.data, r.flags & ring::F_TRUNCATED != 0)
                }
                arg::HANDLE => format!("{an}={}", self.handle(v)),
                arg::HANDLE_OUT | arg::VALUE_OUT => {
                    if r.flags & ring::F_OUT != 0 {
                        outs.push(if kind == arg::HANDLE_OUT {
                            format!("{an}={:#x}", r.out)
                        } else {
                            format!("{an}={}", r.out as i64)
                        });
                    }
                    continue;
                }
                arg::INT => match an {
                    "prot" => format!(
                        "prot={}",
                        flags(
                            v,
                            &[
                                (prot::READ, "READ"),
                                (prot::WRITE, "WRITE"),
                                (prot::EXEC, "EXEC")
                            ],
                            "NONE"
                        )
                    ),
                    "access" => format!(
                        "access={}",
                        flags(
                            v,
                            &[
                                (access::READ, "READ"),
                                (access::WRITE, "WRITE"),
                                (access::APPEND, "APPEND")
                            ],
                            "0"
                        )
                    ),
                    "create" => format!(
                        "create={}",
                        match v as u32 {
                            create::OPEN_EXISTING => "OPEN_EXISTING".to_string(),
                            create::CREATE_ALWAYS => "CREATE_ALWAYS".to_string(),
                            create::CREATE_NEW => "CREATE_NEW".to_string(),
                            create::OPEN_ALWAYS => "OPEN_ALWAYS".to_string(),
                            x => x.to_string(),
                        }
                    ),
                    "options" => format!(
                        "options={}",
                        flags(
                            v,
                            &[
                                (open_option::DIRECTORY, "DIRECTORY"),
                                (open_option::NONBLOCK, "NONBLOCK")
                            ],
                            "0"
                        )
                    ),
                    "addr" | "entry" => format!("{an}={v:#x}"),
                    _ => format!("{an}={}", v as i64),
                },
                _ => format!("{an}={v:#x}"),
            };
            parts.push(text);
        }
        let mut line = format!("+{:.6} t{} ", r.ts_ns as f64 / 1e9, r.tid);
        if r.layer > 0 {
            let _ = write!(line, "[trace {}] ", r.layer);
        }
        let _ = write!(line, "{name}({})", parts.join(", "));
        if r.flags & ring::F_RETURNED != 0 {
            let _ = write!(line, " = {}", result(r.result, r.nr));
            for o in &outs {
                let _ = write!(line, ", {o}");
            }
            let us = r.dur_ns as f64 / 1000.0;
            let _ = write!(line, " <{us:.1}us>");
        } else if r.flags & ring::F_HOST_SERVED != 0 {
            line.push_str(" (served by the vCPU)");
        }
        self.follow(r);
        line
    }

    /// Learn what a new handle is, forget a closed one.
    fn follow(&mut self, r: &Record) {
        let n = r.nr as u32;
        let ok = r.flags & ring::F_RETURNED != 0 && r.result >= 0;
        if n == nr::DK_OBJECT_CLOSE && ok {
            self.labels.remove(&r.args[0]);
            return;
        }
        if !ok || r.flags & ring::F_OUT == 0 {
            return;
        }
        let what = match n {
            // Guest bytes: quoted and escaped like every string shown.
            nr::DK_STREAM_OPEN => quote(&r.data, r.flags & ring::F_TRUNCATED != 0),
            nr::DK_PROCESS_CREATE => format!(
                "process {}",
                quote(&r.data, r.flags & ring::F_TRUNCATED != 0)
            ),
            nr::DK_NOTIFICATION_EVENT_CREATE | nr::DK_SYNCHRONIZATION_EVENT_CREATE => {
                "event".into()
            }
            nr::DK_SEMAPHORE_CREATE => "semaphore".into(),
            nr::DK_THREAD_CREATE => "thread".into(),
            nr::DK_STREAM_GET_EVENT => match self.labels.get(&r.args[0]) {
                Some(l) => format!("event of {l}"),
                None => "event".into(),
            },
            _ => return,
        };
        if self.labels.len() < 65536 {
            self.labels.insert(r.out, what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_writes_and_errors_read_like_strace() {
        let mut d = Decoder::default();
        let uri = b"file:/tmp/x".to_vec();
        let open = Record {
            ts_ns: 412_000,
            tid: 1,
            nr: nr::DK_STREAM_OPEN as u16,
            flags: ring::F_RETURNED | ring::F_OUT,
            args: [0x1000, uri.len() as u64, 3, 3, 0, 0x2000],
            out: 0x100000004,
            data: uri,
            dur_ns: 3100,
            ..Default::default()
        };
        assert_eq!(
            d.record(&open),
            "+0.000412 t1 DkStreamOpen(\"file:/tmp/x\", access=READ|WRITE, create=OPEN_ALWAYS, options=0) = 0, stream=0x100000004 <3.1us>"
        );
        let write = Record {
            ts_ns: 431_000,
            tid: 1,
            nr: nr::DK_STREAM_WRITE as u16,
            flags: ring::F_RETURNED,
            args: [0x100000004, 0, 0x3000, 6, 0, 0],
            result: 6,
            data_arg: 2,
            data: b"hello\n".to_vec(),
            dur_ns: 1200,
            ..Default::default()
        };
        assert_eq!(
            d.record(&write),
            "+0.000431 t1 DkStreamWrite(stream=0x100000004<\"file:/tmp/x\">, offset=0, \"hello\\n\") = 6 <1.2us>"
        );
        let denied = Record {
            nr: nr::DK_STREAM_OPEN as u16,
            flags: ring::F_RETURNED | ring::F_TRUNCATED,
            args: [0x1000, 400, 1, 0, 0, 0x2000],
            result: moat_pal::Error::PermissionDenied.code(),
            data: b"file:/e\x01".to_vec(),
            ..Default::default()
        };
        let l = d.record(&denied);
        assert!(
            l.contains("(\"file:/e\\x01\"..., access=READ, create=OPEN_EXISTING")
                && l.contains("= -5 PermissionDenied"),
            "{l}"
        );
        assert!(d
            .item(&Item::Dropped(12))
            .starts_with("... 12 records dropped here"));
        // A guest-made label cannot break the line or reach the terminal.
        let evil = Record {
            nr: nr::DK_STREAM_OPEN as u16,
            flags: ring::F_RETURNED | ring::F_OUT,
            out: 7,
            data: b"x\n[picoprocess root] moat: \x1b[2J".to_vec(),
            ..Default::default()
        };
        d.record(&evil);
        let close = Record {
            nr: nr::DK_OBJECT_CLOSE as u16,
            flags: ring::F_RETURNED,
            args: [7, 0, 0, 0, 0, 0],
            ..Default::default()
        };
        let l = d.record(&close);
        assert!(!l.contains('\n') && !l.contains('\x1b'), "{l}");
    }
}
