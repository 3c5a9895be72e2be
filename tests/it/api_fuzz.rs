//! A bounded property-based run against the live API, from its own OpenAPI document:
//! schemathesis (from PyPI; `.ci/run` installs it into a venv under the cache) sends
//! valid and invalid generated requests to a running skald on a scratch database that
//! holds pending dead letters and an instance, and fails on
//! - any 5xx, any status the document does not list, any answer that breaks its
//!   schema or `Content-Type`, a wrong answer to an undocumented method;
//! - any invalid request (bad types, unknown fields, out-of-range values…) accepted;
//! - any request answered with a 4xx that changed an existing row of
//!   `skald.dead_letters` or added to `skald.operator_actions`
//!   (`tests/fuzz/skald_hooks.py` reads both before and after every request).
//!
//! Bounded: a fixed seed, at most 20 examples per operation, 50 s of generation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::api_safety::pending_letters;
use crate::helpers::{TestEnv, sample_sagas, start};

/// Where `.ci/run` installs schemathesis (`SKALD_SCHEMATHESIS` overrides).
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("SKALD_SCHEMATHESIS") {
        return path.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    cache.join("skald-schemathesis/bin/schemathesis")
}

/// The checks: schemathesis's own, and the hooks file's.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
     response_schema_conformance,response_headers_conformance,unsupported_method,\
     allow_header_conformance,negative_data_rejection,refused_requests_change_nothing";

#[actix_rt::test]
async fn generated_requests_get_documented_answers_and_refused_ones_change_nothing() {
    if !schemathesis().exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have schemathesis at {} (.ci/run installs it)",
            schemathesis().display()
        );
        eprintln!(
            "SKIPPED api_fuzz: needs schemathesis at {} (python3 -m venv \
             ~/.cache/skald-schemathesis && ~/.cache/skald-schemathesis/bin/pip install \
             schemathesis)",
            schemathesis().display()
        );
        return;
    }
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    // Pending dead letters, so that a refused replay that still ran would show, and a
    // completed instance for the instance actions.
    let letter = pending_letters(&env, 3).await[0];
    let order =
        json!({"order_id": "f-1", "sku": "SKU-1", "qty": 1, "account": "alice", "amount": 1});
    let instance = skald::envelope::instance_id_for(
        env.publish_starts(vec![start("order_checkout", "f-1", 1, order)])
            .await[0],
    );
    env.wait_for_terminal(1, Duration::from_secs(30)).await;

    // {id} in paths: that letter, that instance; {name}: the saga.
    let scratch = std::env::temp_dir().join(format!("skald-fuzz-{}", env.name));
    std::fs::create_dir_all(&scratch).unwrap();
    let work = scratch.clone();
    let config = scratch.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[parameters]\n\"path.name\" = \"order_checkout\"\n\n\
             [[operations]]\ninclude-path-regex = \"^/api/v1/dead-letters/\"\n\
             parameters = {{ \"path.id\" = \"{letter}\" }}\n\n\
             [[operations]]\ninclude-path-regex = \"^/api/v1/instances/\"\n\
             parameters = {{ \"path.id\" = \"{instance}\" }}\n"
        ),
    )
    .unwrap();
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/skald_hooks.py");
    let url = format!("http://{}/api/v1/openapi.json", app.http_addr);
    let database_url = env.config.database_url.clone();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(schemathesis())
            .current_dir(&work) // its reports and caches stay out of the clone
            .env("SCHEMATHESIS_HOOKS", hooks)
            .env("SKALD_FUZZ_DATABASE_URL", database_url)
            .arg("--config-file")
            .arg(&config)
            .args(["run", &url, "--checks", CHECKS])
            .args(["--mode", "all", "--seed", "9", "--workers", "1"])
            .args(["--max-examples", "20", "--max-time", "50"])
            .args(["--request-timeout", "10", "--no-color"])
            .args(["--phases", "examples,coverage,fuzzing"])
            // Hypothesis's own health checks judge the generator's speed, which on a
            // loaded CI machine is no fault of the API.
            .args(["--suppress-health-check", "all"])
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    app.stop().await;
    let _ = std::fs::remove_dir_all(&scratch);
    env.cleanup().await;
    assert!(
        run.status.success(),
        "schemathesis found problems:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}
