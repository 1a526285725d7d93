use moat_host_hypervisor::*;
use std::time::Duration;
fn main() {
    let mut vm = MicroVm::new(2 << 20).unwrap();
    // handler at 0x9000: mov al, 0x77; out 0x51, al; hlt
    vm.write(0x9000, &[0xb0, 0x77, 0xe6, 0x51, 0xf4]).unwrap();
    // IDT at 0x7000: 32 gates to 0x9000
    for v in 0..32u64 {
        let off = 0x9000u64;
        let lo: u64 = (off & 0xffff) | (8 << 16) | (0x8e00u64 << 32) | (((off >> 16) & 0xffff) << 48);
        let hi: u64 = off >> 32;
        vm.write(0x7000 + v * 16, &lo.to_le_bytes()).unwrap();
        vm.write(0x7000 + v * 16 + 8, &hi.to_le_bytes()).unwrap();
    }
    vm.edit_sregs(|s| { s.idt.base = 0x7000; s.idt.limit = 32 * 16 - 1; });
    let which = std::env::args().nth(1).unwrap_or("ud".into());
    let code: Vec<u8> = match which.as_str() {
        "ud" => vec![0x0f, 0x0b],
        "pf" => vec![0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x40], // mov rax,[0x40000000]
        "de" => vec![0x31, 0xc9, 0xf7, 0xf1], // xor ecx,ecx; div ecx
        "bp" => vec![0xcc],
        _ => vec![0xf4],
    };
    vm.write(0x4000, &code).unwrap();
    vm.set_entry(0x4000, 0x8000, 0).unwrap();
    let t = std::time::Instant::now();
    let e = vm.run(Duration::from_secs(2)).unwrap();
    println!("{which}: {e:?} in {:?}", t.elapsed());
    let r = vm.regs();
    println!("rip={:#x} rsp={:#x}", r.rip, r.rsp);
    let frame = vm.read(r.rsp, 48).unwrap();
    for i in 0..6 { println!("  [{}] {:#x}", i, u64::from_le_bytes(frame[i*8..i*8+8].try_into().unwrap())); }
    println!("cr2={:#x}", vm.sregs().cr2);
}
