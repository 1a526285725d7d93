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
        conformance_on(h, &[]);
    }
}

/// Sealing the PAL's code by seccomp (what a kernel before 6.10 gets)
/// refuses nothing the PAL does itself.
#[test]
fn conformance_suite_passes_with_the_seccomp_seal() {
    if !sandbox_available() {
        return;
    }
    conformance_on("linux", &[("MOAT_SEAL", "seccomp")]);
}

fn conformance_on(h: &str, env: &[(&str, &str)]) {
    {
        let scratch = tempfile::tempdir().unwrap();
        let s = file_uri(scratch.path());
        let exit_img = file_uri(&image("exit-code"));
        let peer_img = file_uri(&image("shm-peer"));
        let conf = image("conformance").display().to_string();
        let out = moat_env(
            &[
                "run",
                "--host",
                h,
                "--allow",
                &s,
                "--allow-ro",
                &exit_img,
                "--allow-ro",
                &peer_img,
                "--allow",
                "shm:",
                "--allow",
                "tcp.server:127.0.0.1:",
                "--allow",
                "tcp.client:127.0.0.1:",
                "--allow",
                "pipe.server:",
                "--allow",
                "pipe.client:",
                &conf,
                "--",
                &s,
                &exit_img,
                "-",
                &peer_img,
            ],
            env,
        );
        let fails: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect();
        assert!(
            fails.is_empty(),
            "host {h}: failing cases:\n{}\nstderr:\n{}",
            fails.join("\n"),
            out.stderr
        );
        let skips: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("skip"))
            .collect();
        assert!(
            skips.is_empty(),
            "host {h}: skipped cases (everything is granted):\n{}",
            skips.join("\n")
        );
        out.assert_code(0);
        let summary = out
            .stdout
            .lines()
            .find(|l| l.starts_with("conformance:"))
            .expect("summary line");
        let passed: usize = summary.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(passed >= 40, "host {h}: only {passed} cases ran: {summary}");
    }
}
