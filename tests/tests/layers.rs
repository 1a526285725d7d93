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

#[test]
fn stacks_are_applied_in_order() {
    if !sandbox_available() {
        return;
    }
    for h in hosts() {
        // count outside trace: trace reports each call once; count's line
        // comes before trace reports DkProcessExit (count saw it first).
        let out = run_on(
            h,
            &["--layer", "count,trace", image("hello").to_str().unwrap()],
        );
        out.assert_code(0);
        let at = |pat: &str| {
            out.stderr
                .find(pat)
                .unwrap_or_else(|| panic!("host {h}: no `{pat}` in:\n{}", out.stderr))
        };
        assert!(
            at("] count: ") < at("trace: DkProcessExit(code=0)"),
            "host {h}"
        );
        // trace outside count: the other way round.
        let out = run_on(
            h,
            &["--layer", "trace,count", image("hello").to_str().unwrap()],
        );
        out.assert_code(0);
        let t = out.stderr.find("trace: DkProcessExit(code=0)").unwrap();
        let c = out.stderr.find("] count: ").unwrap();
        assert!(t < c, "host {h}: {}", out.stderr);
    }
}

#[test]
fn a_bad_stack_is_bad_input() {
    let out = moat(&["run", "--layer", "count,remix", "hello"]);
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("no layer named `remix` (there are: trace, count, remap)"),
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
        assert!(lines.contains("trace: DkStreamWrite("), "{h:?}: {lines}");
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
        ] {
            conformance_on(h, &["--layer", stack], &[]);
        }
    }
}
