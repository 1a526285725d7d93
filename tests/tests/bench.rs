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
}
