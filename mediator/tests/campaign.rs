//! A short fault campaign through the mediator, on each host: at least
//! 500 seeded faults of every kind (crashes, panics, hangs, double and
//! wrong completions, wrong lengths, bad statuses, memory exhaustion,
//! floods, broken ring indices, buffers outside the pool or not the
//! request's, answers published before they are written, kills from
//! outside), 32 requests in flight, every byte the workload reads checked.
//! The long run (10,000 faults) is `moat campaign`; see BENCHMARKS.md.
use moat_mediator::block::{Config, DriverSpec, SECTION};
use moat_mediator::campaign::{self, Campaign};
use std::time::Duration;

fn hosts() -> Vec<moat_monitor::Host> {
    let mut h = vec![moat_monitor::Host::Linux];
    if moat_tests::kvm_available() {
        h.push(moat_monitor::Host::Kvm);
    }
    h
}

#[test]
fn five_hundred_faults_change_nothing_the_clients_see() {
    for host in hosts() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let uri = format!("file:{}", disk.display());
        let mut policy = moat_policy::Policy::default();
        policy.limits.memory_mib = 64;
        policy.allow(&uri, moat_policy::Access::Rw).unwrap();
        let c = Campaign {
            driver: DriverSpec {
                files: Vec::new(),
                image: moat_tests::built("blk-file"),
                args: vec![SECTION.into(), uri],
                host,
                policy,
                faults: None,
                console: false,
            },
            config: Config {
                deadline: Duration::from_millis(100),
                start_timeout: Duration::from_secs(1),
                max_failed_restarts: 8,
                ..Config::default()
            },
            faults: 500,
            seed: 42,
            per_million: 50_000,
            kinds: "all".into(),
            kill_every: 97,
            hang_after: Duration::from_secs(10),
            time_limit: Duration::from_secs(240),
            depth: 32,
        };
        let r = campaign::run(&c, |_, _| {}).unwrap();
        let kinds: Vec<_> = r.counters.violations.keys().copied().collect();
        eprintln!(
            "{host:?}: {} faults ({kinds:?}) in {:.1} s, {} requests, recovery p50 {:?} p99 {:?}",
            r.faults,
            r.elapsed.as_secs_f64(),
            r.requests,
            r.counters.recovery_percentile(0.5),
            r.counters.recovery_percentile(0.99)
        );
        assert!(r.faults >= 500, "{host:?}: {r:?}");
        assert!(r.clean(), "{host:?}: the clients saw failures: {r:?}");
        // Every kind the driver can inject was seen by the mediator.
        for k in [
            "crash",
            "deadline",
            "duplicate",
            "unknown_id",
            "wrong_length",
            "bad_status",
            "bad_index",
            "outside_pool",
            "wrong_buffer",
        ] {
            assert!(
                r.counters.violations.get(k).copied().unwrap_or(0) > 0,
                "{host:?}: no `{k}` among {kinds:?}"
            );
        }
    }
}
