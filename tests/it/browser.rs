//! The dashboard page end to end in headless Chromium (Debian's `chromium`, driven
//! by playwright-core from `tests/browser/`; `.ci/run` installs both). Given one saga
//! that completed and one parked as failed, a person sees both, opens the failed
//! one's timeline, replays its dead letter with the button and sees it complete.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use skald::envelope::instance_id_for;

use crate::helpers::{TestEnv, start};

#[actix_rt::test]
async fn a_person_replays_a_failed_saga_from_the_dashboard() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let driver = root.join("tests/browser/node_modules/playwright-core");
    let chromium = Path::new("/usr/bin/chromium");
    if !driver.exists() || !chromium.exists() {
        // CI installs both (.ci/run); elsewhere the test says how to get them.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium and tests/browser/node_modules"
        );
        eprintln!(
            "SKIPPED browser test: needs /usr/bin/chromium (apt-get install chromium) \
             and `npm ci --prefix tests/browser`"
        );
        return;
    }

    let env = TestEnv::new(root.join("tests/fixtures/failing")).await;
    let app = env.start_app().await;
    let ids = env
        .publish_starts(vec![
            start("flaky", "k-ok", 1, json!({"key": "k-ok"})),
            start("receipt", "k-bad", 1, json!({"key": "k-bad"})),
        ])
        .await;
    env.wait_for_terminal(2, Duration::from_secs(30)).await;
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
    let run = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(root.join("tests/browser/e2e.mjs"))
            .env("BASE_URL", base)
            .env("FAILED_ID", failed.to_string())
            .env("SCREENSHOT", screenshot)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let status: String = sqlx::query_scalar("SELECT status FROM skald.instances WHERE id = $1")
        .bind(failed)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    app.stop().await;
    assert!(
        run.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(status, "completed", "the replay completed the saga");
    env.cleanup().await;
}
