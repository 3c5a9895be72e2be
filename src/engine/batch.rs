//! Batches: steps of different aggregates that are ready at the same moment share one
//! PostgreSQL transaction, so they pay one commit (one fsync) between them.
//!
//! Each step still runs exactly as alone ([`Engine::handle`]), as a part of the
//! batch's transaction ([`SharedTx`]): a step that fails or meets an error is undone
//! alone, back to its own savepoint, while the others commit. The actors serialise an
//! aggregate's messages, and a step joins a batch only from inside its actor's
//! handling, so a batch never holds two steps of one aggregate.
//!
//! There is no batching task: the step that opens a batch *leads* it — it waits until
//! [`should_close`] says so, takes the batch, runs every step of it one after the
//! other on one connection, commits, and hands each step its result. The next step to
//! arrive meanwhile opens the next batch, which collects while this one runs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, oneshot};
use tracing::Instrument;

use super::{Engine, EngineError, Handled, Job};
use crate::store::{SharedTx, StepTx};
use crate::transport::TxSettle;

/// `SKALD_BATCH_MAX` unset: steps in one transaction at most.
pub const DEFAULT_BATCH_MAX: usize = 32;
/// The highest `SKALD_BATCH_MAX`: PostgreSQL keeps the subtransactions (savepoints) of
/// 64 per transaction in shared memory; beyond that every other session's snapshots
/// get slower.
pub const MAX_BATCH_MAX: usize = 64;
/// `SKALD_BATCH_WINDOW_MS` unset: how long an open batch waits for more steps at most.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(2);

/// How batches are formed (`SKALD_BATCH_MAX`, `SKALD_BATCH_WINDOW_MS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Steps in one transaction at most (1: every step commits alone, as before).
    pub max: usize,
    /// How long an open batch waits for more steps at most.
    pub window: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max: DEFAULT_BATCH_MAX,
            window: DEFAULT_BATCH_WINDOW,
        }
    }
}

/// An open batch as its leader sees it when deciding whether to close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenBatch {
    /// Steps in it.
    pub len: usize,
    /// Time since it opened.
    pub waited: Duration,
    /// Steps in the engine that are not in it (running in an earlier batch, publishing,
    /// about to join): the ones that could still join it.
    pub others: usize,
}

/// Whether an open batch closes now: when it is full, when its window has passed, or
/// when no other step is in the engine to join it (so a lone step never waits).
pub fn should_close(config: &BatchConfig, open: &OpenBatch) -> bool {
    open.len >= config.max || open.waited >= config.window || open.others == 0
}

/// One step's handling, as the batch gives it back.
pub(super) struct StepDone {
    /// What handling it decided (or the error that undid it).
    pub handled: Result<Handled, EngineError>,
    /// Its delivery was settled, and what it sends was queued, in the batch's own
    /// transaction (the transport's outbox): publish and ack have nothing left to do.
    pub in_transaction: bool,
}

/// A step waiting in an open batch.
struct Request {
    job: Arc<Job>,
    suspect_copy: bool,
    settle: Option<TxSettle>,
    span: tracing::Span,
    /// `None` for the batch's leader, which takes its own result.
    done: Option<oneshot::Sender<StepDone>>,
}

#[derive(Default)]
struct State {
    open: Vec<Request>,
    opened_at: Option<Instant>,
    /// Steps between joining [`Batcher::active`] and leaving it.
    active: usize,
}

/// Forms the batches of one engine.
pub(super) struct Batcher {
    config: BatchConfig,
    state: std::sync::Mutex<State>,
    /// Woken when a step joins or leaves the engine, or a batch closes.
    changed: Notify,
    /// Batches running at once, each on a pooled connection of its own; at most half
    /// the pool, so that a running step can always get a second connection for its
    /// reads outside the batch (a copy's lookup, say).
    running: Semaphore,
}

/// A step counted in the engine until dropped (see [`OpenBatch::others`]).
pub(super) struct Active<'a>(&'a Batcher);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("batch state").active -= 1;
        self.0.changed.notify_waiters();
    }
}

impl Batcher {
    /// Batches formed by `config`, at most `pool_size / 2` (at least 1) running at once.
    pub fn new(config: BatchConfig, pool_size: u32) -> Self {
        Batcher {
            config,
            state: Default::default(),
            changed: Notify::new(),
            running: Semaphore::new((pool_size as usize / 2).max(1)),
        }
    }

    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// Counts a step in the engine while the guard lives.
    pub fn active(&self) -> Active<'_> {
        self.state.lock().expect("batch state").active += 1;
        Active(self)
    }

    /// Adds `request` to the open batch (waiting while it is full); `true` when it
    /// opened the batch, and so leads it.
    async fn join(&self, mut request: Request) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.state.lock().expect("batch state");
                if state.open.len() < self.config.max {
                    let lead = state.open.is_empty();
                    if lead {
                        state.opened_at = Some(Instant::now());
                        request.done = None;
                    }
                    state.open.push(request);
                    drop(state);
                    self.changed.notify_waiters();
                    return lead;
                }
            }
            changed.await;
        }
    }

    /// Waits until the open batch should close ([`should_close`]), then takes it.
    async fn close(&self) -> Vec<Request> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let remaining = {
                let mut state = self.state.lock().expect("batch state");
                let waited = state.opened_at.map_or(Duration::ZERO, |t| t.elapsed());
                let open = OpenBatch {
                    len: state.open.len(),
                    waited,
                    others: state.active.saturating_sub(state.open.len()),
                };
                if should_close(&self.config, &open) {
                    state.opened_at = None;
                    let batch = std::mem::take(&mut state.open);
                    drop(state);
                    self.changed.notify_waiters();
                    return batch;
                }
                self.config.window.saturating_sub(waited)
            };
            let _ = tokio::time::timeout(remaining, changed).await;
        }
    }
}

impl Engine {
    /// Handles `job` in a batch with the other steps ready now: its result once the
    /// batch committed (or the error that undid it).
    pub(super) async fn handle_batched(
        &self,
        job: Arc<Job>,
        suspect_copy: bool,
        settle: Option<TxSettle>,
    ) -> StepDone {
        let (done, result) = oneshot::channel();
        let request = Request {
            job,
            suspect_copy,
            settle,
            span: tracing::Span::current(),
            done: Some(done),
        };
        if !self.batcher.join(request).await {
            return result.await.unwrap_or_else(|_| StepDone {
                handled: Err(EngineError::BatchLost),
                in_transaction: false,
            });
        }
        // While a connection is awaited, the batch stays open and keeps growing.
        let permit = self.batcher.running.acquire().await;
        let batch = self.batcher.close().await;
        let mut results = self.run_batch(&batch).await.into_iter();
        drop(permit);
        let own = results.next().expect("the leader's step is in its batch");
        for (request, result) in batch.into_iter().skip(1).zip(results) {
            if let Some(done) = request.done {
                let _ = done.send(result);
            }
        }
        own
    }

    /// Runs every step of `batch` in one transaction, each undone alone on failure,
    /// and commits; one result per step, in order.
    async fn run_batch(&self, batch: &[Request]) -> Vec<StepDone> {
        let failed = |e: &dyn std::fmt::Display| -> Vec<StepDone> {
            batch
                .iter()
                .map(|_| StepDone {
                    handled: Err(EngineError::Batch(e.to_string())),
                    in_transaction: false,
                })
                .collect()
        };
        let shared = match SharedTx::start(self.store.pool()).await {
            Ok(shared) => shared,
            Err(e) => return failed(&e),
        };
        let outbox = self.transport.in_transaction();
        let mut results = Vec::with_capacity(batch.len());
        for request in batch {
            let handling = self
                .handle(&request.job, request.suspect_copy)
                .instrument(request.span.clone());
            let mut handled = shared.scope(handling).await;
            let mut in_transaction = false;
            if let (Ok(Handled::Send(outgoing)), Some(outbox), Some(settle)) =
                (&handled, outbox, &request.settle)
            {
                let staging = async {
                    let mut tx = StepTx::begin(self.store.pool()).await?;
                    let messages: Vec<_> = outgoing.iter().map(|m| m.outbound()).collect();
                    let settled = outbox.stage(tx.conn(), settle, &messages).await?;
                    tx.commit().await?;
                    Ok::<bool, EngineError>(settled)
                };
                match shared.scope(staging).await {
                    Ok(true) => in_transaction = true,
                    // Another consumer settled this delivery (after a failover): its
                    // step must not commit here, effect included.
                    Ok(false) => handled = Ok(Handled::SettledElsewhere),
                    Err(e) => handled = Err(e),
                }
            }
            let keep = matches!(&handled, Ok(h) if !matches!(h, Handled::SettledElsewhere));
            let closed = if keep {
                shared.end_step().await
            } else {
                shared.undo_step().await
            };
            if let Err(e) = closed {
                // The connection is gone: nothing of the batch commits.
                return failed(&e);
            }
            results.push(StepDone {
                handled,
                in_transaction,
            });
        }
        if let Err(e) = shared.commit().await {
            return failed(&e);
        }
        let stats = &self.stats;
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .batched_steps
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats
            .largest_batch
            .fetch_max(batch.len() as u64, Ordering::Relaxed);
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: BatchConfig = BatchConfig {
        max: 4,
        window: Duration::from_millis(2),
    };

    fn open(len: usize, waited_ms: u64, others: usize) -> OpenBatch {
        OpenBatch {
            len,
            waited: Duration::from_millis(waited_ms),
            others,
        }
    }

    #[test]
    fn a_lone_step_closes_its_batch_at_once() {
        assert!(should_close(&CONFIG, &open(1, 0, 0)));
    }

    #[test]
    fn a_batch_waits_within_its_window_while_other_steps_could_join() {
        assert!(!should_close(&CONFIG, &open(1, 0, 3)));
        assert!(!should_close(&CONFIG, &open(3, 1, 1)));
    }

    #[test]
    fn a_batch_closes_when_its_window_has_passed() {
        assert!(should_close(&CONFIG, &open(1, 2, 5)));
        assert!(should_close(&CONFIG, &open(2, 9, 5)));
    }

    #[test]
    fn a_full_batch_closes_at_once() {
        assert!(should_close(&CONFIG, &open(4, 0, 100)));
    }

    #[test]
    fn a_batch_max_of_one_commits_every_step_alone() {
        let alone = BatchConfig { max: 1, ..CONFIG };
        assert!(should_close(&alone, &open(1, 0, 100)));
    }

    #[test]
    fn the_defaults_stay_within_the_savepoint_limit() {
        let d = BatchConfig::default();
        assert!(d.max >= 1 && d.max <= MAX_BATCH_MAX);
        assert!(d.window <= Duration::from_millis(10));
    }
}
