//! Hostile picoprocesses against the kvm host's own machinery: I/O ports,
//! the protections inside the VM (W^X, the VMM's tables and stubs,
//! privileged instructions, a protection change racing another vCPU), and
//! DMA by a granted virtio-blk device at every region it may not reach.
//! Each attack must end the picoprocess (or be refused) with the exact
//! exit code and report, and leave the host as it was: the disk
//! unchanged, and the next picoprocess running normally. Needs /dev/kvm
//! (CI sets MOAT_REQUIRE_KVM, which turns a skip into a failure).
use moat_tests::*;

fn kvm() -> bool {
    if !kvm_available() || !sandbox_available() {
        eprintln!("skipping: no /dev/kvm (set MOAT_REQUIRE_KVM=1 to fail instead)");
        return false;
    }
    true
}

fn img(name: &str) -> String {
    image(name).display().to_string()
}

/// The host still runs picoprocesses after an attack.
fn host_unaffected() {
    let out = run_on("kvm", &[&img("hello")]);
    out.assert_code(0);
}

/// `hostile-kvm-ports MODE PORT LAST`: the first port of the range ends
/// the picoprocess with a sandbox violation naming it.
fn port_refused(mode: &str, first: u16, last: u16) {
    let (a, b) = (format!("{first:x}"), format!("{last:x}"));
    let out = run_on("kvm", &[&img("hostile-kvm-ports"), mode, &a, &b]);
    assert!(
        !out.stdout.contains("ESCAPED"),
        "{mode} {a}: {}",
        out.stdout
    );
    out.assert_code(159);
    let want = format!("sandbox violation: I/O port {first:#x} is not granted");
    assert!(out.stderr.contains(&want), "{mode} {a}: {}", out.stderr);
}

/// Ports of `range` (the first of each run ends it), `in` and `out` of
/// every width and string I/O.
fn ports_refused(starts: &[u16], last: u16) {
    if !kvm() {
        return;
    }
    let modes = [
        "in8", "out8", "in16", "out16", "in32", "out32", "ins", "outs",
    ];
    for (i, &p) in starts.iter().enumerate() {
        port_refused(modes[i % modes.len()], p, last);
    }
    host_unaffected();
}

#[test]
fn io_ports_0000_to_00ff_are_refused() {
    // DMA controller, PIC, PIT, keyboard controller (reset), CMOS, POST,
    // and the last of the range.
    ports_refused(
        &[
            0x00, 0x20, 0x21, 0x40, 0x43, 0x60, 0x64, 0x70, 0x71, 0x80, 0x92, 0xa0, 0xff,
        ],
        0xff,
    );
}

#[test]
fn io_ports_0100_to_03ff_are_refused() {
    // Legacy ISA, ATA, VGA, and the COM ports of undeclared UARTs.
    ports_refused(
        &[
            0x100, 0x1f0, 0x1f7, 0x2f8, 0x376, 0x3c0, 0x3d4, 0x3f8, 0x3ff,
        ],
        0x3ff,
    );
}

#[test]
fn io_ports_0400_to_0fff_are_refused() {
    // QEMU's debug port and fw_cfg, ACPI, PCI configuration.
    ports_refused(
        &[0x400, 0x402, 0x510, 0x511, 0x604, 0xcf8, 0xcfc, 0xfff],
        0xfff,
    );
}

#[test]
fn io_ports_1000_to_ffff_are_refused() {
    ports_refused(
        &[
            0x1000, 0x5658, 0x7fff, 0x8000, 0xb000, 0xb004, 0xc000, 0xfffe, 0xffff,
        ],
        0xffff,
    );
}

#[test]
fn the_vmm_ports_answer_only_their_stubs() {
    if !kvm() {
        return;
    }
    // The hypercall port takes a 32-bit `out` (any code may make an ABI
    // call); every other access to it, and any access to the internal
    // ports (exception, upcall return, system call) from guest code, is
    // a violation.
    for mode in ["in8", "in16", "in32", "out8", "out16", "ins", "outs"] {
        port_refused(mode, 0x50, 0x50);
    }
    for port in 0x51..=0x53 {
        for mode in ["in8", "out8", "out32", "outs"] {
            port_refused(mode, port, port);
        }
    }
    host_unaffected();
}

/// `hostile-kvm-vm ARGS`: ends with the unhandled memory fault report at
/// the address it printed as its target.
fn faults_at_target(host: &str, args: &[&str]) -> String {
    let mut a = vec![img("hostile-kvm-vm")];
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = run_on(host, &a);
    assert!(
        !out.stdout.contains("ESCAPED"),
        "{host} {args:?}: {}",
        out.stdout
    );
    out.assert_code(139);
    let target = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("target "))
        .unwrap_or_else(|| panic!("{host} {args:?}: no target line: {}", out.stdout))
        .to_string();
    let want = format!("unhandled memory fault in the picoprocess at address {target} ");
    assert!(
        out.stderr.contains(&want),
        "{host} {args:?}: {}",
        out.stderr
    );
    target
}

#[test]
fn executing_data_faults_as_on_linux() {
    if !kvm() {
        return;
    }
    for h in hosts() {
        faults_at_target(h, &["exec-data"]);
        faults_at_target(h, &["exec-static"]);
    }
    host_unaffected();
}

#[test]
fn writing_code_faults_as_on_linux() {
    if !kvm() {
        return;
    }
    for h in hosts() {
        faults_at_target(h, &["write-text"]);
    }
    host_unaffected();
}

#[test]
fn a_protection_change_reaches_every_vcpu_before_it_returns() {
    if !kvm() {
        return;
    }
    // A second thread runs code (reads a page) on another vCPU while the
    // first makes the page RW (frees it): the second must fault at once.
    for h in hosts() {
        faults_at_target(h, &["race-exec"]);
        faults_at_target(h, &["race-free"]);
    }
    host_unaffected();
}

#[test]
fn the_page_tables_and_the_pool_are_out_of_reach() {
    if !kvm() {
        return;
    }
    // PML4, PDPT, a page directory, PT0 (not mapped at all), and the
    // page-table pool above the device windows.
    for addr in [
        "0x1000",
        "0x2000",
        "0x3000",
        "0x7000",
        "0xc0200000",
        "0xc0201000",
    ] {
        for how in ["write", "read"] {
            assert_eq!(faults_at_target("kvm", &[how, addr]), addr);
        }
    }
    host_unaffected();
}

#[test]
fn the_gdt_idt_and_exception_stubs_are_supervisor_only() {
    if !kvm() {
        return;
    }
    for addr in ["0x8000", "0x9000", "0xa000"] {
        for how in ["write", "read"] {
            assert_eq!(faults_at_target("kvm", &[how, addr]), addr);
        }
    }
    // Running the exception stubs from CPL 3.
    assert_eq!(faults_at_target("kvm", &["exec", "0xa000"]), "0xa000");
    // The call stubs and the PAL table are read-only; the table is no code.
    assert_eq!(faults_at_target("kvm", &["write", "0xb000"]), "0xb000");
    assert_eq!(faults_at_target("kvm", &["write", "0xc000"]), "0xc000");
    assert_eq!(faults_at_target("kvm", &["exec", "0xc000"]), "0xc000");
    host_unaffected();
}

#[test]
fn the_task_state_area_is_supervisor_only() {
    if !kvm() {
        return;
    }
    // 1024 MiB of guest RAM (the default limit): the TSS area is its top
    // 2 MiB, the first slot at its start; the CPL 0 stacks above it.
    for addr in ["0x3fe00000", "0x3fe02000", "0x3fe02ff8", "0x3fffffc0"] {
        for how in ["write", "read"] {
            assert_eq!(faults_at_target("kvm", &[how, addr]), addr);
        }
    }
    host_unaffected();
}

#[test]
fn privileged_instructions_fault_at_cpl3() {
    if !kvm() {
        return;
    }
    for name in ["lgdt", "lidt", "ltr", "cr3", "cr0", "wrmsr", "invlpg"] {
        let out = run_on("kvm", &[&img("hostile-kvm-vm"), "priv", name]);
        assert!(!out.stdout.contains("ESCAPED"), "{name}: {}", out.stdout);
        out.assert_code(139);
        assert!(
            out.stderr
                .contains("unhandled memory fault in the picoprocess"),
            "{name}: {}",
            out.stderr
        );
    }
    host_unaffected();
}

/// A zeroed disk of 1 MiB; `hostile-kvm-dma ARGS` on it as blk0. Every
/// target refused, the honest request served, the disk unchanged.
fn dma_refused(args: &[&str], targets: usize) {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let dev = format!("blk0=virtio-blk:{}", path.display());
    let mut a = vec![
        "--device",
        &dev,
        &*Box::leak(img("hostile-kvm-dma").into_boxed_str()),
    ];
    a.extend_from_slice(args);
    let out = run_on("kvm", &a);
    assert!(!out.stdout.contains("ESCAPED"), "{args:?}: {}", out.stdout);
    out.assert_code(0);
    assert_eq!(
        out.stdout.matches("REFUSED").count(),
        targets,
        "{args:?}: every target refused:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("OK honest request"),
        "{args:?}: {}",
        out.stdout
    );
    let disk = std::fs::read(&path).unwrap();
    assert!(disk.iter().all(|&b| b == 0), "{args:?}: the disk changed");
}

const VMM_AREA: [&str; 8] = ["0", "1000", "7000", "8000", "9000", "a000", "b000", "c000"];

#[test]
fn dma_into_page_zero_and_the_vmm_area_is_refused() {
    if !kvm() {
        return;
    }
    // A disk read into them, and a disk write out of them (which would
    // put the VMM's tables on the disk).
    let mut a = vec!["in"];
    a.extend(VMM_AREA);
    dma_refused(&a, VMM_AREA.len());
    let mut a = vec!["out"];
    a.extend(VMM_AREA);
    dma_refused(&a, VMM_AREA.len());
    host_unaffected();
}

#[test]
fn dma_into_read_only_guest_memory_is_refused() {
    if !kvm() {
        return;
    }
    // A page made read-only, the driver's own code, and a buffer that runs
    // from its memory into a page it freed.
    dma_refused(&["in", "readonly", "text", "straddle"], 3);
    dma_refused(&["out", "straddle"], 1);
    host_unaffected();
}

#[test]
fn dma_beyond_guest_ram_is_refused() {
    if !kvm() {
        return;
    }
    // The TSS area at the top of 1 GiB of RAM, the end of RAM, the device
    // windows, the page-table pool, far beyond.
    let far = ["3fe00000", "40000000", "c0000000", "c0200000", "4000000000"];
    let mut a = vec!["in"];
    a.extend(far);
    dma_refused(&a, far.len());
    let mut a = vec!["out"];
    a.extend(far);
    dma_refused(&a, far.len());
    host_unaffected();
}

#[test]
fn virtqueue_rings_outside_the_picoprocess_are_refused() {
    if !kvm() {
        return;
    }
    for at in ["0", "1000", "b000", "3fe00000", "c0200000"] {
        dma_refused(&["ring", at], 1);
    }
    host_unaffected();
}
