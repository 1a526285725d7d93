//! Running a picoprocess image in the micro-VM: a first cut of the KVM
//! PAL. The guest's function table points at small stubs in guest memory;
//! each stores its arguments in a block, leaves through `out` to the
//! hypercall port, and returns the result the VMM wrote back. The VMM reads
//! the arguments (checked copies of guest memory) and carries the call out.
//!
//! The VMM decodes each hypercall with the generated dispatcher into
//! [`KvmPal`], a `Pal` whose pointers are guest addresses; the tracing
//! layer can sit in between. Implemented so far: memory allocation, the
//! console streams, time, random, debug print, and the exits. Every other
//! call answers NotSupported, and there is one vCPU (no DkThreadCreate yet).
use crate::{Exit, GuestMem, MicroVm, VmError};
use moat_pal::dispatch::{dispatch, is_exit};
use moat_pal::trace::TracePal;
use moat_pal::{host_kind, limits, Error, PalTable, StartupBlock};
use moat_pal::{ImageInfo, Pal, StreamAttributes};
use std::io::Write;
use std::sync::Mutex;
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

/// The KVM PAL so far: the ABI with guest addresses for pointers, over
/// checked guest memory. Calls not implemented yet answer NotSupported.
pub struct KvmPal<'a, O: Write + Send, E: Write + Send> {
    mem: GuestMem,
    heap: Mutex<(u64, u64)>, // (next, end)
    stdout: Mutex<&'a mut O>,
    stderr: Mutex<&'a mut E>,
}

impl<O: Write + Send, E: Write + Send> KvmPal<'_, O, E> {
    fn put_handle(&self, out: *mut u64, h: u64) -> i64 {
        self.mem
            .write(out as u64, &h.to_le_bytes())
            .map_or(Error::BadAddress.code(), |_| 0)
    }
}

macro_rules! not_yet {
    ($($name:ident($($a:ident: $t:ty),*);)*) => {$(
        fn $name(&self, $($a: $t),*) -> i64 {
            $(let _ = $a;)*
            Error::NotSupported.code()
        }
    )*};
}

impl<O: Write + Send, E: Write + Send> Pal for KvmPal<'_, O, E> {
    fn dk_virtual_memory_alloc(&self, addr: u64, size: u64, p: u32) -> i64 {
        if moat_pal::validate::check_prot(p).is_err()
            || addr != 0
            || size == 0
            || !size.is_multiple_of(4096)
        {
            return Error::InvalidArgument.code();
        }
        let mut h = self.heap.lock().unwrap();
        match h.0.checked_add(size) {
            Some(e) if e <= h.1 => {
                h.0 = e;
                (e - size) as i64
            }
            _ => Error::NoMemory.code(),
        }
    }
    fn dk_system_time_query(&self) -> i64 {
        moat_host_linux::loader::sys::realtime_micros() as i64
    }
    fn dk_stream_open(
        &self,
        uri: *const u8,
        uri_len: u64,
        _acc: u32,
        _cr: u32,
        _opt: u32,
        stream: *mut u64,
    ) -> i64 {
        if uri_len == 0 || uri_len > limits::MAX_URI_LEN {
            return Error::InvalidArgument.code();
        }
        match self.mem.read(uri as u64, uri_len).ok().as_deref() {
            None => Error::BadAddress.code(),
            Some(b"stdout:") => self.put_handle(stream, 1),
            Some(b"stderr:") => self.put_handle(stream, 2),
            Some(b) => match moat_pal::uri::Uri::parse_bytes(b) {
                Err(e) => e.code(),
                Ok(_) => Error::NotSupported.code(),
            },
        }
    }
    fn dk_stream_write(&self, h: u64, _offset: u64, buf: *const u8, len: u64) -> i64 {
        if len > limits::MAX_IO_LEN {
            return Error::InvalidArgument.code();
        }
        let Ok(b) = self.mem.read(buf as u64, len) else {
            return Error::BadAddress.code();
        };
        let r = match h {
            1 => self.stdout.lock().unwrap().write_all(&b),
            2 => self.stderr.lock().unwrap().write_all(&b),
            _ => return Error::BadHandle.code(),
        };
        r.map_or(Error::Io.code(), |_| len as i64)
    }
    fn dk_debug_string_print(&self, msg: *const u8, len: u64) -> i64 {
        if len > limits::MAX_DEBUG_STRING_LEN {
            return Error::InvalidArgument.code();
        }
        match self.mem.read(msg as u64, len) {
            Ok(b) => {
                let _ = writeln!(
                    self.stderr.lock().unwrap(),
                    "[picoprocess] {}",
                    String::from_utf8_lossy(&b)
                );
                0
            }
            Err(_) => Error::BadAddress.code(),
        }
    }
    fn dk_random_bits_read(&self, buf: *mut u8, len: u64) -> i64 {
        if len > limits::MAX_IO_LEN {
            return Error::InvalidArgument.code();
        }
        let mut b = vec![0u8; len as usize];
        if moat_host_linux::loader::sys::getrandom(&mut b).is_err() {
            return Error::Io.code();
        }
        self.mem
            .write(buf as u64, &b)
            .map_or(Error::BadAddress.code(), |_| len as i64)
    }
    fn dk_thread_exit(&self, _code: i32) -> ! {
        unreachable!("the VMM ends the picoprocess on exit calls before dispatching")
    }
    fn dk_process_exit(&self, _code: i32) -> ! {
        unreachable!("the VMM ends the picoprocess on exit calls before dispatching")
    }
    not_yet! {
        dk_virtual_memory_free(addr: u64, size: u64);
        dk_virtual_memory_protect(addr: u64, size: u64, prot: u32);
        dk_thread_create(entry: u64, param: u64, thread: *mut u64);
        dk_thread_delay_execution(micros: u64);
        dk_thread_yield_execution();
        dk_thread_get_parameter();
        dk_thread_raise_exception(code: u32, arg: u64);
        dk_notification_event_create(initial: u32, event: *mut u64);
        dk_synchronization_event_create(initial: u32, event: *mut u64);
        dk_semaphore_create(initial: u32, max: u32, semaphore: *mut u64);
        dk_semaphore_release(semaphore: u64, count: u32);
        dk_semaphore_peek(semaphore: u64);
        dk_event_set(event: u64);
        dk_event_clear(event: u64);
        dk_event_peek(event: u64);
        dk_objects_wait_any(count: u32, handles: *const u64, timeout_micros: i64);
        dk_abort_event_register(event: u64);
        dk_process_create(uri: *const u8, uri_len: u64, args: *const u8, args_len: u64, process: *mut u64);
        dk_process_get_exit_code(process: u64, code: *mut i32);
        dk_stream_read(stream: u64, offset: u64, buf: *mut u8, len: u64);
        dk_stream_map(stream: u64, addr: u64, prot: u32, offset: u64, size: u64);
        dk_stream_map_pe_binary(stream: u64, info: *mut ImageInfo);
        dk_stream_unmap(addr: u64, size: u64);
        dk_stream_set_length(stream: u64, length: u64);
        dk_stream_flush(stream: u64);
        dk_stream_delete(stream: u64, which: u32);
        dk_stream_get_event(stream: u64, event: *mut u64);
        dk_stream_rename(stream: u64, new_uri: *const u8, new_uri_len: u64);
        dk_stream_enumerate_children(stream: u64, buf: *mut u8, len: u64, cursor: *mut u64);
        dk_stream_attributes_query(uri: *const u8, uri_len: u64, attrs: *mut StreamAttributes);
        dk_stream_attributes_query_by_handle(stream: u64, attrs: *mut StreamAttributes);
        dk_instruction_cache_flush(addr: u64, size: u64);
        dk_object_reference(object: u64);
        dk_object_close(object: u64);
        dk_input_event_read(buf: *mut u8, len: u64);
        dk_frame_buffer_export(addr: u64, width: u32, height: u32);
        dk_frame_buffer_notify_update(x: u32, y: u32, width: u32, height: u32);
    }
}

fn trace_to_stderr(line: std::fmt::Arguments<'_>) {
    eprintln!("[picoprocess] trace: {line}");
}

/// Run a picoprocess image to its exit; returns the exit code. With
/// `trace`, the tracing layer sits between the image and the KVM PAL.
pub fn run_image<O: Write + Send, E: Write + Send>(
    bytes: &[u8],
    args: &[&str],
    mem_size: u64,
    trace: bool,
    stdout: &mut O,
    stderr: &mut E,
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
    let heap = img.end.next_multiple_of(2 << 20);
    let heap_end = mem_size - (1 << 20);
    vm.set_entry(img.entry, stack_top - 8, STARTUP)?;
    let kvm = KvmPal {
        mem: vm.memory(),
        heap: Mutex::new((heap, heap_end)),
        stdout: Mutex::new(stdout),
        stderr: Mutex::new(stderr),
    };
    let tracer = TracePal {
        inner: &kvm,
        sink: trace_to_stderr,
    };
    let pal: &dyn Pal = if trace { &tracer } else { &kvm };
    let deadline = Duration::from_secs(10);
    loop {
        match vm.run(deadline)? {
            Exit::IoOut {
                port: HYPERCALL_PORT,
                value,
                ..
            } => {
                let a = vm.read(BLOCK, 56)?;
                let words: [u64; 6] = std::array::from_fn(|i| u64_at(&a, i + 1)); // slot 0 is ctx
                if is_exit(value) {
                    if trace {
                        trace_to_stderr(format_args!(
                            "{}(code={})",
                            moat_pal::CALL_NAMES[value as usize - 1],
                            words[0] as i32
                        ));
                    }
                    return Ok(words[0] as i32);
                }
                let ret = dispatch(pal, value, &words).unwrap_or(Error::NotSupported.code());
                vm.write(BLOCK + 56, &ret.to_le_bytes())?;
            }
            Exit::Crashed(why) => return Err(RunError::Crashed(why)),
            Exit::Watchdog => return Err(RunError::Watchdog(deadline)),
            other => return Err(RunError::Unexpected(other)),
        }
    }
}
