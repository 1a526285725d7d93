//! Layers stacked between a picoprocess and its PAL (`moat_layers`), from
//! the CLI (`--layer`) and the embedding API (`Sandbox::layers`), on both
//! hosts: the same layer code above both PALs reports the same calls, and
//! the conformance suite passes under every layer and stack, so a layer
//! that changed the ABI's semantics would be caught.
use moat_layers::LayerName;
use moat_monitor::{LogSink, Sandbox, Stdio};
use moat_tests::*;
use std::sync::{Arc, Mutex};

/// The `count:` line of a run's log.
fn count_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split_once("] count: ").map(|(_, c)| c))
        .collect();
    assert_eq!(lines.len(), 1, "one count line wanted:\n{stderr}");
    lines[0].to_string()
}

/// The count of `call` in a count line (0 if absent).
fn count_of(line: &str, call: &str) -> u64 {
    line.split_once(": ")
        .map(|(_, l)| l)
        .unwrap_or("")
        .split(", ")
        .find_map(|e| e.strip_prefix(call)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_count_layer_sees_the_same_calls_on_both_hosts() {
    if !sandbox_available() {
        return;
    }
    let plain = run_on("linux", &[image("hello").to_str().unwrap()]);
    plain.assert_code(0);
    let mut lines = Vec::new();
    for h in hosts() {
        let out = run_on(h, &["--layer", "count", image("hello").to_str().unwrap()]);
        out.assert_code(0);
        // The guest cannot tell: its output is what it is without layers.
        assert_eq!(out.stdout, plain.stdout, "host {h}");
        let line = count_line(&out.stderr);
        assert_eq!(count_of(&line, "DkProcessExit"), 1, "{line}");
        assert!(count_of(&line, "DkStreamWrite") >= 1, "{line}");
        let total: u64 = line.split(' ').next().unwrap().parse().unwrap();
        assert!(total >= 3, "{line}");
        lines.push((h, line));
    }
    for (h, l) in &lines[1..] {
        assert_eq!(l, &lines[0].1, "host {h} counted differently from linux");
    }
}

/// Threads end the picoprocess too: the count comes when the last one
/// ends, with every DkThreadCreate the guest made.
#[test]
fn the_count_layer_counts_threads_on_both_hosts() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        let out = run_on(
            h,
            &[
                "--layer",
                "count",
                image("threads").to_str().unwrap(),
                "--",
                "4",
            ],
        );
        out.assert_code(0);
        let line = count_line(&out.stderr);
        assert_eq!(count_of(&line, "DkThreadCreate"), 4, "host {h}: {line}");
    }
}

/// Order: `--layer trace,remap,trace` puts a trace on each side of the
/// remap layer: the outer one sees the guest's URI, the inner one (`[trace
/// 1]`) the host's.
#[test]
fn stacks_are_applied_in_order() {
    if !sandbox_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), "x").unwrap();
    let host = file_uri(d.path());
    let m = d.path().join("m.toml");
    std::fs::write(
        &m,
        format!("[[remap]]\nguest = \"file:/data\"\nhost = \"{host}\"\n"),
    )
    .unwrap();
    for h in hosts() {
        let out = run_on(
            h,
            &[
                "--manifest",
                m.to_str().unwrap(),
                "--allow-ro",
                &host,
                "--layer",
                "trace,remap,trace",
                image("files").to_str().unwrap(),
                "--",
                "read",
                "file:/data/f",
            ],
        );
        out.assert_code(0);
        assert_eq!(out.stdout.trim(), "ok x", "{h}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        let outer = lines
            .iter()
            .any(|l| !l.contains("[trace 1]") && l.contains("DkStreamOpen(\"file:/data/f\""));
        let inner = lines.iter().any(|l| {
            l.contains("[trace 1] DkStreamOpen(") && l.contains(&format!("(\"{host}/f\""))
        });
        assert!(outer && inner, "{h}:\n{}", out.stderr);
    }
}

#[test]
fn a_bad_stack_is_bad_input() {
    let out = moat(&["run", "--layer", "count,remix", "hello"]);
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("no layer named `remix` (there are: trace, count, remap, checkpoint)"),
        "{}",
        out.stderr
    );
    let nine = ["count"; 9].join(",");
    let out = moat(&["run", "--layer", &nine, "hello"]);
    out.assert_code(2);
    assert!(out.stderr.contains("at most 8"), "{}", out.stderr);
}

#[test]
fn the_embedding_api_takes_a_stack() {
    if !sandbox_available() {
        return;
    }
    let mut hs = vec![moat_monitor::Host::Linux];
    if kvm_available() {
        hs.push(moat_monitor::Host::Kvm);
    }
    for h in hs {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut p = Sandbox::new(image("hello"))
            .host(h)
            .stdout(Stdio::Null)
            .log(LogSink::Buffer(log.clone()))
            .layers(&[LayerName::Count, LayerName::Trace])
            .spawn()
            .unwrap();
        assert_eq!(p.wait().unwrap().code, 0);
        let lines = log.lock().unwrap().join("\n");
        assert!(
            lines.contains("] trace: ") && lines.contains("DkStreamWrite("),
            "{h:?}: {lines}"
        );
        let c = count_line(&lines);
        assert_eq!(count_of(&c, "DkProcessExit"), 1, "{h:?}: {c}");
    }
}

/// Every layer, and stacks of them, on both hosts: the conformance suite
/// passes unchanged.
#[test]
fn conformance_passes_under_every_layer_and_stack() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        for stack in [
            "trace",
            "count",
            "remap",
            "count,trace",
            "trace,count,remap,trace",
            "checkpoint",
            "trace,count,remap,checkpoint",
        ] {
            conformance_on(h, &["--layer", stack], &[]);
        }
    }
}
