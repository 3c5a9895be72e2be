//! Given a saga, then `skald explore` drives it through every crash and fault point
//! and proves it ends as the legacy transaction would — or, for a saga built to be
//! wrong, says where it does not and exits non-zero (issue #10).

use std::path::Path;

use crate::helpers::{explore, flow_data};

#[test]
fn the_sample_saga_keeps_every_promise_at_every_point_and_ends_as_the_legacy_transaction() {
    let out = explore(&[
        "sagas/order_checkout.yaml",
        "--data",
        r#"{"order_id":"o-1","sku":"SKU-1","qty":2,"account":"alice","amount":19.9}"#,
        "--legacy",
        "sagas/order_checkout.legacy.sql",
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every fault at every action (3) and compensation (2): 8 each.
    for fault in [
        "crash before commit",
        "crash after commit",
        "crash after publish",
        "publish confirm lost",
        "delivery duplicated",
        "older message after it",
        "retryable failure",
        "fatal failure",
    ] {
        assert_eq!(report.matches(fault).count(), 5, "{fault}\n{report}");
    }
    assert!(!report.contains("BROKEN"), "{report}");
    assert!(report.contains("fault-free saga vs legacy commit: same business state"));
    assert!(report.contains("order_checkout: every promise held at all 40 points"));
}

/// `skald explore` of a shipped flow against its legacy transaction: every promise holds
/// at all `points`, and the fault-free run ends as the legacy commit.
fn shipped_flow_holds(flow: &str, points: usize) {
    let saga = format!("sagas/{flow}.yaml");
    let legacy = format!("sagas/{flow}.legacy.sql");
    let out = explore(&[&saga, "--data", flow_data(flow), "--legacy", &legacy]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!report.contains("BROKEN"), "{report}");
    assert!(
        report.contains("fault-free saga vs legacy commit: same business state"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "{flow}: every promise held at all {points} points"
        )),
        "{report}"
    );
}

#[test]
fn the_bank_transfer_ends_as_its_legacy_transaction_at_every_point() {
    // 3 actions and the debit's compensation (the credit, the pivot, can trigger it).
    shipped_flow_holds("transfer_funds", 32);
}

#[test]
fn the_trip_booking_ends_as_its_legacy_transaction_at_every_point() {
    // 3 actions and 2 compensations (hotel and flight, triggered by a later failure).
    shipped_flow_holds("trip_booking", 40);
}

#[test]
fn a_compensation_that_does_not_undo_its_step_is_reported_and_fails() {
    let saga = Path::new("tests/fixtures/explore/leaky.yaml");
    let out = explore(&[saga.to_str().unwrap(), "--data", r#"{"key":"k"}"#]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    // The run where `confirm` fails for good compensates `take`, which leaves the item
    // taken: neither the commit nor the rollback.
    let broken: Vec<&str> = report.lines().filter(|l| l.contains("BROKEN")).collect();
    assert!(
        broken
            .iter()
            .any(|l| l.contains("confirm") && l.contains("fatal failure")),
        "{report}"
    );
    assert!(
        broken.iter().all(|l| l.contains("compensated")),
        "only compensated runs break atomicity: {report}"
    );
    assert!(report.contains("leaky: promises broken at"), "{report}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = explore(&["sagas/order_checkout.yaml", "--data", "[1]"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data must be a JSON object"));
    let out = explore(&["no/such/saga.yaml", "--data", "{}"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/saga.yaml"));
}

#[test]
fn random_schedules_keep_every_promise_and_the_same_seed_gives_the_same_run() {
    let run = |schedules: &str| {
        let out = explore(&[
            "sagas/order_checkout.yaml",
            "--data",
            r#"{"order_id":"o-1","sku":"SKU-1","qty":2,"account":"alice","amount":19.9}"#,
            "--random",
            schedules,
            "--seed",
            "1",
        ]);
        let report = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{report}");
        report
    };
    let thousand = run("1000");
    assert!(
        thousand.contains("1000 random schedules (seeds 1..=1000)")
            && thousand.contains("every promise held"),
        "{thousand}"
    );
    let first = run("40");
    assert!(
        first.contains("40 random schedules (seeds 1..=40)")
            && first.contains("every promise held"),
        "{first}"
    );
    let faults = |r: &str| {
        r.split(", ")
            .find(|p| p.ends_with("faults: every promise held\n"))
            .map(str::to_string)
    };
    assert!(
        faults(&first).is_some_and(|f| !f.starts_with("0 ")),
        "faults were injected: {first}"
    );
    assert_eq!(run("40"), first, "the same seed, the same schedules");
}

#[test]
fn a_saga_of_command_steps_keeps_every_promise_with_the_services_played_in_memory() {
    let out = explore(&[
        "sagas/order_services.yaml",
        "--data",
        r#"{"order_id":"o-1","sku":"SKU-1","qty":2,"account":"alice","amount":19.9}"#,
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every command step (3 actions, 2 compensations) also meets the reply's faults:
    // crashes while handling it, a duplicated reply, and no reply in time (then a late
    // one).
    for fault in [
        "reply: crash before commit",
        "reply: crash after commit",
        "reply: crash after publish",
        "reply delivered twice",
        "no reply in time, late reply",
    ] {
        assert_eq!(report.matches(fault).count(), 5, "{fault}\n{report}");
    }
    // No reply in time: the step fails for good, so a forward step compensates and a
    // compensation parks.
    let silent: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("no reply in time"))
        .collect();
    assert!(
        silent
            .iter()
            .all(|l| l.contains("forward") == l.contains("compensated  compensated")),
        "{report}"
    );
    assert!(!report.contains("BROKEN"), "{report}");
    assert!(report.contains("order_services: every promise held at all 65 points"));
}

#[test]
fn a_delivery_slower_than_the_delivery_timeout_stops_the_run_with_an_error_naming_it() {
    let began = std::time::Instant::now();
    let out = explore(&[
        "tests/fixtures/explore/slow.yaml",
        "--data",
        r#"{"key":"k"}"#,
        "--delivery-timeout",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "error: a delivery (slow step nap forward) was not handled within 1 s \
             (--delivery-timeout)"
        ),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "no report: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(began.elapsed() < std::time::Duration::from_secs(30));
    // Out of range is a usage error.
    let out = explore(&[
        "sagas/order_checkout.yaml",
        "--data",
        "{}",
        "--delivery-timeout",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
}
