//! Unmodified picoprocess images (built for host-linux) run in the micro-VM
//! through the first cut of the KVM PAL. Needs /dev/kvm.
use moat_host_hypervisor::{kvm_available, run_image};

fn image(name: &str) -> Option<Vec<u8>> {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first",
        p.display()
    );
    if !kvm_available() {
        eprintln!("skipping: no /dev/kvm (set MOAT_REQUIRE_KVM=1 to fail instead)");
        return None;
    }
    Some(std::fs::read(p).unwrap())
}

#[test]
fn hello_runs_unmodified_in_the_micro_vm() {
    let Some(img) = image("hello") else { return };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_image(
        &img,
        &["hello", "from", "kvm"],
        64 << 20,
        false,
        &mut out,
        &mut err,
    )
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(
        code,
        0,
        "stdout: {out}\nstderr: {}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(out, "hello from a moat picoprocess\nfrom\nkvm\n");
}

#[test]
fn a_panic_ends_with_101_and_its_message() {
    let Some(img) = image("panic") else { return };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_image(&img, &["panic"], 64 << 20, false, &mut out, &mut err).unwrap();
    assert_eq!(code, 101);
    assert!(String::from_utf8_lossy(&err).contains("deliberate panic"));
}

#[test]
fn a_raw_syscall_does_not_reach_the_host() {
    // In the micro-VM there is no kernel to call: `syscall` with no
    // handler set up ends the vCPU (or faults), never the host.
    let Some(img) = image("hostile-raw-open") else {
        return;
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let r = run_image(
        &img,
        &["hostile-raw-open"],
        64 << 20,
        false,
        &mut out,
        &mut err,
    );
    assert!(!String::from_utf8_lossy(&out).contains("ESCAPED"), "{r:?}");
    assert!(r.is_err() || r.as_ref().is_ok_and(|c| *c != 42), "{r:?}");
}
