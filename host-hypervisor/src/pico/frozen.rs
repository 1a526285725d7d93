//! A vCPU's side of checkpoints (see `moat_host_common::freeze`): where
//! the vCPU loop stops its thread for a freeze, how its state is carried
//! (the registers KVM shares, its XSAVE image), and how a restored thread
//! starts from a carried state.
//!
//! A vCPU stops only at an instruction boundary of guest code at the
//! guest's own level: interrupted by the freeze signal while running
//! user code outside any exception upcall, or as a call returns (its
//! state then is the one after the stub's `ret`: the return address
//! popped, the result in `rax`). A call the checkpoint layer cut short
//! is carried as the call to make again; on this host that is the call's
//! stub, entered with the return address pushed back.
use super::vcpu::Cpu;
use super::PicoVm;
use crate::layout::{CALL_STUBS, RAM_START};
use crate::longmode::USER_RFLAGS;
use crate::pal::KvmPal;
use kvm_bindings::{kvm_regs, kvm_xsave};
use kvm_ioctls::SyncReg;
use kvm_ioctls::VcpuFd;
use moat_checkpoint::{Regs, Restart, MAX_FPU};
use moat_host_common::freeze;
use moat_host_common::sys;
use moat_pal::prot;

/// `kvm_regs` in the order a checkpoint carries them.
pub(super) fn to_regs(r: &kvm_regs) -> Regs {
    Regs([
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        r.rsp,
        r.r8,
        r.r9,
        r.r10,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        r.rip,
        r.rflags & Regs::USER_FLAGS,
    ])
}

/// A carried state as `kvm_regs` (the flags the guest may not set are
/// this host's).
pub(super) fn from_regs(g: &Regs) -> kvm_regs {
    let r = &g.0;
    kvm_regs {
        rax: r[0],
        rbx: r[1],
        rcx: r[2],
        rdx: r[3],
        rsi: r[4],
        rdi: r[5],
        rbp: r[6],
        rsp: r[7],
        r8: r[8],
        r9: r[9],
        r10: r[10],
        r11: r[11],
        r12: r[12],
        r13: r[13],
        r14: r[14],
        r15: r[15],
        rip: r[16],
        rflags: USER_RFLAGS | (r[17] & Regs::USER_FLAGS),
    }
}

/// Make the registers of a thread that returned from call `r.nr` make it
/// again: the return address back on the stack, the arguments in their
/// registers, the call's stub next. False if its stack is not writable.
pub(super) fn make_again(vm: &PicoVm, regs: &mut kvm_regs, r: Restart) -> bool {
    let rsp = regs.rsp.wrapping_sub(8);
    let six = freeze::six_args(r.nr);
    let len = if six { 16 } else { 8 };
    if vm.lin.check_w(rsp, len).is_err() || r.nr == 0 || r.nr > moat_pal::NUM_CALLS {
        return false;
    }
    sys::put(rsp, regs.rip);
    if six {
        // Above the return address (see `stack_arg`).
        sys::put(rsp + 8, r.args[5]);
    }
    regs.rsp = rsp;
    regs.rip = CALL_STUBS + 8 * (r.nr as u64 - 1);
    // The stubs' context word is 0; the arguments follow it.
    regs.rdi = 0;
    regs.rsi = r.args[0];
    regs.rdx = r.args[1];
    regs.rcx = r.args[2];
    regs.r8 = r.args[3];
    regs.r9 = r.args[4];
    true
}

fn xsave_bytes(x: &kvm_xsave) -> Vec<u8> {
    x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Load a carried XSAVE image over the vCPU's own (so that what the file
/// does not say stays valid): the legacy area with MXCSR masked, and the
/// extended state of the components this vCPU has enabled.
pub(super) fn load_fpu(vcpu: &VcpuFd, saved: &[u8]) -> bool {
    let Ok(mut x) = vcpu.get_xsave() else {
        return false;
    };
    let xcr0 = vcpu
        .get_xcrs()
        .ok()
        .and_then(|c| {
            c.xcrs[..(c.nr_xcrs as usize).min(16)]
                .iter()
                .find(|x| x.xcr == 0)
                .map(|x| x.value)
        })
        .unwrap_or(3);
    let mut b = xsave_bytes(&x);
    let word = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let mask = u32::from_le_bytes(b[28..32].try_into().unwrap());
    let mask = if mask == 0 { 0xffbf } else { mask };
    let n = saved.len().min(MAX_FPU).min(b.len());
    if n < 512 {
        return true;
    }
    b[..464].copy_from_slice(&saved[..464]);
    b[28..32].copy_from_slice(&mask.to_le_bytes());
    let mxcsr = u32::from_le_bytes(b[24..28].try_into().unwrap()) & mask;
    b[24..28].copy_from_slice(&mxcsr.to_le_bytes());
    // x87 and SSE come from the legacy area; the other components the
    // file has, where this vCPU has them enabled (or in use).
    let mut bv = word(&b, 512) | 3;
    if n >= 576 {
        b[576..n].copy_from_slice(&saved[576..n]);
        bv = 3 | (word(saved, 512) & (xcr0 | word(&b, 512)) & !3);
    }
    b[512..520].copy_from_slice(&bv.to_le_bytes());
    b[520..576].fill(0);
    for (w, c) in x.region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes(c.try_into().unwrap());
    }
    vcpu.set_xsave(&x).is_ok()
}

impl PicoVm {
    /// A freeze may stop this vCPU here: after a call (`after_call`: the
    /// stop the checkpoint layer asked for, with the call to make again),
    /// or interrupted (`None`). Returns once thawed.
    pub(super) fn maybe_stop(&self, cpu: &mut Cpu, after_call: Option<Option<Restart>>) {
        let Some(slot) = freeze::current() else {
            return;
        };
        let mut regs = cpu.vcpu.sync_regs().regs;
        if !slot.wants_stop() || cpu.depth > 0 || !freeze::freezing() {
            // Not stopping here after all: a call the freeze cut short is
            // made again at once, as if there had been no freeze.
            if let Some(Some(r)) = after_call {
                if self.lin.check_r(regs.rsp, 8).is_ok() {
                    regs.rip = sys::get(regs.rsp);
                    regs.rsp += 8;
                    if make_again(self, &mut regs, r) {
                        cpu.vcpu.sync_regs_mut().regs = regs;
                        cpu.vcpu.set_sync_dirty_reg(SyncReg::Register);
                    }
                }
            }
            return;
        }
        let restart = match after_call {
            Some(r) => {
                // The stub's `ret` has not run: run it here.
                if self.lin.check_r(regs.rsp, 8).is_err() {
                    return;
                }
                regs.rip = sys::get(regs.rsp);
                regs.rsp += 8;
                r
            }
            None => {
                let code = regs.rip >= RAM_START
                    && self
                        .lin
                        .regions
                        .read()
                        .unwrap()
                        .check(regs.rip, 1, prot::EXEC)
                        .is_ok();
                if !code {
                    // In a stub: the coordinator asks again shortly.
                    return;
                }
                None
            }
        };
        let Ok(x) = cpu.vcpu.get_xsave() else {
            return;
        };
        {
            let mut sv = slot.saved.lock().unwrap();
            sv.regs = to_regs(&regs);
            let b = xsave_bytes(&x);
            let n = b.len().min(MAX_FPU);
            sv.fpu[..n].copy_from_slice(&b[..n]);
            sv.fpu_len = n;
            sv.restart = restart;
        }
        freeze::park(slot);
        // Going on (a checkpoint that leaves it running, or one that
        // failed): a call cut short is made again.
        let r = slot.saved.lock().unwrap().restart.take();
        if let Some(r) = r {
            if make_again(self, &mut regs, r) {
                cpu.vcpu.sync_regs_mut().regs = regs;
                cpu.vcpu.set_sync_dirty_reg(SyncReg::Register);
            }
        }
    }

    /// Run a thread a checkpoint carried, from its state, to its end.
    pub(super) fn run_restored_thread(
        &self,
        pal: &KvmPal,
        id: u64,
        vcpu: VcpuFd,
        alt: u64,
        state: &moat_host_common::freeze::Saved,
        param: u64,
    ) -> i32 {
        crate::guest_thread::set_thread_param(param);
        let mut regs = from_regs(&state.regs);
        if let Some(r) = state.restart {
            if !make_again(self, &mut regs, r) {
                return 134;
            }
        }
        // After `prepare`: the vCPU's XCR0 says which state it takes.
        let Some(prepared) = self.prepare(&vcpu) else {
            return 125;
        };
        if !load_fpu(&vcpu, &state.fpu[..state.fpu_len]) {
            self.tss_free.lock().unwrap().push(prepared.0);
            self.idle.lock().unwrap().push(vcpu);
            return 125;
        }
        self.run_from(pal, id, vcpu, prepared, regs, alt)
    }
}
