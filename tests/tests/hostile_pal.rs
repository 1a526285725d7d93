//! Hostile guests that go around the ABI: they find the loader's C library
//! (as any image can, by walking the loader's tables) and make system
//! calls through it, past the seccomp filter's instruction-pointer check
//! (`guests/hostile/src/bin/hostile-pal-code.rs`). What must hold then: the
//! allow-list, sealed PAL code and table, kernel-enforced limits (cgroups,
//! `RLIMIT_NOFILE`), sockets that refuse descriptors, a monitor that
//! attributes every message to its picoprocess and treats anything else
//! as a violation, a bounded log. Each case asserts the exact outcome on
//! both hosts: on kvm the guest has no C library to reach (exit 3), and the
//! ABI-level cases behave as on linux. After each, the host still runs a
//! picoprocess.
use moat_tests::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn img() -> PathBuf {
    image("hostile-pal-code")
}

fn run(host: &str, extra: &[&str], args: &[&str]) -> Output {
    let image = img();
    let mut a: Vec<&str> = extra.to_vec();
    a.push(image.to_str().unwrap());
    a.push("--");
    a.extend_from_slice(args);
    run_on(host, &a)
}

/// The host still starts and runs a picoprocess.
fn host_intact(host: &str) {
    run_on(host, &[image("hello").to_str().unwrap()]).assert_code(0);
}

/// On kvm the gadget finds nothing: the VM holds no C library.
fn no_libc_on_kvm(out: &Output) {
    out.assert_code(3);
    assert!(
        out.stdout.contains("NO C LIBRARY in reach of the guest"),
        "{}",
        out.stdout
    );
}

fn no_escape(out: &Output) {
    assert!(!out.stdout.contains("ESCAPED"), "{}", out.stdout);
}

/// Whether this host makes per-picoprocess cgroups (the limits a guest
/// that bypasses the ABI meets); with `MOAT_REQUIRE_SANDBOX` it must.
fn cgroups() -> bool {
    match moat_monitor::cgroup::unavailable() {
        None => true,
        Some(why) => {
            assert!(
                std::env::var_os("MOAT_REQUIRE_SANDBOX").is_none(),
                "MOAT_REQUIRE_SANDBOX is set but moat cannot make cgroups here: {why}"
            );
            eprintln!("skipping the kernel-limit cases: {why}");
            false
        }
    }
}

fn manifest(dir: &tempfile::TempDir, text: &str) -> String {
    let p = dir.path().join("m.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn the_c_library_is_in_reach_on_linux_only() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let out = run(h, &[], &["find"]);
        if h == "kvm" {
            no_libc_on_kvm(&out);
        } else {
            out.assert_code(0);
            assert!(out.stdout.contains("the gadget works"), "{}", out.stdout);
        }
    }
}

/// System calls off the allow-list, made from PAL code: the filter still
/// ends the picoprocess and names the call.
#[test]
fn calls_off_the_allow_list_through_the_c_library_are_violations() {
    if !sandbox_available() {
        return;
    }
    for (mode, call) in [
        ("open-file", "`openat`"),
        ("wx-mmap", "`mmap`"),
        ("mseal-other", "`mseal`"),
        ("kill-zygote", "`kill`"),
        ("fork", "`fork`"),
        ("ptrace", "`ptrace`"),
        ("setsockopt", "`setsockopt`"),
    ] {
        for h in hosts() {
            let out = run(h, &[], &[mode]);
            no_escape(&out);
            if h == "kvm" {
                no_libc_on_kvm(&out);
                continue;
            }
            out.assert_code(159);
            assert!(
                out.stderr.contains("sandbox violation") && out.stderr.contains(call),
                "{mode}: {}",
                out.stderr
            );
        }
    }
    for h in hosts() {
        host_intact(h);
    }
}

/// PAL code stays PAL code: the loader's text, the C library, the PAL
/// table cannot be re-protected, unmapped, remapped, mapped or moved
/// over, and a write into the table faults. Twice on linux: sealed by the
/// kernel (`mseal`), and by the seccomp program as on a kernel before 6.10
/// (`MOAT_SEAL=seccomp`), which must refuse the same calls the same way.
#[test]
fn sealed_pal_code_and_table_cannot_be_changed() {
    if !sandbox_available() {
        return;
    }
    for env in [&[][..], &[("MOAT_SEAL", "seccomp")][..]] {
        let run = |h: &str, mode: &str| {
            let image = img();
            moat_env(
                &["run", "--host", h, image.to_str().unwrap(), "--", mode],
                env,
            )
        };
        for (mode, what) in [
            ("patch-code", "mprotect of the loader's text"),
            ("unmap-code", "munmap of the loader's text"),
            ("remap-code", "mremap of the loader's text"),
            ("remap-onto-code", "mremap onto the loader's text"),
            ("map-over-code", "mmap over the loader's text"),
            ("patch-table", "mprotect of the PAL table"),
        ] {
            for h in hosts() {
                let out = run(h, mode);
                no_escape(&out);
                if h == "kvm" {
                    no_libc_on_kvm(&out);
                    continue;
                }
                out.assert_code(0);
                assert!(
                    out.stdout.contains(&format!("REFUSED {what}: EPERM")),
                    "{mode} {env:?}: {}",
                    out.stdout
                );
            }
        }
        for h in hosts() {
            let out = run(h, "write-table");
            no_escape(&out);
            if h == "kvm" {
                no_libc_on_kvm(&out);
            } else {
                out.assert_code(139);
                assert!(out.stderr.contains("memory fault"), "{}", out.stderr);
            }
            host_intact(h);
        }
    }
}

/// Threads, descriptors and memory past the PAL: the kernel stops them
/// at the manifest's limits (plus the host's own, documented, share).
#[test]
fn limits_hold_against_a_guest_that_bypasses_the_abi() {
    if !sandbox_available() || !cgroups() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let m = manifest(&d, "[limits]\nthreads = 8\nhandles = 16\nmemory_mib = 64\n");
    let count = |out: &Output, key: &str| -> u64 {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{key}` in {}", out.stdout))
    };
    for h in hosts() {
        let out = run(h, &["--manifest", &m], &["threads"]);
        no_escape(&out);
        if h == "kvm" {
            no_libc_on_kvm(&out);
        } else {
            out.assert_code(0);
            let n = count(&out, "threads created past the PAL: ");
            assert!(
                n <= 8 + moat_monitor::cgroup::TASK_OVERHEAD,
                "{n} threads: {}",
                out.stdout
            );
        }
        let out = run(h, &["--manifest", &m], &["handles"]);
        no_escape(&out);
        if h == "kvm" {
            no_libc_on_kvm(&out);
        } else {
            out.assert_code(0);
            let n = count(&out, "descriptors opened past the PAL: ");
            assert!(
                n <= 16 + moat_host_common::child::FD_OVERHEAD,
                "{n} descriptors: {}",
                out.stdout
            );
        }
        let out = run(h, &["--manifest", &m], &["memory", "512"]);
        no_escape(&out);
        if h == "kvm" {
            no_libc_on_kvm(&out);
        } else {
            out.assert_code(137);
            assert!(
                out.stderr
                    .contains("killed by the kernel at its memory limit (memory_mib = 64"),
                "{}",
                out.stderr
            );
        }
        host_intact(h);
    }
}

/// A picoprocess that takes every task the kernel lets it does not starve
/// its sibling in the same session.
#[test]
fn a_hog_does_not_starve_its_sibling() {
    if !sandbox_available() || !cgroups() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let m = manifest(&d, "[limits]\nthreads = 8\n");
    let grant = file_uri(&img());
    let out = run(
        "linux",
        &["--manifest", &m, "--allow-ro", &grant],
        &["siblings", &grant, "6"],
    );
    no_escape(&out);
    out.assert_code(0);
    assert!(
        out.stdout
            .contains("the worker beside the hog ended with 0"),
        "{}",
        out.stdout
    );
}

/// No descriptor passes from one picoprocess to another: the monitor
/// channel sent over a pipe is refused by the receiving socket.
#[test]
fn the_monitor_channel_cannot_be_handed_to_another_picoprocess() {
    if !sandbox_available() {
        return;
    }
    let grant = file_uri(&img());
    for h in hosts() {
        let out = run(
            h,
            &[
                "--allow-ro",
                &grant,
                "--allow",
                "pipe.server:moat-pass",
                "--allow",
                "pipe.client:moat-pass",
            ],
            &["pass-fd", &grant],
        );
        no_escape(&out);
        if h == "kvm" {
            no_libc_on_kvm(&out);
            continue;
        }
        out.assert_code(0);
        assert!(
            out.stdout
                .contains("REFUSED passing the monitor channel over 1 pipe socket(s): EPERM"),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout.contains("the receiver ended with 0"),
            "{}",
            out.stdout
        );
    }
}

/// Anything on the monitor channel but a well-formed request from the
/// picoprocess itself ends it as a protocol violation: 159 with a report,
/// never 125, and a closed channel does not leave it running.
#[test]
fn the_monitor_channel_refuses_what_is_not_a_request() {
    if !sandbox_available() {
        return;
    }
    for (mode, report) in [
        ("empty-message", "protocol violation: an empty message"),
        ("garbage-message", "protocol violation: malformed message"),
        ("fd-to-monitor", "protocol violation"),
        (
            "close-channel",
            "protocol violation: it closed its monitor channel and went on running",
        ),
    ] {
        for h in hosts() {
            let t0 = Instant::now();
            let out = run(h, &[], &[mode]);
            no_escape(&out);
            if h == "kvm" {
                no_libc_on_kvm(&out);
                continue;
            }
            out.assert_code(159);
            assert!(out.stderr.contains(report), "{mode}: {}", out.stderr);
            assert!(
                t0.elapsed() < Duration::from_secs(8),
                "{mode} took {:?}",
                t0.elapsed()
            );
        }
    }
    for h in hosts() {
        host_intact(h);
    }
}

/// Thousands of refused requests leave a bounded log with a count of what
/// was suppressed (the same on both hosts: refusals are the monitor's).
#[test]
fn refusals_cannot_flood_the_log() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let out = run(h, &[], &["log-flood"]);
        out.assert_code(0);
        assert!(out.stdout.contains("REFUSED 5000 opens"), "{}", out.stdout);
        let lines = out.stderr.lines().count();
        // The burst, the rate over the run, and the summaries.
        assert!(lines < 400, "{h}: {lines} log lines for 5000 refusals");
        let suppressed: u64 = out
            .stderr
            .lines()
            .filter_map(|l| l.split("] ").nth(1))
            .filter_map(|l| l.strip_suffix(" more lines suppressed (refusals and debug output are limited to 10 lines a second after 64)"))
            .filter_map(|n| n.parse::<u64>().ok())
            .sum();
        let refusal_lines = out
            .stderr
            .lines()
            .filter(|l| l.contains("refused file:/moat-flood-"))
            .count() as u64;
        assert_eq!(
            refusal_lines + suppressed,
            5000,
            "{h}: every refusal is either logged or counted:\n{}",
            out.stderr
        );
    }
}
