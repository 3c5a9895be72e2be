//! A running participant: consume the service's endpoint, handle each message with
//! the participant's guarantees, drain on shutdown.
//!
//! One message, end to end:
//!
//! 1. not a service message, or a type without handler → recorded in
//!    `skald_participant.dead_letters` and sent to the transport's dead-letter queue at
//!    once, with the reason; acked; never retried, never answered;
//! 2. it waits for its aggregate's lane (one message per aggregate at a time);
//! 3. one transaction on the service's database: a processed message is a copy (its
//!    stored reply is sent again, nothing runs); a stale one is recorded unrun; else the
//!    handler runs and its success is recorded with it (a failure rolls the
//!    transaction back, and a new one records the failure);
//! 4. commit, then (each confirmed) the dead letter, the delayed retry or the reply;
//! 5. ack.
//!
//! A database or broker failure in 3 or 4 is not an attempt: the message waits and is
//! tried again, holding its aggregate, until the infrastructure is back (or shutdown,
//! which leaves it unacked for redelivery).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};

use super::builder::ParticipantError;
use super::decide::{self, LastApplied, Outcome};
use super::faults::{CrashPoint, ParticipantFaults};
use super::handler::{HandlerError, Incoming, MessageHandler};
use super::lanes::Lanes;
use super::policy::{AfterFailure, RetryPolicy};
use super::store::{self, DeadReason, NewDeadLetter};
use super::wire::{Reply, ServiceError, ServiceMessage};
use crate::engine::InFlight;
use crate::envelope::nul_path;
use crate::transport::{Delivery, Endpoint, Transport, TransportError};

/// Pause before consuming again after the broker connection was lost.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// The first and the longest wait between tries through an infrastructure failure.
const INFRA_WAIT: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// A participant service, built by [`Participant::builder`], ready to [`Participant::run`].
pub struct Participant {
    inner: Arc<Inner>,
    shutdown_timeout: Duration,
}

/// What the builder checked and hands over.
pub(super) struct Parts {
    pub(super) service: String,
    pub(super) pool: PgPool,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) handlers: HashMap<String, Arc<dyn MessageHandler>>,
    pub(super) retry: RetryPolicy,
    pub(super) faults: ParticipantFaults,
}

struct Inner {
    parts: Parts,
    lanes: Lanes,
    in_flight: InFlight,
    stopping: AtomicBool,
}

/// What follows a committed transaction, each step confirmed by the broker before the
/// next, all before the ack.
#[derive(Debug)]
enum Action {
    DeadLetter {
        body: Vec<u8>,
        code: DeadReason,
        reason: String,
    },
    Republish {
        body: Vec<u8>,
        delay_ms: u64,
    },
    Reply(Reply),
}

/// Why a piece of work was given up.
enum Stop {
    /// Shutdown: the delivery stays unacked and is redelivered.
    Shutdown,
    /// PostgreSQL refused the data itself: no wait can help.
    Refused(String),
}

/// Why a piece of work must be done again (never an attempt of the message).
enum Again {
    /// The database or the broker failed.
    Infra(ParticipantError),
    /// Another process recorded the message first: look again, it is a copy now.
    Raced,
}

impl From<sqlx::Error> for Again {
    fn from(e: sqlx::Error) -> Self {
        Again::Infra(e.into())
    }
}

impl From<TransportError> for Again {
    fn from(e: TransportError) -> Self {
        Again::Infra(e.into())
    }
}

impl Participant {
    pub(super) fn new(parts: Parts, shutdown_timeout: Duration) -> Self {
        Participant {
            inner: Arc::new(Inner {
                parts,
                lanes: Lanes::default(),
                in_flight: InFlight::default(),
                stopping: AtomicBool::new(false),
            }),
            shutdown_timeout,
        }
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.inner.parts.service
    }

    /// Consumes until `shutdown` resolves, then shuts down gracefully: stops
    /// consuming, lets messages in flight finish (commit, reply, ack) within the
    /// shutdown timeout, and closes the transport. Unfinished messages stay unacked
    /// and are redelivered. Returns an error only when the broker refuses the
    /// configuration; a lost connection is waited out.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ParticipantError> {
        let inner = &self.inner;
        tracing::info!(service = %inner.parts.service, types = ?inner.parts.handlers.keys().collect::<Vec<_>>(),
            "participant consuming");
        tokio::pin!(shutdown);
        loop {
            let mut deliveries = match inner.parts.transport.consume().await {
                Ok(stream) => stream,
                Err(e @ TransportError::Refused(_)) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RECONNECT_DELAY) => continue,
                        _ = &mut shutdown => break,
                    }
                }
            };
            let stopped = loop {
                tokio::select! {
                    next = deliveries.next() => match next {
                        Some(delivery) => self.dispatch(delivery),
                        None => break false,
                    },
                    _ = &mut shutdown => break true,
                }
            };
            if stopped {
                break;
            }
            tracing::warn!("consumer stream ended; reconnecting");
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
        tracing::info!(
            in_flight = inner.in_flight.count(),
            "participant shutting down: draining"
        );
        inner.parts.transport.stop_consuming().await;
        let drained = tokio::time::timeout(self.shutdown_timeout, inner.in_flight.drained()).await;
        inner.stopping.store(true, Ordering::SeqCst);
        if drained.is_err() {
            tracing::warn!(
                in_flight = inner.in_flight.count(),
                "shutdown timeout: unfinished messages will be redelivered"
            );
        }
        inner.parts.transport.close().await;
        Ok(())
    }

    /// Starts the work of one delivery. Runs in receive order, so a message joins its
    /// aggregate's lane behind the ones received before it.
    fn dispatch(&self, delivery: Delivery) {
        let inner = self.inner.clone();
        inner.in_flight.enter();
        match ServiceMessage::parse(&delivery.body) {
            Err(reason) => {
                tokio::spawn(async move {
                    let reason = format!("malformed: {reason}");
                    inner
                        .set_apart(delivery, DeadReason::Malformed, reason, None)
                        .await;
                    inner.in_flight.leave();
                });
            }
            Ok(msg) if !inner.parts.handlers.contains_key(&msg.kind) => {
                tokio::spawn(async move {
                    let reason = format!(
                        "unknown type {:?}: service {} has no handler for it",
                        msg.kind, inner.parts.service
                    );
                    inner
                        .set_apart(delivery, DeadReason::UnknownType, reason, Some(&msg))
                        .await;
                    inner.in_flight.leave();
                });
            }
            Ok(msg) => {
                let mut turn = inner.lanes.enter(&msg.aggregate_id);
                // The handling joins the trace of the saga step that sent the command.
                let span = crate::telemetry::command_span(&inner.parts.service, &msg);
                tokio::spawn(async move {
                    turn.wait().await;
                    let handled = inner.handle_delivery(&msg, delivery);
                    tracing::Instrument::instrument(handled, span).await;
                    inner.lanes.leave(turn);
                    inner.in_flight.leave();
                });
            }
        }
    }
}

impl Inner {
    /// Runs `work` until it succeeds, waiting out infrastructure failures (0.2 s
    /// doubling to 5 s). Stops at shutdown, and at once when PostgreSQL refuses the
    /// data itself (waiting cannot fix that).
    async fn until_done<T, F, Fut>(&self, what: &str, mut work: F) -> Result<T, Stop>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Again>>,
    {
        let mut wait = INFRA_WAIT.0;
        loop {
            match work().await {
                Ok(value) => return Ok(value),
                Err(Again::Raced) => continue,
                Err(Again::Infra(ParticipantError::Database(e)))
                    if crate::store::is_data_error(&e) =>
                {
                    tracing::error!(error = %crate::store::error_text(&e), "{what}: data refused");
                    return Err(Stop::Refused(crate::store::error_text(&e)));
                }
                Err(Again::Infra(e)) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        tracing::warn!(error = %e, "{what}: giving up at shutdown; redelivered later");
                        return Err(Stop::Shutdown);
                    }
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                        "{what}: infrastructure failure, not an attempt; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(INFRA_WAIT.1);
                }
            }
        }
    }

    async fn handle_delivery(&self, msg: &ServiceMessage, delivery: Delivery) {
        match self.until_done("handling", || self.handle(msg)).await {
            Ok(actions) => self.finish_delivery(actions, delivery, &msg.kind).await,
            Err(Stop::Shutdown) => {}
            Err(Stop::Refused(why)) => {
                let reason =
                    format!("unprocessable: the service's database refused to record it: {why}");
                self.set_apart(delivery, DeadReason::Unprocessable, reason, Some(msg))
                    .await;
            }
        }
    }

    /// Carries out `actions` in order, then acks the delivery (of a message of type
    /// `kind`).
    async fn finish_delivery(&self, actions: VecDeque<Action>, delivery: Delivery, kind: &str) {
        let replies = actions.iter().any(|a| matches!(a, Action::Reply(_)));
        let actions = std::sync::Mutex::new(actions);
        let sent = self
            .until_done("publishing", || async {
                // Each action is dropped once confirmed: a retry resumes after it.
                loop {
                    let next = actions.lock().expect("actions").pop_front();
                    let Some(action) = next else { return Ok(()) };
                    if let Err(e) = self.carry_out(&action).await {
                        actions.lock().expect("actions").push_front(action);
                        return Err(e.into());
                    }
                }
            })
            .await;
        if sent.is_err() {
            return;
        }
        if replies {
            self.parts.faults.at(CrashPoint::AfterReply, kind);
        }
        if let Err(e) = delivery.ack().await {
            // The channel is gone: the broker redelivers it, and it is a copy then.
            tracing::warn!(error = %e, "ack failed; the message will come again");
        }
    }

    async fn carry_out(&self, action: &Action) -> Result<(), TransportError> {
        match action {
            Action::DeadLetter { body, code, reason } => {
                self.parts
                    .transport
                    .dead_letter(body, code.as_str(), reason)
                    .await
            }
            Action::Republish { body, delay_ms } => {
                let msg = ServiceMessage::parse(body).expect("a republished body is ours");
                self.parts
                    .transport
                    .publish(&msg.aggregate_id, body, *delay_ms)
                    .await
            }
            Action::Reply(reply) => {
                self.parts
                    .transport
                    .send_to(
                        &Endpoint::Orchestrator,
                        &reply.aggregate_id,
                        &crate::telemetry::reply_body(reply),
                    )
                    .await
            }
        }
    }

    /// Sets a delivery apart at once: a row in the service's dead letters, a copy in
    /// the transport's dead-letter queue, the ack. No reply: skald times out.
    async fn set_apart(
        &self,
        delivery: Delivery,
        code: DeadReason,
        reason: String,
        msg: Option<&ServiceMessage>,
    ) {
        tracing::warn!(service = %self.parts.service, code = code.as_str(), %reason, "dead letter");
        let letter = NewDeadLetter {
            code,
            reason: &reason,
            msg,
            body: &delivery.body,
        };
        let recorded = self
            .until_done("recording a dead letter", || async {
                let mut conn = self.parts.pool.acquire().await?;
                store::insert_dead_letter(&mut conn, &self.parts.service, &letter).await?;
                Ok(())
            })
            .await;
        if recorded.is_err() {
            return;
        }
        let action = Action::DeadLetter {
            body: delivery.body.clone(),
            code,
            reason: reason.clone(),
        };
        let kind = msg.map_or("", |m| m.kind.as_str());
        self.finish_delivery(VecDeque::from([action]), delivery, kind)
            .await;
    }

    /// A copy of a processed message: nothing runs, its stored reply is sent again.
    async fn copy_of(
        &self,
        tx: Transaction<'static, Postgres>,
        msg: &ServiceMessage,
        done: store::Processed,
    ) -> Result<VecDeque<Action>, Again> {
        tx.rollback().await?;
        tracing::info!(service = %self.parts.service, message_id = %msg.message_id,
            outcome = %done.outcome, "copy of a processed message: nothing runs");
        Ok(done.reply.into_iter().map(Action::Reply).collect())
    }

    /// One message's transaction: what follows its commit.
    ///
    /// On the way that succeeds (the usual one) the participant's own round trips are
    /// four — `BEGIN`, one look-up of its processed row and its aggregate's last
    /// applied, one record of both, `COMMIT` — besides the handler's statements.
    async fn handle(&self, msg: &ServiceMessage) -> Result<VecDeque<Action>, Again> {
        let mut tx = self.parts.pool.begin().await?;
        let (done, last) = store::lookup(&mut tx, &self.parts.service, msg).await?;
        if let Some(done) = done {
            return self.copy_of(tx, msg, done).await;
        }
        if let Some(reason) = decide::stale(msg, &last) {
            return self
                .record(tx, msg, Outcome::Stale(reason), 0, &msg.errors, None)
                .await;
        }
        let attempt = msg.errors.len() as u32 + 1;
        let handler = self.parts.handlers[&msg.kind].clone();
        let incoming = Incoming {
            message_id: msg.message_id,
            kind: msg.kind.clone(),
            aggregate_id: msg.aggregate_id.clone(),
            payload: msg.payload.clone(),
            attempt,
            is_command: msg.reply_to.is_some(),
            sequence: msg.sequence,
            dispatched_at: msg.dispatched_at,
        };
        // No savepoint (two round trips each time): a failure rolls the whole
        // transaction back, and a new one records the failure.
        let result = handler.call(&mut tx, incoming).await.and_then(|outputs| {
            match nul_path(&Value::Object(outputs.clone()), "outputs") {
                // A handler bug no retry fixes: PostgreSQL cannot store the reply.
                Some(path) => Err(HandlerError::Fatal(format!(
                    "the handler's outputs hold a NUL character at {path}, which PostgreSQL cannot store"
                ))),
                None => Ok(outputs),
            }
        });
        let error = match result {
            Ok(outputs) => {
                let advance = Some(last.after(msg));
                return self
                    .record(
                        tx,
                        msg,
                        Outcome::Succeeded(outputs),
                        attempt,
                        &msg.errors,
                        advance,
                    )
                    .await;
            }
            Err(error) => error,
        };
        // A dead connection fails here too: then it is the infrastructure, not an attempt.
        tx.rollback().await?;
        let mut tx = self.parts.pool.begin().await?;
        // Locked again; recorded by another process meanwhile (a partition handed
        // over): a copy now, this try counts for nothing.
        if let (Some(done), _) = store::lookup(&mut tx, &self.parts.service, msg).await? {
            return self.copy_of(tx, msg, done).await;
        }
        // The error text is stored as text: a NUL in it is spelled out.
        let message = error.to_string().replace('\0', "\\0");
        let failure = ServiceError {
            attempt,
            at: Utc::now(),
            message: message.clone(),
        };
        let next = self
            .parts
            .retry
            .after_failure(error.kind(), attempt, fastrand::f64());
        store::record_failure(
            &mut tx,
            &self.parts.service,
            msg,
            &failure,
            next != AfterFailure::Fatal,
        )
        .await?;
        let mut errors = msg.errors.clone();
        errors.push(failure);
        tracing::warn!(service = %self.parts.service, message_id = %msg.message_id, attempt,
            error = %error, next = ?next, "handler failed");
        match next {
            AfterFailure::Retry { delay_ms } => {
                tx.commit().await?;
                let body = ServiceMessage {
                    errors,
                    ..msg.clone()
                }
                .to_body();
                Ok(VecDeque::from([Action::Republish { body, delay_ms }]))
            }
            AfterFailure::Fatal => {
                self.record(tx, msg, Outcome::Fatal(message), attempt, &errors, None)
                    .await
            }
            AfterFailure::Exhausted => {
                let reason = format!("exhausted after {attempt} attempt(s): {message}");
                let dead = ServiceMessage {
                    errors: errors.clone(),
                    ..msg.clone()
                };
                let body = dead.to_body();
                let letter = NewDeadLetter {
                    code: DeadReason::Exhausted,
                    reason: &reason,
                    msg: Some(&dead),
                    body: &body,
                };
                store::insert_dead_letter(&mut tx, &self.parts.service, &letter).await?;
                let mut actions = self
                    .record(
                        tx,
                        msg,
                        Outcome::Exhausted(reason.clone()),
                        attempt,
                        &errors,
                        None,
                    )
                    .await?;
                actions.push_front(Action::DeadLetter {
                    body,
                    code: DeadReason::Exhausted,
                    reason,
                });
                Ok(actions)
            }
        }
    }

    /// Records `msg` as processed with `outcome` (and, with `advance`, what its
    /// aggregate last applied) and commits: its reply follows.
    async fn record(
        &self,
        mut tx: Transaction<'static, Postgres>,
        msg: &ServiceMessage,
        outcome: Outcome,
        attempts: u32,
        errors: &[ServiceError],
        advance: Option<LastApplied>,
    ) -> Result<VecDeque<Action>, Again> {
        let reply = decide::reply(&self.parts.service, msg, &outcome);
        let new = store::NewProcessed {
            service: &self.parts.service,
            msg,
            outcome: &outcome,
            reply: reply.as_ref(),
            attempts,
            errors,
            advance,
        };
        let recorded = store::record(&mut tx, &new).await?;
        if !recorded {
            tx.rollback().await?;
            return Err(Again::Raced);
        }
        tx.commit().await?;
        tracing::info!(service = %self.parts.service, message_id = %msg.message_id,
            aggregate = %msg.aggregate_id, kind = %msg.kind, outcome = outcome.as_str(),
            attempts, "processed");
        self.parts.faults.at(CrashPoint::AfterCommit, &msg.kind);
        Ok(reply.into_iter().map(Action::Reply).collect())
    }
}
