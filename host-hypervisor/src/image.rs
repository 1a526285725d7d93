//! Running a picoprocess image in the micro-VM: a first cut of the KVM
//! PAL. The guest's function table points at small stubs in guest memory;
//! each stores its arguments in a block, leaves through `out` to the
//! hypercall port, and returns the result the VMM wrote back. The VMM reads
//! the arguments (checked copies of guest memory) and carries the call out.
//!
//! Implemented so far: memory allocation, the console streams, time,
//! random, debug print, and the exits. Every other call answers
//! NotSupported, and there is one vCPU (no DkThreadCreate yet).
use crate::{Exit, MicroVm, VmError};
use moat_pal::{host_kind, limits, nr, Error, PalTable, StartupBlock};
use std::io::Write;
use std::time::Duration;

/// I/O port of the hypercall `out`.
pub const HYPERCALL_PORT: u16 = 0x50;
const STUBS: u64 = 0x4000;
const TABLE: u64 = 0x5000;
const STARTUP: u64 = 0x5400;
const ARGS_AREA: u64 = 0x5800;
const BLOCK: u64 = 0x6000; // 7 argument slots, then the result
const IMAGE_MIN: u64 = 0x10_0000;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot load the image: {0}")]
    Image(String),
    #[error("the picoprocess crashed: {0}")]
    Crashed(String),
    #[error("the picoprocess ran past its watchdog ({0:?} without a hypercall)")]
    Watchdog(Duration),
    #[error("unexpected exit from the micro-VM: {0:?}")]
    Unexpected(Exit),
}

/// The stub code: entry N is `mov eax, N; jmp common`, 16 bytes apart;
/// `common` saves rdi, rsi, rdx, rcx, r8, r9 and the 7th argument (on the
/// stack) into the block, does `out` to the hypercall port, and returns
/// the result the VMM left in the block.
fn stubs() -> Vec<u8> {
    let n = moat_pal::NUM_CALLS as usize;
    let common = (n * 16) as i64;
    let mut code = vec![0xccu8; n * 16];
    for i in 0..n {
        let at = i * 16;
        code[at] = 0xb8; // mov eax, imm32
        code[at + 1..at + 5].copy_from_slice(&(i as u32 + 1).to_le_bytes());
        code[at + 5] = 0xe9; // jmp rel32
        let rel = (common - (at as i64 + 10)) as i32;
        code[at + 6..at + 10].copy_from_slice(&rel.to_le_bytes());
    }
    let b = BLOCK as u32;
    let st = |rex: u8, modrm: u8, off: u32| {
        let mut v = vec![rex, 0x89, modrm, 0x25];
        v.extend_from_slice(&(b + off).to_le_bytes());
        v
    };
    code.extend(st(0x48, 0x3c, 0)); // mov [b], rdi
    code.extend(st(0x48, 0x34, 8)); // mov [b+8], rsi
    code.extend(st(0x48, 0x14, 16)); // mov [b+16], rdx
    code.extend(st(0x48, 0x0c, 24)); // mov [b+24], rcx
    code.extend(st(0x4c, 0x04, 32)); // mov [b+32], r8
    code.extend(st(0x4c, 0x0c, 40)); // mov [b+40], r9
    code.extend([0x4c, 0x8b, 0x54, 0x24, 0x08]); // mov r10, [rsp+8]
    code.extend(st(0x4c, 0x14, 48)); // mov [b+48], r10
    code.extend([0x66, 0xba]); // mov dx, port
    code.extend(HYPERCALL_PORT.to_le_bytes());
    code.push(0xef); // out dx, eax
    code.extend([0x48, 0x8b, 0x04, 0x25]); // mov rax, [b+56]
    code.extend((b + 56).to_le_bytes());
    code.push(0xc3); // ret
    code
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())
}

/// Run a picoprocess image to its exit; returns the exit code.
pub fn run_image(
    bytes: &[u8],
    args: &[&str],
    mem_size: u64,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32, RunError> {
    let img =
        moat_host_linux::elf::parse(bytes, mem_size).map_err(|e| RunError::Image(e.to_string()))?;
    if img.base < IMAGE_MIN || img.end > mem_size {
        return Err(RunError::Image(format!(
            "image spans {:#x}..{:#x}; guest memory is {IMAGE_MIN:#x}..{mem_size:#x}",
            img.base, img.end
        )));
    }
    let mut vm = MicroVm::new(mem_size)?;
    for s in &img.segments {
        vm.write(
            s.vaddr,
            &bytes[s.offset as usize..(s.offset + s.filesz) as usize],
        )?;
    }
    vm.write(STUBS, &stubs())?;
    // The table: header, then one stub address per call.
    let mut t = Vec::new();
    t.extend(moat_pal::ABI_VERSION.to_le_bytes());
    t.extend(moat_pal::NUM_CALLS.to_le_bytes());
    t.extend(0u64.to_le_bytes()); // ctx
    for i in 0..moat_pal::NUM_CALLS as u64 {
        t.extend((STUBS + i * 16).to_le_bytes());
    }
    debug_assert_eq!(t.len(), std::mem::size_of::<PalTable>());
    vm.write(TABLE, &t)?;
    let argbytes = moat_pal::validate::join_args(args);
    vm.write(ARGS_AREA, &argbytes)?;
    let sb = StartupBlock {
        magic: moat_pal::STARTUP_MAGIC,
        abi_version: moat_pal::ABI_VERSION,
        host_kind: host_kind::KVM,
        table: TABLE as *const PalTable,
        args: ARGS_AREA,
        args_len: argbytes.len() as u64,
        argc: args.len() as u64,
        exception_upcall: 0,
        process_handle: 0,
    };
    // SAFETY: StartupBlock is a plain repr(C) struct; we copy its bytes.
    let sb_bytes = unsafe {
        std::slice::from_raw_parts(
            &sb as *const StartupBlock as *const u8,
            std::mem::size_of::<StartupBlock>(),
        )
    };
    vm.write(STARTUP, sb_bytes)?;
    // Heap above the image, stack at the top of memory.
    let stack_top = mem_size - 16;
    let mut heap = img.end.next_multiple_of(2 << 20);
    let heap_end = mem_size - (1 << 20);
    vm.set_entry(img.entry, stack_top - 8, STARTUP)?;
    let deadline = Duration::from_secs(10);
    loop {
        match vm.run(deadline)? {
            Exit::IoOut {
                port: HYPERCALL_PORT,
                value,
                ..
            } => {
                let a = vm.read(BLOCK, 56)?;
                let arg = |i: usize| u64_at(&a, i + 1); // slot 0 is ctx
                let ret: i64 = match value {
                    nr::DK_PROCESS_EXIT | nr::DK_THREAD_EXIT => return Ok(arg(0) as i32),
                    nr::DK_VIRTUAL_MEMORY_ALLOC => {
                        let size = arg(1);
                        if arg(0) != 0 || size == 0 || size % 4096 != 0 {
                            Error::InvalidArgument.code()
                        } else if heap.checked_add(size).is_none_or(|e| e > heap_end) {
                            Error::NoMemory.code()
                        } else {
                            heap += size;
                            (heap - size) as i64
                        }
                    }
                    nr::DK_SYSTEM_TIME_QUERY => {
                        let d = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default();
                        (d.as_secs() * 1_000_000 + d.subsec_micros() as u64) as i64
                    }
                    nr::DK_STREAM_OPEN => {
                        let (uri, len, out) = (arg(0), arg(1), arg(5));
                        if len == 0 || len > limits::MAX_URI_LEN {
                            Error::InvalidArgument.code()
                        } else {
                            match vm.read(uri, len).ok().as_deref() {
                                None => Error::BadAddress.code(),
                                Some(b"stdout:") => vm
                                    .write(out, &1u64.to_le_bytes())
                                    .map_or(Error::BadAddress.code(), |_| 0),
                                Some(b"stderr:") => vm
                                    .write(out, &2u64.to_le_bytes())
                                    .map_or(Error::BadAddress.code(), |_| 0),
                                Some(_) => Error::NotSupported.code(),
                            }
                        }
                    }
                    nr::DK_STREAM_WRITE => {
                        let (h, buf, len) = (arg(0), arg(2), arg(3));
                        match (h, vm.read(buf, len.min(limits::MAX_IO_LEN))) {
                            (_, Err(_)) => Error::BadAddress.code(),
                            (1, Ok(b)) => stdout
                                .write_all(&b)
                                .map_or(Error::Io.code(), |_| b.len() as i64),
                            (2, Ok(b)) => stderr
                                .write_all(&b)
                                .map_or(Error::Io.code(), |_| b.len() as i64),
                            _ => Error::BadHandle.code(),
                        }
                    }
                    nr::DK_DEBUG_STRING_PRINT => match vm
                        .read(arg(0), arg(1).min(limits::MAX_DEBUG_STRING_LEN))
                    {
                        Ok(b) => {
                            let _ =
                                writeln!(stderr, "[picoprocess] {}", String::from_utf8_lossy(&b));
                            0
                        }
                        Err(_) => Error::BadAddress.code(),
                    },
                    nr::DK_RANDOM_BITS_READ => {
                        let len = arg(1).min(limits::MAX_IO_LEN);
                        let mut b = vec![0u8; len as usize];
                        // SAFETY: b is writable for len bytes.
                        unsafe { libc::getrandom(b.as_mut_ptr() as *mut _, b.len(), 0) };
                        vm.write(arg(0), &b)
                            .map_or(Error::BadAddress.code(), |_| len as i64)
                    }
                    _ => Error::NotSupported.code(),
                };
                vm.write(BLOCK + 56, &ret.to_le_bytes())?;
            }
            Exit::Crashed(why) => return Err(RunError::Crashed(why)),
            Exit::Watchdog => return Err(RunError::Watchdog(deadline)),
            other => return Err(RunError::Unexpected(other)),
        }
    }
}
