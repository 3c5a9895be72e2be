//! The dashboard page end to end in headless Chromium (Debian's `chromium`, driven
//! by playwright-core from `tests/browser/`; `.ci/run` installs both). Given one saga
//! that completed and one parked as failed, a person sees both, opens the failed
//! one's timeline, replays its dead letter with the button and sees it complete; and
//! given instances failing in two groups, a person retries one group with its button;
//! and a person finds a parked saga with the search box and resumes it with its button.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use skald::envelope::instance_id_for;
use uuid::Uuid;

use crate::helpers::{RunningApp, TestEnv, start};

/// Whether chromium and the driver are installed; CI must have them, elsewhere the
/// test says how to get them and is skipped.
fn browser_installed() -> bool {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let driver = root.join("tests/browser/node_modules/playwright-core");
    if driver.exists() && Path::new("/usr/bin/chromium").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have chromium and tests/browser/node_modules"
    );
    eprintln!(
        "SKIPPED browser test: needs /usr/bin/chromium (apt-get install chromium) \
         and `npm ci --prefix tests/browser`"
    );
    false
}

/// Runs `tests/browser/<script>` with node and `envs`; its output.
async fn run_script(script: &str, envs: Vec<(&'static str, String)>) -> std::process::Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser")
        .join(script);
    tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(path)
            .envs(envs)
            .output()
            .expect("run node")
    })
    .await
    .unwrap()
}

fn assert_script_passed(run: &std::process::Output) {
    assert!(
        run.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}

/// skald on the `failing` fixtures with two sagas ended: `flaky` completed (aggregate
/// `k-ok`) and `receipt` parked as failed (aggregate `k-bad`); their start ids.
async fn one_completed_one_parked(root: &Path) -> (TestEnv, RunningApp, Vec<Uuid>) {
    let env = TestEnv::new(root.join("tests/fixtures/failing")).await;
    let app = env.start_app().await;
    let ids = env
        .publish_starts(vec![
            start("flaky", "k-ok", 1, json!({"key": "k-ok"})),
            start("receipt", "k-bad", 1, json!({"key": "k-bad"})),
        ])
        .await;
    env.wait_for_terminal(2, Duration::from_secs(30)).await;
    (env, app, ids)
}

#[actix_rt::test]
async fn a_person_replays_a_failed_saga_from_the_dashboard() {
    if !browser_installed() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    let (env, app, ids) = one_completed_one_parked(root).await;
    let failed = instance_id_for(ids[1]);
    let status: String = sqlx::query_scalar("SELECT status FROM skald.instances WHERE id = $1")
        .bind(failed)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(status, "failed");
    // The cause is fixed; now the person replays it.
    sqlx::query("UPDATE ft.gate SET open = true")
        .execute(&env.pool)
        .await
        .unwrap();

    let base = format!("http://{}/", app.http_addr);
    // UPDATE_SCREENSHOT=1 refreshes the picture in README; otherwise it goes to a
    // scratch file, so that running the tests leaves the tree clean.
    let screenshot = if std::env::var_os("UPDATE_SCREENSHOT").is_some() {
        root.join("docs/dashboard.png")
    } else {
        std::env::temp_dir().join(format!("skald-dashboard-{}.png", env.name))
    };
    let run = run_script(
        "e2e.mjs",
        vec![
            ("BASE_URL", base),
            ("FAILED_ID", failed.to_string()),
            ("SCREENSHOT", screenshot.display().to_string()),
        ],
    )
    .await;
    let status: String = sqlx::query_scalar("SELECT status FROM skald.instances WHERE id = $1")
        .bind(failed)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    app.stop().await;
    assert_script_passed(&run);
    assert_eq!(status, "completed", "the replay completed the saga");
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_person_retries_a_failure_group_from_the_dashboard() {
    if !browser_installed() {
        return;
    }
    // Given three instances out of stock and one with a declined card, all waiting a
    // minute for their retry, and the cause fixed…
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let env = TestEnv::new(root.join("tests/fixtures/groups")).await;
    let app = env.start_app().await;
    let starts = [
        ("a", "stock"),
        ("b", "stock"),
        ("c", "card"),
        ("d", "stock"),
    ]
    .iter()
    .enumerate()
    .map(|(n, (key, kind))| start("grouped", key, 0, json!({"key": key, "kind": kind, "n": n})))
    .collect();
    env.publish_starts(starts).await;
    env.wait_failing(4).await;
    sqlx::query("UPDATE fg.gate SET open = true")
        .execute(&env.pool)
        .await
        .unwrap();

    // …pressing the out-of-stock group's retry button completes its three only.
    let run = run_script(
        "groups.mjs",
        vec![
            ("BASE_URL", format!("http://{}/", app.http_addr)),
            ("CODE", "55000".into()),
            ("RETRIED", "3".into()),
        ],
    )
    .await;
    let completed = env.count_status("completed").await;
    let running = env.count_status("running").await;
    let by: Vec<String> =
        sqlx::query_scalar("SELECT actor FROM skald.operator_actions WHERE action = 'retry_group'")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    app.stop().await;
    assert_script_passed(&run);
    assert_eq!((completed, running), (3, 1));
    assert_eq!(by, vec!["dashboard".to_string()]);
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_person_finds_a_parked_saga_with_the_search_box_and_resumes_it_with_its_button() {
    if !browser_installed() {
        return;
    }
    // Given one saga completed and one parked, its cause fixed.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (env, app, ids) = one_completed_one_parked(root).await;
    let failed = instance_id_for(ids[1]);
    sqlx::query("UPDATE ft.gate SET open = true")
        .execute(&env.pool)
        .await
        .unwrap();

    // When the person searches for it, presses "retry now" (refused: it is parked),
    // then "resume".
    let run = run_script(
        "actions.mjs",
        vec![
            ("BASE_URL", format!("http://{}/", app.http_addr)),
            ("FAILED_ID", failed.to_string()),
            ("AGGREGATE", "k-bad".into()),
            ("MESSAGE_ID", ids[1].to_string()),
        ],
    )
    .await;
    let status: String = sqlx::query_scalar("SELECT status FROM skald.instances WHERE id = $1")
        .bind(failed)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let actions: Vec<(String, String)> =
        sqlx::query_as("SELECT action, actor FROM skald.operator_actions ORDER BY at")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    app.stop().await;
    assert_script_passed(&run);
    // Then it completed, resumed by the dashboard (the refused retry left no record).
    assert_eq!(status, "completed");
    assert_eq!(
        actions,
        vec![("resume".to_string(), "dashboard".to_string())]
    );
    env.cleanup().await;
}
