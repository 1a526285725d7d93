//! Hostile guests: each tries one way out of the sandbox. Each must end
//! refused (the PAL says no) or killed (the sandbox ends it), with the host
//! intact and nothing outside its grant touched.
use moat_tests::*;
use std::fs;
use std::path::Path;

/// A granted directory next to an outside directory holding a secret.
struct Arena {
    _tmp: tempfile::TempDir,
    grant: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn arena() -> Arena {
    let tmp = tempfile::tempdir().unwrap();
    let grant = tmp.path().join("grant");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(grant.join("sub")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), "TOPSECRET").unwrap();
    fs::write(tmp.path().join("secret"), "TOPSECRET").unwrap();
    fs::write(grant.join("inside"), "ok").unwrap();
    std::os::unix::fs::symlink(&outside, grant.join("escape")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), grant.join("abs")).unwrap();
    std::os::unix::fs::symlink("loop", grant.join("loop")).unwrap();
    std::os::unix::fs::symlink("/proc/self/root", grant.join("proclink")).unwrap();
    Arena {
        _tmp: tmp,
        grant,
        outside,
    }
}

impl Arena {
    fn untouched(&self) {
        let parent = self.outside.parent().unwrap();
        assert_eq!(
            fs::read_to_string(self.outside.join("secret")).unwrap(),
            "TOPSECRET"
        );
        assert_eq!(
            fs::read_to_string(parent.join("secret")).unwrap(),
            "TOPSECRET"
        );
        for p in [
            self.outside.join("created-by-guest"),
            self.outside.join("moved-by-guest"),
            parent.join("created-by-guest"),
        ] {
            assert!(
                !p.exists(),
                "{} was created by a hostile guest",
                p.display()
            );
        }
        let mut names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["secret"]);
    }
}

fn refused(host: &str, image: &str, extra: &[&str], args: &[&str]) -> Output {
    let img = image_path(image);
    let mut a: Vec<&str> = extra.to_vec();
    a.push(&img);
    if !args.is_empty() {
        a.push("--");
        a.extend_from_slice(args);
    }
    let out = run_on(host, &a);
    assert!(
        !out.stdout.contains("ESCAPED"),
        "{image} escaped:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    out.assert_code(0);
    assert!(
        out.stdout.contains("REFUSED"),
        "{image} printed no REFUSED line:\n{}",
        out.stdout
    );
    out
}

fn image_path(name: &str) -> String {
    image(name).display().to_string()
}

fn killed(host: &str, image: &str, syscall: &str) {
    let out = run_on(host, &[&image_path(image)]);
    assert!(
        !out.stdout.contains("ESCAPED"),
        "{image} escaped:\n{}",
        out.stdout
    );
    out.assert_code(159);
    assert!(
        out.stderr.contains("sandbox violation"),
        "{image}: no violation report:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(syscall),
        "{image}: report does not name `{syscall}`:\n{}",
        out.stderr
    );
    assert_eq!(
        out.stderr
            .lines()
            .filter(|l| l.contains("sandbox violation"))
            .count(),
        1,
        "one report line"
    );
}

macro_rules! raw_syscall_tests {
    ($($name:ident: $image:expr, $syscall:expr;)*) => {$(
        #[test]
        fn $name() {
            if !sandbox_available() { return; }
            for h in hosts() { killed(h, $image, $syscall); }
        }
    )*};
}

raw_syscall_tests! {
    raw_open_is_killed: "hostile-raw-open", "`openat`";
    raw_execve_is_killed: "hostile-raw-execve", "`execve`";
    raw_socket_is_killed: "hostile-raw-socket", "`socket`";
    raw_ptrace_is_killed: "hostile-raw-ptrace", "`ptrace`";
    raw_kill_is_killed: "hostile-raw-kill", "`kill`";
    raw_write_to_inherited_fd_is_killed: "hostile-raw-write-fd", "`write`";
    raw_mmap_wx_is_killed: "hostile-raw-mmap-wx", "`mmap`";
    int80_is_killed: "hostile-int80", "32-bit system call";
}

#[test]
fn descriptor_numbers_are_not_handles() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        refused(h, "hostile-fd-handles", &[], &[]);
    }
}

#[test]
fn proc_self_tricks_are_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let a = arena();
        let g = file_uri(&a.grant);
        let out = refused(h, "hostile-proc-self", &["--allow-ro", &g], &[&g]);
        assert!(out.stdout.matches("REFUSED").count() >= 7, "{}", out.stdout);
        a.untouched();
    }
}

#[test]
fn writable_executable_memory_is_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        refused(h, "hostile-wx-memory", &[], &[]);
    }
}

#[test]
fn dotdot_paths_are_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let a = arena();
        let g = file_uri(&a.grant);
        let out = refused(h, "hostile-dotdot", &["--allow", &g], &[&g]);
        assert!(out.stdout.contains("InvalidUri"), "{}", out.stdout);
        a.untouched();
    }
}

#[test]
fn symlinks_out_of_the_grant_are_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let a = arena();
        let g = file_uri(&a.grant);
        let out = refused(h, "hostile-symlink", &["--allow", &g], &[&g]);
        assert!(out.stdout.contains("REFUSED rename"), "{}", out.stdout);
        a.untouched();
        assert_eq!(fs::read_to_string(a.grant.join("inside")).unwrap(), "ok");
    }
}

#[test]
fn racing_uri_rewrite_never_opens_the_other_uri() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let a = arena();
        let tmp = a.grant.parent().unwrap();
        // Same length: .../grant/inside vs .../outside/secret -> pad names.
        fs::write(a.grant.join("okfile"), "ok").unwrap();
        let good = file_uri(&a.grant.join("okfile"));
        let bad = file_uri(&tmp.join("outside").join("secret"));
        let (good, bad) = if good.len() == bad.len() {
            (good, bad)
        } else {
            // Make them the same length by choosing a file name to match.
            let want = bad.len() - file_uri(&a.grant).len() - 1;
            let name: String = "k".repeat(want);
            fs::write(a.grant.join(&name), "ok").unwrap();
            (file_uri(&a.grant.join(&name)), bad)
        };
        assert_eq!(good.len(), bad.len());
        let out = refused(
            h,
            "hostile-uri-race",
            &["--allow-ro", &file_uri(&a.grant)],
            &[&good, &bad],
        );
        assert!(out.stdout.contains("REFUSED racing URI"), "{}", out.stdout);
        a.untouched();
    }
}

#[test]
fn fork_bomb_hits_the_process_limit() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let img = image_path("hostile-fork-bomb");
        let me = format!("file:{img}");
        refused(h, "hostile-fork-bomb", &["--allow-ro", &me], &[&me, "0"]);
    }
}

fn manifest(dir: &Path, body: &str) -> String {
    let p = dir.join("moat.toml");
    fs::write(&p, body).unwrap();
    p.display().to_string()
}

#[test]
fn memory_exhaustion_is_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let t = tempfile::tempdir().unwrap();
        let m = manifest(t.path(), "[limits]\nmemory_mib = 128\n");
        let out = refused(h, "hostile-memory", &["--manifest", &m], &[]);
        assert!(
            out.stdout.contains("REFUSED memory after"),
            "{}",
            out.stdout
        );
    }
}

#[test]
fn handle_exhaustion_is_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let t = tempfile::tempdir().unwrap();
        let m = manifest(t.path(), "[limits]\nhandles = 100\n");
        let out = refused(h, "hostile-handles", &["--manifest", &m], &[]);
        assert!(
            out.stdout.contains("REFUSED handles after"),
            "{}",
            out.stdout
        );
    }
}

#[test]
fn thread_exhaustion_is_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let t = tempfile::tempdir().unwrap();
        let m = manifest(t.path(), "[limits]\nthreads = 8\n");
        let out = refused(h, "hostile-threads", &["--manifest", &m], &[]);
        assert!(
            out.stdout.contains("REFUSED threads after 7"),
            "{}",
            out.stdout
        );
    }
}

#[test]
fn bad_pointers_are_refused() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        refused(h, "hostile-bad-pointers", &[], &[]);
    }
}

#[test]
fn network_without_grant_is_refused() {
    if !sandbox_available() {
        return;
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    l.set_nonblocking(true).unwrap();
    for h in hosts() {
        refused(h, "hostile-network", &[], &[&port]);
        assert!(
            l.accept().is_err(),
            "a connection reached the host listener"
        );
    }
}

#[test]
fn stack_overflow_ends_the_picoprocess_only() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let out = run_on(h, &[&image_path("hostile-stack-overflow")]);
        assert!(!out.stdout.contains("ESCAPED"));
        out.assert_code(139);
        assert!(out.stderr.contains("memory fault"), "{}", out.stderr);
    }
}
