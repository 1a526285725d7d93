//! Sealing by seccomp, for kernels without `mseal` (before Linux 6.10).
//!
//! The same promise as [`crate::seal`] (no `mprotect`, `munmap`, `mremap`
//! or `mmap` over the PAL's code, its RELRO ranges or the PAL table, even
//! from PAL code), kept by an argument check in the seccomp program
//! instead of by the kernel's VMA flags: a memory call whose range
//! `[addr, addr + len)` overlaps a sealed range fails with `EPERM`, as
//! `mseal` makes it fail. `madvise` over a sealed range is refused too
//! (stricter than `mseal`, which refuses only the discarding kinds on
//! anonymous read-only memory; the PAL never advises its own code), and
//! `mremap` with `MREMAP_FIXED` is checked at both ends. One call is let
//! through: `mprotect(table, 4096, PROT_READ)`, with which the PAL makes
//! the table read-only once it is filled (a no-op for anyone after).
//!
//! The check compares 64-bit quantities in classic BPF's 32-bit
//! accumulator: `end = addr + len` is computed once per call into the
//! scratch words (an address or length at or above 2^63 is refused first,
//! so the sum cannot wrap), then each range is two comparisons
//! (`addr < range.end && end > range.start`). The program is built by a
//! tiny assembler with symbolic labels that refuses a conditional jump
//! longer than BPF allows, so adding a range cannot silently corrupt it.
//!
//! Tested on a kernel that has `mseal` by `MOAT_SEAL=seccomp`, which makes
//! the loader take this path (see `tests/tests/hostile_pal.rs`).
use seccompiler::sock_filter;

// Classic BPF opcodes.
const LD_ABS: u16 = 0x20; // ld [k]
const LD_MEM: u16 = 0x60; // ld M[k]
const LDX_MEM: u16 = 0x61; // ldx M[k]
const ST: u16 = 0x02; // st M[k]
const TAX: u16 = 0x07;
const ADD_X: u16 = 0x0c;
const ADD_K: u16 = 0x04;
const JA: u16 = 0x05;
const JEQ_K: u16 = 0x15;
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const JGT_X: u16 = 0x2d;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;
const RET_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;

const OFF_NR: u32 = 0;
fn arg_lo(i: u32) -> u32 {
    16 + 8 * i
}
fn arg_hi(i: u32) -> u32 {
    16 + 8 * i + 4
}

/// The scratch words holding `end`'s low and high halves.
const M_END_LO: u32 = 0;
const M_END_HI: u32 = 1;

type Label = usize;

enum Item {
    /// A plain instruction.
    Op(u16, u32),
    /// A conditional jump (`jt`/`jf` must be forward and within 255).
    Jmp(u16, u32, Label, Label),
    /// An unconditional jump (any forward distance).
    Ja(Label),
    /// A label at this position.
    At(Label),
}

#[derive(Default)]
struct Asm {
    items: Vec<Item>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels += 1;
        self.labels - 1
    }
    fn op(&mut self, code: u16, k: u32) {
        self.items.push(Item::Op(code, k));
    }
    fn jmp(&mut self, code: u16, k: u32, t: Label, f: Label) {
        self.items.push(Item::Jmp(code, k, t, f));
    }
    fn ja(&mut self, l: Label) {
        self.items.push(Item::Ja(l));
    }
    fn at(&mut self, l: Label) {
        self.items.push(Item::At(l));
    }
    /// Resolve the labels. Fails on a jump backwards, too far or to a
    /// label never placed.
    fn finish(self) -> Result<Vec<sock_filter>, String> {
        let mut pos = vec![None; self.labels];
        let mut n = 0usize;
        for it in &self.items {
            match it {
                Item::At(l) => pos[*l] = Some(n),
                _ => n += 1,
            }
        }
        let mut out = Vec::with_capacity(n);
        let dist = |from: usize, to: Label| -> Result<usize, String> {
            let t = pos[to].ok_or("seal filter: a label was never placed")?;
            t.checked_sub(from + 1)
                .ok_or_else(|| "seal filter: a backward jump".to_string())
        };
        for it in &self.items {
            let here = out.len();
            let ins = match *it {
                Item::At(_) => continue,
                Item::Op(code, k) => sock_filter {
                    code,
                    jt: 0,
                    jf: 0,
                    k,
                },
                Item::Jmp(code, k, t, f) => {
                    let (t, f) = (dist(here, t)?, dist(here, f)?);
                    let short = |d: usize| {
                        u8::try_from(d).map_err(|_| "seal filter: a jump too long".to_string())
                    };
                    sock_filter {
                        code,
                        jt: short(t)?,
                        jf: short(f)?,
                        k,
                    }
                }
                Item::Ja(l) => sock_filter {
                    code: JA,
                    jt: 0,
                    jf: 0,
                    k: u32::try_from(dist(here, l)?).map_err(|e| e.to_string())?,
                },
            };
            out.push(ins);
        }
        Ok(out)
    }

    /// `EPERM` if `[arg a, arg a + arg l)` overlaps one of `ranges`,
    /// else fall through.
    fn check_range(&mut self, a: u32, l: u32, ranges: &[(u64, u64)]) {
        let deny = self.label();
        let ok = self.label();
        let sum = self.label();
        // Addresses and lengths at or above 2^63 are no user memory; the
        // kernel refuses them anyway. Refusing them here keeps the sum
        // below from wrapping.
        let l_big = self.label();
        self.op(LD_ABS, arg_hi(a));
        self.jmp(JGE_K, 0x8000_0000, deny, l_big);
        self.at(l_big);
        self.op(LD_ABS, arg_hi(l));
        self.jmp(JGE_K, 0x8000_0000, deny, sum);
        self.at(deny);
        self.op(RET_K, RET_EPERM);
        self.at(sum);
        // end = a + l (low half, high half, carry).
        self.op(LD_ABS, arg_lo(l));
        self.op(TAX, 0);
        self.op(LD_ABS, arg_lo(a));
        self.op(ADD_X, 0);
        self.op(ST, M_END_LO);
        self.op(LD_ABS, arg_hi(l));
        self.op(TAX, 0);
        self.op(LD_ABS, arg_hi(a));
        self.op(ADD_X, 0);
        self.op(ST, M_END_HI);
        let carry = self.label();
        let ranges_start = self.label();
        self.op(LDX_MEM, M_END_LO);
        self.op(LD_ABS, arg_lo(a));
        // a.lo > end.lo: the low half wrapped.
        self.jmp(JGT_X, 0, carry, ranges_start);
        self.at(carry);
        self.op(LD_MEM, M_END_HI);
        self.op(ADD_K, 1);
        self.op(ST, M_END_HI);
        self.at(ranges_start);
        for &(s, e) in ranges {
            let (s_hi, s_lo) = ((s >> 32) as u32, s as u32);
            let (e_hi, e_lo) = ((e >> 32) as u32, e as u32);
            let next = self.label();
            let deny = self.label();
            let (a_eq, below_e, end_eq) = (self.label(), self.label(), self.label());
            // a < e ?
            self.op(LD_ABS, arg_hi(a));
            self.jmp(JGT_K, e_hi, next, a_eq);
            self.at(a_eq);
            let a_lo = self.label();
            self.jmp(JEQ_K, e_hi, a_lo, below_e);
            self.at(a_lo);
            self.op(LD_ABS, arg_lo(a));
            self.jmp(JGE_K, e_lo, next, below_e);
            // end > s ?
            self.at(below_e);
            self.op(LD_MEM, M_END_HI);
            let end_hi_eq = self.label();
            self.jmp(JGT_K, s_hi, deny, end_hi_eq);
            self.at(end_hi_eq);
            self.jmp(JEQ_K, s_hi, end_eq, next);
            self.at(end_eq);
            self.op(LD_MEM, M_END_LO);
            self.jmp(JGT_K, s_lo, deny, next);
            self.at(deny);
            self.op(RET_K, RET_EPERM);
            self.at(next);
        }
        self.ja(ok);
        self.at(ok);
    }
}

/// The sealing section of the loader's seccomp program: it sits between
/// the instruction-pointer prefix and the allow-list, refuses (`EPERM`)
/// memory calls over `ranges` (and over the PAL table's page, except the
/// one `mprotect` that makes it read-only), and lets every other call
/// fall through to the allow-list.
pub fn program(ranges: &[(u64, u64)], table_page: u64) -> Result<Vec<sock_filter>, String> {
    let mut all: Vec<(u64, u64)> = ranges.to_vec();
    all.push((table_page, table_page + 4096));
    let mut s = Asm::default();
    let (end, pair01, mprot, to_end) = (s.label(), s.label(), s.label(), s.label());
    s.op(LD_ABS, OFF_NR);
    for (nr, target) in [
        (libc::SYS_mprotect, mprot),
        (libc::SYS_munmap, pair01),
        (libc::SYS_madvise, pair01),
        (libc::SYS_mmap, pair01),
        (libc::SYS_mremap, pair01),
    ] {
        let next = s.label();
        s.jmp(JEQ_K, nr as u32, target, next);
        s.at(next);
    }
    s.at(to_end);
    s.ja(end);
    // mprotect(table, 4096, PROT_READ): the PAL's own, once the table is
    // filled; harmless from anyone after.
    s.at(mprot);
    for (off, v) in [
        (arg_lo(0), table_page as u32),
        (arg_hi(0), (table_page >> 32) as u32),
        (arg_lo(1), 4096),
        (arg_hi(1), 0),
        (arg_lo(2), libc::PROT_READ as u32),
    ] {
        let next = s.label();
        s.op(LD_ABS, off);
        s.jmp(JEQ_K, v, next, pair01);
        s.at(next);
    }
    s.ja(end);
    // (addr, len) in arguments 0 and 1: mprotect, munmap, madvise, mmap,
    // and mremap's old range.
    s.at(pair01);
    s.check_range(0, 1, &all);
    // mremap(old, old_len, new_len, flags, new): with MREMAP_FIXED the
    // new range [new, new + new_len) too.
    let (is_mremap, fixed, to_end2) = (s.label(), s.label(), s.label());
    s.op(LD_ABS, OFF_NR);
    s.jmp(JEQ_K, libc::SYS_mremap as u32, is_mremap, to_end2);
    s.at(is_mremap);
    s.op(LD_ABS, arg_lo(3));
    s.jmp(JSET_K, libc::MREMAP_FIXED as u32, fixed, to_end2);
    s.at(to_end2);
    s.ja(end);
    s.at(fixed);
    s.check_range(4, 2, &all);
    s.at(end);
    s.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run a classic BPF program over one `seccomp_data`, as the kernel
    /// would (only the instructions this module emits).
    fn eval(p: &[sock_filter], nr: i64, args: [u64; 6]) -> Option<u32> {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let word =
            |k: u32| u32::from_le_bytes(data[k as usize..k as usize + 4].try_into().unwrap());
        let (mut a, mut x, mut m) = (0u32, 0u32, [0u32; 16]);
        let mut pc = 0usize;
        while pc < p.len() {
            let i = &p[pc];
            pc += 1;
            let cond = |c: bool| if c { i.jt as usize } else { i.jf as usize };
            match i.code {
                LD_ABS => a = word(i.k),
                LD_MEM => a = m[i.k as usize],
                LDX_MEM => x = m[i.k as usize],
                ST => m[i.k as usize] = a,
                TAX => x = a,
                ADD_X => a = a.wrapping_add(x),
                ADD_K => a = a.wrapping_add(i.k),
                JA => pc += i.k as usize,
                JEQ_K => pc += cond(a == i.k),
                JGT_K => pc += cond(a > i.k),
                JGE_K => pc += cond(a >= i.k),
                JGT_X => pc += cond(a > x),
                JSET_K => pc += cond(a & i.k != 0),
                RET_K => return Some(i.k),
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
        None // fell through: on to the allow-list
    }

    const TEXT: (u64, u64) = (0x5555_5555_4000, 0x5555_5556_0000);
    const HIGH: (u64, u64) = (0x7fff_fff0_0000, 0x8000_0000_1000);
    const TABLE: u64 = 0x7f00_0000_0000;

    fn prog() -> Vec<sock_filter> {
        program(&[TEXT, HIGH], TABLE).unwrap()
    }

    fn denied(nr: i64, args: [u64; 6]) -> bool {
        match eval(&prog(), nr, args) {
            Some(RET_EPERM) => true,
            None => false,
            Some(r) => panic!("unexpected return {r:#x}"),
        }
    }

    #[test]
    fn overlap_is_refused_and_the_rest_falls_through() {
        let mp = libc::SYS_mprotect;
        let (s, e) = TEXT;
        for (addr, len, want) in [
            (s, 4096, true),
            (e - 4096, 4096, true),
            (e, 4096, false),
            (s - 4096, 4096, false),
            (s - 4096, 4097, true),
            (s - (1 << 40), (1 << 40) + 1, true),
            (0, s, false),
            (0, s + 1, true),
            (e - 1, 1, true),
            // Crossing a 4 GiB boundary at both halves.
            (HIGH.0 - 0x1000, 0x1000, false),
            (0x7fff_0000_0000, 0x1_0000_0000, true),
            (0x8000_0000_0000, 0x1000, true),
            (0x8000_0000_1000, 0x1000, false),
            // Wrapping lengths and addresses above 2^63.
            (0x1000, u64::MAX - 0x10, true),
            (0x8000_0000_0000_0000, 0x1000, true),
        ] {
            assert_eq!(
                denied(mp, [addr, len, 1, 0, 0, 0]),
                want,
                "{addr:#x}+{len:#x}"
            );
            assert_eq!(denied(libc::SYS_munmap, [addr, len, 0, 0, 0, 0]), want);
            assert_eq!(denied(libc::SYS_madvise, [addr, len, 4, 0, 0, 0]), want);
            assert_eq!(denied(libc::SYS_mmap, [addr, len, 3, 0x32, 0, 0]), want);
            assert_eq!(denied(libc::SYS_mremap, [addr, len, len, 1, 0, 0]), want);
        }
        // Other calls are not this section's business.
        assert!(!denied(libc::SYS_read, [s, 4096, 0, 0, 0, 0]));
    }

    #[test]
    fn the_table_takes_one_mprotect_only() {
        let mp = libc::SYS_mprotect;
        assert!(!denied(mp, [TABLE, 4096, 1, 0, 0, 0]));
        assert!(denied(mp, [TABLE, 4096, 3, 0, 0, 0]));
        assert!(denied(mp, [TABLE, 8192, 1, 0, 0, 0]));
        assert!(denied(libc::SYS_munmap, [TABLE, 4096, 0, 0, 0, 0]));
        assert!(denied(mp, [TABLE - 4096, 8192, 1, 0, 0, 0]));
    }

    #[test]
    fn mremap_fixed_is_checked_at_its_destination() {
        let r = libc::SYS_mremap;
        let fixed = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        let away = 0x1000_0000;
        assert!(denied(r, [away, 4096, 4096, fixed, TEXT.0, 0]));
        assert!(!denied(r, [away, 4096, 4096, fixed, away + 0x10_0000, 0]));
        // Without MREMAP_FIXED the fifth argument is whatever was in the
        // register: not looked at.
        assert!(!denied(r, [away, 4096, 4096, 1, TEXT.0, 0]));
    }

    #[test]
    fn every_jump_fits_with_many_ranges() {
        let many: Vec<(u64, u64)> = (0..40u64)
            .map(|i| {
                (
                    0x5555_0000_0000 + i * 0x10_0000,
                    0x5555_0000_8000 + i * 0x10_0000,
                )
            })
            .collect();
        let p = program(&many, TABLE).unwrap();
        assert!(p.len() < 2048, "{}", p.len());
        assert_eq!(
            eval(&p, libc::SYS_munmap, [many[39].0, 4096, 0, 0, 0, 0]),
            Some(RET_EPERM)
        );
    }
}
