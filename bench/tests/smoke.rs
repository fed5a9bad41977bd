//! A smoke run of the whole harness: every scenario of `orderline-bench all`, briefly, against
//! the real Postgres and broker. It checks that each runs and reports what the README promises;
//! the figures themselves are not judged here (a shared CI machine says nothing about speed).

use std::process::Command;

use serde_json::Value;

#[test]
fn every_scenario_runs_and_reports() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orderline-bench"));
    command.args([
        "--json",
        "--connections",
        "4",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--orders",
        "40",
        "all",
        "--events",
        "3000",
    ]);
    if let Ok(brokers) = std::env::var("ORDERLINE_TEST_KAFKA_BROKERS") {
        command.args(["--brokers", &brokers]);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the bench failed: {stderr}");
    let reports: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let scenario = |name: &str| {
        reports
            .iter()
            .filter(|r| r["scenario"].as_str().is_some_and(|s| s.starts_with(name)))
            .collect::<Vec<_>>()
    };
    for name in ["restock", "hot-sku", "place-order", "query"] {
        let found = scenario(name);
        assert_eq!(found.len(), 1, "{name}: {reports:?}");
        let report = found[0];
        for figure in [
            "throughput_per_second",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "max_ms",
        ] {
            assert!(
                report[figure].is_number(),
                "{name} lacks {figure}: {report}"
            );
            assert!(
                report["baseline"][figure].is_number(),
                "{name}'s baseline lacks {figure}"
            );
        }
        assert_eq!(report["errors"], 0, "{name}: {report}");
        assert_eq!(report["baseline"]["errors"], 0, "{name}: {report}");
        assert!(report["ok"].as_u64().unwrap() > 0, "{name}: {report}");
        assert!(report["ratio"].as_f64().unwrap() > 0.0, "{name}: {report}");
        assert!(
            report["server_rss_mib_peak"].as_f64().unwrap() > 0.0,
            "{name}: {report}"
        );
    }
    assert!(scenario("place-order")[0]["placed_to_confirmed_samples"]
        .as_u64()
        .is_some());
    assert!(!scenario("replay").is_empty(), "{reports:?}");
    assert!(!scenario("relay").is_empty(), "{reports:?}");
}
