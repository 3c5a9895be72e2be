//! One message, end to end: read, run, record, commit, publish, ack.
//!
//! [`Engine`] is a plain component: the actors call [`Engine::process`] one message
//! at a time per aggregate, but nothing here depends on actix, so a test (or a
//! future fault-injection mode) can drive it directly.
//!
//! The order of operations is what keeps the promises:
//! 1. one PostgreSQL transaction: run the step's effect, then record — guarded on the
//!    message being new and the instance expecting exactly this step — the inbox row
//!    (the attempt and the messages to send next) and the instance's new state;
//!    commit (a copy or an out-of-date message rolls back instead: see
//!    [`crate::store::steps`]);
//! 2. publish those messages, each confirmed by the broker;
//! 3. ack the delivery.
//!
//! Step 1 is shared: steps of different aggregates ready at the same moment run in one
//! transaction, each undone alone if it fails, and commit together ([`batch`]). When
//! the transport can settle a delivery inside that transaction
//! ([`Transport::in_transaction`]), steps 2 and 3 happen in it too: the messages to
//! send are queued and the delivery settled before the commit, so a step's consume,
//! effect, record, next message and ack are one fact.
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
use tokio::sync::Notify;
use uuid::Uuid;

mod batch;
mod commands;

pub use batch::{
    BatchConfig, DEFAULT_BATCH_MAX, DEFAULT_BATCH_WINDOW, MAX_BATCH_MAX, OpenBatch, should_close,
};

use crate::envelope::{
    Command, Envelope, Malformed, Outgoing, check_aggregate_id, instance_id_for, version_list,
};
use crate::handlers::Handlers;
use crate::metrics::LatencyHistogram;
use crate::participant::wire::Reply;
use crate::saga::command;
use crate::saga::context::StepInput;
use crate::saga::coordinator::{Cursor, FailureKind, InstanceStatus, Phase};
use crate::saga::decide::{
    self, Attempt, Disposition, ParkKind, StepResult, Target, deadline_after,
};
use crate::saga::definition::{Action, StepDef};
use crate::saga::{Catalog, SagaDef};
use crate::seen::SeenIds;
use crate::store::dead_letters::{self, DeadLetterKind, NewDeadLetter};
use crate::store::effects::{self, ActionContext, EffectError};
use crate::store::{
    Disposal, InboxOutcome, NewInstance, Promoted, StepRecord, StepTx, Store, StoreError,
};
use crate::transport::{Delivery, Transport, TransportError};
use batch::Batcher;

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
    /// The instance changed while the message was being disposed of.
    #[error("instance {0} changed concurrently")]
    Raced(Uuid),
    /// An injected crash (`skald explore`): the handling stops here, the delivery is
    /// left unacked.
    #[error("injected crash")]
    Crashed,
    /// The batch this step was in could not commit (or could not start): nothing of it
    /// was kept.
    #[error("batch transaction: {0}")]
    Batch(String),
    /// The step that led this step's batch stopped before handing back its result.
    #[error("the batch leading this step was dropped")]
    BatchLost,
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
    /// A service's reply to a command step: then `envelope` is only its identity, a run
    /// message of the cursor it answers under the reply's message id (so routing, logs
    /// and the inbox treat it like any message of its instance).
    pub reply: Option<Arc<Reply>>,
}

pub use crate::faults::{FaultPoint, Faults, Injected};

/// Counters of what the engine did, for logs, `skald bench` and the dashboard.
#[derive(Debug, Default)]
pub struct Stats {
    /// Steps and compensations that ran and committed (success or recorded failure).
    pub applied: AtomicU64,
    /// Copies of already-handled messages, recognised by the inbox.
    pub duplicates: AtomicU64,
    /// Messages out of date for their instance, recorded and dropped.
    pub skipped: AtomicU64,
    /// Starts older than their aggregate's watermark, recorded and dropped.
    pub stale: AtomicU64,
    /// Starts of exclusive sagas queued behind another instance of their aggregate.
    pub queued: AtomicU64,
    /// Aggregate actors alive now (a gauge: it goes down as idle actors stop).
    pub live_actors: AtomicU64,
    /// Attempts that failed (and were recorded).
    pub failed_attempts: AtomicU64,
    /// Retries scheduled (a failed attempt followed by a delayed one).
    pub retries: AtomicU64,
    /// Compensations committed successfully.
    pub compensations: AtomicU64,
    /// Unreadable messages sent to the dead-letter queue.
    pub malformed: AtomicU64,
    /// Infrastructure errors that made the engine wait and try a message again.
    pub infra_retries: AtomicU64,
    /// Messages being tried again after infrastructure failures for longer than the
    /// engine's `stuck_after` (a gauge): an outage that needs a person.
    pub stuck: AtomicU64,
    /// Messages whose data PostgreSQL refused while recording them (never retried:
    /// dead-lettered as `unprocessable`, code `data_error`).
    pub data_errors: AtomicU64,
    /// Time to handle one message, from the actor taking it to its ack.
    pub step_latency: LatencyHistogram,
    /// Per-saga, per-step and per-command metrics for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Batch transactions committed.
    pub batches: AtomicU64,
    /// Steps in the committed batches (÷ `batches`: the mean batch size).
    pub batched_steps: AtomicU64,
    /// The most steps one committed batch held.
    pub largest_batch: AtomicU64,
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

impl EngineError {
    /// Whether PostgreSQL refused the message's data (see [`StoreError::is_data_error`]).
    fn is_data_error(&self) -> bool {
        matches!(self, EngineError::Store(e) if e.is_data_error())
    }
}

/// The result of one try at a message.
enum Handled {
    /// Send these (possibly none), then ack.
    Send(Vec<Outgoing>),
    /// The message cannot be processed: dead-letter it with this reason, then ack.
    DeadLetter(&'static str, String),
    /// Another consumer settled the delivery already (seen inside the step's
    /// transaction, which was undone): nothing to send, nothing to ack.
    SettledElsewhere,
}

/// How a handled delivery is finished.
enum Finish {
    /// Ack it (after its messages were published).
    Ack,
    /// It was settled inside the step's transaction: only forget it.
    Forget,
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
    consuming: AtomicBool,
    stuck_after: Duration,
    seen: SeenIds,
    batcher: Batcher,
}

/// How long a message may be tried again through infrastructure failures before the
/// engine reports it stuck (see [`Engine::with_stuck_after`]).
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(60);

/// The message that runs the first step of a waiting instance once it is promoted
/// (`isolation: exclusive`), in the saga version it was started with, with the
/// deadline its promotion recorded.
pub fn first_step_message(
    saga: &str,
    aggregate_id: &str,
    promoted: Promoted,
    deadline: Option<chrono::DateTime<Utc>>,
) -> Outgoing {
    Outgoing::to_intake(
        Envelope {
            deadline,
            ..Envelope::run(
                saga,
                promoted.saga_version,
                aggregate_id,
                promoted.id,
                Cursor::START,
                promoted.payload,
            )
        },
        0,
    )
}

/// The saga version `envelope` runs on: the one it names, else (a start) the newest
/// loaded one, else (a run message from a skald before versions) the only loaded one.
///
/// # Errors
/// [`Malformed::UnknownSaga`] when no version of the saga is loaded,
/// [`Malformed::UnknownVersion`] when the named version is not loaded.
pub fn resolve<'c>(
    catalog: &'c Catalog,
    envelope: &Envelope,
) -> Result<&'c Arc<SagaDef>, Malformed> {
    let name = &envelope.saga;
    let newest = catalog
        .get(name)
        .ok_or_else(|| Malformed::UnknownSaga(name.clone()))?;
    match (envelope.saga_version, envelope.command) {
        (None, Command::Start) => Ok(newest),
        // A run message sent by a skald older than versions: unambiguous only while
        // one version is loaded.
        (None, _) if catalog.versions(name).len() == 1 => Ok(newest),
        (None, _) => Err(Malformed::Invalid(format!(
            "run message without saga_version while versions {} of saga {name:?} are loaded",
            version_list(catalog.versions(name))
        ))),
        (Some(wanted), _) => {
            catalog
                .get_version(name, wanted)
                .ok_or_else(|| Malformed::UnknownVersion {
                    saga: name.clone(),
                    wanted,
                    loaded: catalog.versions(name).to_vec(),
                    instance: envelope.command.target().map(|(id, _)| id),
                })
        }
    }
}

/// The instance and cursor a message is about: a start's derived instance at
/// [`Cursor::START`], else the ones its run or timer command names.
fn target_of(env: &Envelope) -> (Uuid, Cursor) {
    env.command
        .target()
        .unwrap_or((instance_id_for(env.message_id), Cursor::START))
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
            transport,
            catalog,
            handlers,
            faults,
            stats: Stats::default(),
            in_flight: InFlight::default(),
            shutting_down: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            stuck_after: DEFAULT_STUCK_AFTER,
            seen: SeenIds::default(),
            batcher: Batcher::new(
                BatchConfig::default(),
                store.pool().options().get_max_connections(),
            ),
            store,
        }
    }

    /// Forms batches this way (`SKALD_BATCH_MAX`, `SKALD_BATCH_WINDOW_MS`; the default
    /// is [`BatchConfig::default`]).
    pub fn with_batching(mut self, config: BatchConfig) -> Self {
        let pool_size = self.store.pool().options().get_max_connections();
        self.batcher = Batcher::new(config, pool_size);
        self
    }

    /// How batches are formed.
    pub fn batching(&self) -> BatchConfig {
        self.batcher.config()
    }

    /// Reports a message as stuck (an error log, the `stuck` gauge, `/ready`'s detail)
    /// once infrastructure failures have held it this long.
    pub fn with_stuck_after(mut self, stuck_after: Duration) -> Self {
        self.stuck_after = stuck_after;
        self
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

    /// Records whether deliveries are flowing (for readiness).
    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::SeqCst);
    }

    /// Whether deliveries are flowing.
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::SeqCst)
    }

    /// From now on, a message that meets an infrastructure failure is abandoned
    /// unacked (the broker redelivers it) instead of being tried again.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The highest start sequence applied for `saga` on `aggregate_id`.
    pub async fn watermark(
        &self,
        saga: &str,
        aggregate_id: &str,
    ) -> Result<Option<i64>, EngineError> {
        Ok(self.store.watermark(saga, aggregate_id).await?)
    }

    /// Reads a raw body into a [`Job`]: envelope (or a service's reply), saga,
    /// aggregate.
    pub fn read(&self, body: &[u8]) -> Result<Job, Malformed> {
        if Reply::looks_like(body) {
            match self.read_reply(body) {
                Ok(job) => return Ok(job),
                // A start whose payload merely holds an `in_reply_to` key stays a start.
                Err(e) if commands::is_reply_shaped(body) => return Err(e),
                Err(_) => {}
            }
        }
        let envelope = Envelope::parse(body)?;
        let saga = resolve(&self.catalog, &envelope)?.clone();
        let aggregate_id = match (&envelope.aggregate_id, envelope.command) {
            (Some(id), _) => id.clone(),
            (None, Command::Start) => {
                let id = saga
                    .aggregate_of(&envelope.payload)
                    .ok_or_else(|| Malformed::NoAggregate(saga.aggregate.to_string()))?;
                check_aggregate_id(&id)?;
                id
            }
            (None, _) => {
                return Err(Malformed::Invalid(
                    "run message without aggregate_id".into(),
                ));
            }
        };
        Ok(Job {
            envelope,
            saga,
            aggregate_id,
            reply: None,
        })
    }

    /// Handles one job completely — commit, publish, ack — retrying through
    /// infrastructure failures until it succeeds or shutdown begins. Everything it logs
    /// happens in a `message` span naming the saga, instance, aggregate and step.
    pub async fn process(&self, job: Job, delivery: Delivery) {
        let env = &job.envelope;
        let (instance, cursor) = target_of(env);
        let span = crate::telemetry::message_span(
            &job.saga,
            &job.aggregate_id,
            instance,
            cursor,
            env.message_id,
            env.traceparent.as_deref(),
        );
        tracing::Instrument::instrument(self.process_in_span(job, delivery), span).await
    }

    async fn process_in_span(&self, job: Job, delivery: Delivery) {
        let started = Instant::now();
        let mut tries = 0;
        let mut stuck = false;
        let finished = loop {
            let e = match self.try_once(&job, &delivery).await {
                Ok(finish) => break Some(finish),
                // The simulated process is gone: the delivery stays unacked.
                Err(EngineError::Crashed) => break None,
                Err(e) => e,
            };
            if e.is_data_error() {
                // PostgreSQL refused what the message carries: no retry can fix that,
                // and retrying would hold the aggregate for good.
                self.stats.data_errors.fetch_add(1, Ordering::Relaxed);
                let reason = format!("PostgreSQL refused the message's data: {e}");
                match self.park_unprocessable(&job, "data_error", &reason).await {
                    Ok(()) => break Some(Finish::Ack),
                    Err(park) => tracing::warn!(error = %park, "dead-lettering failed; will retry"),
                }
            }
            self.stats.infra_retries.fetch_add(1, Ordering::Relaxed);
            if self.shutting_down.load(Ordering::SeqCst) {
                tracing::warn!(error = %e, message_id = %job.envelope.message_id,
                    "shutting down: leaving the message unacked for redelivery");
                break None;
            }
            let wait = infra_backoff(tries);
            if !stuck && started.elapsed() >= self.stuck_after {
                stuck = true;
                self.stats.stuck.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, message_id = %job.envelope.message_id,
                    aggregate = %job.aggregate_id, stuck_for_ms = started.elapsed().as_millis() as u64,
                    "message stuck behind infrastructure failures; its aggregate waits");
            } else {
                tracing::warn!(error = %e, message_id = %job.envelope.message_id,
                    retry_in_ms = wait.as_millis() as u64, "infrastructure failure; will retry");
            }
            tokio::time::sleep(wait).await;
            tries += 1;
        };
        if stuck {
            self.stats.stuck.fetch_sub(1, Ordering::Relaxed);
        }
        let Some(finish) = finished else {
            self.in_flight.leave();
            return;
        };
        let acked = match finish {
            Finish::Ack => delivery.ack().await,
            Finish::Forget => delivery.settled().await,
        };
        if let Err(e) = acked {
            // The broker will redeliver it; the inbox makes that copy harmless.
            tracing::warn!(error = %e, "ack failed; the message will be redelivered");
        }
        self.stats.step_latency.record(started.elapsed());
        self.in_flight.leave();
    }

    /// Sends an unreadable message to the dead-letter queue, then acks it. A run
    /// message for a saga version that is not loaded is readable: it is recorded as
    /// `unprocessable`, with its instance and saga.
    pub async fn dead_letter(&self, delivery: Delivery, reason: Malformed) {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(reason = %reason, bytes = delivery.body.len(), "malformed message: dead-lettered");
        let text = reason.to_string();
        let (kind, instance_id, saga) = match &reason {
            Malformed::UnknownVersion {
                saga,
                instance: Some(instance),
                ..
            } => (
                DeadLetterKind::Unprocessable,
                Some(*instance),
                Some(saga.as_str()),
            ),
            _ => (DeadLetterKind::Malformed, None, None),
        };
        let record = NewDeadLetter {
            id: Uuid::new_v4(),
            kind,
            reason_code: reason.code(),
            reason: &text,
            body: &delivery.body,
            message_id: None,
            instance_id,
            saga,
        };
        let mut tries = 0;
        loop {
            let stored = async {
                dead_letters::insert(self.store.pool(), &record).await?;
                self.transport
                    .dead_letter(&delivery.body, reason.code(), &text)
                    .await?;
                Ok::<(), EngineError>(())
            };
            let Err(e) = stored.await else { break };
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

    /// One try at `job`: its step in a batch, then what follows the batch's commit.
    async fn try_once(&self, job: &Job, delivery: &Delivery) -> Result<Finish, EngineError> {
        let _active = self.batcher.active();
        let (_, cursor) = target_of(&job.envelope);
        let phase = cursor.phase;
        let step_name = job
            .saga
            .steps
            .get(cursor.step as usize)
            .map_or("", |s| s.name.as_str());
        let crash_at = |point| {
            if self.faults.at(point, step_name, phase) == Injected::Crash {
                Err(EngineError::Crashed)
            } else {
                Ok(())
            }
        };
        // A copy is looked up before its step runs again: when the broker says it is a
        // redelivery, or when this process recorded its id lately.
        let suspect_copy = delivery.redelivered || self.seen.contains(&job.envelope.message_id);
        let done = self
            .handle_batched(
                Arc::new(job.clone()),
                suspect_copy,
                delivery.settle_handle(),
            )
            .await;
        let handled = done.handled?;
        self.seen.insert(job.envelope.message_id);
        match handled {
            Handled::Send(outgoing) => {
                crash_at(FaultPoint::AfterCommit)?;
                if !done.in_transaction {
                    commands::send_all(&outgoing, self.transport.as_ref()).await?;
                }
                crash_at(FaultPoint::AfterPublish)?;
                Ok(if done.in_transaction {
                    Finish::Forget
                } else {
                    Finish::Ack
                })
            }
            Handled::DeadLetter(code, reason) => {
                self.park_unprocessable(job, code, &reason).await?;
                Ok(Finish::Ack)
            }
            Handled::SettledElsewhere => Ok(Finish::Forget),
        }
    }

    /// Records `job` as an `unprocessable` dead letter (in PostgreSQL, then in the
    /// dead-letter queue) with its reason.
    async fn park_unprocessable(
        &self,
        job: &Job,
        code: &'static str,
        reason: &str,
    ) -> Result<(), EngineError> {
        tracing::warn!(reason, code, message_id = %job.envelope.message_id, "dead-lettered");
        // A reply is kept as the service sent it, not as its routing envelope.
        let body = match &job.reply {
            Some(reply) => reply.to_body(),
            None => job.envelope.to_body(),
        };
        dead_letters::insert(
            self.store.pool(),
            &NewDeadLetter {
                id: Uuid::new_v5(&job.envelope.message_id, b"dead-letter"),
                kind: DeadLetterKind::Unprocessable,
                reason_code: code,
                reason,
                body: &body,
                message_id: Some(job.envelope.message_id),
                instance_id: None,
                saga: Some(&job.saga.name),
            },
        )
        .await?;
        self.transport.dead_letter(&body, code, reason).await?;
        Ok(())
    }

    /// The transaction part: everything up to and including the commit. The
    /// decisions are [`decide`]'s; this carries them out.
    ///
    /// Fast path (a new message for the step its instance expects): effect and record
    /// in one transaction, as many round trips as a bare consume→commit→ack worker.
    /// Anything else — a copy, an out-of-date message — is found out by the guarded
    /// record, rolled back, and disposed of by [`Engine::dispose`].
    async fn handle(&self, job: &Job, suspect_copy: bool) -> Result<Handled, EngineError> {
        let env = &job.envelope;
        let saga = &job.saga;
        let (instance_id, requested) = target_of(env);
        let (step, action) = match decide::target(saga, requested) {
            Target::Run { step, action } => (step, action),
            Target::DeadLetter { code, reason } => return Ok(Handled::DeadLetter(code, reason)),
        };
        if suspect_copy && self.store.disposal(env.message_id, instance_id).await? == Disposal::Seen
        {
            if let Some(reply) = &job.reply {
                return self.duplicate_reply(reply).await;
            }
            return self.resend_copy(env.message_id).await;
        }
        if let Some(reply) = &job.reply {
            return self.handle_reply(job, reply, step).await;
        }
        if let Command::Timer { send, .. } = env.command {
            return match action {
                Action::Command(command) => {
                    self.handle_timer(job, instance_id, requested, send, step, command)
                        .await
                }
                _ => Ok(Handled::DeadLetter(
                    "not_a_command",
                    format!(
                        "step {} sends no command: a reply timer has nothing to time",
                        step.name
                    ),
                )),
            };
        }

        let started_at = Utc::now();
        let at = Attempt {
            saga,
            envelope: env,
            aggregate_id: &job.aggregate_id,
            instance_id,
            cursor: requested,
            deadline: decide::deadline(saga, env, started_at),
        };
        let mut tx = self.store.begin().await?;
        // Every job's saga comes from the catalog, whose hashes are computed once.
        let computed;
        let saga_hash = match self.catalog.hash(&saga.name, saga.version) {
            Some(hash) => hash,
            None => {
                computed = saga.content_hash();
                &computed
            }
        };
        let new_instance = NewInstance {
            saga: &saga.name,
            saga_version: saga.version,
            saga_hash,
            start_message_id: env.message_id,
            sequence: env.order_key(),
            deadline: at.deadline,
        };
        if decide::takes_lock(saga, env) && tx.exclusive_busy(&saga.name, &job.aggregate_id).await?
        {
            // Another instance holds the aggregate: queue this one behind it.
            let queued = tx
                .record_waiting(
                    env.message_id,
                    instance_id,
                    &job.aggregate_id,
                    &env.payload,
                    &new_instance,
                )
                .await?;
            if !queued {
                tx.rollback().await?;
                return self.dispose(job, instance_id, requested).await;
            }
            tx.commit().await?;
            self.stats.queued.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(instance = %instance_id, aggregate = %job.aggregate_id,
                "exclusive saga busy on this aggregate: instance waits its turn");
            return Ok(Handled::Send(Vec::new()));
        }

        let injected = self
            .faults
            .at(FaultPoint::BeforeEffect, &step.name, requested.phase);
        let result = match (
            decide::expired(step, requested, at.deadline, started_at),
            injected,
        ) {
            // Past the deadline the step counts as failed for good.
            (Some(message), _) => StepResult::Failed {
                kind: FailureKind::Fatal,
                message,
            },
            (None, Injected::Crash) => return Err(EngineError::Crashed),
            (None, Injected::Fail(kind)) => StepResult::Failed {
                kind,
                message: "injected failure".to_string(),
            },
            (None, Injected::Nothing) => {
                let input = StepInput {
                    instance_id,
                    aggregate_id: &job.aggregate_id,
                    payload: &env.payload,
                    outputs: &env.outputs,
                };
                if let Action::Command(command) = action {
                    match command::bind(command, &input) {
                        Ok(params) => {
                            let sent = command::send(&at, command, params, Utc::now());
                            let new = (env.command == Command::Start).then_some(&new_instance);
                            return self
                                .record_sent(tx, job, &at, step, command, sent, started_at, new)
                                .await;
                        }
                        Err(message) => {
                            tx.rollback().await?;
                            tx = self.store.begin().await?;
                            let plan = decide::decide(
                                &at,
                                StepResult::Failed {
                                    kind: FailureKind::Fatal,
                                    message,
                                },
                                Utc::now(),
                                fastrand::f64(),
                            );
                            let new = (env.command == Command::Start).then_some(&new_instance);
                            return self.finish(tx, job, &at, step, plan, started_at, new).await;
                        }
                    }
                }
                let ctx = ActionContext {
                    input: &input,
                    step_name: &step.name,
                    cursor: requested,
                    timeout: step.timeout,
                };
                match effects::run_action(tx.conn(), action, ctx, &self.handlers).await {
                    Ok(output) => StepResult::Succeeded(output),
                    Err(EffectError { kind, message }) => StepResult::Failed { kind, message },
                }
            }
        };
        if matches!(result, StepResult::Failed { .. }) {
            // The effect's transaction is aborted: undo it, record the failure in a
            // fresh one.
            tx.rollback().await?;
            tx = self.store.begin().await?;
        }

        let plan = decide::decide(&at, result, Utc::now(), fastrand::f64());
        let new = (env.command == Command::Start).then_some(&new_instance);
        self.finish(tx, job, &at, step, plan, started_at, new).await
    }

    /// Records an attempt's `plan` in `tx` — the inbox row under the message's id, the
    /// instance's new state (creating it for a start, `new`), the lock hand-over and
    /// the parked instance's dead letter — and commits; or, when the guarded record
    /// does not apply, rolls back and disposes of the message.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        mut tx: StepTx,
        job: &Job,
        at: &Attempt<'_>,
        step: &StepDef,
        mut plan: decide::Plan,
        started_at: chrono::DateTime<Utc>,
        new_instance: Option<&NewInstance<'_>>,
    ) -> Result<Handled, EngineError> {
        let saga = &job.saga;
        let env = &job.envelope;
        let (instance_id, requested) = (at.instance_id, at.cursor);
        if plan.pass_lock {
            // The semantic lock passes to the oldest waiting instance, in this same
            // transaction: if this record does not commit, neither does the promotion.
            let deadline = deadline_after(Utc::now(), saga.timeout);
            if let Some(promoted) = tx
                .promote_next(&saga.name, &job.aggregate_id, deadline)
                .await?
            {
                plan.outgoing.push(first_step_message(
                    &saga.name,
                    &job.aggregate_id,
                    promoted,
                    deadline,
                ));
            }
        }
        crate::telemetry::propagate(&mut plan.outgoing, instance_id, env.traceparent.as_deref());
        let record = StepRecord {
            message_id: env.message_id,
            instance_id,
            aggregate_id: &job.aggregate_id,
            payload: &at.envelope.payload,
            ran: requested,
            step_name: &step.name,
            outcome: InboxOutcome::Ran(plan.outcome),
            error: plan.error.as_deref(),
            started_at,
            new_state: plan.state,
            outputs: &plan.outputs,
            outgoing: &plan.outgoing,
        };
        let recorded = match new_instance {
            Some(new) => tx.record_start(&record, new).await?,
            None => tx.record_run(&record, requested).await?,
        };
        if !recorded {
            tx.rollback().await?;
            return self.dispose(job, instance_id, requested).await;
        }
        if let Some(park) = &plan.park {
            let body = park.envelope.to_body();
            let kind = match park.kind {
                ParkKind::Exhausted => DeadLetterKind::Exhausted,
                ParkKind::CompensationFailed => DeadLetterKind::CompensationFailed,
            };
            dead_letters::insert(
                tx.conn(),
                &NewDeadLetter {
                    id: Uuid::new_v5(&env.message_id, b"dead-letter"),
                    kind,
                    reason_code: park.kind.code(),
                    reason: &park.reason,
                    body: &body,
                    message_id: Some(env.message_id),
                    instance_id: Some(instance_id),
                    saga: Some(&saga.name),
                },
            )
            .await?;
        }
        self.commit(tx, &step.name, requested.phase).await?;
        crate::telemetry::record_attempt(plan.outcome, plan.error.as_deref());
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        self.stats.metrics.step_attempt(
            &saga.name,
            &step.name,
            requested.phase.as_str(),
            plan.error.is_some(),
        );
        if let Some(error) = &plan.error {
            // Logged only now that it is recorded: a copy's failed re-run is not an attempt.
            tracing::info!(saga = %saga.name, step = %step.name, phase = requested.phase.as_str(),
                attempt = requested.attempt, outcome = ?plan.outcome, error = %error,
                "step attempt failed");
            self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            if plan.retries {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
        } else if requested.phase == Phase::Compensate {
            self.stats.compensations.fetch_add(1, Ordering::Relaxed);
        }
        if plan.state.status.is_terminal() && plan.state.status != InstanceStatus::Completed {
            tracing::warn!(saga = %saga.name, instance = %instance_id,
                status = plan.state.status.as_str(), "saga instance finished after a failure");
        }
        Ok(Handled::Send(plan.outgoing))
    }

    /// Commits `tx`, unless a crash is injected just before (`BeforeCommit`).
    async fn commit(&self, tx: StepTx, step_name: &str, phase: Phase) -> Result<(), EngineError> {
        if self.faults.at(FaultPoint::BeforeCommit, step_name, phase) == Injected::Crash {
            return Err(EngineError::Crashed);
        }
        tx.commit().await?;
        Ok(())
    }

    /// The slow path: a message whose guarded record did not apply.
    async fn dispose(
        &self,
        job: &Job,
        instance_id: Uuid,
        requested: Cursor,
    ) -> Result<Handled, EngineError> {
        let env = &job.envelope;
        let message_id = env.message_id;
        let disposal = self.store.disposal(message_id, instance_id).await?;
        let watermark = if decide::needs_watermark(disposal, env) {
            self.store
                .watermark(&job.saga.name, &job.aggregate_id)
                .await?
        } else {
            None
        };
        match decide::dispose(disposal, env, instance_id, requested, watermark) {
            Disposition::ResendCopy => self.resend_copy(message_id).await,
            Disposition::RecordStale => {
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%message_id, saga = %job.saga.name, aggregate = %job.aggregate_id,
                    order_key = env.order_key(), ?watermark, "stale start: discarded and recorded");
                let mut tx = self.store.begin().await?;
                tx.record_skipped(message_id, instance_id, true).await?;
                tx.commit().await?;
                Ok(Handled::Send(Vec::new()))
            }
            Disposition::RecordSkipped(reason) => {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%message_id, ?reason, "message out of date: skipped");
                let mut tx = self.store.begin().await?;
                tx.record_skipped(message_id, instance_id, false).await?;
                tx.commit().await?;
                Ok(Handled::Send(Vec::new()))
            }
            Disposition::DeadLetter { code, reason } => Ok(Handled::DeadLetter(code, reason)),
            Disposition::Raced => Err(EngineError::Raced(instance_id)),
        }
    }

    /// A copy of a handled message: runs nothing, re-sends what the first handling
    /// sent (in case that publish was lost; the receivers drop copies by id).
    async fn resend_copy(&self, message_id: Uuid) -> Result<Handled, EngineError> {
        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        let outgoing = self.store.outgoing_of(message_id).await?;
        tracing::info!(%message_id, resend = outgoing.len(),
            "copy of a handled message: ran nothing, re-sent what it sent");
        Ok(Handled::Send(outgoing))
    }
}
