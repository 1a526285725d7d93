//! The micro-VM on real KVM: long mode, `out` exits, halt, triple fault,
//! the watchdog, checked guest memory. Needs /dev/kvm (CI sets
//! MOAT_REQUIRE_KVM, which turns a skip into a failure).
use moat_host_hypervisor::{kvm_available, MicroVm, VmError, VmExit, GUEST_BASE_RESERVED};
use std::time::{Duration, Instant};

const MEM: u64 = 2 << 20;
const CODE: u64 = GUEST_BASE_RESERVED;
const STACK: u64 = 0x8000;
const LONG: Duration = Duration::from_secs(5);

fn vm_with(code: &[u8]) -> Option<MicroVm> {
    if !kvm_available() {
        eprintln!("skipping: no /dev/kvm (set MOAT_REQUIRE_KVM=1 to fail instead)");
        return None;
    }
    let mut vm = MicroVm::new(MEM).expect("a micro-VM");
    vm.write(CODE, code).unwrap();
    vm.set_entry(CODE, STACK, 0x1234).unwrap();
    Some(vm)
}

#[test]
fn runs_in_long_mode_to_the_first_out() {
    // mov rax, rdi (64-bit: only works in long mode); mov dx, 0x10;
    // out dx, eax; hlt
    let code = [0x48, 0x89, 0xf8, 0x66, 0xba, 0x10, 0x00, 0xef, 0xf4];
    let Some(mut vm) = vm_with(&code) else { return };
    assert_eq!(
        vm.run(LONG).unwrap(),
        VmExit::IoOut {
            port: 0x10,
            value: 0x1234,
            size: 4
        }
    );
    assert_eq!(vm.run(LONG).unwrap(), VmExit::Hlt);
}

#[test]
fn many_out_round_trips_keep_state() {
    // mov dx, 0x20; xor eax, eax; loop: out dx, eax; inc eax; jmp loop
    let code = [
        0x66, 0xba, 0x20, 0x00, 0x31, 0xc0, 0xef, 0xff, 0xc0, 0xeb, 0xfb,
    ];
    let Some(mut vm) = vm_with(&code) else { return };
    for i in 0..2000u32 {
        assert_eq!(
            vm.run(LONG).unwrap(),
            VmExit::IoOut {
                port: 0x20,
                value: i,
                size: 4
            }
        );
    }
}

#[test]
fn watchdog_ends_a_runaway_vcpu() {
    // jmp $ (for ever)
    let Some(mut vm) = vm_with(&[0xeb, 0xfe]) else {
        return;
    };
    let t = Instant::now();
    assert_eq!(
        vm.run(Duration::from_millis(100)).unwrap(),
        VmExit::Watchdog
    );
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "the watchdog took {took:?}");
    // The VM can run on (and is stopped again).
    assert_eq!(vm.run(Duration::from_millis(50)).unwrap(), VmExit::Watchdog);
}

#[test]
fn triple_fault_ends_the_vcpu() {
    // lidt [0] with a zero-limit IDT, then int3: no handler, no double-fault
    // handler -> triple fault.
    // mov qword [0x7000], 0 ; lidt [0x7000] ; int3
    let code = [
        0x48, 0xc7, 0x04, 0x25, 0x00, 0x70, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, // mov qword [0x7000], 0
        0x0f, 0x01, 0x1c, 0x25, 0x00, 0x70, 0x00, 0x00, // lidt [0x7000]
        0xcc, // int3
    ];
    let Some(mut vm) = vm_with(&code) else { return };
    match vm.run(LONG).unwrap() {
        VmExit::Crashed(_) => {}
        other => panic!("expected the vCPU to crash, got {other:?}"),
    }
}

#[test]
fn guest_memory_access_is_checked() {
    let Some(vm) = vm_with(&[0xf4]) else { return };
    assert_eq!(vm.read(CODE, 1).unwrap(), vec![0xf4]);
    for (addr, len) in [(MEM, 1), (MEM - 1, 2), (u64::MAX, 2), (0, MEM + 1)] {
        assert!(
            matches!(vm.read(addr, len), Err(VmError::OutOfRange { .. })),
            "{addr:#x}+{len}"
        );
        assert!(vm.write(addr, &vec![0u8; len.min(16) as usize]).is_err() || len > 16);
    }
    assert!(matches!(MicroVm::new(3 << 20), Err(VmError::BadSize(_))));
    assert!(matches!(MicroVm::new(4 << 30), Err(VmError::BadSize(_))));
}
