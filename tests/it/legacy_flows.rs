//! The legacy flows shipped in `sagas/` behave as their comments say, on the real
//! services: the trip booking waits out a held flight row by retrying (a transient
//! failure), and the bank transfer refuses what its daily limit does not allow and
//! compensates nothing it did not do.

use std::time::Duration;

use serde_json::json;
use skald::envelope::instance_id_for;

use crate::helpers::{TestEnv, flow_data, sample_sagas, start};

/// The shipped trip booking: while another booking holds the flight's row, each
/// `book_flight` attempt gives up after the step's `timeout_ms` (SQLSTATE 57014, a
/// transient failure) and is retried; once the row is free, the trip completes.
#[actix_rt::test]
async fn the_trip_bookings_flight_step_retries_while_the_flight_row_is_held() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await; // runs the setup: the tables exist
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM travel.flights WHERE flight_id = 'SK-4411' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let payload: serde_json::Value = serde_json::from_str(flow_data("trip_booking")).unwrap();
    let ids = env
        .publish_starts(vec![start("trip_booking", "trip-1", 1, payload)])
        .await;
    let instance = instance_id_for(ids[0]);
    // Held for more than two attempts' timeouts.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    holder.commit().await.unwrap();
    env.wait_for_terminal(1, Duration::from_secs(60)).await;
    app.stop().await;

    assert_eq!(
        env.statuses().await,
        vec![(instance, "completed".to_string())]
    );
    let attempts: Vec<(String, String, Option<String>)> =
        env.attempts(instance, "step_name, outcome, error").await;
    let flight: Vec<_> = attempts.iter().filter(|a| a.0 == "book_flight").collect();
    assert!(flight.len() >= 3, "retried: {attempts:?}");
    assert!(
        flight[..flight.len() - 1]
            .iter()
            .all(|a| a.2.as_deref().is_some_and(|e| e.contains("57014"))),
        "timed out waiting for the row: {attempts:?}"
    );
    let tickets: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM travel.flight_tickets WHERE trip_id = 'trip-1' AND NOT cancelled",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(tickets, 1, "one ticket, however many attempts");
    env.cleanup().await;
}

/// The balance and the amount withdrawn today of a bank account, as text.
async fn account(env: &TestEnv, id: &str) -> (String, String) {
    sqlx::query_as(
        "SELECT balance::text, withdrawn_today::text FROM bank.accounts WHERE account_id = $1",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .expect("read the account")
}

/// `north-002` holds 1000.00 with a daily limit of 500.00: 300 passes, another 300 the
/// same day would exceed the limit (the legacy `SELECT … FOR UPDATE` check, folded into
/// the debit), and 50 to an unknown account is debited, then refunded when the credit
/// (the pivot) fails.
#[actix_rt::test]
async fn the_bank_transfer_keeps_the_daily_limit_and_refunds_a_failed_credit() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let transfer = |id: &str, to: &str, amount: f64| {
        start(
            "transfer_funds",
            id,
            1,
            json!({"transfer_id": id, "from_account": "north-002", "to_account": to, "amount": amount}),
        )
    };
    // One at a time: the second must see the first's withdrawal.
    let first = env
        .publish_starts(vec![transfer("t-1", "south-001", 300.0)])
        .await;
    env.wait_for_terminal(1, Duration::from_secs(30)).await;
    let rest = env
        .publish_starts(vec![
            transfer("t-2", "south-001", 300.0),
            transfer("t-3", "nobody", 50.0),
        ])
        .await;
    env.wait_for_terminal(3, Duration::from_secs(30)).await;
    app.stop().await;

    let mut statuses = env.statuses().await;
    statuses.sort();
    let mut expected = vec![
        (instance_id_for(first[0]), "completed".to_string()),
        (instance_id_for(rest[0]), "compensated".to_string()),
        (instance_id_for(rest[1]), "compensated".to_string()),
    ];
    expected.sort();
    assert_eq!(statuses, expected);
    assert_eq!(
        account(&env, "north-002").await,
        ("700.00".to_string(), "300.00".to_string()),
        "only the first transfer left the account"
    );
    let ledger: Vec<String> =
        sqlx::query_scalar("SELECT transfer_id FROM bank.ledger ORDER BY transfer_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(ledger, ["t-1"]);
    env.cleanup().await;
}
