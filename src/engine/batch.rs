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
pub(super) struct Request {
    job: Arc<Job>,
    suspect_copy: bool,
    settle: Option<TxSettle>,
    span: tracing::Span,
    done: oneshot::Sender<StepDone>,
}

struct State<R> {
    open: Vec<R>,
    opened_at: Option<Instant>,
    /// Steps between joining [`Batcher::active`] and leaving it.
    active: usize,
}

impl<R> Default for State<R> {
    fn default() -> Self {
        State {
            open: Vec::new(),
            opened_at: None,
            active: 0,
        }
    }
}

/// Forms the batches of one engine (of [`Request`]s; of anything in unit tests).
pub(super) struct Batcher<R = Request> {
    config: BatchConfig,
    state: std::sync::Mutex<State<R>>,
    /// Woken when a step joins or leaves the engine, or a batch closes.
    changed: Notify,
    /// Batches running at once, each on a pooled connection of its own; at most half
    /// the pool, so that a running step can always get a second connection for its
    /// reads outside the batch (a copy's lookup, say).
    running: Semaphore,
}

/// A step counted in the engine until dropped (see [`OpenBatch::others`]).
pub(super) struct Active<'a, R>(&'a Batcher<R>);

impl<R> Drop for Active<'_, R> {
    fn drop(&mut self) {
        self.0.state.lock().expect("batch state").active -= 1;
        self.0.changed.notify_waiters();
    }
}

/// The open batch's leader, until it closes the batch ([`Lead::close`]). A leader
/// dropped before (its task cancelled) takes the batch with it, so that its steps learn
/// it is lost (and try again) instead of waiting for a leader that is gone.
pub(super) struct Lead<'a, R> {
    batcher: &'a Batcher<R>,
    closed: bool,
}

impl<R> Lead<'_, R> {
    /// Waits until the open batch should close ([`should_close`]), then takes it.
    pub async fn close(mut self) -> Vec<R> {
        let batch = self.batcher.close().await;
        self.closed = true;
        batch
    }
}

impl<R> Drop for Lead<'_, R> {
    fn drop(&mut self) {
        if !self.closed {
            let lost = self.batcher.take();
            drop(lost);
        }
    }
}

impl<R> Batcher<R> {
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
    pub fn active(&self) -> Active<'_, R> {
        self.state.lock().expect("batch state").active += 1;
        Active(self)
    }

    /// Adds `request` to the open batch (waiting while it is full); its [`Lead`] when
    /// it opened the batch, and so leads it.
    async fn join(&self, request: R) -> Option<Lead<'_, R>> {
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
                    }
                    state.open.push(request);
                    drop(state);
                    self.changed.notify_waiters();
                    // Built only for the leader: a `Lead` dropped unclosed loses its batch.
                    return lead.then(|| Lead {
                        batcher: self,
                        closed: false,
                    });
                }
            }
            changed.await;
        }
    }

    /// Waits until the open batch should close ([`should_close`]), then takes it.
    async fn close(&self) -> Vec<R> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let remaining = {
                let state = self.state.lock().expect("batch state");
                let waited = state.opened_at.map_or(Duration::ZERO, |t| t.elapsed());
                let open = OpenBatch {
                    len: state.open.len(),
                    waited,
                    others: state.active.saturating_sub(state.open.len()),
                };
                if should_close(&self.config, &open) {
                    drop(state);
                    return self.take();
                }
                self.config.window.saturating_sub(waited)
            };
            let _ = tokio::time::timeout(remaining, changed).await;
        }
    }

    /// Takes the open batch, so that the next step to join opens a new one.
    fn take(&self) -> Vec<R> {
        let mut state = self.state.lock().expect("batch state");
        state.opened_at = None;
        let batch = std::mem::take(&mut state.open);
        drop(state);
        self.changed.notify_waiters();
        batch
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
            done,
        };
        if let Some(lead) = self.batcher.join(request).await {
            // While a connection is awaited, the batch stays open and keeps growing.
            let permit = self.batcher.running.acquire().await;
            let batch = lead.close().await;
            let results = self.run_batch(&batch).await;
            drop(permit);
            for (request, result) in batch.into_iter().zip(results) {
                let _ = request.done.send(result);
            }
        }
        // A batch dropped unrun (its leader cancelled) is lost: the step tries again.
        result.await.unwrap_or_else(|_| StepDone {
            handled: Err(EngineError::BatchLost),
            in_transaction: false,
        })
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

    #[tokio::test]
    async fn a_leader_cancelled_before_closing_its_batch_loses_it_and_the_next_step_leads() {
        let batcher: Batcher<oneshot::Sender<()>> = Batcher::new(CONFIG, 4);
        let (lead_tx, _lead_rx) = oneshot::channel();
        let (follow_tx, follow_rx) = oneshot::channel();
        let lead = batcher.join(lead_tx).await.expect("the first step leads");
        assert!(
            batcher.join(follow_tx).await.is_none(),
            "the second follows"
        );
        assert_eq!(
            batcher.state.lock().unwrap().open.len(),
            2,
            "both wait in the batch"
        );
        drop(lead);
        assert!(
            follow_rx.await.is_err(),
            "the follower learns its batch is lost"
        );
        let (next_tx, _next_rx) = oneshot::channel();
        let next = batcher
            .join(next_tx)
            .await
            .expect("the next step leads anew");
        assert_eq!(next.close().await.len(), 1);
    }

    #[tokio::test]
    async fn a_closed_batch_holds_every_step_that_joined_it() {
        let batcher: Batcher<u32> = Batcher::new(CONFIG, 4);
        let _a = batcher.active();
        let _b = batcher.active();
        let lead = batcher.join(1).await.expect("leads");
        assert!(batcher.join(2).await.is_none());
        assert_eq!(lead.close().await, vec![1, 2]);
        let again = batcher.join(3).await.expect("a new batch opens");
        assert_eq!(again.close().await, vec![3]);
    }

    #[test]
    fn the_defaults_stay_within_the_savepoint_limit() {
        let d = BatchConfig::default();
        assert!(d.max >= 1 && d.max <= MAX_BATCH_MAX);
        assert!(d.window <= Duration::from_millis(10));
    }
}
