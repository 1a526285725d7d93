//! Data safety on the host: moat never pins a host file system, `moat
//! serve` stops without breaking a mounted file system, clears what a
//! killed server left, serves a disk file only once at a time, and refuses
//! disks it could not serve whole. On each host; real loop devices, ext4,
//! FUSE and signals (root; see `moat_tests::root`).
use moat_tests::root::{self, FsMount, LoopDev};
use moat_tests::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tests here take turns: they use loop devices, mounts and signals,
/// and timing matters to some.
static SERIAL: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The driver `moat serve` uses on `host`: the file-backed one on linux,
/// the virtio-blk device (and so the device grant and its lock) on kvm.
fn driver(host: &str) -> &'static str {
    if host == "kvm" {
        "virtio-blk"
    } else {
        "blk-file"
    }
}

/// A running `moat` whose output is collected as it comes.
struct Moat {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Moat {
    fn start(args: &[&str], stdin: bool) -> Moat {
        let mut child = Command::new(built("moat"))
            .args(args)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |r: Box<dyn std::io::Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let mut b = b.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
            });
            buf
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Moat {
            child,
            stdout,
            stderr,
        }
    }

    /// `moat serve` of `disk` on `mount` with `extra` arguments, once it
    /// says it is serving.
    fn serve(host: &str, disk: &Path, mount: &Path, extra: &[&str]) -> Moat {
        let mut args = vec![
            "serve",
            "--host",
            host,
            "--driver",
            driver(host),
            "--disk",
            disk.to_str().unwrap(),
            "--mount",
            mount.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut m = Moat::start(&args, false);
        m.wait_for_stdout("serving ", Duration::from_secs(30));
        m
    }

    fn out(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn err(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait_for(&mut self, stream: &Arc<Mutex<String>>, what: &str, timeout: Duration) {
        let t0 = Instant::now();
        while !stream.lock().unwrap().contains(what) {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "moat ended ({st}) before printing {what:?}\nstdout:\n{}\nstderr:\n{}",
                    self.out(),
                    self.err()
                );
            }
            assert!(
                t0.elapsed() < timeout,
                "no {what:?} within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                self.out(),
                self.err()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for_stdout(&mut self, what: &str, timeout: Duration) {
        let s = self.stdout.clone();
        self.wait_for(&s, what, timeout);
    }

    fn wait_for_stderr(&mut self, what: &str, timeout: Duration) {
        let s = self.stderr.clone();
        self.wait_for(&s, what, timeout);
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Its exit code, once it ends within `timeout` (a failure if not).
    fn wait(&mut self, timeout: Duration) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the readers take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                use std::os::unix::process::ExitStatusExt;
                return st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
            }
            if t0.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "moat did not end within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.out(),
                    self.err()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Moat {
    /// An orderly stop first (a killed server would leave its mount),
    /// then a kill.
    fn drop(&mut self) {
        if self.running() {
            self.signal(libc::SIGTERM);
            let t0 = Instant::now();
            while self.running() && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The counters line `moat serve` prints: (client requests, completed,
/// failed).
fn accounting(out: &str) -> (u64, u64, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("client requests "))
        .unwrap_or_else(|| panic!("no counters in:\n{out}"));
    let num = |key: &str| -> u64 {
        line.split(key)
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{key}` in {line:?}"))
    };
    (num("client requests "), num("completed "), num("failed "))
}

fn disk_file(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p
}

fn subdir(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir(&p).unwrap();
    p
}

/// A host file system mounted before moat starts is really released when
/// the host unmounts it while moat runs: `moat run` and `moat serve`, on
/// each host. (Before, the zygote's copy of the host's mounts kept its
/// superblock alive, and the loop device busy, until moat ended.)
#[test]
fn host_file_systems_are_released_while_moat_runs() {
    let _t = turn();
    if !sandbox_available() || !root::root_tools("the mount-release test") {
        return;
    }
    for host in hosts() {
        for mode in ["run", "serve"] {
            let d = tempfile::tempdir().unwrap();
            let img = disk_file(d.path(), "fs.img", 32 << 20);
            root::run_ok("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
            let (mut lo, _) = LoopDev::attach(&img);
            let mut fs = FsMount::ext4(&lo.dev, &subdir(d.path(), "fs"));
            std::fs::write(fs.dir().join("data"), b"written after mount").unwrap();
            // moat starts after the mount (a zygote starts with it).
            let mut m = if mode == "run" {
                let mut m = Moat::start(
                    &["run", "--host", host, image("echo").to_str().unwrap()],
                    true,
                );
                let stdin = m.child.stdin.as_mut().unwrap();
                stdin.write_all(b"ping\n").unwrap();
                stdin.flush().unwrap();
                m.wait_for_stdout("ping", Duration::from_secs(30));
                m
            } else {
                let disk = disk_file(d.path(), "disk.img", 4 << 20);
                Moat::serve(host, &disk, &subdir(d.path(), "mnt"), &[])
            };
            fs.unmount();
            let ext4_proc = format!("/proc/fs/ext4/{}", lo.name());
            let t0 = Instant::now();
            while (Path::new(&ext4_proc).exists() || root::held_by_a_file_system(&lo.dev))
                && t0.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                !Path::new(&ext4_proc).exists(),
                "{host} {mode}: the ext4 on {} is still alive after umount",
                lo.dev
            );
            assert!(
                !root::held_by_a_file_system(&lo.dev),
                "{host} {mode}: {} is still held after umount",
                lo.dev
            );
            assert!(lo.detach(), "{host} {mode}: {} kept its file", lo.dev);
            assert!(m.running(), "{host} {mode}: moat ended early: {}", m.err());
            // The file system is whole: unmounted for real, so written out.
            root::run_ok("fsck.ext4", &["-fn", img.to_str().unwrap()]);
            root::ext4_clean_without_replay(&img).unwrap();
            if mode == "run" {
                drop(m.child.stdin.take());
            } else {
                m.signal(libc::SIGTERM);
            }
            assert_eq!(
                m.wait(Duration::from_secs(20)),
                0,
                "{host} {mode}: {}",
                m.err()
            );
        }
    }
}

/// SIGTERM while a mounted file system is busy on the export: the server
/// says so once and keeps serving until the last user lets go, then flushes,
/// accounts for every request and exits 0; the file system is clean
/// without a journal replay.
#[test]
fn sigterm_waits_for_the_last_user_and_exits_clean() {
    let _t = turn();
    if !sandbox_available() || !root::root_tools("the orderly-stop test") {
        return;
    }
    for host in hosts() {
        let d = tempfile::tempdir().unwrap();
        let disk = disk_file(d.path(), "disk.img", 64 << 20);
        let mnt = subdir(d.path(), "mnt");
        let mut m = Moat::serve(host, &disk, &mnt, &[]);
        let (mut lo, _) = LoopDev::attach(&mnt.join("disk"));
        root::run_ok("mkfs.ext4", &["-q", "-F", &lo.dev]);
        let mut fs = FsMount::ext4(&lo.dev, &subdir(d.path(), "fs"));
        // A busy writer (small files, some fsynced) while the signal comes.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (dir, stop) = (fs.dir().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let data = vec![(n % 251) as u8; 4096 + (n as usize % 7) * 1000];
                    // A bounded set of names, rewritten in turn: a fast
                    // I/O path must not fill the file system's inodes or
                    // blocks before the signal's effect is checked.
                    let p = dir.join(format!("f{}", n % 1000));
                    std::fs::write(&p, &data).unwrap();
                    if n.is_multiple_of(10) {
                        std::fs::File::open(&p).unwrap().sync_all().unwrap();
                    }
                    n += 1;
                }
                n
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        m.signal(libc::SIGTERM);
        m.wait_for_stderr("still in use by", Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            m.running(),
            "{host}: the server stopped while in use: {}",
            m.err()
        );
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let files = writer.join().unwrap();
        assert!(files > 0);
        root::run_ok("sync", &[]);
        fs.unmount();
        assert!(lo.detach(), "{host}: {} kept its file", lo.dev);
        let t0 = Instant::now();
        let code = m.wait(Duration::from_secs(10));
        let (out, err) = (m.out(), m.err());
        assert_eq!(code, 0, "{host}: stdout:\n{out}\nstderr:\n{err}");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{host}: took {:?} to stop once unused",
            t0.elapsed()
        );
        assert_eq!(
            err.matches("still in use by").count(),
            1,
            "{host}: said more than once:\n{err}"
        );
        assert!(
            err.contains(&lo.dev),
            "{host}: the loop device is not named:\n{err}"
        );
        let (submitted, completed, failed) = accounting(&out);
        assert!(submitted > 0, "{host}: {out}");
        assert_eq!(
            submitted,
            completed + failed,
            "{host}: unaccounted requests: {out}"
        );
        assert_eq!(failed, 0, "{host}: {out}");
        root::run_ok("fsck.ext4", &["-fn", disk.to_str().unwrap()]);
        root::ext4_clean_without_replay(&disk).unwrap_or_else(|e| panic!("{host}: {e}"));
        eprintln!("{host}: {files} files written; {out}");
    }
}

/// A second signal while the export is in use stops the server at once,
/// still accounting for every request.
#[test]
fn a_second_signal_forces_the_stop() {
    let _t = turn();
    if !sandbox_available() || !root::root_tools("the forced-stop test") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let disk = disk_file(d.path(), "disk.img", 8 << 20);
    let mnt = subdir(d.path(), "mnt");
    let mut m = Moat::serve("linux", &disk, &mnt, &[]);
    let (mut lo, _) = LoopDev::attach(&mnt.join("disk"));
    root::run_ok("mkfs.ext4", &["-q", "-F", &lo.dev]);
    m.signal(libc::SIGTERM);
    m.wait_for_stderr("still in use by", Duration::from_secs(10));
    m.signal(libc::SIGTERM);
    let code = m.wait(Duration::from_secs(10));
    let (out, err) = (m.out(), m.err());
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("stopped by force"), "{err}");
    let (submitted, completed, failed) = accounting(&out);
    assert_eq!(submitted, completed + failed, "{out}");
    assert!(lo.detach());
    // The lazily detached mount went with the server.
    assert!(std::fs::read_dir(&mnt).unwrap().next().is_none());
}

/// A server killed with SIGKILL leaves a dead FUSE mount; the next server
/// on that mount point clears it and serves, or, while a loop device still
/// holds it, refuses with exit 2 and the commands that clear it.
#[test]
fn a_killed_servers_stale_mount_is_cleared_or_named() {
    let _t = turn();
    if !sandbox_available() || !root::root_tools("the stale-mount test") {
        return;
    }
    for host in hosts() {
        let d = tempfile::tempdir().unwrap();
        let disk = disk_file(d.path(), "disk.img", 8 << 20);
        let mnt = subdir(d.path(), "mnt");
        let mut m = Moat::serve(host, &disk, &mnt, &[]);
        m.signal(libc::SIGKILL);
        m.wait(Duration::from_secs(10));
        let e = std::fs::read_dir(&mnt).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{host}: {e}");
        let mut m = Moat::serve(host, &disk, &mnt, &[]);
        assert!(
            m.err().contains("cleared the stale mount"),
            "{host}: {}",
            m.err()
        );
        // Now with a loop device on the export when the server dies.
        let (mut lo, _) = LoopDev::attach(&mnt.join("disk"));
        m.signal(libc::SIGKILL);
        m.wait(Duration::from_secs(10));
        let out = moat(&[
            "serve",
            "--host",
            host,
            "--driver",
            driver(host),
            "--disk",
            disk.to_str().unwrap(),
            "--mount",
            mnt.to_str().unwrap(),
        ]);
        out.assert_code(2);
        assert!(out.stderr.contains("stale mount"), "{host}: {}", out.stderr);
        assert!(
            out.stderr.contains(&format!("losetup -d {}", lo.dev)),
            "{host}: {}",
            out.stderr
        );
        assert!(lo.detach());
        let mut m = Moat::serve(host, &disk, &mnt, &["--seconds", "1"]);
        assert!(
            m.err().contains("cleared the stale mount"),
            "{host}: {}",
            m.err()
        );
        assert_eq!(m.wait(Duration::from_secs(20)), 0, "{host}: {}", m.err());
    }
}

/// A disk file is served by one server at a time: a second one (either
/// host, `moat run` with the disk as a device too) is refused with exit 2
/// naming the first; read-only servers may share.
#[test]
fn a_disk_is_served_once() {
    let _t = turn();
    if !sandbox_available() || !root::root_tools("the disk-lock test") {
        return;
    }
    let hs = hosts();
    for host in &hs {
        let d = tempfile::tempdir().unwrap();
        let disk = disk_file(d.path(), "disk.img", 8 << 20);
        let mut first = Moat::serve(host, &disk, &subdir(d.path(), "a"), &[]);
        let pid = first.child.id();
        for other in &hs {
            let b = subdir(d.path(), &format!("b-{other}"));
            for ro in [false, true] {
                let mut args = vec![
                    "serve",
                    "--host",
                    other,
                    "--driver",
                    driver(other),
                    "--disk",
                    disk.to_str().unwrap(),
                    "--mount",
                    b.to_str().unwrap(),
                ];
                if ro {
                    args.push("--read-only");
                }
                let out = moat(&args);
                out.assert_code(2);
                assert!(
                    out.stderr.contains(&format!("already served by pid {pid}")),
                    "{host}/{other}: {}",
                    out.stderr
                );
            }
        }
        if hs.contains(&"kvm") {
            let out = run_on(
                "kvm",
                &[
                    "--device",
                    &format!("blk0=virtio-blk:{}", disk.display()),
                    image("virtio-blk").to_str().unwrap(),
                    "blk0",
                    "check",
                    "8",
                    "1",
                ],
            );
            out.assert_code(2);
            assert!(out.stderr.contains("already served"), "{}", out.stderr);
        }
        first.signal(libc::SIGTERM);
        assert_eq!(first.wait(Duration::from_secs(20)), 0);
        // Released: two read-only servers share it.
        let mut ra = Moat::serve(host, &disk, &subdir(d.path(), "ra"), &["--read-only"]);
        let mut rb = Moat::serve(host, &disk, &subdir(d.path(), "rb"), &["--read-only"]);
        for r in [&mut ra, &mut rb] {
            r.signal(libc::SIGTERM);
            assert_eq!(r.wait(Duration::from_secs(20)), 0, "{}", r.err());
        }
    }
}

/// Disks that could not be served whole are refused at once with exit 2
/// and the reason; a file that cannot be written is served with
/// `--read-only`, where writes fail with EROFS.
#[test]
fn disks_are_checked_up_front() {
    let _t = turn();
    if !sandbox_available() || !root::root_tools("the disk-check test") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mnt = subdir(d.path(), "mnt");
    let serve = |host: &str, disk: &Path, extra: &[&str]| {
        let mut a = vec![
            "serve",
            "--host",
            host,
            "--driver",
            driver(host),
            "--disk",
            disk.to_str().unwrap(),
            "--mount",
            mnt.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        moat(&a)
    };
    // A read-only file system holding a disk file.
    let ro = subdir(d.path(), "ro");
    root::run_ok(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            ro.to_str().unwrap(),
        ],
    );
    let ro_disk = disk_file(&ro, "d.img", 1 << 20);
    std::fs::write(&ro_disk, vec![7u8; 1 << 20]).unwrap();
    root::run_ok("mount", &["-o", "remount,ro", ro.to_str().unwrap()]);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = root::run("umount", &[self.0.to_str().unwrap()]);
        }
    }
    let _ro = Unmount(ro.clone());
    for host in hosts() {
        let odd = disk_file(d.path(), &format!("odd-{host}.img"), 1_000_000);
        let out = serve(host, &odd, &[]);
        out.assert_code(2);
        assert!(
            out.stderr.contains("not a whole number of 512-byte blocks"),
            "{}",
            out.stderr
        );
        let tiny = disk_file(d.path(), &format!("tiny-{host}.img"), 100);
        let out = serve(host, &tiny, &[]);
        out.assert_code(2);
        assert!(
            out.stderr.contains("smaller than one 512-byte block"),
            "{}",
            out.stderr
        );
        let ok = disk_file(d.path(), &format!("ok-{host}.img"), 1 << 20);
        let out = serve(host, &ok, &["--kill-every", "0"]);
        out.assert_code(2);
        assert!(
            out.stderr.contains("positive number of milliseconds"),
            "{}",
            out.stderr
        );
        let t0 = Instant::now();
        let out = serve(host, &ro_disk, &[]);
        out.assert_code(2);
        assert!(
            out.stderr.contains("Read-only file system"),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains("--read-only"), "{}", out.stderr);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // Served read-only: reads see the file, writes fail.
        let mut m = Moat::serve(host, &ro_disk, &mnt, &["--read-only"]);
        let file = mnt.join("disk");
        let mut buf = vec![0u8; 4096];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&file)
            .unwrap()
            .read_exact_at(&mut buf, 4096)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 7), "{host}: wrong bytes read");
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{host}: {e}");
        m.signal(libc::SIGTERM);
        assert_eq!(m.wait(Duration::from_secs(20)), 0, "{host}: {}", m.err());
        let (submitted, completed, failed) = accounting(&m.out());
        assert_eq!((submitted, failed), (completed, 0), "{}", m.out());
    }
}
