//! The mediator through the CLI: `moat demo` on each host, and `moat serve`
//! with a real loop device, ext4 and fsck while the driver is killed.
use moat_tests::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn demo_shows_delays_not_failures_on_each_host() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let out = moat(&["demo", "--host", h, "--seconds", "2"]);
        out.assert_code(0);
        assert!(
            out.stdout.contains("0 data mismatches, 0 errors, 0 hangs"),
            "{h}: {}",
            out.stdout
        );
        assert!(out.stdout.contains("the clients saw delays, not failures"));
        assert!(out.stdout.contains("faults seen"), "{}", out.stdout);
    }
    // The virtio-blk driver (kvm): the same service over a virtio-mmio disk.
    if hosts().contains(&"kvm") {
        let out = moat(&[
            "demo",
            "--host",
            "kvm",
            "--driver",
            "virtio-blk",
            "--seconds",
            "2",
        ]);
        out.assert_code(0);
        assert!(
            out.stdout.contains("0 data mismatches, 0 errors, 0 hangs"),
            "{}",
            out.stdout
        );
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn serve_exports_a_disk_linux_mounts_while_the_driver_dies() {
    if !sandbox_available() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root
        && std::path::Path::new("/dev/fuse").exists()
        && ["losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount"]
            .iter()
            .all(|t| have(t));
    if !ok {
        assert!(
            std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_none(),
            "MOAT_REQUIRE_ROOT_TOOLS is set, but root, /dev/fuse, losetup or e2fsprogs is missing"
        );
        eprintln!("skipping: needs root, /dev/fuse, losetup and e2fsprogs");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (disk, mnt, ext) = (
        d.path().join("disk.img"),
        d.path().join("mnt"),
        d.path().join("ext"),
    );
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(&ext).unwrap();
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let serve = Command::new(built("moat"))
        .args(["serve", "--disk"])
        .arg(&disk)
        .arg("--mount")
        .arg(&mnt)
        .args(["--kill-every", "100", "--seconds", "6"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let file = mnt.join("disk");
    let t0 = std::time::Instant::now();
    while !file.exists() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let lo = sh(&format!("losetup --find --show {}", file.display()));
    let e = ext.display();
    let result = std::panic::catch_unwind(|| {
        sh(&format!("mkfs.ext4 -q -F {lo}"));
        sh(&format!("mount {lo} {e}"));
        sh(&format!("mkdir {e}/t && for i in $(seq 1 40); do head -c $((i * 7919)) /dev/urandom > {e}/t/f$i; done"));
        let sums = sh(&format!("cd {e}/t && cksum f*"));
        sh(&format!("sync && umount {e}"));
        sh(&format!("fsck.ext4 -fn {lo}"));
        sh(&format!("mount {lo} {e}"));
        assert_eq!(sh(&format!("cd {e}/t && cksum f*")), sums);
        sh(&format!("umount {e}"));
    });
    let _ = Command::new("umount").arg(&ext).output();
    sh(&format!("losetup -d {lo}"));
    let out = serve.wait_with_output().unwrap();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("failed 0"), "{text}");
    let restarts: u64 = text
        .split("restarts ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(restarts >= 20, "only {restarts} restarts: {text}");
}
