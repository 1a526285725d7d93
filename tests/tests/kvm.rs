//! The kvm host end to end: granted devices (a 16550 UART, a file-backed
//! virtio-blk disk) driven by driver picoprocesses, device grants refused
//! or missing, hostile drivers and hypercalls, runaway vCPUs. Needs
//! /dev/kvm (CI sets MOAT_REQUIRE_KVM, which turns a skip into a failure).
use moat_tests::*;
use std::io::Write;
use std::time::Duration;

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

/// A file of `mib` MiB of zeros in a fresh temporary directory.
fn disk(mib: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    (d, p)
}

/// The `virtio-blk check` pattern (see drivers/virtio/src/bin/virtio-blk.rs).
fn pattern(seed: u64, sector: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(31)
        .wrapping_add(sector.wrapping_mul(7))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    (0..512u64)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.wrapping_add(i) as u8
        })
        .collect()
}

#[test]
fn uart_bytes_in_and_out() {
    if !kvm() {
        return;
    }
    let mut cmd = std::process::Command::new(built("moat"));
    cmd.args([
        "run",
        "--host",
        "kvm",
        "--device",
        "com1=uart",
        &img("uart-driver"),
    ]);
    let out = run_cmd(
        cmd,
        Some(b"hello through the uart\nsecond line\nquit\n"),
        Duration::from_secs(60),
    );
    out.assert_code(0);
    // Out through the transmit register, in through the receive FIFO and
    // its interrupt, and out again.
    assert!(out.stdout.contains("uart-driver ready"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("echo: HELLO THROUGH THE UART\necho: SECOND LINE\n"),
        "{}",
        out.stdout
    );
}

#[test]
fn virtio_blk_sectors_land_in_the_backing_file() {
    if !kvm() {
        return;
    }
    let (_d, path) = disk(8);
    let dev = format!("blk0=virtio-blk:{}", path.display());
    let out = run_on(
        "kvm",
        &[
            "--device",
            &dev,
            &img("virtio-blk"),
            "blk0",
            "check",
            "300",
            "42",
        ],
    );
    out.assert_code(0);
    assert!(
        out.stdout.contains(
            "capacity 16384 sectors, wrote 300 sectors, read back 300 sectors, all match"
        ),
        "{}",
        out.stdout
    );
    // What the driver wrote through the device is in the file.
    let bytes = std::fs::read(&path).unwrap();
    for s in 0..300u64 {
        let at = (s * 512) as usize;
        assert_eq!(&bytes[at..at + 512], &pattern(42, s)[..], "sector {s}");
    }
    assert!(
        bytes[300 * 512..].iter().all(|&b| b == 0),
        "beyond the written sectors"
    );
    // And the driver reads back what the host put there.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(&[0xab; 512]).unwrap();
    drop(f);
    let out = run_on(
        "kvm",
        &["--device", &dev, &img("virtio-blk"), "blk0", "dump", "0"],
    );
    out.assert_code(0);
    assert!(out.stdout.contains("000: ab ab ab ab"), "{}", out.stdout);
}

#[test]
fn devices_from_a_manifest_with_a_relative_backing_file() {
    if !kvm() {
        return;
    }
    let (d, _path) = disk(4);
    let m = d.path().join("driver.toml");
    std::fs::write(
        &m,
        format!(
            "image = \"{}\"\nargs = [\"disk\", \"check\", \"16\", \"7\"]\n[[device]]\nname = \"disk\"\nkind = \"virtio-blk\"\nfile = \"disk.img\"\n",
            img("virtio-blk")
        ),
    )
    .unwrap();
    let out = run_on("kvm", &["--manifest", m.to_str().unwrap()]);
    out.assert_code(0);
    assert!(out.stdout.contains("all match"), "{}", out.stdout);
}

#[test]
fn undeclared_devices_are_not_there() {
    if !kvm() {
        return;
    }
    // No device at all: the driver cannot open it, and the log names it.
    let out = run_on("kvm", &[&img("uart-driver"), "com1"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("device `com1` is not declared"),
        "{}",
        out.stderr
    );
    // Another device declared: still only what is declared exists.
    let (_d, path) = disk(1);
    let dev = format!("blk0=virtio-blk:{}", path.display());
    let out = run_on("kvm", &["--device", &dev, &img("uart-driver"), "com1"]);
    out.assert_code(2);
    // No port of an undeclared UART is reachable: a raw access ends it.
    let out = run_on(
        "kvm",
        &["--device", &dev, &img("virtio-blk"), "com1", "dump", "0"],
    );
    out.assert_code(3);
}

#[test]
fn dma_outside_the_picoprocess_is_refused() {
    if !kvm() {
        return;
    }
    let (_d, path) = disk(1);
    let before = std::fs::read(&path).unwrap();
    let dev = format!("blk0=virtio-blk:{}", path.display());
    let out = run_on("kvm", &["--device", &dev, &img("hostile-dma")]);
    out.assert_code(0);
    assert!(!out.stdout.contains("ESCAPED"), "{}", out.stdout);
    assert_eq!(
        out.stdout.matches("REFUSED").count(),
        4,
        "every foreign target refused:\n{}",
        out.stdout
    );
    assert!(out.stdout.contains("OK honest request"), "{}", out.stdout);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the disk is unchanged"
    );
}

#[test]
fn unknown_hypercalls_are_errors() {
    if !kvm() {
        return;
    }
    let out = run_on("kvm", &[&img("hostile-hypercall")]);
    out.assert_code(0);
    assert!(
        out.stdout
            .contains("REFUSED all unknown calls; still running"),
        "{}",
        out.stdout
    );
    // The VMM's internal ports answer only its own stubs.
    let out = run_on("kvm", &[&img("hostile-hypercall"), "exception-port"]);
    assert!(!out.stdout.contains("ESCAPED"), "{}", out.stdout);
    out.assert_code(159);
    assert!(
        out.stderr.contains("I/O port 0x51 is not granted"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_runaway_vcpu_is_ended_by_the_watchdog() {
    if !kvm() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("cpu.toml");
    std::fs::write(&m, "[limits]\ncpu_seconds = 1\n").unwrap();
    let out = run_on(
        "kvm",
        &[
            "--manifest",
            m.to_str().unwrap(),
            &img("hostile-spin"),
            "spin",
        ],
    );
    out.assert_code(137);
    assert!(out.stderr.contains("watchdog"), "{}", out.stderr);
    // Instructions that leave a VM elsewhere are faults here, or (vmcall
    // from CPL 3) refused by KVM itself with -KVM_EPERM.
    for mode in ["vmcall", "hlt"] {
        let out = run_on("kvm", &[&img("hostile-spin"), mode]);
        assert!(!out.stdout.contains("ESCAPED"), "{}", out.stdout);
        if mode == "vmcall" && out.code == 3 {
            assert!(
                out.stdout.contains("REFUSED vmcall rax=-1"),
                "{}",
                out.stdout
            );
        } else {
            out.assert_code(139);
        }
    }
}

#[test]
fn an_image_larger_than_the_memory_limit_is_refused() {
    if !kvm() {
        return;
    }
    // hello with a last segment that asks for 2 GiB (the limit is 1 GiB).
    let mut elf = std::fs::read(image("hello")).unwrap();
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes(elf[0x36..0x38].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(elf[0x38..0x3a].try_into().unwrap()) as usize;
    // The last loadable segment (nothing above it to overlap).
    let last = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) == 1)
        .max_by_key(|&ph| u64::from_le_bytes(elf[ph + 0x10..ph + 0x18].try_into().unwrap()))
        .expect("hello has a PT_LOAD");
    elf[last + 0x28..last + 0x30].copy_from_slice(&(2u64 << 30).to_le_bytes());
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("huge");
    std::fs::write(&p, &elf).unwrap();
    for h in hosts() {
        let out = run_on(h, &[p.to_str().unwrap()]);
        out.assert_code(2);
        assert!(out.stderr.contains("memory"), "host {h}: {}", out.stderr);
    }
}

#[test]
fn attacks_on_the_vmm_end_only_the_picoprocess() {
    if !kvm() {
        return;
    }
    // The VM's own memory: page tables, IDT, exception stubs, call stubs.
    for addr in ["0x1000", "0x9000", "0xa000", "0xb000", "0xc000"] {
        let out = run_on("kvm", &[&img("hostile-vmm"), "vmm-area", addr]);
        assert!(!out.stdout.contains("ESCAPED"), "{addr}: {}", out.stdout);
        out.assert_code(139);
    }
    // A fault inside a handler with a hostile stack pointer.
    let out = run_on("kvm", &[&img("hostile-vmm"), "nested-rsp"]);
    assert!(!out.stdout.contains("ESCAPED"), "{}", out.stdout);
    out.assert_code(132);
    assert!(
        out.stderr.contains("unhandled illegal instruction"),
        "{}",
        out.stderr
    );
    // Thousands of threads over time, vCPUs reused.
    let out = run_on("kvm", &[&img("hostile-vmm"), "threads", "4200"]);
    out.assert_code(0);
    // The host copies from a file mapping past the file's end: as on
    // linux, the picoprocess ends with a report, the host does not.
    let d = tempfile::tempdir().unwrap();
    let tiny = d.path().join("tiny");
    std::fs::write(&tiny, b"abc").unwrap();
    let grant = file_uri(&tiny);
    for h in hosts() {
        let out = run_on(
            h,
            &[
                "--allow-ro",
                &grant,
                &img("hostile-vmm"),
                "sigbus",
                tiny.to_str().unwrap(),
            ],
        );
        assert!(!out.stdout.contains("ESCAPED"), "{h}: {}", out.stdout);
        out.assert_code(135);
        assert!(
            out.stderr.contains("memory fault inside the PAL"),
            "{h}: {}",
            out.stderr
        );
    }
}
