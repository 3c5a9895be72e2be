//! Given unreadable messages mixed with good ones, then every unreadable one is in
//! the dead-letter queue (never retried) and every good one completes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use skald::envelope::MAX_BODY_BYTES;

use crate::helpers::{TestEnv, start, test_sagas};

fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let id = "6f1c2a4e-0000-4000-8000-0000000000aa";
    let good_shape = |extra: &str| {
        format!(
            r#"{{"message_id":"{id}","saga":"ordered","payload":{{"account":"a","seq":1}}{extra}}}"#
        )
        .into_bytes()
    };
    vec![
        ("empty body", vec![]),
        ("huge body", vec![b'x'; MAX_BODY_BYTES + 1]),
        ("invalid UTF-8", vec![0xc3, 0x28, b'{', b'}']),
        ("not JSON", b"hello".to_vec()),
        ("a JSON array", b"[1,2,3]".to_vec()),
        ("a JSON string", br#""start""#.to_vec()),
        ("duplicate keys", good_shape(r#","saga":"other""#)),
        (
            "missing message id",
            br#"{"saga":"ordered","payload":{}}"#.to_vec(),
        ),
        (
            "message id not a UUID",
            br#"{"message_id":"42","saga":"ordered","payload":{}}"#.to_vec(),
        ),
        ("negative sequence", good_shape(r#","sequence":-1"#)),
        ("unknown field", good_shape(r#","priority":"high""#)),
        (
            "unknown saga",
            format!(r#"{{"message_id":"{id}","saga":"nope","payload":{{}}}}"#).into_bytes(),
        ),
        (
            "payload not an object",
            format!(r#"{{"message_id":"{id}","saga":"ordered","payload":[1]}}"#).into_bytes(),
        ),
        (
            "no aggregate anywhere",
            format!(r#"{{"message_id":"{id}","saga":"ordered","payload":{{"seq":1}}}}"#)
                .into_bytes(),
        ),
        (
            "wrong type for saga",
            format!(r#"{{"message_id":"{id}","saga":7,"payload":{{}}}}"#).into_bytes(),
        ),
        (
            "truncated JSON",
            format!(r#"{{"message_id":"{id}","saga":"ord"#).into_bytes(),
        ),
        (
            "unknown command",
            good_shape(r#","command":{"type":"explode"}"#),
        ),
        ("unknown saga version", good_shape(r#","saga_version":99"#)),
        // Data PostgreSQL cannot store: refused at the edge, not retried for ever while
        // the aggregate ("a", started again below) waits behind it.
        (
            "NUL in the payload",
            format!(
                r#"{{"message_id":"{id}","saga":"ordered","payload":{{"account":"a","seq":1,"note":"x\u0000y"}}}}"#
            )
            .into_bytes(),
        ),
        ("NUL in the aggregate id", good_shape(r#","aggregate_id":"a\u0000""#)),
        ("empty aggregate id", good_shape(r#","aggregate_id":"""#)),
        (
            "empty aggregate in the payload",
            format!(r#"{{"message_id":"{id}","saga":"ordered","payload":{{"account":"","seq":1}}}}"#)
                .into_bytes(),
        ),
        (
            "aggregate id over 255 bytes",
            good_shape(&format!(r#","aggregate_id":"{}""#, "a".repeat(256))),
        ),
    ]
}

#[actix_rt::test]
async fn malformed_messages_go_to_the_dead_letter_queue_and_good_ones_complete() {
    let env = TestEnv::new(test_sagas()).await;
    let corpus = corpus();
    assert!(corpus.len() >= 15);
    // A good start between every two malformed messages.
    let mut bodies = Vec::new();
    let mut good = 0;
    for (i, (_, bad)) in corpus.iter().enumerate() {
        bodies.push(bad.clone());
        let account = format!("acct-{i}");
        bodies.push(
            start(
                "ordered",
                &account,
                1,
                json!({"account": account, "seq": 1}),
            )
            .to_body(),
        );
        good += 1;
    }
    // The aggregate the refused NUL-bearing start named is not held.
    bodies.push(start("ordered", "a", 2, json!({"account": "a", "seq": 2})).to_body());
    good += 1;
    env.publish_raw(&bodies).await;
    let app = env.start_app().await;
    env.wait_for_terminal(good, Duration::from_secs(60)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.engine.stats().malformed.load(Ordering::Relaxed) < corpus.len() as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "not every malformed message was handled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = app.engine.stats();
    assert_eq!(
        stats.failed_attempts.load(Ordering::Relaxed),
        0,
        "malformed is not failed"
    );
    app.stop().await;

    let completed = env.count_status("completed").await;
    assert_eq!(completed, good, "every good message completed");
    // Count in = count out: each malformed message is in the dead-letter queue once.
    assert_eq!(env.dead_letter_depth().await as usize, corpus.len());
    assert_eq!(env.intake_depth().await, 0);
    // ...and recorded in PostgreSQL with its reason and raw body.
    let recorded: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT kind, reason_code, body FROM skald.dead_letters ORDER BY created_at",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(recorded.len(), corpus.len());
    assert!(recorded.iter().all(|(kind, _, _)| kind == "malformed"));
    let codes: std::collections::BTreeSet<&str> =
        recorded.iter().map(|(_, code, _)| code.as_str()).collect();
    for code in [
        "nul_character",
        "bad_aggregate",
        "no_aggregate",
        "unknown_saga",
    ] {
        assert!(codes.contains(code), "{code} in {codes:?}");
    }
    let mut bodies: Vec<&Vec<u8>> = recorded.iter().map(|(_, _, b)| b).collect();
    let mut sent: Vec<&Vec<u8>> = corpus.iter().map(|(_, b)| b).collect();
    bodies.sort();
    sent.sort();
    assert_eq!(bodies, sent, "raw bodies preserved");
    env.cleanup().await;
}
