//! moat's checkpoint file: a frozen picoprocess as the ABI sees it, so
//! that it can be rebuilt on either host (`moat checkpoint`, `moat
//! restore`).
//!
//! What is carried is what the picoprocess holds at the ABI, nothing of
//! the host that served it: its memory regions (with their bytes and
//! protections, at the addresses of the guest window both hosts share,
//! `moat_pal::layout`), its handles by what they are (a file by URI and
//! access, an event by its state, a semaphore by its count, a thread by
//! its state), and its threads by their user register state at an
//! instruction boundary of guest code (a thread that was inside a
//! blocking call is carried as about to make that call again, see
//! [`Restart`]). A checkpoint carries no authority: the restoring host
//! opens every file again under the grants it is given.
//!
//! # The file
//!
//! ```text
//! 0      header (64 bytes, little-endian):
//!          magic "MOATCKPT", version u32, flags u32 (0),
//!          meta offset u64 (64), meta length u64,
//!          data offset u64 (page-aligned), data length u64,
//!          CRC-32 of the meta u32, CRC-32 of the data u32, 8 zero bytes
//! 64     meta: a [`Checkpoint`], postcard
//! data   the regions' bytes, each at a page-aligned offset; pages of
//!        zeros may be holes
//! ```
//!
//! Reading treats the file as hostile input: [`parse_header`] and
//! [`decode_meta`] check every field against the bounds below before
//! anything is used, and [`Checkpoint::check`] checks the whole (regions
//! inside the window and apart, data inside the file, handles unique,
//! threads consistent). The data's checksum is checked by whoever maps
//! it ([`data_crc`]), before any byte of it reaches a guest.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"MOATCKPT";
/// The version this code writes and reads.
pub const VERSION: u32 = 1;
/// The header's size.
pub const HEADER: usize = 64;
/// Pages: region starts, lengths and data offsets are multiples.
pub const PAGE: u64 = 4096;

/// The most abort-event registrations (as the hosts allow).
pub const MAX_ABORT_EVENTS: usize = 64;
/// The largest meta section (decoding may take several times this in
/// memory, so it is kept small: a meta of the largest counts fits).
pub const MAX_META: u64 = 4 << 20;
/// The most regions, handles and threads a checkpoint may hold.
pub const MAX_REGIONS: usize = 1 << 16;
pub const MAX_HANDLES: usize = 1 << 16;
pub const MAX_THREADS: usize = 4096;
/// The most arguments, and the longest argument or URI.
pub const MAX_ARGS: usize = 1024;
pub const MAX_STRING: usize = 4096;
/// The saved vector state (the XSAVE image, standard form): at least the
/// legacy area, at most a page.
pub const MIN_FPU: usize = 512;
pub const MAX_FPU: usize = 4096;
/// The highest guest address a region may reach (kvm's largest guest RAM;
/// linux's window for the same limits is the same).
pub const MAX_GUEST_END: u64 = 3 << 30;

/// A frozen picoprocess.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Its arguments, the image name first (for reports and `/proc`-like
    /// names; the image itself is in the regions).
    pub args: Vec<String>,
    /// The limits it ran with: a restore must give at least these.
    pub memory_mib: u64,
    pub threads_limit: u64,
    pub handles_limit: u64,
    /// The start-up block's address (in a region): the restoring host
    /// writes its own PAL table's address and host kind there.
    pub startup: u64,
    pub regions: Vec<Region>,
    pub handles: Vec<Handle>,
    pub threads: Vec<Thread>,
    /// Events registered with DkAbortEventRegister, in order (handles).
    pub abort_events: Vec<u64>,
}

/// What a region is (as `moat_pal::memory::RegionKind`, the kinds that
/// can be carried).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegionKind {
    Image,
    Alloc,
    Stack,
    /// The host's page of the start-up block and arguments.
    Host,
}

/// A range of guest memory and where its bytes are in the data section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub start: u64,
    pub len: u64,
    /// `moat_pal::prot` bits.
    pub prot: u32,
    pub kind: RegionKind,
    /// Offset of its bytes in the data section (`len` bytes).
    pub data: u64,
}

/// A live handle: its number (the guest holds it), its references
/// (DkObjectReference), and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    pub handle: u64,
    pub refs: u32,
    pub held: Held,
}

/// What a handle is, enough to make it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Held {
    /// A `file:` stream or directory, opened again by URI (never created:
    /// a file that vanished fails the restore), checked against the size
    /// and modification time it had.
    File {
        uri: String,
        access: u32,
        options: u32,
        directory: bool,
        size: u64,
        mtime_ns: i64,
    },
    /// `stdin:`, `stdout:`, `stderr:` or `null:`: the restoring run's.
    Console {
        uri: String,
        access: u32,
    },
    NotificationEvent {
        set: bool,
    },
    SynchronizationEvent {
        set: bool,
    },
    Semaphore {
        count: u32,
        max: u32,
    },
    /// A thread's handle: the index of the thread in
    /// [`Checkpoint::threads`], or `None` once it has ended.
    Thread {
        thread: Option<u32>,
    },
}

/// A thread, stopped at an instruction boundary of guest code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thread {
    /// Its DkThreadGetParameter value.
    pub param: u64,
    pub regs: Regs,
    /// Its vector and floating-point state: an XSAVE image in standard
    /// form, legacy area first ([`MIN_FPU`] to [`MAX_FPU`] bytes).
    pub fpu: Vec<u8>,
    /// It was inside a blocking call: on restore it makes the call again.
    pub restart: Option<Restart>,
}

/// A blocking call to make again on restore. `regs` hold the thread as it
/// returns from the call (`rip` the return address, `rsp` above it); the
/// restoring host pushes the return address back, loads the arguments and
/// enters its own entry of call `nr`, so the thread makes the same call
/// (with the time left, for the calls that take a timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    pub nr: u32,
    /// The six register arguments (a seventh stays on the guest stack).
    pub args: [u64; 6],
}

/// User register state, in this order: rax rbx rcx rdx rsi rdi rbp rsp
/// r8..r15 rip rflags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs(pub [u64; 18]);

impl Regs {
    pub const RAX: usize = 0;
    pub const RBX: usize = 1;
    pub const RCX: usize = 2;
    pub const RDX: usize = 3;
    pub const RSI: usize = 4;
    pub const RDI: usize = 5;
    pub const RBP: usize = 6;
    pub const RSP: usize = 7;
    pub const R8: usize = 8;
    pub const R9: usize = 9;
    pub const R12: usize = 12;
    pub const R15: usize = 15;
    pub const RIP: usize = 16;
    pub const RFLAGS: usize = 17;
    /// The flags a guest may carry: CF PF AF ZF SF DF OF (and the
    /// always-one bit 1, added back on restore); never TF, IF, IOPL or
    /// anything else of the host's.
    pub const USER_FLAGS: u64 = 0x0cd5;
}

/// The header, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub meta_off: u64,
    pub meta_len: u64,
    pub data_off: u64,
    pub data_len: u64,
    pub meta_crc: u32,
    pub data_crc: u32,
}

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&self.meta_off.to_le_bytes());
        h[24..32].copy_from_slice(&self.meta_len.to_le_bytes());
        h[32..40].copy_from_slice(&self.data_off.to_le_bytes());
        h[40..48].copy_from_slice(&self.data_len.to_le_bytes());
        h[48..52].copy_from_slice(&self.meta_crc.to_le_bytes());
        h[52..56].copy_from_slice(&self.data_crc.to_le_bytes());
        h
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Check a header against the file's length: the right magic and
/// version, the meta right after the header and bounded, the data
/// page-aligned after the meta and ending at the file's end.
pub fn parse_header(b: &[u8], file_len: u64) -> Result<Header, String> {
    if b.len() < HEADER || b[0..8] != MAGIC {
        return Err("is not a moat checkpoint (no MOATCKPT header)".into());
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(format!(
            "is a version {version} checkpoint; this moat reads version {VERSION}"
        ));
    }
    if u32_at(b, 12) != 0 || b[56..64] != [0; 8] {
        return Err("has header fields this version does not know".into());
    }
    let h = Header {
        meta_off: u64_at(b, 16),
        meta_len: u64_at(b, 24),
        data_off: u64_at(b, 32),
        data_len: u64_at(b, 40),
        meta_crc: u32_at(b, 48),
        data_crc: u32_at(b, 52),
    };
    if h.meta_off != HEADER as u64 || h.meta_len == 0 || h.meta_len > MAX_META {
        return Err(format!(
            "has a meta section of {} bytes at {} (at most {MAX_META}, right after the header)",
            h.meta_len, h.meta_off
        ));
    }
    let meta_end = h.meta_off + h.meta_len;
    if !h.data_off.is_multiple_of(PAGE) || h.data_off < meta_end || h.data_off - meta_end >= PAGE {
        return Err(format!(
            "has its data at {} (the first page boundary after the meta is expected)",
            h.data_off
        ));
    }
    if h.data_off.checked_add(h.data_len) != Some(file_len) {
        return Err(format!(
            "is {file_len} bytes long, but its header says {} (truncated, or something appended)",
            h.data_off.saturating_add(h.data_len)
        ));
    }
    Ok(h)
}

/// Decode and check the meta section against its header.
pub fn decode_meta(h: &Header, meta: &[u8]) -> Result<Checkpoint, String> {
    if meta.len() as u64 != h.meta_len {
        return Err("is truncated inside its meta section".into());
    }
    if crc32fast::hash(meta) != h.meta_crc {
        return Err("is damaged (the meta section's checksum does not match)".into());
    }
    let (c, rest): (Checkpoint, &[u8]) = postcard::take_from_bytes(meta)
        .map_err(|e| format!("has a meta section that does not decode ({e})"))?;
    if !rest.is_empty() {
        return Err("has bytes after its meta section's end".into());
    }
    c.check(h.data_len)?;
    Ok(c)
}

/// The CRC-32 of data as it is streamed in pieces.
#[derive(Default)]
pub struct DataCrc(crc32fast::Hasher);

impl DataCrc {
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    pub fn finish(self) -> u32 {
        self.0.finalize()
    }
}

/// The CRC-32 of a whole data section.
pub fn data_crc(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

/// Encode `c` (checked first) for a file whose data section is
/// `data_len` bytes with checksum `data_crc`: the header and the meta,
/// padded to the data's offset.
pub fn encode_front(c: &Checkpoint, data_len: u64, data_crc: u32) -> Result<Vec<u8>, String> {
    c.check(data_len)?;
    let meta = postcard::to_allocvec(c).map_err(|e| e.to_string())?;
    if meta.len() as u64 > MAX_META {
        return Err(format!(
            "the checkpoint's description takes {} bytes (at most {MAX_META})",
            meta.len()
        ));
    }
    let meta_end = HEADER as u64 + meta.len() as u64;
    let h = Header {
        meta_off: HEADER as u64,
        meta_len: meta.len() as u64,
        data_off: meta_end.next_multiple_of(PAGE),
        data_len,
        meta_crc: crc32fast::hash(&meta),
        data_crc,
    };
    let mut out = Vec::with_capacity(h.data_off as usize);
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&meta);
    out.resize(h.data_off as usize, 0);
    Ok(out)
}

fn bad_string(s: &str) -> bool {
    s.len() > MAX_STRING || s.bytes().any(|b| b == 0)
}

impl Checkpoint {
    /// Every bound and every relation the restoring host relies on.
    pub fn check(&self, data_len: u64) -> Result<(), String> {
        use moat_pal::prot;
        if self.args.is_empty()
            || self.args.len() > MAX_ARGS
            || self.args.iter().any(|a| bad_string(a))
        {
            return Err("has arguments that are missing, too many or too long".into());
        }
        if self.memory_mib == 0
            || self.memory_mib > MAX_GUEST_END >> 20
            || self.threads_limit == 0
            || self.threads_limit > MAX_THREADS as u64
            || self.handles_limit == 0
            || self.handles_limit > MAX_HANDLES as u64
        {
            return Err("has limits out of range".into());
        }
        let (lo, hi) = moat_pal::layout::window(self.memory_mib, self.threads_limit);
        if self
            .regions
            .iter()
            .map(|r| r.len)
            .try_fold(0u64, |a, l| a.checked_add(l))
            != Some(data_len)
        {
            return Err(
                "has a data section whose length is not its regions' (a file grown or forged)"
                    .into(),
            );
        }
        if self.regions.is_empty() || self.regions.len() > MAX_REGIONS {
            return Err(format!(
                "has {} regions (1 to {MAX_REGIONS})",
                self.regions.len()
            ));
        }
        let mut sorted: Vec<&Region> = self.regions.iter().collect();
        sorted.sort_by_key(|r| r.start);
        let mut prev_end = lo;
        let mut total: u64 = 0;
        let mut data: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
        for r in &sorted {
            let end = r.start.checked_add(r.len);
            let ok = r.len > 0
                && r.start.is_multiple_of(PAGE)
                && r.len.is_multiple_of(PAGE)
                && r.data.is_multiple_of(PAGE)
                && end.is_some_and(|e| e <= hi)
                && r.start >= prev_end
                && r.prot & !(prot::READ | prot::WRITE | prot::EXEC) == 0
                && !(r.prot & prot::WRITE != 0 && r.prot & prot::EXEC != 0)
                && r.data.checked_add(r.len).is_some_and(|e| e <= data_len);
            if !ok {
                return Err(format!(
                    "has a region at {:#x} (+{:#x}) that overlaps another, lies outside the guest window {lo:#x}..{hi:#x}, is not whole pages, is writable and executable, or has its bytes outside the file",
                    r.start, r.len
                ));
            }
            prev_end = r.start + r.len;
            total += r.len;
            data.push((r.data, r.len));
        }
        if total > self.memory_mib << 20 {
            return Err(format!(
                "has {total} bytes of regions, more than its memory limit of {} MiB",
                self.memory_mib
            ));
        }
        data.sort_unstable();
        if data.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err("has regions that share bytes of the file".into());
        }
        if !sorted.iter().any(|r| {
            r.kind == RegionKind::Host
                && self.startup >= r.start
                && self
                    .startup
                    .checked_add(4096)
                    .is_some_and(|e| e <= r.start + r.len)
        }) {
            return Err("has no start-up block".into());
        }
        if self.threads.is_empty() || self.threads.len() as u64 > self.threads_limit {
            return Err(format!(
                "has {} threads (1 to its limit of {})",
                self.threads.len(),
                self.threads_limit
            ));
        }
        for (i, t) in self.threads.iter().enumerate() {
            if t.fpu.len() < MIN_FPU || t.fpu.len() > MAX_FPU {
                return Err(format!(
                    "thread {i} has a vector state of {} bytes",
                    t.fpu.len()
                ));
            }
            if let Some(r) = t.restart {
                if r.nr == 0 || r.nr > moat_pal::NUM_CALLS {
                    return Err(format!("thread {i} restarts call {} (no such call)", r.nr));
                }
            }
            let rip = t.regs.0[Regs::RIP];
            // The region at or below rip (sorted, apart).
            let k = sorted.partition_point(|r| r.start <= rip);
            let inside = k > 0 && {
                let r = sorted[k - 1];
                r.prot & prot::EXEC != 0 && rip < r.start + r.len
            };
            if !inside {
                return Err(format!(
                    "thread {i} stopped at {rip:#x}, outside executable guest memory"
                ));
            }
        }
        if self.handles.len() > MAX_HANDLES || self.handles.len() as u64 > self.handles_limit {
            return Err(format!(
                "has {} handles (more than its limit)",
                self.handles.len()
            ));
        }
        let mut seen: Vec<u64> = self.handles.iter().map(|h| h.handle).collect();
        seen.sort_unstable();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return Err("names a handle twice".into());
        }
        let mut thread_owner = vec![false; self.threads.len()];
        for h in &self.handles {
            let slot = h.handle & 0xffff_ffff;
            if slot == 0 || slot > MAX_HANDLES as u64 || h.handle >> 32 == 0 || h.refs == 0 {
                return Err(format!("has a handle {:#x} that no host gives", h.handle));
            }
            let ok = match &h.held {
                Held::File { uri, .. } => uri.starts_with("file:") && !bad_string(uri),
                Held::Console { uri, .. } => {
                    ["stdin:", "stdout:", "stderr:", "null:"].contains(&uri.as_str())
                }
                Held::Semaphore { count, max } => *max > 0 && count <= max,
                Held::Thread { thread: Some(t) } => match thread_owner.get_mut(*t as usize) {
                    Some(o) if !*o && *t != 0 => {
                        *o = true;
                        true
                    }
                    _ => false,
                },
                _ => true,
            };
            if !ok {
                return Err(format!(
                    "has a handle {:#x} that is not well formed",
                    h.handle
                ));
            }
        }
        if self.abort_events.len() > MAX_ABORT_EVENTS
            || self.abort_events.iter().any(|a| {
                !self.handles.iter().any(|h| {
                    h.handle == *a
                        && matches!(
                            h.held,
                            Held::NotificationEvent { .. } | Held::SynchronizationEvent { .. }
                        )
                })
            })
        {
            return Err("registers an abort event it does not hold".into());
        }
        Ok(())
    }

    /// The handle table's most slots the checkpoint needs (for the
    /// restoring host's table).
    pub fn max_slot(&self) -> u64 {
        self.handles
            .iter()
            .map(|h| h.handle & 0xffff_ffff)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests;
