//! The embedding API (`moat_monitor::Sandbox`) used as a library: the
//! documented example, console pipes, stop requests, host pipes, policy.
use moat_monitor::{Sandbox, Stdio};
use moat_tests::*;
use std::io::{BufRead, BufReader, Read, Write};

#[test]
fn documented_example_runs() {
    if !sandbox_available() {
        return;
    }
    let ex = target_dir().join("examples").join("embed");
    assert!(ex.exists(), "{} is built by `cargo test`", ex.display());
    let out = run_cmd(
        std::process::Command::new(ex),
        None,
        std::time::Duration::from_secs(60),
    );
    out.assert_code(0);
    assert!(
        out.stdout
            .contains("echoed back: hello through the sandbox"),
        "{}",
        out.stdout
    );
}

#[test]
fn stdin_stdout_and_exit_code() {
    if !sandbox_available() {
        return;
    }
    let mut p = Sandbox::new(image("echo"))
        .stdin(Stdio::Piped)
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    let mut i = p.stdin.take().unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|x| (x % 251) as u8).collect();
    let d2 = data.clone();
    let w = std::thread::spawn(move || {
        i.write_all(&d2).unwrap();
    });
    let mut got = Vec::new();
    p.stdout.take().unwrap().read_to_end(&mut got).unwrap();
    w.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echo returned different bytes");
    assert_eq!(p.wait().unwrap().code, 0);
}

#[test]
fn stop_request_sets_the_abort_event() {
    if !sandbox_available() {
        return;
    }
    let mut p = Sandbox::new(image("stoppable"))
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(p.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    p.request_stop().unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "stopping");
    assert_eq!(p.wait().unwrap().code, 7);
}

#[test]
fn host_connects_to_a_picoprocess_pipe() {
    if !sandbox_available() {
        return;
    }
    let mut p = Sandbox::new(image("pipe-echo"))
        .args(["svc", "2"])
        .allow("pipe.server:svc")
        .unwrap()
        .spawn()
        .unwrap();
    for msg in ["first client", "second client"] {
        let mut c = p.connect_pipe("svc").unwrap();
        c.write_all(msg.as_bytes()).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        c.read_to_string(&mut back).unwrap();
        assert_eq!(back, msg);
    }
    assert_eq!(p.wait().unwrap().code, 0);
}

#[test]
fn ungranted_pipe_is_refused_and_logged() {
    if !sandbox_available() {
        return;
    }
    let (sink, lines) = moat_monitor::LogSink::buffer();
    let mut p = Sandbox::new(image("pipe-echo"))
        .args(["svc"])
        .log(sink)
        .spawn()
        .unwrap();
    assert_eq!(p.wait().unwrap().code, 1, "the open fails without a grant");
    let l = lines.lock().unwrap();
    assert!(l.iter().any(|x| x.contains("pipe.server:svc")), "{l:?}");
}

#[test]
fn a_changed_image_is_checked_again() {
    if !sandbox_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("img");
    std::fs::copy(image("exit-code"), &img).unwrap();
    let mut p = Sandbox::new(&img).arg("4").spawn().unwrap();
    assert_eq!(p.wait().unwrap().code, 4);
    // Same path, new contents: the monitor's check is not skipped.
    std::fs::write(&img, b"\x7fELF\x02\x01\x01not an image").unwrap();
    let e = Sandbox::new(&img)
        .spawn()
        .expect_err("a broken image is refused");
    assert!(e.to_string().contains("ELF"), "{e}");
}

#[test]
fn the_same_api_runs_a_driver_in_a_micro_vm() {
    if !sandbox_available() || !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut policy = moat_policy::Policy::default();
    policy
        .add_device(
            moat_policy::DeviceSpec::parse(&format!("blk0=virtio-blk:{}", disk.display())).unwrap(),
        )
        .unwrap();
    let mut p = Sandbox::new(image("virtio-blk"))
        .args(["blk0", "check", "32", "5"])
        .policy(policy)
        .host(moat_monitor::Host::Kvm)
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    let mut out = String::new();
    p.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(p.wait().unwrap().code, 0, "{out}");
    assert!(
        out.contains("wrote 32 sectors, read back 32 sectors, all match"),
        "{out}"
    );
    // And a device the policy does not hold is refused before anything starts.
    let err = Sandbox::new(image("hello"))
        .host(moat_monitor::Host::Linux)
        .policy({
            let mut p = moat_policy::Policy::default();
            p.add_device(moat_policy::DeviceSpec::parse("com1=uart").unwrap())
                .unwrap();
            p
        })
        .spawn()
        .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
}

#[test]
fn mediated_block_device_example_runs() {
    if !sandbox_available() {
        return;
    }
    let ex = target_dir().join("examples").join("blockdev");
    assert!(ex.exists(), "{} is built by `cargo test`", ex.display());
    let out = run_cmd(
        std::process::Command::new(ex),
        None,
        std::time::Duration::from_secs(60),
    );
    out.assert_code(0);
    assert!(
        out.stdout
            .contains("read back 65536 bytes intact after 1 driver restart(s)"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_uart_handed_a_line_talks_on_it_not_on_the_console() {
    if !sandbox_available() || !kvm_available() {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let (ours, line) = UnixStream::pair().unwrap();
    let mut policy = moat_policy::Policy::default();
    policy
        .add_device(moat_policy::DeviceSpec::parse("com1=uart").unwrap())
        .unwrap();
    let mut p = Sandbox::new(image("uart-driver"))
        .policy(policy.clone())
        .host(moat_monitor::Host::Kvm)
        .device_file(
            "com1",
            std::fs::File::from(std::os::fd::OwnedFd::from(line)),
        )
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    ours.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(ours.try_clone().unwrap());
    let mut got = String::new();
    reader.read_line(&mut got).unwrap();
    assert_eq!(got, "uart-driver ready\n");
    (&ours).write_all(b"over the line\n").unwrap();
    got.clear();
    reader.read_line(&mut got).unwrap();
    assert_eq!(got, "echo: OVER THE LINE\n");
    (&ours).write_all(b"quit\n").unwrap();
    let mut console = String::new();
    p.stdout
        .take()
        .unwrap()
        .read_to_string(&mut console)
        .unwrap();
    assert_eq!(p.wait().unwrap().code, 0);
    assert_eq!(console, "", "the console saw the line's bytes");

    // A descriptor for a device that takes none, for no declared device,
    // twice, and a NIC without its wire: refused before anything starts.
    let devnull = || std::fs::File::open("/dev/null").unwrap();
    let mut with_blk = policy.clone();
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    with_blk
        .add_device(
            moat_policy::DeviceSpec::parse(&format!("blk0=virtio-blk:{}", disk.display())).unwrap(),
        )
        .unwrap();
    let mut with_net = moat_policy::Policy::default();
    with_net
        .add_device(moat_policy::DeviceSpec::parse("net0=virtio-net").unwrap())
        .unwrap();
    let cases: Vec<(Sandbox, &str)> = vec![
        (
            Sandbox::new(image("uart-driver"))
                .policy(with_blk)
                .device_file("blk0", devnull()),
            "takes none",
        ),
        (
            Sandbox::new(image("uart-driver"))
                .policy(policy.clone())
                .device_file("com2", devnull()),
            "not declared",
        ),
        (
            Sandbox::new(image("uart-driver"))
                .policy(policy)
                .device_file("com1", devnull())
                .device_file("com1", devnull()),
            "more than one",
        ),
        (
            Sandbox::new(image("uart-driver")).policy(with_net),
            "needs its wire",
        ),
    ];
    for (sb, says) in cases {
        let err = sb.host(moat_monitor::Host::Kvm).spawn().unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
}
