//! Given a legacy transaction, `skald scaffold` drafts the saga that replaces it
//! (issue #18): for each legacy flow shipped in `sagas/`, the draft — after the TODOs
//! this test fills in, listed in [`fill_in`] — validates, ends as the legacy
//! transaction on the same input (the legacy script and the saga run on separate
//! scratch databases, by `skald explore --legacy`), and compensates back to the
//! starting state when its last compensatable step fails. Input the scaffold cannot
//! read is refused with the line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use uuid::Uuid;

use crate::helpers::{explore, flow_data, sample_sagas};

fn scaffold(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skald"))
        .arg("scaffold")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run skald scaffold")
}

/// A fresh directory for drafts, under the system's temporary directory.
fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("skald-scaffold-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The TODOs this test fills in, and only these: the draft cannot know the tables'
/// schema (its `setup:` TODO), so `setup` is appended. The aggregate, roles and
/// compensations are the scaffold's own proposals, unchanged.
fn fill_in(draft: &str, setup: &str) -> String {
    let indented: String = setup.lines().map(|l| format!("  {l}\n")).collect();
    format!("{draft}setup: |\n{indented}")
}

/// The `setup:` SQL of the shipped saga of `flow`.
fn shipped_setup(flow: &str) -> String {
    skald::saga::load_file(&sample_sagas().join(format!("{flow}.yaml")))
        .expect("the shipped saga loads")
        .setup_sql
        .expect("the shipped saga has setup SQL")
}

/// The columns of `report`'s row for `step`'s forward action under `fault`:
/// (ended, expected, atomic).
fn row(report: &str, step: &str, fault: &str) -> (String, String, String) {
    let line = report
        .lines()
        .find(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.get(1) == Some(&step) && words.get(2) == Some(&"forward") && l.contains(fault)
        })
        .unwrap_or_else(|| panic!("no row for {step} {fault}:\n{report}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let n = words.len();
    (
        words[n - 6].into(),
        words[n - 5].into(),
        words[n - 2].into(),
    )
}

/// Scaffolds `<dir>/<flow>.legacy.sql`, fills in the TODOs of [`fill_in`] with
/// `setup`, and checks the draft against the legacy transaction (and
/// `<dir>/<flow>.observe.sql`) at every fault point.
fn drafted_flow_ends_as_its_legacy_transaction(
    dir: &str,
    flow: &str,
    setup: &str,
    data: &str,
    last_compensatable: &str,
) {
    let scratch = scratch_dir();
    let draft_file = scratch.join(format!("{flow}.yaml"));
    let legacy = format!("{dir}/{flow}.legacy.sql");
    let out = scaffold(&[
        &legacy,
        "--name",
        flow,
        "--out",
        draft_file.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the draft passes `skald validate` as it is"),
        "{stderr}"
    );
    let draft = std::fs::read_to_string(&draft_file).unwrap();
    assert!(draft.contains("# TODO: setup:"), "{draft}");
    std::fs::write(&draft_file, fill_in(&draft, setup)).unwrap();

    let validate = Command::new(env!("CARGO_BIN_EXE_skald"))
        .arg("validate")
        .arg(&scratch)
        .output()
        .unwrap();
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );

    let observe = format!("{dir}/{flow}.observe.sql");
    let out = explore(&[
        draft_file.to_str().unwrap(),
        "--data",
        data,
        "--legacy",
        &legacy,
        "--observe",
        &observe,
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same end state as the legacy transaction on the same input…
    assert!(
        report.contains("fault-free saga vs legacy commit: same business state"),
        "{report}"
    );
    // …and back to the starting state (the rollback reference) when the last
    // compensatable step fails for good.
    assert_eq!(
        row(&report, last_compensatable, "fatal failure"),
        ("compensated".into(), "compensated".into(), "ok".into()),
        "{report}"
    );
    assert!(report.contains("every promise held"), "{report}");
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// [`drafted_flow_ends_as_its_legacy_transaction`] for a flow shipped in `sagas/`.
fn drafted_shipped_flow(flow: &str, last_compensatable: &str) {
    drafted_flow_ends_as_its_legacy_transaction(
        "sagas",
        flow,
        &shipped_setup(flow),
        flow_data(flow),
        last_compensatable,
    );
}

#[test]
fn the_drafted_order_checkout_ends_as_its_legacy_transaction_and_compensates_to_the_start() {
    drafted_shipped_flow("order_checkout", "insert_shipments");
}

#[test]
fn the_drafted_bank_transfer_ends_as_its_legacy_transaction_and_compensates_to_the_start() {
    drafted_shipped_flow("transfer_funds", "insert_ledger");
}

#[test]
fn the_drafted_trip_booking_ends_as_its_legacy_transaction_and_compensates_to_the_start() {
    drafted_shipped_flow("trip_booking", "insert_flight_tickets");
}

/// The rules that rewrite the action run on PostgreSQL as generated: an overwriting
/// UPDATE captures the old values (a NULL note, a timestamp) and a DELETE the whole row
/// (jsonb, a microsecond timestamp), and their compensations put both back exactly.
#[test]
fn a_drafted_overwrite_and_delete_are_undone_exactly_on_postgresql() {
    let dir = "tests/fixtures/scaffold";
    let setup = std::fs::read_to_string(format!("{dir}/archive_order.setup.sql")).unwrap();
    drafted_flow_ends_as_its_legacy_transaction(
        dir,
        "archive_order",
        &setup,
        r#"{"order_id":"o-1","note":"done"}"#,
        "insert_archive_log",
    );
}

#[test]
fn the_drafted_trip_booking_proposes_the_car_rental_as_its_pivot() {
    let out = scaffold(&["sagas/trip_booking.legacy.sql", "--name", "trip_booking"]);
    assert!(out.status.success());
    let yaml = String::from_utf8_lossy(&out.stdout);
    let def = skald::saga::load_str(&yaml, Path::new("trip_booking.yaml")).expect("loads");
    let roles: Vec<(String, String)> = def
        .steps
        .iter()
        .map(|s| (s.name.clone(), format!("{:?}", s.role)))
        .collect();
    assert_eq!(
        roles.last().unwrap(),
        &("call_rent_car".to_string(), "Pivot".to_string()),
        "{roles:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("proposed as the point of no return"),
        "the TODO list says why"
    );
}

/// `skald scaffold` on `text` (written to a scratch file): its exit code and stderr.
fn scaffold_text(text: &str) -> (Option<i32>, String, PathBuf) {
    let dir = scratch_dir();
    let file = dir.join("legacy.sql");
    std::fs::write(&file, text).unwrap();
    let out = scaffold(&[file.to_str().unwrap(), "--name", "x"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        file,
    )
}

#[test]
fn unsupported_input_is_refused_with_its_line() {
    for (text, expected) in [
        (
            "BEGIN;\nUPDATE t SET a = 1;\nCOMMIT;\n\nBEGIN;\nUPDATE t SET a = 2;\nCOMMIT;\n",
            "line 5: a second transaction (the first ends at line 3)",
        ),
        (
            "BEGIN;\nUPDATE t SET a = 1;\nALTER TABLE t ADD COLUMN b int;\nCOMMIT;\n",
            "line 3: ALTER TABLE is DDL",
        ),
        (
            "BEGIN;\n\nUPDATE t SET a = 1 WHERE;\nCOMMIT;\n",
            "line 3: the SQL parser rejects this statement",
        ),
    ] {
        let (code, stderr, file) = scaffold_text(text);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.starts_with(&format!("error: {}: {expected}", file.display())),
            "{stderr}"
        );
        std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
    }
}

#[test]
fn the_draft_goes_to_stdout_or_to_out_which_is_never_overwritten_without_force() {
    let legacy = "sagas/order_checkout.legacy.sql";
    let printed = scaffold(&[legacy, "--name", "place_order"]);
    assert!(printed.status.success());
    let yaml = String::from_utf8_lossy(&printed.stdout).to_string();
    assert!(yaml.contains("name: place_order\n"), "{yaml}");

    let dir = scratch_dir();
    let out_file = dir.join("place_order.yaml");
    std::fs::write(&out_file, "keep me").unwrap();
    let refused = scaffold(&[
        legacy,
        "--name",
        "place_order",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr).trim(),
        format!(
            "error: {} exists: pass --force to overwrite it",
            out_file.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "keep me");
    let forced = scaffold(&[
        legacy,
        "--name",
        "place_order",
        "--out",
        out_file.to_str().unwrap(),
        "--force",
    ]);
    assert!(forced.status.success());
    assert!(forced.stdout.is_empty(), "nothing on stdout with --out");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), yaml);

    let bad_name = scaffold(&[legacy, "--name", "Place-Order"]);
    assert_eq!(bad_name.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}
