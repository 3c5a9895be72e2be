//! Given `skald bench` with a shape of work (steps per saga, message size), then its
//! report says what it ran and counts every step; a shape out of range is a usage error.

use std::process::Output;

use crate::helpers::skald_bench;

fn bench(args: &[&str]) -> Output {
    skald_bench().args(args).output().expect("run skald bench")
}

#[test]
fn a_longer_saga_with_padded_messages_runs_every_step_and_the_report_says_its_shape() {
    let out = bench(&[
        "--sagas",
        "12",
        "--aggregates",
        "4",
        "--saga-steps",
        "5",
        "--payload-kib",
        "2",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["completed"], 12, "{report}");
    assert_eq!(report["saga_steps"], 5, "{report}");
    assert_eq!(report["payload_kib"], 2, "{report}");
    // Every step of every saga committed once: 12 × 5 over the run's seconds.
    let steps = report["steps_per_s"].as_f64().unwrap() * report["seconds"].as_f64().unwrap();
    assert!((steps - 60.0).abs() < 0.01, "{steps} steps: {report}");
}

#[test]
fn the_sample_is_three_steps_without_padding_by_default() {
    let out = bench(&["--sagas", "3", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["completed"], 3, "{report}");
    assert_eq!(report["saga_steps"], 3, "{report}");
    assert_eq!(report["payload_kib"], 0, "{report}");
}

#[test]
fn a_shape_out_of_range_is_a_usage_error() {
    for args in [
        ["--saga-steps", "0"],
        ["--saga-steps", "51"],
        ["--payload-kib", "1025"],
        ["--payload-kib", "-1"],
        ["--saga-steps", "-3"],
    ] {
        let out = bench(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(args[0]), "{args:?}: {stderr}");
    }
}

#[test]
fn the_text_report_gives_latencies_as_plain_milliseconds() {
    let out = bench(&["--sagas", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let skald = stdout
        .lines()
        .find(|l| l.starts_with("skald "))
        .unwrap_or_else(|| panic!("a skald line: {stdout}"));
    let p50 = skald
        .split("p50 ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .unwrap_or_else(|| panic!("a p50: {skald}"));
    assert!(p50.parse::<f64>().is_ok(), "p50 {p50:?} in {skald}");
}
