//! Given a saga changed from version 1 to version 2 while version-1 instances are
//! paused mid-saga, then each instance finishes on the definition it started with,
//! new starts run the newest, and `skald run` refuses what would strand instances or
//! change them silently (README, *Changing a saga*).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use skald::envelope::instance_id_for;
use uuid::Uuid;

use skald::config::Orphaned;

use crate::helpers::{TestEnv, start};

/// A private saga directory holding copies of some `tests/fixtures/versions` files.
struct SagaDir(PathBuf);

impl SagaDir {
    fn with(files: &[&str]) -> SagaDir {
        let dir = std::env::temp_dir().join(format!("skald-versions-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = SagaDir(dir);
        for file in files {
            dir.add(file);
        }
        dir
    }

    fn fixture(file: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/versions")
            .join(file)
    }

    /// Deploys a fixture file (under its own name, from a fixture subdirectory too).
    fn add(&self, file: &str) {
        let name = Path::new(file).file_name().unwrap();
        std::fs::copy(Self::fixture(file), self.0.join(name)).unwrap();
    }

    /// Removes a deployed file.
    fn remove(&self, file: &str) {
        std::fs::remove_file(self.0.join(file)).unwrap();
    }
}

impl Drop for SagaDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `stepped` on aggregate `key` (failing for good at step three when `fail`),
/// returning the instance id.
async fn start_stepped(env: &TestEnv, key: &str, fail: bool) -> Uuid {
    let ids = env
        .publish_starts(vec![start(
            "stepped",
            key,
            1,
            json!({ "key": key, "fail": fail }),
        )])
        .await;
    instance_id_for(ids[0])
}

/// Waits until each instance has failed step two at least once (gate closed): its
/// retry now waits in a delay queue.
async fn wait_until_retrying(env: &TestEnv, instances: &[Uuid]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let retrying: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT instance_id) FROM skald.inbox \
             WHERE instance_id = ANY($1) AND step_name = 'two' AND outcome = 'failed'",
        )
        .bind(instances)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if retrying == instances.len() as i64 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {retrying} of {} instances reached step two",
            instances.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn open_gate(env: &TestEnv) {
    sqlx::query("UPDATE vt.gate SET open = true")
        .execute(&env.pool)
        .await
        .unwrap();
}

/// The effects an instance left, in order.
async fn effects(env: &TestEnv, instance: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT effect FROM vt.effects WHERE instance_id = $1 ORDER BY id")
        .bind(instance)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

/// Status and version of an instance.
async fn instance(env: &TestEnv, id: Uuid) -> (String, i32) {
    sqlx::query_as("SELECT status, saga_version FROM skald.instances WHERE id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Waits until the instance is in `status`.
async fn wait_for_status(env: &TestEnv, id: Uuid, status: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (now, _) = instance(env, id).await;
        if now == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "instance {id} is {now}, not {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `skald run` against this test's services, expected to refuse to start: its stderr.
fn refused_run(env: &TestEnv, args: &[&str]) -> String {
    let mut argv = vec!["run"];
    argv.extend_from_slice(args);
    let out = env.skald(&argv).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "refused: {stderr}");
    stderr
}

#[actix_rt::test]
async fn version_1_instances_finish_on_version_1_while_new_starts_run_version_2() {
    let dir = SagaDir::with(&["stepped.v1.yaml"]);
    let env = TestEnv::new(dir.0.clone()).await;
    let app = env.start_app().await;
    let v1_ok = start_stepped(&env, "a", false).await;
    let v1_fail = start_stepped(&env, "b", true).await;
    wait_until_retrying(&env, &[v1_ok, v1_fail]).await;
    app.stop().await;

    // Deploy version 2 next to version 1; the paused retries come back after it.
    dir.add("stepped.v2.yaml");
    let app = env.start_app().await;
    let v2_ok = start_stepped(&env, "c", false).await;
    let v2_fail = start_stepped(&env, "d", true).await;
    wait_until_retrying(&env, &[v2_ok, v2_fail]).await;

    // Both versions are live, two instances each: shown per version.
    let live = json!([
        { "saga": "stepped", "version": 1, "live": 2 },
        { "saga": "stepped", "version": 2, "live": 2 },
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&env.skald_ok(&["status", "--json"])).unwrap();
    assert_eq!(report["live_per_version"], live);
    let table = env.skald_ok(&["status"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip_while(|l| !l.starts_with("saga ") || !l.contains("version"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["saga", "version", "live"],
            vec!["stepped", "1", "2"],
            vec!["stepped", "2", "2"]
        ],
        "{table}"
    );
    let svc = crate::api::service(app.api.clone()).await;
    let (_, stats) = crate::api::get(&svc, "/api/v1/stats").await;
    assert_eq!(stats["live_per_version"], live);

    open_gate(&env).await;
    env.wait_for_terminal(4, Duration::from_secs(60)).await;
    app.stop().await;

    assert_eq!(instance(&env, v1_ok).await, ("completed".into(), 1));
    assert_eq!(instance(&env, v1_fail).await, ("compensated".into(), 1));
    assert_eq!(instance(&env, v2_ok).await, ("completed".into(), 2));
    assert_eq!(instance(&env, v2_fail).await, ("compensated".into(), 2));
    assert_eq!(
        effects(&env, v1_ok).await,
        ["one v1", "two v1", "three v1"],
        "no step of version 2 ran for a version-1 instance"
    );
    assert_eq!(
        effects(&env, v1_fail).await,
        ["one v1", "two v1", "undo two v1", "undo one v1"],
        "a version-1 instance compensates with version 1's compensations"
    );
    assert_eq!(
        effects(&env, v2_ok).await,
        ["one v2", "between v2", "two v2", "three v2"]
    );
    assert_eq!(
        effects(&env, v2_fail).await,
        [
            "one v2",
            "between v2",
            "two v2",
            "undo two v2",
            "undo between v2",
            "undo one v2, refunding"
        ]
    );
    let unprocessable: i64 = sqlx::query_scalar("SELECT count(*) FROM skald.dead_letters")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(unprocessable, 0, "no message was dead-lettered");
    env.cleanup().await;
}

#[actix_rt::test]
async fn an_edited_file_that_kept_its_version_number_is_refused_naming_file_and_line() {
    let dir = SagaDir::with(&["stepped.v1.yaml"]);
    let env = TestEnv::new(dir.0.clone()).await;
    let app = env.start_app().await;
    open_gate(&env).await;
    start_stepped(&env, "a", false).await;
    env.wait_for_terminal(1, Duration::from_secs(30)).await;
    app.stop().await;

    // Same version number, different SQL.
    let file = dir.0.join("stepped.v1.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("'three v1'", "'three, edited'")).unwrap();
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("version:"))
        .unwrap();
    let stderr = refused_run(&env, &[]);
    assert!(
        stderr.contains(&format!(
            "{}:{line}: saga `stepped` version 1: same version number, different content",
            file.display()
        )),
        "{stderr}"
    );

    // Restoring the file (or giving the change a new number) lets it start.
    std::fs::write(&file, &text).unwrap();
    let app = env.start_app().await;
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn removing_a_version_with_live_instances_is_refused_unless_told_to_park_them() {
    let dir = SagaDir::with(&["stepped.v1.yaml"]);
    let mut env = TestEnv::new(dir.0.clone()).await;
    let app = env.start_app().await;
    let live = start_stepped(&env, "a", false).await;
    wait_until_retrying(&env, &[live]).await;
    app.stop().await;

    // Version 1 removed while an instance still runs on it: refused, nothing parked.
    dir.remove("stepped.v1.yaml");
    dir.add("stepped.v2.yaml");
    let stderr = refused_run(&env, &[]);
    assert!(
        stderr.contains(
            "saga `stepped` version 1 is no longer loaded but has 1 live instance(s) \
             (waiting, running or compensating): restore its file, or start with \
             --orphaned=park"
        ),
        "{stderr}"
    );
    assert_eq!(instance(&env, live).await, ("running".into(), 1));

    // Told to park them: the instance is failed with a dead letter saying why, and its
    // retry, coming back meanwhile, is dead-lettered too: never run on version 2.
    env.config.orphaned = Orphaned::Park;
    let app = env.start_app().await;
    assert_eq!(instance(&env, live).await, ("failed".into(), 1));
    let (letter, status, reason): (Uuid, String, String) = sqlx::query_as(
        "SELECT id, status, reason FROM skald.dead_letters \
         WHERE instance_id = $1 AND kind = 'orphaned' AND reason_code = 'orphaned_version'",
    )
    .bind(live)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(status, "pending");
    assert!(
        reason.contains("saga `stepped` version 1 is not loaded"),
        "{reason}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let unknown: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM skald.dead_letters WHERE reason_code = 'unknown_version' \
             AND kind = 'unprocessable' AND instance_id = $1 AND saga = 'stepped'",
        )
        .bind(live)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if unknown == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the waiting retry was never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
    assert_eq!(
        effects(&env, live).await,
        ["one v1"],
        "nothing ran on version 2"
    );

    // Version 1 restored: replaying the dead letter finishes the instance on it.
    env.config.orphaned = Orphaned::Refuse;
    dir.add("stepped.v1.yaml");
    let app = env.start_app().await;
    open_gate(&env).await;
    env.skald_ok(&["dlq", "replay", &letter.to_string(), "--by", "test"]);
    wait_for_status(&env, live, "completed").await;
    app.stop().await;
    assert_eq!(effects(&env, live).await, ["one v1", "two v1", "three v1"]);
    env.cleanup().await;
}

/// `skald diff` against this test's database and saga directory: exit code, stdout.
fn diff(env: &TestEnv) -> (Option<i32>, String) {
    let out = env.skald(&["diff"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code(), stdout)
}

#[actix_rt::test]
async fn diff_counts_the_live_instances_around_each_change_and_says_whether_it_is_safe() {
    let dir = SagaDir::with(&["stepped.v1.yaml"]);
    let env = TestEnv::new(dir.0.clone()).await;
    let app = env.start_app().await;
    let mut instances = Vec::new();
    for key in ["a", "b", "c", "d"] {
        instances.push(start_stepped(&env, key, false).await);
    }
    wait_until_retrying(&env, &instances).await;
    app.stop().await;
    // Spread them: one at step 0, two at step 1 (where they wait), one at step 2.
    for (instance, step) in [(instances[0], 0), (instances[3], 2)] {
        sqlx::query("UPDATE skald.instances SET step = $2 WHERE id = $1")
            .bind(instance)
            .bind(step)
            .execute(&env.pool)
            .await
            .unwrap();
    }

    // Version 2 next to version 1: safe, and what new starts would get, step by step.
    dir.add("diff/stepped.v2.yaml");
    let out = env.skald(&["validate"]).output().unwrap();
    let validated = String::from_utf8_lossy(&out.stdout);
    assert!(
        validated.ends_with(": stepped v1, stepped v2\n"),
        "validate names each version: {validated}"
    );
    let (code, out) = diff(&env);
    assert_eq!(
        out,
        "saga stepped\n\
         \x20 version 1: unchanged, 4 live instance(s)\n\
         \x20 version 2: added\n\
         \x20 version 1 -> version 2 on disk:\n\
         \x20   step `one`: compensation changed (0 before, 1 at, 3 past)\n\
         \x20   step `between`: added (1 before, 0 at, 3 past)\n\
         \x20   step `two`: action SQL changed (1 before, 2 at, 1 past)\n\
         \x20   step `three`: removed (3 before, 1 at, 0 past)\n\
         safe: no live instance is stranded or changed\n"
    );
    assert_eq!(code, Some(0));

    // Version 1 removed: its instances would be stranded.
    dir.remove("stepped.v1.yaml");
    let (code, out) = diff(&env);
    assert!(
        out.contains("  version 1: removed, 4 live instance(s) stranded (unsafe)\n"),
        "{out}"
    );
    assert!(
        out.ends_with("unsafe: 1 version(s) would strand or change live instances\n"),
        "{out}"
    );
    assert_eq!(code, Some(1));

    // Version 1 edited in place: its instances would run the new content.
    dir.remove("stepped.v2.yaml");
    let edited = std::fs::read_to_string(SagaDir::fixture("stepped.v1.yaml"))
        .unwrap()
        .replace("'two v1'", "'two, edited'");
    std::fs::write(dir.0.join("stepped.v1.yaml"), edited).unwrap();
    let (code, out) = diff(&env);
    assert!(
        out.contains(
            "  version 1: changed under the same version number, 4 live instance(s) would run \
             the new content (unsafe)\n  version 1 -> version 1 on disk:\n    step `two`: \
             action SQL changed (1 before, 2 at, 1 past)\n"
        ),
        "{out}"
    );
    assert_eq!(code, Some(1));
    env.cleanup().await;
}
