//! Templates from the command line (`moat run --template FILE`, `moat
//! restore FILE`): a picoprocess checkpointed at its first open, before
//! that open is made, and started from there again and again, on either
//! host; each start makes the open under its own grants. What cannot be
//! done says so and leaves nothing behind.
use moat_tests::*;

fn ticks(n: u64) -> String {
    (0..n).map(|i| format!("tick {i}\n")).collect()
}

#[test]
fn a_template_starts_again_and_again_on_either_host_under_its_own_grants() {
    if !sandbox_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let tpl = d.path().join("counter.tpl");
    let out = d.path().join("ticks");
    let uri = file_uri(&out);
    let grant = file_uri(d.path());
    // The run that takes it goes on to its end.
    let r = moat(&[
        "run",
        "--allow",
        &grant,
        "--template",
        tpl.to_str().unwrap(),
        "counter",
        "5",
        &uri,
    ]);
    r.assert_code(0);
    assert_eq!(r.stdout, ticks(5));
    assert!(r.stderr.contains("template written to"), "{}", r.stderr);
    assert!(tpl.exists());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), ticks(5));
    // Nothing but the template beside it.
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    for host in hosts() {
        for _ in 0..3 {
            std::fs::remove_file(&out).unwrap();
            let r = moat(&[
                "restore",
                "--host",
                host,
                "--allow",
                &grant,
                tpl.to_str().unwrap(),
            ]);
            r.assert_code(0);
            // Everything from the first tick on: the template was taken
            // before any (the file is the first thing it opens).
            assert_eq!(r.stdout, ticks(5), "{host}: {}", r.stderr);
            assert_eq!(std::fs::read_to_string(&out).unwrap(), ticks(5), "{host}");
        }
        // The open is made under this start's grants: none, and it is
        // refused (the guest's own error).
        let r = moat(&["restore", "--host", host, tpl.to_str().unwrap()]);
        r.assert_code(1);
        assert!(r.stdout.contains("counter: cannot create"), "{}", r.stdout);
        assert!(r.stderr.contains("--allow"), "{}", r.stderr);
    }
}

#[test]
fn what_cannot_take_a_template_says_so_and_leaves_nothing() {
    if !sandbox_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // A place that cannot be written: bad input, no picoprocess run.
    let r = moat(&["run", "--template", "/proc/nope/t.tpl", "counter", "2"]);
    r.assert_code(2);
    assert!(
        r.stderr.contains("cannot write /proc/nope/t.tpl"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
    // A picoprocess that opens nothing but its console: it runs to its
    // end, and no template is left.
    let tpl = d.path().join("never.tpl");
    let r = moat(&["run", "--template", tpl.to_str().unwrap(), "counter", "2"]);
    r.assert_code(0);
    assert_eq!(r.stdout, ticks(2));
    assert!(r.stderr.contains("no template"), "{}", r.stderr);
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    // A template is taken from an image, not from a restore.
    let ck = d.path().join("c.tpl");
    let grant = file_uri(d.path());
    let uri = file_uri(&d.path().join("t"));
    moat(&[
        "run",
        "--allow",
        &grant,
        "--template",
        ck.to_str().unwrap(),
        "counter",
        "1",
        &uri,
    ])
    .assert_code(0);
    assert!(ck.exists());
}
