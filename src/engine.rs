//! One message, end to end: read, claim, run, record, commit, publish, ack.
//!
//! [`Engine`] is a plain component: the actors call [`Engine::process`] one message
//! at a time per aggregate, but nothing here depends on actix, so a test (or a
//! future fault-injection mode) can drive it directly.
//!
//! The order of operations is what keeps the promises:
//! 1. one PostgreSQL transaction: claim the instance (or see that this message id was
//!    handled already), run the step's effect, record inbox row + attempt + new state
//!    + the messages to send next; commit;
//! 2. publish those messages, each confirmed by the broker;
//! 3. ack the delivery.
//!
//! A crash after 1 leaves the delivery unacked: its redelivery finds its inbox row,
//! runs nothing, and publishes the recorded messages again (their ids are
//! deterministic, so the receiver's inbox drops any copy). Infrastructure failures
//! (database or broker unreachable) never count as step failures: the engine waits
//! and tries the whole message again, holding the aggregate so order is kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::envelope::{Command, Envelope, Malformed, Outgoing, instance_id_for, run_message_id};
use crate::handlers::Handlers;
use crate::metrics::LatencyHistogram;
use crate::saga::context::StepInput;
use crate::saga::coordinator::{self, Admission, Cursor, FailureKind, Outcome, Phase, Transition};
use crate::saga::{Catalog, SagaDef};
use crate::store::effects::{self, EffectError};
use crate::store::{AttemptRecord, InstanceRow, NewInstance, RunClaim, StepTx, Store, StoreError};
use crate::transport::{Delivery, Transport, TransportError};

/// An infrastructure failure while handling a message: nothing about the message is
/// wrong, so it is tried again later.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// A message that was read successfully and knows where it belongs.
#[derive(Debug, Clone)]
pub struct Job {
    /// The message.
    pub envelope: Envelope,
    /// Its saga.
    pub saga: Arc<SagaDef>,
    /// The aggregate whose actor handles it.
    pub aggregate_id: String,
}

/// Where a simulated crash happens (the `SKALD_CRASH_AT` test hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the step's transaction committed, before publishing what follows.
    AfterCommit,
    /// After publishing what follows, before acking the delivery.
    AfterPublish,
}

/// Crash the process (as `kill -9` would: no cleanup) when a step reaches a point.
/// Used by the crash-recovery tests, and the seam for a future fault-injection mode.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    crash: Option<(CrashPoint, String)>,
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Faults::default()
    }

    /// Reads `SKALD_CRASH_AT=after_commit:<step>` or `after_publish:<step>`.
    pub fn from_env() -> Result<Self, String> {
        let Ok(spec) = std::env::var("SKALD_CRASH_AT") else {
            return Ok(Faults::none());
        };
        let (point, step) = spec
            .split_once(':')
            .ok_or_else(|| format!("SKALD_CRASH_AT={spec:?}: expected <point>:<step>"))?;
        let point = match point {
            "after_commit" => CrashPoint::AfterCommit,
            "after_publish" => CrashPoint::AfterPublish,
            other => return Err(format!("SKALD_CRASH_AT: unknown point {other:?}")),
        };
        Ok(Faults {
            crash: Some((point, step.to_string())),
        })
    }

    fn hit(&self, point: CrashPoint, step: Option<&str>) {
        if let Some((p, s)) = &self.crash
            && *p == point
            && step == Some(s.as_str())
        {
            tracing::error!(?point, step = s, "SKALD_CRASH_AT: aborting the process");
            std::process::abort();
        }
    }
}

/// Counters of what the engine did, for logs, `skald bench` and the dashboard.
#[derive(Debug, Default)]
pub struct Stats {
    /// Steps and compensations that ran and committed (success or recorded failure).
    pub applied: AtomicU64,
    /// Copies of already-handled messages, recognised by the inbox.
    pub duplicates: AtomicU64,
    /// Messages out of date for their instance, recorded and dropped.
    pub skipped: AtomicU64,
    /// Attempts that failed (and were recorded).
    pub failed_attempts: AtomicU64,
    /// Unreadable messages sent to the dead-letter queue.
    pub malformed: AtomicU64,
    /// Infrastructure errors that made the engine wait and try a message again.
    pub infra_retries: AtomicU64,
    /// Time to handle one message, from the actor taking it to its ack.
    pub step_latency: LatencyHistogram,
}

/// Messages received but not yet acked; graceful shutdown waits for zero.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    drained: Notify,
}

impl InFlight {
    /// One more message in flight.
    pub fn enter(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// One message finished.
    pub fn leave(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// How many are in flight now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The result of one try at a message.
enum Handled {
    /// Send these (possibly none), then ack.
    Send(Vec<Outgoing>),
    /// The message cannot be processed: dead-letter it with this reason, then ack.
    DeadLetter(&'static str, String),
}

/// Handles messages. Shared by every aggregate actor of a process.
pub struct Engine {
    store: Store,
    transport: Arc<dyn Transport>,
    catalog: Catalog,
    handlers: Handlers,
    faults: Faults,
    stats: Stats,
    in_flight: InFlight,
    shutting_down: AtomicBool,
}

/// Waits between tries after an infrastructure failure: 100 ms doubling to 5 s.
fn infra_backoff(tries: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << tries.min(6))).min(Duration::from_secs(5))
}

impl Engine {
    /// An engine over these parts.
    pub fn new(
        store: Store,
        transport: Arc<dyn Transport>,
        catalog: Catalog,
        handlers: Handlers,
        faults: Faults,
    ) -> Self {
        Engine {
            store,
            transport,
            catalog,
            handlers,
            faults,
            stats: Stats::default(),
            in_flight: InFlight::default(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// What the engine did so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Messages received and not yet acked.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// The sagas this engine runs.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// From now on, a message that meets an infrastructure failure is abandoned
    /// unacked (the broker redelivers it) instead of being tried again.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Reads a raw body into a [`Job`]: envelope, saga, aggregate.
    pub fn read(&self, body: &[u8]) -> Result<Job, Malformed> {
        let envelope = Envelope::parse(body)?;
        let saga = self
            .catalog
            .get(&envelope.saga)
            .ok_or_else(|| Malformed::UnknownSaga(envelope.saga.clone()))?
            .clone();
        let aggregate_id = match (&envelope.aggregate_id, envelope.command) {
            (Some(id), _) => id.clone(),
            (None, Command::Start) => saga
                .aggregate
                .resolve(&StepInput {
                    instance_id: Uuid::nil(),
                    aggregate_id: "",
                    payload: &envelope.payload,
                    outputs: &Value::Null,
                })
                .and_then(|v| match v {
                    Value::String(s) => Some(s),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .ok_or_else(|| Malformed::NoAggregate(saga.aggregate.to_string()))?,
            (None, Command::Run { .. }) => {
                return Err(Malformed::Invalid(
                    "run message without aggregate_id".into(),
                ));
            }
        };
        Ok(Job {
            envelope,
            saga,
            aggregate_id,
        })
    }

    /// Handles one job completely — commit, publish, ack — retrying through
    /// infrastructure failures until it succeeds or shutdown begins.
    pub async fn process(&self, job: Job, delivery: Delivery) {
        let started = Instant::now();
        let mut tries = 0;
        loop {
            match self.try_once(&job).await {
                Ok(()) => break,
                Err(e) => {
                    self.stats.infra_retries.fetch_add(1, Ordering::Relaxed);
                    if self.shutting_down.load(Ordering::SeqCst) {
                        tracing::warn!(error = %e, message_id = %job.envelope.message_id,
                            "shutting down: leaving the message unacked for redelivery");
                        self.in_flight.leave();
                        return;
                    }
                    let wait = infra_backoff(tries);
                    tracing::warn!(error = %e, message_id = %job.envelope.message_id,
                        retry_in_ms = wait.as_millis() as u64, "infrastructure failure; will retry");
                    tokio::time::sleep(wait).await;
                    tries += 1;
                }
            }
        }
        if let Err(e) = delivery.ack().await {
            // The broker will redeliver it; the inbox makes that copy harmless.
            tracing::warn!(error = %e, "ack failed; the message will be redelivered");
        }
        self.stats.step_latency.record(started.elapsed());
        self.in_flight.leave();
    }

    /// Sends an unreadable message to the dead-letter queue, then acks it.
    pub async fn dead_letter(&self, delivery: Delivery, reason: Malformed) {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(reason = %reason, bytes = delivery.body.len(), "malformed message: dead-lettered");
        let mut tries = 0;
        while let Err(e) = self
            .transport
            .dead_letter(&delivery.body, reason.code(), &reason.to_string())
            .await
        {
            if self.shutting_down.load(Ordering::SeqCst) {
                self.in_flight.leave();
                return;
            }
            tracing::warn!(error = %e, "dead-lettering failed; will retry");
            tokio::time::sleep(infra_backoff(tries)).await;
            tries += 1;
        }
        if let Err(e) = delivery.ack().await {
            tracing::warn!(error = %e, "ack failed; the message will be redelivered");
        }
        self.in_flight.leave();
    }

    async fn try_once(&self, job: &Job) -> Result<(), EngineError> {
        let step_name = match job.envelope.command {
            Command::Start => job.saga.steps.first().map(|s| s.name.as_str()),
            Command::Run { cursor, .. } => job
                .saga
                .steps
                .get(cursor.step as usize)
                .map(|s| s.name.as_str()),
        };
        match self.handle(job).await? {
            Handled::Send(outgoing) => {
                self.faults.hit(CrashPoint::AfterCommit, step_name);
                for msg in &outgoing {
                    self.transport.publish(msg).await?;
                }
                self.faults.hit(CrashPoint::AfterPublish, step_name);
            }
            Handled::DeadLetter(code, reason) => {
                tracing::warn!(reason, message_id = %job.envelope.message_id, "dead-lettered");
                self.transport
                    .dead_letter(&job.envelope.to_body(), code, &reason)
                    .await?;
            }
        }
        Ok(())
    }

    /// The transaction part: everything up to and including the commit.
    async fn handle(&self, job: &Job) -> Result<Handled, EngineError> {
        let (requested, claim) = match self.claim(job).await? {
            Claimed::Fresh(tx, row, requested) => (requested, (tx, row)),
            Claimed::Seen => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                let outgoing = self.store.outgoing_of(job.envelope.message_id).await?;
                tracing::debug!(message_id = %job.envelope.message_id, resend = outgoing.len(),
                    "duplicate message");
                return Ok(Handled::Send(outgoing));
            }
            Claimed::NoInstance(instance_id) => {
                return Ok(Handled::DeadLetter(
                    "no_instance",
                    format!("run message for unknown instance {instance_id}"),
                ));
            }
        };
        let (mut tx, row) = claim;
        let cursor = match coordinator::admit(row.state, requested) {
            Admission::Run(cursor) => cursor,
            Admission::Skip(reason) => {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(message_id = %job.envelope.message_id, ?reason, "message skipped");
                tx.record_skipped(job.envelope.message_id, row.id).await?;
                tx.commit().await?;
                return Ok(Handled::Send(Vec::new()));
            }
        };

        let started_at = Utc::now();
        let step = &job.saga.steps[cursor.step as usize];
        let action = match cursor.phase {
            Phase::Forward => &step.action,
            Phase::Compensate => step
                .compensation
                .as_ref()
                .expect("validation: compensated steps have a compensation"),
        };
        let input = StepInput {
            instance_id: row.id,
            aggregate_id: &row.aggregate_id,
            payload: &row.payload,
            outputs: &row.outputs,
        };
        let result = effects::run_action(
            tx.conn(),
            action,
            &input,
            &step.name,
            cursor,
            &self.handlers,
        )
        .await;

        match result {
            Ok(output) => {
                let t =
                    coordinator::transition(&job.saga, cursor, Outcome::Succeeded, fastrand::f64());
                let outgoing = self.outgoing(&job.saga, &row, &t);
                let attempt = AttemptRecord {
                    cursor,
                    step_name: &step.name,
                    outcome: Outcome::Succeeded,
                    error: None,
                    started_at,
                };
                tx.record_applied(
                    job.envelope.message_id,
                    row.id,
                    &attempt,
                    t.state,
                    output.as_ref(),
                    &outgoing,
                )
                .await?;
                tx.commit().await?;
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                Ok(Handled::Send(outgoing))
            }
            Err(failure) => {
                // The effect's transaction is aborted: undo it, and record the failure
                // in a fresh one (which claims the instance again).
                tx.rollback().await?;
                self.record_failure(job, cursor, &failure, started_at).await
            }
        }
    }

    async fn record_failure(
        &self,
        job: &Job,
        cursor: Cursor,
        failure: &EffectError,
        started_at: chrono::DateTime<Utc>,
    ) -> Result<Handled, EngineError> {
        let step = &job.saga.steps[cursor.step as usize];
        tracing::info!(saga = %job.saga.name, step = %step.name, phase = cursor.phase.as_str(),
            attempt = cursor.attempt, kind = ?failure.kind, error = %failure.message, "step attempt failed");
        let (mut tx, row) = match self.claim(job).await? {
            Claimed::Fresh(tx, row, _) => (tx, row),
            // A copy of this message committed meanwhile (another process?): its
            // outcome stands.
            Claimed::Seen => {
                let outgoing = self.store.outgoing_of(job.envelope.message_id).await?;
                return Ok(Handled::Send(outgoing));
            }
            Claimed::NoInstance(id) => {
                return Ok(Handled::DeadLetter(
                    "no_instance",
                    format!("unknown instance {id}"),
                ));
            }
        };
        let outcome = Outcome::Failed(failure.kind);
        let t = coordinator::transition(&job.saga, cursor, outcome, fastrand::f64());
        let outgoing = self.outgoing(&job.saga, &row, &t);
        let attempt = AttemptRecord {
            cursor,
            step_name: &step.name,
            outcome,
            error: Some(&failure.message),
            started_at,
        };
        tx.record_applied(
            job.envelope.message_id,
            row.id,
            &attempt,
            t.state,
            None,
            &outgoing,
        )
        .await?;
        tx.commit().await?;
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        if t.state.status.is_terminal() {
            tracing::warn!(saga = %job.saga.name, instance = %row.id, status = t.state.status.as_str(),
                "saga instance finished after a failure");
        }
        if failure.kind == FailureKind::Fatal {
            tracing::debug!(instance = %row.id, "fatal failure: no retry");
        }
        Ok(Handled::Send(outgoing))
    }

    async fn claim(&self, job: &Job) -> Result<Claimed, EngineError> {
        let env = &job.envelope;
        let mut tx = self.store.begin().await?;
        match env.command {
            Command::Start => {
                let new = NewInstance {
                    id: instance_id_for(env.message_id),
                    start_message_id: env.message_id,
                    saga: &job.saga.name,
                    saga_version: job.saga.version,
                    aggregate_id: &job.aggregate_id,
                    payload: &env.payload,
                    sequence: env.sequence,
                };
                match tx.claim_start(&new).await? {
                    Some(row) => Ok(Claimed::Fresh(tx, row, Cursor::START)),
                    None => {
                        tx.rollback().await?;
                        Ok(Claimed::Seen)
                    }
                }
            }
            Command::Run {
                instance_id,
                cursor,
            } => match tx.claim_run(env.message_id, instance_id).await? {
                RunClaim::Fresh(row) => Ok(Claimed::Fresh(tx, row, cursor)),
                RunClaim::Seen => {
                    tx.rollback().await?;
                    Ok(Claimed::Seen)
                }
                RunClaim::NoInstance => {
                    tx.rollback().await?;
                    Ok(Claimed::NoInstance(instance_id))
                }
            },
        }
    }

    fn outgoing(&self, saga: &SagaDef, row: &InstanceRow, t: &Transition) -> Vec<Outgoing> {
        t.next
            .iter()
            .map(|next| Outgoing {
                envelope: Envelope {
                    message_id: run_message_id(row.id, next.cursor),
                    saga: saga.name.clone(),
                    aggregate_id: Some(row.aggregate_id.clone()),
                    sequence: None,
                    dispatched_at: Some(Utc::now()),
                    command: Command::Run {
                        instance_id: row.id,
                        cursor: next.cursor,
                    },
                    payload: Value::Null,
                },
                delay_ms: next.delay.as_millis() as u64,
            })
            .collect()
    }
}

enum Claimed {
    Fresh(StepTx, InstanceRow, Cursor),
    Seen,
    NoInstance(Uuid),
}
