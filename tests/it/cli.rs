//! The `skald` command line as a user runs it.

use std::path::Path;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use skald::config::TransportKind;

use crate::helpers::{AMQP, TestEnv, sample_sagas, wait_child};

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

    let report: serde_json::Value =
        serde_json::from_str(&env.skald_ok(&["status", "--json"])).unwrap();
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
    let as_json = env.skald_ok(&["dlq", "discard", id, "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&as_json).unwrap(),
        serde_json::json!({"id": id, "status": "discarded"})
    );
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

/// Runs `skald run` against this test's services with `extra` env on top (and the
/// default log filter), waits for it to exit — failing the test if it is still running
/// after `within` — and returns its exit status and stderr.
fn run_expecting_exit(
    env: &TestEnv,
    extra: &[(&str, &str)],
    within: Duration,
) -> (std::process::ExitStatus, String) {
    use std::io::Read as _;
    let mut child = env
        .skald(&["run"])
        .env_remove("SKALD_LOG") // the default log filter, as a user has it
        .env("SKALD_STARTUP_TIMEOUT_MS", "60000")
        .envs(extra.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, within);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

/// The one line of a failed `skald run`'s `stderr` that contains `needle`: it fails
/// when the problem is said never or more than once, or was waited on as an outage.
fn said_once<'s>(status: std::process::ExitStatus, stderr: &'s str, needle: &str) -> &'s str {
    assert!(!status.success(), "{stderr}");
    assert!(
        !stderr.contains("not reachable yet"),
        "not waited on: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "{needle} said once:\n{stderr}");
    lines[0]
}

#[actix_rt::test]
async fn an_unknown_transport_is_refused_naming_the_choices() {
    let env = TestEnv::new(sample_sagas()).await;
    let (status, stderr) = run_expecting_exit(
        &env,
        &[("SKALD_TRANSPORT", "kafka")],
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "error: configuration: environment variable SKALD_TRANSPORT=\"kafka\" is invalid: \
         must be one of rabbitmq, postgres, redis"
    );
    env.cleanup().await;
}

#[actix_rt::test]
async fn run_stops_at_once_when_the_broker_refuses_its_topology() {
    // RabbitMQ's refusals: on RabbitMQ whatever the test run's transport.
    let env = TestEnv::on(TransportKind::RabbitMq, sample_sagas()).await;
    // Someone declared our intake exchange with another type: RabbitMQ answers
    // skald's declaration with 406 PRECONDITION_FAILED, which no wait can fix (the
    // same path as 503 COMMAND_INVALID when the consistent-hash plugin is off).
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let exchange = env.config.namespace.as_str();
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let (status, stderr) = run_expecting_exit(&env, &[], Duration::from_secs(20));
    let refusal = said_once(status, &stderr, "PRECONDITION_FAILED");
    assert!(refusal.contains(exchange), "{stderr}");
    assert!(refusal.contains("SKALD_NAMESPACE"), "the fix: {stderr}");

    let _ = ch
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "".into()).await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn run_stops_at_once_when_the_broker_refuses_its_login() {
    // RabbitMQ's refusals: on RabbitMQ whatever the test run's transport.
    let env = TestEnv::on(TransportKind::RabbitMq, sample_sagas()).await;
    let (status, stderr) = run_expecting_exit(
        &env,
        &[("AMQP_URL", "amqp://guest:wrong-password@127.0.0.1:5672/%2f")],
        Duration::from_secs(20),
    );
    let refusal = said_once(status, &stderr, "ACCESS_REFUSED");
    assert!(
        refusal.contains("password in AMQP_URL"),
        "the fix: {stderr}"
    );
    env.cleanup().await;
}

fn setup_fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/setup")
}

#[test]
fn validate_parses_setup_sql_and_warns_where_it_cannot() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skald"))
        .arg("validate")
        .arg(setup_fixtures())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A warning, not an error: the parser does not know all of PostgreSQL.
    assert!(out.status.success(), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.contains("typo_in_setup.yaml"))
        .unwrap_or_else(|| panic!("no warning in:\n{stderr}"));
    assert!(
        warning.contains("typo_in_setup.yaml:10:3: setup: warning: "),
        "{warning}"
    );
    assert!(warning.contains("CREAT"), "{warning}");
}

#[actix_rt::test]
async fn run_names_the_file_and_line_of_failing_setup_sql_once() {
    let env = TestEnv::new(setup_fixtures()).await;
    let (status, stderr) = run_expecting_exit(&env, &[], Duration::from_secs(20));
    let said = said_once(status, &stderr, "CREAT");
    assert!(
        said.contains("typo_in_setup.yaml:10:3: setup: SQLSTATE 42601: syntax error"),
        "{stderr}"
    );
    assert!(
        !said.contains(" at line "),
        "no server source line: {stderr}"
    );
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

#[actix_rt::test]
async fn json_logs_are_one_object_per_line_carrying_the_instance() {
    let env =
        TestEnv::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/failing")).await;
    let ids = env
        .publish_starts(vec![crate::helpers::start(
            "fatal_third",
            "k-1",
            1,
            serde_json::json!({"key": "k-1"}),
        )])
        .await;
    let instance = skald::envelope::instance_id_for(ids[0]).to_string();
    let mut child = env
        .skald(&["run"])
        .env("SKALD_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn skald run");
    env.wait_for_terminal(1, Duration::from_secs(60)).await;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    wait_child(&mut child, Duration::from_secs(30));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // The failed third step is logged inside its message's span, instance and all.
    let failed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "step attempt failed")
        .unwrap_or_else(|| panic!("no failed attempt logged: {stderr}"));
    assert_eq!(failed["span"]["instance"], instance.as_str(), "{failed}");
    assert_eq!(failed["span"]["saga"], "fatal_third");
    assert_eq!(failed["level"], "INFO");

    let bad = env
        .skald(&["status"])
        .env("SKALD_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("SKALD_LOG_FORMAT=\"yaml\" is invalid"));
    env.cleanup().await;
}

/// `skald <args>`: its exit code, stdout and the last line of its stderr (the error,
/// after the test's info logs).
fn skald_exit(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    let out = env.skald(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        stderr.lines().last().unwrap_or_default().to_string(),
    )
}

/// `skald start <saga> --data <data> --json`: the instance id it printed.
fn start_instance(env: &TestEnv, saga: &str, data: &str) -> String {
    let out = env.skald_ok(&["start", saga, "--data", data, "--json"]);
    let ids: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ids["message_id"].is_string(), "{ids}");
    ids["instance_id"]
        .as_str()
        .expect("an instance id")
        .to_string()
}

#[actix_rt::test]
async fn instance_commands_list_show_and_act_as_the_api_does() {
    use crate::api::{failing_sagas, wait_failed_attempt, wait_status};
    let env = TestEnv::new(failing_sagas()).await;
    let app = env.start_app().await;

    // Given an instance waiting to retry its closed gate…
    let id = start_instance(&env, "gated", r#"{"key":"a"}"#);
    let uuid: uuid::Uuid = id.parse().unwrap();
    wait_failed_attempt(&env, uuid).await;

    // …it is listed with the API's filters and shown with its failed attempt.
    let page: serde_json::Value = serde_json::from_str(&env.skald_ok(&[
        "instances",
        "list",
        "--saga",
        "gated",
        "--status",
        "running",
        "--json",
    ]))
    .unwrap();
    assert_eq!(page["items"][0]["id"], id.as_str(), "{page}");
    assert!(page["next_cursor"].is_null());
    let none: serde_json::Value = serde_json::from_str(&env.skald_ok(&[
        "instances",
        "list",
        "--aggregate",
        "nobody",
        "--json",
    ]))
    .unwrap();
    assert_eq!(none["items"], serde_json::json!([]));
    let doc: serde_json::Value =
        serde_json::from_str(&env.skald_ok(&["instance", "show", &id, "--json"])).unwrap();
    let timeline = doc["timeline"].as_array().unwrap();
    assert!(timeline.iter().any(|e| e["outcome"] == "failed"), "{doc}");
    assert!(doc["commands"].is_array() && doc["dead_letters"].is_array());
    let text = env.skald_ok(&["instance", "show", &id]);
    assert!(text.starts_with(&format!("instance {id}\n")), "{text}");

    // The search box's search, scripted: by instance id and by aggregate id.
    let by_id: serde_json::Value =
        serde_json::from_str(&env.skald_ok(&["instances", "search", &id, "--json"])).unwrap();
    assert_eq!(by_id["items"][0]["matched"], "instance_id", "{by_id}");
    assert_eq!(by_id["items"][0]["instance"]["id"], id.as_str(), "{by_id}");
    let start = doc["start_message_id"]
        .as_str()
        .expect("a start message id");
    let by_message: serde_json::Value =
        serde_json::from_str(&env.skald_ok(&["instances", "search", start, "--json"])).unwrap();
    assert_eq!(
        by_message["items"][0]["matched"], "message_id",
        "{by_message}"
    );
    let aggregate = doc["aggregate_id"].as_str().expect("an aggregate id");
    let by_aggregate = env.skald_ok(&["instances", "search", aggregate]);
    assert!(
        by_aggregate.starts_with(&id)
            && by_aggregate.trim_end().ends_with("(matched aggregate_id)"),
        "{by_aggregate}"
    );
    let nothing = env.skald_ok(&["instances", "search", "nobody-at-all"]);
    assert_eq!(nothing.trim(), r#"no instance matches "nobody-at-all""#);
    let (code, _, err) = skald_exit(&env, &["instances", "search", "  "]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.trim(),
        "error: q must be 1 to 200 characters (spaces around it ignored)"
    );

    // Cancel is recorded with who did it; a second cancel is already done (exit 0).
    let done: serde_json::Value =
        serde_json::from_str(&env.skald_ok(&["instance", "cancel", &id, "--by", "ops", "--json"]))
            .unwrap();
    assert_eq!(
        done,
        serde_json::json!({"id": id, "action": "cancel", "outcome": "done"})
    );
    wait_status(&env, uuid, "compensated").await;
    let again = env.skald_ok(&["instance", "cancel", &id]);
    assert!(
        again.starts_with(&format!("cancel {id}: already done")),
        "{again}"
    );
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM skald.operator_actions WHERE instance_id = $1 AND action = 'cancel' \
         ORDER BY at LIMIT 1",
    )
    .bind(uuid)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(actor, "ops");

    // Refusals: exit 4 when the action does not apply, 3 for no such instance, 2 for
    // invalid filters, each with the API's message.
    let (code, _, err) = skald_exit(&env, &["instance", "retry", &id]);
    assert_eq!(code, 4, "{err}");
    assert_eq!(
        err.trim(),
        format!("error: instance {id} has no retry pending (it is compensated)")
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    for args in [
        vec!["instance", "show", unknown.as_str()],
        vec!["instance", "resume", unknown.as_str()],
    ] {
        let (code, _, err) = skald_exit(&env, &args);
        assert_eq!(code, 3, "{args:?}: {err}");
        assert_eq!(err.trim(), format!("error: no instance {unknown}"));
    }
    let (code, _, err) = skald_exit(&env, &["instances", "list", "--limit", "0"]);
    assert_eq!(code, 2);
    assert_eq!(err.trim(), "error: `limit` must be from 1 to 500, not 0");
    let (code, _, err) = skald_exit(&env, &["instances", "list", "--status", "weird"]);
    assert_eq!(code, 2);
    assert_eq!(err.trim(), r#"error: unknown status "weird""#);

    // Resume a parked instance once its cause is fixed.
    let parked = start_instance(&env, "bad_compensation", r#"{"key":"c"}"#);
    let parked_id: uuid::Uuid = parked.parse().unwrap();
    wait_status(&env, parked_id, "failed").await;
    sqlx::query("UPDATE ft.gate SET open = true")
        .execute(&env.pool)
        .await
        .unwrap();
    let resumed = env.skald_ok(&["instance", "resume", &parked, "--json"]);
    assert!(resumed.contains(r#""outcome":"done""#), "{resumed}");
    wait_status(&env, parked_id, "compensated").await;
    app.stop().await;
    env.cleanup().await;
}
