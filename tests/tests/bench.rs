//! The benchmark harness, short version: it must run every benchmark with
//! its floor and print a ratio for each. (Figures come from the release
//! build outside the test suite; see BENCHMARKS.md.)
use moat_tests::*;

#[test]
fn quick_benchmarks_print_ratios() {
    if !sandbox_available() {
        return;
    }
    let out = run_cmd(
        {
            let mut c = std::process::Command::new(built("moat-bench"));
            c.arg("--quick");
            c
        },
        None,
        std::time::Duration::from_secs(300),
    );
    out.assert_code(0);
    for name in [
        "spawn to first ABI call",
        "DkSystemTimeQuery",
        "DkStreamWrite 4 KiB",
        "pipe round trip",
    ] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no `{name}` row:\n{}", out.stdout));
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let ratio: f64 = cols[4]
            .trim_end_matches('x')
            .parse()
            .unwrap_or_else(|_| panic!("no ratio in {line}"));
        assert!(ratio > 0.0 && ratio.is_finite(), "{line}");
    }
    // The export and net rows need root, FUSE, losetup, fio and ip;
    // where those are required, they must be there.
    if std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_some() {
        for name in [
            "export.fio.randread4k.qd32",
            "export.fio.seq1m",
            "net.tcp.throughput",
            "net.tcp.rr1",
        ] {
            assert!(
                out.stdout
                    .lines()
                    .any(|l| l.contains(name) && l.ends_with('|')),
                "no `{name}` row:\n{}",
                out.stdout
            );
        }
    }
}

/// `--json`: one object per measurement and line, with the fields the
/// house's tools read; nothing else on standard output.
#[test]
fn json_output_is_one_object_per_line() {
    if !sandbox_available() {
        return;
    }
    let out = run_cmd(
        {
            let mut c = std::process::Command::new(built("moat-bench"));
            c.args(["--quick", "--json", "calls"]);
            c
        },
        None,
        std::time::Duration::from_secs(120),
    );
    out.assert_code(0);
    let mut n = 0;
    for line in out.stdout.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for k in ["name", "unit", "target"] {
            assert!(v[k].is_string(), "no string `{k}` in {line}");
        }
        for k in ["moat", "floor", "ratio"] {
            assert!(
                v[k].as_f64().is_some_and(f64::is_finite),
                "no number `{k}` in {line}"
            );
        }
        let ratio = v["moat"].as_f64().unwrap() / v["floor"].as_f64().unwrap();
        assert!(
            (ratio - v["ratio"].as_f64().unwrap()).abs() < 1e-9,
            "{line}"
        );
        n += 1;
    }
    assert!(n >= 3, "too few measurements:\n{}", out.stdout);
}

/// Every binary of moat answers `--help` with its usage and exit code 0
/// (and runs nothing).
#[test]
fn every_binary_prints_its_usage() {
    for (bin, want) in [
        ("moat", "Usage"),
        ("moat-bench", "Usage: moat-bench"),
        ("moat-loader", "not meant to be run by hand"),
        ("moat-vmm", "not meant to be run by hand"),
    ] {
        let out = run_cmd(
            {
                let mut c = std::process::Command::new(built(bin));
                c.arg("--help");
                c
            },
            None,
            std::time::Duration::from_secs(10),
        );
        out.assert_code(0);
        assert!(out.stdout.contains(want), "{bin} --help:\n{}", out.stdout);
    }
}
