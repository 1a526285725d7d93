//! A thread's user state as a signal handler sees it (the `ucontext` the
//! kernel saved, with its XSAVE image) and as a checkpoint carries it
//! ([`moat_checkpoint::Regs`] and the standard-form XSAVE bytes): the
//! only code of the freeze that reads or writes a signal frame.
//!
//! Loading a carried state into a frame keeps what belongs to the host:
//! only the guest's flag bits are taken (never TF, IF or IOPL), the
//! frame's own description of its XSAVE area (the software-reserved
//! bytes) stays, the features restored are those the frame has, and
//! MXCSR is masked with the frame's mask, so that the kernel's
//! `rt_sigreturn` never refuses the frame whatever the file said.
use moat_checkpoint::Regs;

/// The gregs index of each carried register, in [`Regs`] order.
const GREGS: [libc::c_int; 18] = [
    libc::REG_RAX,
    libc::REG_RBX,
    libc::REG_RCX,
    libc::REG_RDX,
    libc::REG_RSI,
    libc::REG_RDI,
    libc::REG_RBP,
    libc::REG_RSP,
    libc::REG_R8,
    libc::REG_R9,
    libc::REG_R10,
    libc::REG_R11,
    libc::REG_R12,
    libc::REG_R13,
    libc::REG_R14,
    libc::REG_R15,
    libc::REG_RIP,
    libc::REG_EFL,
];

/// The trap flag.
pub const TF: u64 = 0x100;

/// `FP_XSTATE_MAGIC1`: the frame has an XSAVE image past the legacy area.
const MAGIC1: u32 = 0x4650_5853;
/// Where the legacy area's software-reserved bytes start (to its end).
const SW_RESERVED: usize = 464;
const LEGACY: usize = 512;
/// XSAVE header: XSTATE_BV, then XCOMP_BV.
const XSTATE_BV: usize = 512;
const XCOMP_BV: usize = 520;

/// A signal handler's view of the interrupted state.
pub struct Frame<'a> {
    uc: &'a mut libc::ucontext_t,
}

impl<'a> Frame<'a> {
    /// # Safety
    /// `uc` is the third argument of an `SA_SIGINFO` handler, used only
    /// while that handler runs.
    pub unsafe fn new(uc: *mut libc::c_void) -> Frame<'a> {
        // SAFETY: per the contract, the kernel's ucontext, valid and
        // exclusively ours for the handler's run.
        let uc = unsafe { &mut *(uc as *mut libc::ucontext_t) };
        Frame { uc }
    }

    pub fn reg(&self, i: libc::c_int) -> u64 {
        self.uc.uc_mcontext.gregs[i as usize] as u64
    }

    pub fn set_reg(&mut self, i: libc::c_int, v: u64) {
        self.uc.uc_mcontext.gregs[i as usize] = v as i64;
    }

    pub fn rip(&self) -> u64 {
        self.reg(libc::REG_RIP)
    }

    /// Whether `sig` was blocked where the thread was interrupted.
    pub fn blocks(&self, sig: libc::c_int) -> bool {
        let n = (sig - 1) as usize;
        // The kernel's sigset: 64 bits, bit sig-1.
        // SAFETY: sigset_t is plain data of at least 8 bytes; only its
        // first word is read.
        let first: u64 = unsafe {
            std::ptr::read_unaligned(&self.uc.uc_sigmask as *const libc::sigset_t as *const u64)
        };
        n < 64 && first & (1 << n) != 0
    }

    /// Set or clear the trap flag the thread resumes with.
    pub fn set_trap(&mut self, on: bool) {
        let f = self.reg(libc::REG_EFL);
        self.set_reg(libc::REG_EFL, if on { f | TF } else { f & !TF });
    }

    /// The frame's XSAVE area and its size (the legacy area only when the
    /// frame has no extended state).
    fn fpu_area(&mut self) -> Option<&mut [u8]> {
        let p = self.uc.uc_mcontext.fpregs as *mut u8;
        if p.is_null() {
            return None;
        }
        // SAFETY: the kernel's fpstate of this frame: at least the 512
        // bytes of the legacy area; the software-reserved bytes say
        // whether (and how much) extended state follows.
        let legacy = unsafe { std::slice::from_raw_parts(p, LEGACY) };
        let magic = u32::from_le_bytes(legacy[SW_RESERVED..SW_RESERVED + 4].try_into().ok()?);
        let size = u32::from_le_bytes(legacy[SW_RESERVED + 16..SW_RESERVED + 20].try_into().ok()?);
        let len = if magic == MAGIC1 && (size as usize) >= LEGACY + 64 {
            (size as usize).min(moat_checkpoint::MAX_FPU)
        } else {
            LEGACY
        };
        // SAFETY: as above: the frame holds `len` bytes of state there.
        Some(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }

    /// Copy the interrupted state out (into buffers owned by the caller,
    /// so that a signal handler allocates nothing): the registers, and the
    /// XSAVE image's length in `fpu`.
    pub fn save(&mut self, regs: &mut Regs, fpu: &mut [u8; moat_checkpoint::MAX_FPU]) -> usize {
        for (i, g) in GREGS.iter().enumerate() {
            regs.0[i] = self.reg(*g);
        }
        regs.0[Regs::RFLAGS] &= Regs::USER_FLAGS;
        match self.fpu_area() {
            Some(a) => {
                fpu[..a.len()].copy_from_slice(a);
                a.len()
            }
            None => 0,
        }
    }

    /// Load a carried state into the frame (see the module's notes on
    /// what stays the host's).
    pub fn load(&mut self, regs: &Regs, fpu: &[u8]) {
        let flags = self.reg(libc::REG_EFL);
        for (i, g) in GREGS.iter().enumerate() {
            self.set_reg(*g, regs.0[i]);
        }
        let keep = flags & !(Regs::USER_FLAGS | TF);
        self.set_reg(
            libc::REG_EFL,
            keep | (regs.0[Regs::RFLAGS] & Regs::USER_FLAGS),
        );
        let Some(area) = self.fpu_area() else { return };
        if fpu.len() < LEGACY {
            return;
        }
        let word = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        // The frame's MXCSR mask (what this CPU takes), before the copy.
        let mask = u32::from_le_bytes(area[28..32].try_into().unwrap());
        let mask = if mask == 0 { 0xffbf } else { mask };
        area[..SW_RESERVED].copy_from_slice(&fpu[..SW_RESERVED]);
        area[28..32].copy_from_slice(&mask.to_le_bytes());
        let mxcsr = u32::from_le_bytes(area[24..28].try_into().unwrap()) & mask;
        area[24..28].copy_from_slice(&mxcsr.to_le_bytes());
        if area.len() > LEGACY && fpu.len() > LEGACY + 64 {
            // The features this frame describes (software-reserved bytes).
            let have = word(area, SW_RESERVED + 8);
            let n = area.len().min(fpu.len());
            area[LEGACY..n].copy_from_slice(&fpu[LEGACY..n]);
            let bv = word(fpu, XSTATE_BV) & have;
            area[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
            area[XCOMP_BV..XCOMP_BV + 8].copy_from_slice(&0u64.to_le_bytes());
            // Nothing else of the header is defined: zero.
            area[XCOMP_BV + 8..LEGACY + 64].fill(0);
        }
    }
}
