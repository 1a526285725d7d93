//! The ABI conformance suite: one guest image exercising every call and
//! its error paths, run through the real host. Host-independent: the same
//! image and expectations on every host in `hosts()`.
use moat_tests::*;

#[test]
fn conformance_suite_passes() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        conformance_on(h, &[], &[]);
    }
}

/// Sealing the PAL's code by seccomp (what a kernel before 6.10 gets)
/// refuses nothing the PAL does itself.
#[test]
fn conformance_suite_passes_with_the_seccomp_seal() {
    if !sandbox_available() {
        return;
    }
    conformance_on("linux", &[], &[("MOAT_SEAL", "seccomp")]);
}
