//! The `moat` command line: running images, exit codes, bad input, `abi`,
//! `inspect`, `images`.
use moat_tests::*;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

#[test]
fn hello_runs_by_bare_name() {
    if !sandbox_available() {
        return;
    }
    let out = moat(&["run", "hello", "--", "a", "b c"]);
    out.assert_code(0);
    assert!(
        out.stdout.contains("hello from a moat picoprocess"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("\na\n") && out.stdout.contains("b c"),
        "{}",
        out.stdout
    );
}

#[test]
fn exit_codes_pass_through() {
    if !sandbox_available() {
        return;
    }
    for code in ["0", "3", "77", "255"] {
        let out = moat(&["run", "exit-code", "--", code]);
        out.assert_code(code.parse().unwrap());
    }
}

#[test]
fn panic_ends_with_101_and_message() {
    if !sandbox_available() {
        return;
    }
    let out = moat(&["run", "panic"]);
    out.assert_code(101);
    assert!(out.stderr.contains("deliberate panic"), "{}", out.stderr);
}

#[test]
fn refused_uri_is_reported() {
    if !sandbox_available() {
        return;
    }
    let out = moat(&["run", "hostile-network", "--", "1"]);
    out.assert_code(0);
    assert!(
        out.stderr.contains("tcp.client:127.0.0.1:1"),
        "refusals are logged: {}",
        out.stderr
    );
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let t = tempfile::tempdir().unwrap();
    let garbage = t.path().join("garbage");
    fs::write(&garbage, b"\x7fELF\x02\x01\x01garbage").unwrap();
    let text = t.path().join("text");
    fs::write(&text, "#!/bin/sh\necho hi\n").unwrap();
    let bad_manifest = t.path().join("m.toml");
    fs::write(&bad_manifest, "imgae = \"hello\"\n").unwrap();
    let bad_limits = t.path().join("l.toml");
    fs::write(&bad_limits, "[limits]\nthreads = 0\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["run".into(), "no-such-image".into()], "no-such-image"),
        (
            vec!["run".into(), "/nonexistent/image".into()],
            "/nonexistent/image",
        ),
        (vec!["run".into(), garbage.display().to_string()], "ELF"),
        (vec!["run".into(), text.display().to_string()], "ELF"),
        (vec!["run".into(), "/bin/true".into()], "static"),
        (
            vec![
                "run".into(),
                "--manifest".into(),
                bad_manifest.display().to_string(),
                "hello".into(),
            ],
            "imgae",
        ),
        (
            vec![
                "run".into(),
                "--manifest".into(),
                bad_limits.display().to_string(),
                "hello".into(),
            ],
            "threads",
        ),
        (
            vec![
                "run".into(),
                "--manifest".into(),
                "/nonexistent.toml".into(),
                "hello".into(),
            ],
            "nonexistent.toml",
        ),
        (
            vec![
                "run".into(),
                "--allow".into(),
                "file:relative".into(),
                "hello".into(),
            ],
            "file:relative",
        ),
        (
            vec![
                "run".into(),
                "--allow".into(),
                "gopher:x".into(),
                "hello".into(),
            ],
            "gopher:x",
        ),
        (
            vec!["run".into(), "--host".into(), "vax".into(), "hello".into()],
            "vax",
        ),
        (vec!["inspect".into(), garbage.display().to_string()], "ELF"),
        (vec!["abi".into(), "--format".into(), "yaml".into()], "yaml"),
    ];
    for (args, needle) in cases {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = moat(&a);
        assert_eq!(
            out.code, 2,
            "{a:?}: exit {} stderr {}",
            out.code, out.stderr
        );
        assert!(
            out.stderr.contains(needle),
            "{a:?}: stderr does not name `{needle}`: {}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("panicked"),
            "{a:?} panicked: {}",
            out.stderr
        );
    }
}

#[test]
fn run_help_documents_exit_codes() {
    let out = moat(&["run", "--help"]);
    out.assert_code(0);
    for needle in ["159", "125", "2"] {
        assert!(
            out.stdout.contains(needle),
            "--help lacks {needle}: {}",
            out.stdout
        );
    }
}

#[test]
fn abi_json_has_every_call() {
    let out = moat(&["abi", "--format", "json"]);
    out.assert_code(0);
    for name in [
        "DkStreamOpen",
        "DkVirtualMemoryAlloc",
        "DkObjectsWaitAny",
        "DkDebugStringPrint",
        "LibOsExceptionDispatch",
    ] {
        assert!(
            out.stdout.contains(&format!("\"{name}\"")),
            "missing {name}"
        );
    }
    assert!(out.stdout.contains("\"version\""));
    let md = moat(&["abi", "--format", "md"]);
    md.assert_code(0);
    assert!(md.stdout.contains("DkStreamMapPeBinary"));
    let c = moat(&["abi", "--format", "c"]);
    c.assert_code(0);
    assert!(c.stdout.contains("moat_pal_table"));
}

#[test]
fn inspect_accepts_images_and_explains_rejections() {
    let out = moat(&["inspect", &image("hello").display().to_string()]);
    out.assert_code(0);
    assert!(
        out.stdout.contains("W^X") || out.stdout.contains("ok"),
        "{}",
        out.stdout
    );
    let out = moat(&["inspect", &image("hostile-raw-open").display().to_string()]);
    assert_ne!(
        out.code, 0,
        "an image with a syscall instruction is flagged: {}",
        out.stdout
    );
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("syscall"),
        "{}",
        out.stdout
    );
    let out = moat(&["inspect", "/bin/true"]);
    assert_ne!(out.code, 0);
}

#[test]
fn images_lists_built_images() {
    let out = moat(&["images"]);
    out.assert_code(0);
    for name in ["hello", "conformance", "echo"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} not listed:\n{}",
            out.stdout
        );
    }
    assert!(out.stdout.contains(&target_dir().display().to_string()));
}

#[test]
fn hello_runs_unmodified_on_the_kvm_host() {
    if !moat_host_hypervisor::kvm_available() {
        eprintln!("skipping: no /dev/kvm (set MOAT_REQUIRE_KVM=1 to fail instead)");
        return;
    }
    let out = moat(&["run", "--host", "kvm", "hello", "--", "a", "b c"]);
    out.assert_code(0);
    assert_eq!(out.stdout, "hello from a moat picoprocess\na\nb c\n");
    // The same image, the same output, on host-linux.
    if sandbox_available() {
        let linux = moat(&["run", "--host", "linux", "hello", "--", "a", "b c"]);
        linux.assert_code(0);
        assert_eq!(linux.stdout, out.stdout);
    }
    let p = moat(&["run", "--host", "kvm", "panic"]);
    p.assert_code(101);
    assert!(p.stderr.contains("deliberate panic"), "{}", p.stderr);
}

// Bad input, help texts and runs by name, on `moat`'s raw output.

fn moat_raw(args: &[&str]) -> Output {
    Command::new(built("moat"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn one_line(o: &Output, needle: &str) {
    let e = stderr_of(o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with("moat: ") && e.contains(needle), "{e}");
}

fn temp(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("moat-cli-test-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn help_documents_exit_codes() {
    let o = moat_raw(&["run", "--help"]);
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    for s in ["125", "159", "128+N", "--allow-ro", "--manifest", "--host"] {
        assert!(h.contains(s), "`{s}` missing from:\n{h}");
    }
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let o = moat_raw(&["run", "no-such-image"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(
        &o,
        "image `no-such-image` not found; `moat images` lists the built images",
    );

    // Devices: only on kvm, only known kinds, backing files that exist.
    let o = moat_raw(&["run", "--device", "com1=uart", "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "only the kvm host grants devices: add --host kvm");

    let o = moat_raw(&["run", "--host", "kvm", "--device", "fd0=floppy", "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "floppy");

    let o = moat_raw(&[
        "run",
        "--host",
        "kvm",
        "--device",
        "blk0=virtio-blk",
        "hello",
    ]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "blk0=virtio-blk:PATH");

    let o = moat_raw(&[
        "run",
        "--host",
        "kvm",
        "--device",
        "blk0=virtio-blk:/nonexistent/disk.img",
        "hello",
    ]);
    assert_eq!(o.status.code(), Some(2));
    one_line(
        &o,
        "device `blk0`: cannot open its backing file `/nonexistent/disk.img`",
    );

    let o = moat_raw(&[
        "run", "--host", "kvm", "--device", "a=uart", "--device", "a=uart", "hello",
    ]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "`a`");

    let o = moat_raw(&["run", "--allow", "file:relative", "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "file:relative");

    let o = moat_raw(&["run", "/etc/hostname-does-not-exist/x"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "cannot open");

    let not_elf = temp("not-elf", "just text\n");
    let o = moat_raw(&["run", not_elf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "not an ELF file");

    let m = temp("bad.toml", "imag = \"x\"\n");
    let o = moat_raw(&["run", "--manifest", m.to_str().unwrap(), "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "imag");

    let m = temp(
        "dev.toml",
        "[[device]]\nname = \"blk0\"\nkind = \"virtio-blk\"\n",
    );
    let o = moat_raw(&["run", "--manifest", m.to_str().unwrap(), "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "add `file = \"PATH\"` to its [[device]] entry");

    let m = temp(
        "dev2.toml",
        "[[device]]\nname = \"com1\"\nkind = \"uart\"\n",
    );
    let o = moat_raw(&["run", "--manifest", m.to_str().unwrap(), "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "only the kvm host grants devices");

    // More memory than the kvm host offers.
    let m = temp("big.toml", "[limits]\nmemory_mib = 8192\n");
    let o = moat_raw(&[
        "run",
        "--host",
        "kvm",
        "--manifest",
        m.to_str().unwrap(),
        "hello",
    ]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "memory_mib");

    let o = moat_raw(&["run"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "no image given");

    // Fault kinds the drivers do not know.
    let o = moat_raw(&["campaign", "--count", "1", "--kinds", "crash,bogus"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "unknown fault kind `bogus`");
    let o = moat_raw(&["demo", "--faults", "1:10:melt"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "unknown fault kind `melt`");

    let o = moat_raw(&["run", "--manifest", "/nonexistent.toml"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "cannot read manifest");

    // clap's own usage errors exit 2 as well.
    let o = moat_raw(&["run", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    let o = moat_raw(&["run", "--host", "vmware", "x"]);
    assert_eq!(o.status.code(), Some(2));
    for p in [not_elf, temp("bad.toml", ""), temp("dev.toml", "")] {
        let _ = std::fs::remove_file(p);
    }
}

/// Whether the images and the loader are built next to `moat`.
fn images_built(name: &str) -> bool {
    let dir = built("moat").parent().unwrap().to_path_buf();
    let ok = dir.join(name).is_file() && dir.join("moat-loader").is_file();
    if !ok {
        if std::env::var_os("MOAT_REQUIRE_SANDBOX").is_some() {
            panic!("image `{name}` or moat-loader not built and MOAT_REQUIRE_SANDBOX is set");
        }
        eprintln!("SKIP: image `{name}` or moat-loader not built; run `cargo build --workspace`");
    }
    ok
}

#[test]
fn runs_images_by_name() {
    if !images_built("hello") || !images_built("exit-code") {
        return;
    }
    let o = moat_raw(&["run", "hello"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("hello from a moat picoprocess"));

    let o = moat_raw(&["run", "exit-code", "--", "7"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr_of(&o));
    let o = moat_raw(&["run", "exit-code", "9"]);
    assert_eq!(o.status.code(), Some(9), "{}", stderr_of(&o));

    // A manifest can name the image and its arguments.
    let m = temp("run.toml", "image = \"exit-code\"\nargs = [\"5\"]\n");
    let o = moat_raw(&["run", "--manifest", m.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr_of(&o));
    let _ = std::fs::remove_file(m);
}
