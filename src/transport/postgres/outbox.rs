//! The PostgreSQL transport's [`TxOutbox`]: a step's messages and its delivery's ack
//! are statements of the step's own transaction, since the queue is a table of the
//! same database.

use futures_util::future::BoxFuture;
use sqlx::PgConnection;

use super::{db_err, endpoint_name};
use crate::transport::{Outbound, TransportError, TxOutbox, TxSettle};

/// Stages into the step's transaction for the home endpoint `endpoint`.
pub(super) struct PgOutbox {
    pub endpoint: String,
}

impl TxOutbox for PgOutbox {
    /// One statement: deletes the delivery's row `WHERE id = $1` and — only if it was
    /// there — inserts the messages in order (ready ones into `queue_messages`, delayed
    /// ones into `queue_delayed` due `clock_timestamp()` + delay, so never earlier than
    /// asked, dead letters into `queue_dead_letters`). The tables' insert triggers
    /// notify the consumers when the transaction commits.
    fn stage<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        settle: &'a TxSettle,
        messages: &'a [Outbound],
    ) -> BoxFuture<'a, Result<bool, TransportError>> {
        Box::pin(async move {
            let (mut endpoints, mut keys, mut bodies, mut delays) =
                (vec![], vec![], vec![], vec![]);
            let (mut dead_bodies, mut codes, mut reasons) = (vec![], vec![], vec![]);
            for m in messages {
                match m {
                    Outbound::Intake {
                        key,
                        body,
                        delay_ms,
                    } => {
                        endpoints.push(self.endpoint.as_str());
                        keys.push(key.as_str());
                        bodies.push(body.as_slice());
                        delays.push(i64::try_from(*delay_ms).unwrap_or(i64::MAX));
                    }
                    Outbound::Endpoint { to, key, body } => {
                        endpoints.push(endpoint_name(to));
                        keys.push(key.as_str());
                        bodies.push(body.as_slice());
                        delays.push(0);
                    }
                    Outbound::DeadLetter {
                        body,
                        reason_code,
                        reason,
                    } => {
                        dead_bodies.push(body.as_slice());
                        codes.push(reason_code.as_str());
                        reasons.push(reason.as_str());
                    }
                }
            }
            let settled: i64 = sqlx::query_scalar(
                "WITH settled AS (
                    DELETE FROM skald.queue_messages WHERE id = $1 RETURNING 1),
                 batch AS MATERIALIZED (
                    SELECT * FROM unnest($2::text[], $3::text[], $4::bytea[], $5::bigint[])
                           WITH ORDINALITY AS b(endpoint, key, body, delay_ms, n)
                     WHERE EXISTS (SELECT 1 FROM settled)),
                 ready AS (
                    INSERT INTO skald.queue_messages (endpoint, key, body)
                    SELECT endpoint, key, body FROM batch WHERE delay_ms = 0 ORDER BY n
                    RETURNING 1),
                 delayed AS (
                    INSERT INTO skald.queue_delayed (endpoint, key, body, due_at)
                    SELECT endpoint, key, body,
                           clock_timestamp() + delay_ms * interval '1 millisecond'
                      FROM batch WHERE delay_ms > 0 ORDER BY n
                    RETURNING 1),
                 dead AS (
                    INSERT INTO skald.queue_dead_letters (endpoint, reason_code, reason, body)
                    SELECT $6, code, reason, body
                      FROM unnest($7::bytea[], $8::text[], $9::text[])
                           WITH ORDINALITY AS d(body, code, reason, n)
                     WHERE EXISTS (SELECT 1 FROM settled) ORDER BY n
                    RETURNING 1)
                 SELECT (SELECT count(*) FROM settled)
                        + 0 * ((SELECT count(*) FROM ready) + (SELECT count(*) FROM delayed)
                               + (SELECT count(*) FROM dead))",
            )
            .bind(settle.id)
            .bind(&endpoints)
            .bind(&keys)
            .bind(&bodies)
            .bind(&delays)
            .bind(&self.endpoint)
            .bind(&dead_bodies)
            .bind(&codes)
            .bind(&reasons)
            .fetch_one(conn)
            .await
            .map_err(db_err)?;
            Ok(settled == 1)
        })
    }
}
