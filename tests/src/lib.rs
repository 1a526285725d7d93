//! Support for moat's integration tests: they run the real `moat` binary,
//! the real loader and real guest images, built by `cargo build --workspace`.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>`, found from the test executable (`target/<profile>/deps/...`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().unwrap()
    } else {
        deps
    };
    dir.to_path_buf()
}

/// Path of a built artefact (binary or guest image); panics with the fix if missing.
pub fn built(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before `cargo test`",
        p.display()
    );
    p
}

pub fn image(name: &str) -> PathBuf {
    built(name)
}

/// The hosts every conformance and hostile test runs on: linux, and kvm
/// where `/dev/kvm` is usable (with `MOAT_REQUIRE_KVM` set, as in CI, a
/// machine without it fails instead of skipping kvm).
pub fn hosts() -> Vec<&'static str> {
    let mut h = vec!["linux"];
    if kvm_available() {
        h.push("kvm");
    } else {
        eprintln!("skipping host kvm: /dev/kvm is not usable here (set MOAT_REQUIRE_KVM=1 to fail instead)");
    }
    h
}

pub use moat_host_hypervisor::kvm_available;

/// Whether this machine can run the host-linux sandbox (user namespaces
/// and Landlock). With `MOAT_REQUIRE_SANDBOX` set (CI), a machine that
/// cannot is a failure, not a skip.
pub fn sandbox_available() -> bool {
    let ok = Command::new("unshare")
        .args(["-U", "-p", "-n", "-i", "-m", "-f", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("MOAT_REQUIRE_SANDBOX").is_some() {
            panic!("user namespaces are not available, and MOAT_REQUIRE_SANDBOX is set");
        }
        eprintln!("skipping: this machine cannot create user namespaces (set MOAT_REQUIRE_SANDBOX=1 to fail instead)");
    }
    ok
}

/// What a run printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code {} (wanted {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

/// Run a command with a deadline; a hang is a test failure, not a hung suite.
pub fn run_cmd(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    if let Some(data) = stdin {
        use std::io::Write;
        let mut si = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = si.write_all(&data);
        });
    }
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Output {
        code,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// `moat ARGS...`
pub fn moat(args: &[&str]) -> Output {
    moat_in(args, None)
}

pub fn moat_in(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = Command::new(built("moat"));
    c.args(args);
    run_cmd(c, stdin, Duration::from_secs(120))
}

/// `moat ARGS...` with `env` added to its environment.
pub fn moat_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(built("moat"));
    c.args(args);
    c.envs(env.iter().copied());
    run_cmd(c, None, Duration::from_secs(120))
}

/// `moat run --host HOST ARGS...`
pub fn run_on(host: &str, args: &[&str]) -> Output {
    let mut a = vec!["run", "--host", host];
    a.extend_from_slice(args);
    moat(&a)
}

pub mod root;
pub mod typing;

pub fn file_uri(p: &Path) -> String {
    format!("file:{}", p.display())
}

/// What the conformance guest needs on `moat run`'s command line: the
/// grants (`host_scratch` read-write, the images it starts, sections,
/// local sockets, pipes), and its own arguments (`guest_scratch`, the
/// URI it is told for it).
pub fn conformance_args(host_scratch: &str, guest_scratch: &str) -> (Vec<String>, Vec<String>) {
    let exit_img = file_uri(&image("exit-code"));
    let peer_img = file_uri(&image("shm-peer"));
    let grants = [
        "--allow",
        host_scratch,
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
    ];
    let guest = [guest_scratch, &exit_img, "-", &peer_img];
    (
        grants.iter().map(|s| s.to_string()).collect(),
        guest.iter().map(|s| s.to_string()).collect(),
    )
}

/// Run the conformance guest on `host` with every grant it needs, `extra`
/// before the image on `moat run`'s command line and `env` added to
/// moat's environment; fails the test on any failing or skipped case.
pub fn conformance_on(h: &str, extra: &[&str], env: &[(&str, &str)]) {
    let scratch = tempfile::tempdir().unwrap();
    let s = file_uri(scratch.path());
    conformance_in(h, extra, env, &s, &s);
}

/// [`conformance_on`] with its scratch directory given: `host_scratch`
/// granted read-write, `guest_scratch` the URI the guest is told (the
/// same, or a remapped name for it).
pub fn conformance_in(
    h: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    host_scratch: &str,
    guest_scratch: &str,
) {
    {
        let (grants, guest) = conformance_args(host_scratch, guest_scratch);
        let conf = image("conformance").display().to_string();
        let mut args: Vec<&str> = vec!["run", "--host", h];
        args.extend_from_slice(extra);
        args.extend(grants.iter().map(String::as_str));
        args.extend_from_slice(&[&conf, "--"]);
        args.extend(guest.iter().map(String::as_str));
        let out = moat_env(&args, env);
        let fails: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect();
        assert!(
            fails.is_empty(),
            "host {h} {extra:?}: failing cases:\n{}\nstderr:\n{}",
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

/// A child process that is ended if it still runs when this is dropped
/// (SIGTERM, then SIGKILL after 10 s): a test that fails half-way leaves
/// no server behind. Reach the child through `.0` or deref.
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
