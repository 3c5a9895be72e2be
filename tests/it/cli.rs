//! The `skald` command line as a user runs it.

use std::path::Path;
use std::time::Duration;

use crate::helpers::{TestEnv, sample_sagas};

#[test]
fn validate_accepts_the_sample_sagas() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skald"))
        .args(["validate"])
        .arg(sample_sagas())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("order_checkout"));
}

#[test]
fn validate_reports_every_broken_file_with_its_line_and_fails() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skald"))
        .arg("validate")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for file in std::fs::read_dir(&dir).unwrap() {
        let name = file.unwrap().file_name().to_string_lossy().to_string();
        let line = stderr
            .lines()
            .find(|l| l.contains(&name))
            .unwrap_or_else(|| panic!("no error for {name} in:\n{stderr}"));
        // file:line:column: field: message
        let after = line.split(&name).nth(1).unwrap();
        let line_no: u32 = after
            .trim_start_matches(':')
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(line_no > 0, "{line}");
    }
}

#[actix_rt::test]
async fn start_prints_ids_after_confirm_and_status_counts_the_result() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let out = env
        .skald(&[
            "start",
            "order_checkout",
            "--data",
            r#"{"order_id":"cli-1","sku":"SKU-3","qty":1,"account":"alice","amount":10}"#,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("message_id="), "{stdout}");
    env.wait_for_terminal(1, Duration::from_secs(30)).await;
    app.stop().await;

    let out = env.skald(&["status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sagas"]["order_checkout"]["completed"], 1);
    assert_eq!(report["sagas"]["order_checkout"]["running"], 0);

    let out = env.skald(&["status"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("order_checkout") && table.contains("completed"),
        "{table}"
    );
    env.cleanup().await;
}

#[test]
fn start_refuses_a_payload_that_is_not_an_object() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skald"))
        .args(["start", "order_checkout", "--data", "[1,2]"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON object"));
}

#[actix_rt::test]
async fn dlq_commands_list_show_and_discard_dead_letters() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    env.publish_raw(&[b"not json at all".to_vec()]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let out = env.skald(&["dlq", "list", "--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !text.trim().is_empty() {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    app.stop().await;
    let letter: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(letter["kind"], "malformed");
    let id = letter["id"].as_str().unwrap();

    let shown = env.skald(&["dlq", "show", id]).output().unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["body"], "not json at all", "the raw body is kept");
    assert_eq!(shown["reason_code"], "invalid");

    let discard = |by: &str| {
        let out = env
            .skald(&["dlq", "discard", id, "--by", by, "--note", "junk"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(discard("ops").starts_with("discarded"));
    assert!(discard("ops").contains("already discarded"));
    let pending = env
        .skald(&["dlq", "list", "--status", "pending"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&pending.stdout).contains("no dead letters"));
    let bad = env
        .skald(&["dlq", "list", "--kind", "weird"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    env.cleanup().await;
}

#[actix_rt::test]
async fn start_refuses_an_unknown_saga_with_the_apis_message_and_publishes_nothing() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let svc = crate::api::service(app.api.clone()).await;
    let api = crate::api::post(
        &svc,
        "/api/v1/instances",
        serde_json::json!({"saga": "no_such_saga", "payload": {}}),
    )
    .await;
    assert_eq!(api.0, actix_web::http::StatusCode::BAD_REQUEST);
    let message = api.1["error"]["message"].as_str().unwrap().to_string();
    app.stop().await;

    for args in [
        &["start", "no_such_saga"][..],
        &["start", "no_such_saga", "--aggregate", "a-1"],
    ] {
        let out = env.skald(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} exited 0");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim(), format!("error: {message}"), "{args:?}");
    }
    assert_eq!(env.intake_depth().await, 0, "nothing was published");
    env.cleanup().await;
}

#[test]
fn dlq_list_refuses_a_limit_out_of_range_as_a_usage_error() {
    for limit in ["--limit=-5", "--limit=0", "--limit=1001", "--limit=many"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_skald"))
            .args(["dlq", "list", limit])
            .output()
            .unwrap();
        // clap's usage error: exit 2, naming the option; nothing reached the database.
        assert_eq!(out.status.code(), Some(2), "{limit}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--limit"),
            "{limit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[actix_rt::test]
async fn dlq_list_json_prints_one_object_per_line_at_most_100_by_default() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    crate::api_safety::pending_letters(&env, 101).await;
    app.stop().await;
    let list = |extra: &[&str]| {
        let out = env
            .skald(&[&["dlq", "list", "--json"][..], extra].concat())
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .collect::<Vec<_>>()
    };
    let lines = list(&[]);
    assert_eq!(lines.len(), 100, "the default limit");
    assert!(lines.iter().all(|l| l["kind"] == "malformed"));
    assert_eq!(list(&["--limit", "1000"]).len(), 101);
    env.cleanup().await;
}
