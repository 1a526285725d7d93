//! The `moat` command line: exit codes and one-line messages for bad input,
//! and (when the images are built) real runs.
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn moat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn one_line(o: &Output, needle: &str) {
    let e = stderr(o);
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
    let o = moat(&["run", "--help"]);
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    for s in ["125", "159", "128+N", "--allow-ro", "--manifest", "--host"] {
        assert!(h.contains(s), "`{s}` missing from:\n{h}");
    }
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let o = moat(&["run", "no-such-image"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(
        &o,
        "image `no-such-image` not found; `moat images` lists the built images",
    );

    // Devices: only on kvm, only known kinds, backing files that exist.
    let o = moat(&["run", "--device", "com1=uart", "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "only the kvm host grants devices: add --host kvm");

    let o = moat(&["run", "--host", "kvm", "--device", "fd0=floppy", "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "floppy");

    let o = moat(&[
        "run",
        "--host",
        "kvm",
        "--device",
        "blk0=virtio-blk",
        "hello",
    ]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "blk0=virtio-blk:PATH");

    let o = moat(&[
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

    let o = moat(&[
        "run", "--host", "kvm", "--device", "a=uart", "--device", "a=uart", "hello",
    ]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "`a`");

    let o = moat(&["run", "--allow", "file:relative", "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "file:relative");

    let o = moat(&["run", "/etc/hostname-does-not-exist/x"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "cannot open");

    let not_elf = temp("not-elf", "just text\n");
    let o = moat(&["run", not_elf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "not an ELF file");

    let m = temp("bad.toml", "imag = \"x\"\n");
    let o = moat(&["run", "--manifest", m.to_str().unwrap(), "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "imag");

    let m = temp(
        "dev.toml",
        "[[device]]\nname = \"blk0\"\nkind = \"virtio-blk\"\n",
    );
    let o = moat(&["run", "--manifest", m.to_str().unwrap(), "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "add `file = \"PATH\"` to its [[device]] entry");

    let m = temp(
        "dev2.toml",
        "[[device]]\nname = \"com1\"\nkind = \"uart\"\n",
    );
    let o = moat(&["run", "--manifest", m.to_str().unwrap(), "hello"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "only the kvm host grants devices");

    // More memory than the kvm host offers.
    let m = temp("big.toml", "[limits]\nmemory_mib = 8192\n");
    let o = moat(&[
        "run",
        "--host",
        "kvm",
        "--manifest",
        m.to_str().unwrap(),
        "hello",
    ]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "memory_mib");

    let o = moat(&["run"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "no image given");

    // Fault kinds the drivers do not know.
    let o = moat(&["campaign", "--count", "1", "--kinds", "crash,bogus"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "unknown fault kind `bogus`");
    let o = moat(&["demo", "--faults", "1:10:melt"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "unknown fault kind `melt`");

    let o = moat(&["run", "--manifest", "/nonexistent.toml"]);
    assert_eq!(o.status.code(), Some(2));
    one_line(&o, "cannot read manifest");

    // clap's own usage errors exit 2 as well.
    let o = moat(&["run", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    let o = moat(&["run", "--host", "vmware", "x"]);
    assert_eq!(o.status.code(), Some(2));
    for p in [not_elf, temp("bad.toml", ""), temp("dev.toml", "")] {
        let _ = std::fs::remove_file(p);
    }
}

/// Whether the images and the loader are built next to `moat`.
fn built(name: &str) -> bool {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_moat"))
        .parent()
        .unwrap()
        .to_path_buf();
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
    if !built("hello") || !built("exit-code") {
        return;
    }
    let o = moat(&["run", "hello"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("hello from a moat picoprocess"));

    let o = moat(&["run", "exit-code", "--", "7"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let o = moat(&["run", "exit-code", "9"]);
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));

    // A manifest can name the image and its arguments.
    let m = temp("run.toml", "image = \"exit-code\"\nargs = [\"5\"]\n");
    let o = moat(&["run", "--manifest", m.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let _ = std::fs::remove_file(m);
}
