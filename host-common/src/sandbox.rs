//! The loader's confinement, installed after the image is mapped and
//! before the first guest instruction:
//!
//! 1. Landlock: every file-system right and every TCP bind/connect right
//!    handled, none granted. The picoprocess opens nothing by path; all its
//!    streams are descriptors the monitor brokered.
//! 2. seccomp-bpf: a prefix that refuses any system call whose instruction
//!    pointer lies outside the PAL's own code (the loader, its C library,
//!    the vDSO), on a kernel without `mseal` the sealing section of
//!    [`crate::seal_filter`], then an allow-list with argument checks (no W+X mappings,
//!    clone only for threads, fcntl only for flags, tgkill only of
//!    ourselves). Everything else traps (SIGSYS) and the loader reports the
//!    call by name, then exits with [`crate::protocol::EXIT_SANDBOX_VIOLATION`].
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

use crate::seal::Sealing;

/// Which system calls the sandboxed loader may make (each also only from
/// the PAL's code range). Kept small; the count is documented in the README.
pub fn allow_list(my_pid: i64) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let e = |x: seccompiler::BackendError| x.to_string();
    let c = |arg: u8, op: Op, v: u64| Cond::new(arg, Len::Qword, op, v).map_err(e);
    let cd = |arg: u8, op: Op, v: u64| Cond::new(arg, Len::Dword, op, v).map_err(e);
    let rule = |conds: Vec<Cond>| SeccompRule::new(conds).map_err(e);
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_fstat,
        libc::SYS_lseek,
        libc::SYS_getdents64,
        libc::SYS_ftruncate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_eventfd2,
        libc::SYS_accept4,
        libc::SYS_shutdown,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_restart_syscall,
        libc::SYS_sched_getaffinity,
    ] {
        m.insert(nr, vec![]);
    }
    // Memory: never writable and executable at once.
    let wx = |arg| -> Result<Vec<SeccompRule>, String> {
        Ok(vec![
            rule(vec![cd(arg, Op::MaskedEq(libc::PROT_WRITE as u64), 0)?])?,
            rule(vec![cd(arg, Op::MaskedEq(libc::PROT_EXEC as u64), 0)?])?,
        ])
    };
    m.insert(libc::SYS_mmap, wx(2)?);
    m.insert(libc::SYS_mprotect, wx(2)?);
    // clone: threads only (the C library's pthread_create).
    let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
    m.insert(
        libc::SYS_clone,
        vec![rule(vec![c(0, Op::MaskedEq(thread), thread)?])?],
    );
    // fcntl: reading flags, and duplication (bounded by RLIMIT_NOFILE).
    // Never F_SETFL: open file descriptions may be shared with the host
    // (the console), whose O_NONBLOCK must not change under it.
    m.insert(
        libc::SYS_fcntl,
        [libc::F_GETFL, libc::F_GETFD, libc::F_DUPFD_CLOEXEC]
            .into_iter()
            .map(|cmd| rule(vec![cd(1, Op::Eq, cmd as u64)?]))
            .collect::<Result<_, _>>()?,
    );
    // tgkill: only this process (abort() signals itself).
    m.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cd(0, Op::Eq, my_pid as u64)?])?],
    );
    Ok(m)
}

/// Build the whole program: the instruction-pointer prefix, then (under
/// [`Sealing::Seccomp`](crate::seal::Sealing)) the sealing section of
/// [`crate::seal_filter`], then the allow-list. `seal` carries the PAL
/// table's page: under [`Sealing::Kernel`](crate::seal::Sealing), `mseal`
/// is allowed on that one page (sealed once the table is in it; see
/// `crate::seal`) and nothing else. `None`: no sealing at all (the
/// benchmark's bare filter).
pub fn build_filter(
    pal_ranges: &[(u64, u64)],
    my_pid: i64,
    seal: Option<(&Sealing, u64)>,
) -> Result<BpfProgram, String> {
    // clone3 (ENOSYS) is answered by the prefix: seccompiler gives all of
    // its rules one match action.
    let mut rules = allow_list(my_pid)?;
    if let Some((Sealing::Kernel, page)) = seal {
        let e = |x: seccompiler::BackendError| x.to_string();
        let c = |arg: u8, v: u64| Cond::new(arg, Len::Qword, Op::Eq, v).map_err(e);
        rules.insert(
            crate::seal::SYS_MSEAL,
            vec![SeccompRule::new(vec![c(0, page)?, c(1, 4096)?, c(2, 0)?]).map_err(e)?],
        );
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    let main: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    let mut prog = ip_prefix(pal_ranges)?;
    if let Some((Sealing::Seccomp(ranges), page)) = seal {
        prog.extend(crate::seal_filter::program(ranges, page)?);
    }
    prog.extend(main);
    if prog.len() > 4096 {
        return Err(format!(
            "the seccomp program is too long ({} instructions; the kernel takes 4096)",
            prog.len()
        ));
    }
    Ok(prog)
}

// Classic BPF opcodes and seccomp constants.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;
const JA: u16 = 0x05;
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_IP_LO: u32 = 8;
const OFF_IP_HI: u32 = 12;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// The prefix: wrong architecture -> trap; clone3 -> ENOSYS (its flags are
/// in memory seccomp cannot read; the C library then falls back to clone,
/// whose flags are checked); instruction
/// pointer in one of `ranges` -> continue with the next program; else trap.
pub fn ip_prefix(ranges: &[(u64, u64)]) -> Result<BpfProgram, String> {
    // Split ranges at 4 GiB boundaries so each has one high word.
    let mut rs: Vec<(u32, u32, u64)> = Vec::new(); // (hi, lo_start, lo_end exclusive as u64)
    for &(s, e) in ranges {
        let mut s = s;
        while s < e {
            let hi = (s >> 32) as u32;
            let block_end = ((hi as u64) + 1) << 32;
            let end = e.min(block_end);
            rs.push((hi, s as u32, end - ((hi as u64) << 32)));
            s = end;
        }
    }
    if rs.len() > 40 {
        return Err(format!(
            "too many code ranges for the PAL filter ({})",
            rs.len()
        ));
    }
    let mut p = vec![
        ins(LD_W_ABS, 0, 0, OFF_ARCH),
        ins(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        ins(RET_K, 0, 0, SECCOMP_RET_TRAP),
        ins(LD_W_ABS, 0, 0, OFF_NR),
        ins(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        ins(RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    // Each range block: 5 instructions.
    //   ld hi; jeq HI ? 0 : next; ld lo; jge START ? 0 : next; jge END ? next : ok
    // "ok" jumps to the instruction after the final trap.
    let n = rs.len();
    for (i, &(hi, lo_s, lo_e)) in rs.iter().enumerate() {
        let remaining_after = (n - i - 1) * 5; // instructions in later blocks
                                               // distance from an instruction at offset `k` within this block to the
                                               // first instruction of the next block is (5 - k - 1); to "ok" it is
                                               // (5 - k - 1) + remaining_after + 1 (skip the final trap).
        let to_next = |k: usize| (5 - k - 1) as u8;
        let to_ok = |k: usize| ((5 - k - 1) + remaining_after + 1) as u8;
        p.push(ins(LD_W_ABS, 0, 0, OFF_IP_HI));
        p.push(ins(JEQ_K, 0, to_next(1), hi));
        p.push(ins(LD_W_ABS, 0, 0, OFF_IP_LO));
        p.push(ins(JGE_K, 0, to_next(3), lo_s));
        if lo_e > u32::MAX as u64 {
            // The range runs to the end of this 4 GiB block: any low word is in.
            p.push(ins(JA, 0, 0, to_ok(4) as u32));
        } else {
            p.push(ins(JGE_K, to_next(4), to_ok(4), lo_e as u32));
        }
    }
    p.push(ins(RET_K, 0, 0, SECCOMP_RET_TRAP));
    Ok(p)
}

/// Confine the calling process (all its threads) for good (see
/// [`build_filter`] for `seal`).
pub fn install(pal_ranges: &[(u64, u64)], seal: Option<(&Sealing, u64)>) -> Result<(), String> {
    landlock_restrict()?;
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as i64;
    let prog = build_filter(pal_ranges, pid, seal)?;
    seccompiler::apply_filter_all_threads(&prog)
        .map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
    Ok(())
}

pub fn landlock_restrict() -> Result<(), String> {
    use landlock::{Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetStatus, ABI};
    let abi = ABI::V4;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("cannot install the Landlock ruleset: {e}"))?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err("Landlock is not enforced by this kernel (needs Linux 5.13 with CONFIG_SECURITY_LANDLOCK and lsm=landlock); moat will not run a picoprocess without it".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn allow_list_size_is_documented() {
        // README.md and the security model state this number.
        assert_eq!(allow_list(1).unwrap().len(), 49);
    }

    #[test]
    fn prefix_shape() {
        let p = ip_prefix(&[
            (0x5555_0000_1000, 0x5555_0000_9000),
            (0x7fff_f000_0000, 0x8000_0001_0000),
        ])
        .unwrap();
        // 6 header + 5 per range (the second range spans two blocks) + trap.
        assert_eq!(p.len(), 6 + 5 * 3 + 1);
        assert!(ip_prefix(&[(0, 1 << 40)]).is_err());
        assert!(!allow_list(1).unwrap().contains_key(&libc::SYS_openat));
    }
}
