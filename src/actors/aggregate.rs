use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, AtomicResponse, Context, Handler,
    Message, ResponseActFuture, SpawnHandle, WrapFuture,
};

use super::router::{Idle, Router};
use crate::engine::{Engine, Job};
use crate::envelope::Command;
use crate::saga::OrderingPolicy;
use crate::transport::Delivery;

/// Handle one message of this actor's aggregate.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Process {
    pub job: Job,
    pub delivery: Delivery,
}

/// Stop now (sent by the router once it forgot this actor).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Stop;

/// A held start waited its saga's `max_wait`: apply the earliest held one, skipping
/// the gap before it.
#[derive(Message)]
#[rtype(result = "()")]
struct GapTimeout {
    saga: String,
}

/// What to do with a message before handling it.
enum Gate {
    /// Handle it now.
    Go,
    /// A strict-order start that arrived before its predecessor: hold it.
    Hold,
}

/// Serialises the handling of one aggregate's messages.
pub struct AggregateActor {
    key: String,
    engine: Arc<Engine>,
    router: Addr<Router>,
    idle: Duration,
    /// Messages fully handled; compared with what the router dispatched before
    /// eviction, so that an actor with queued or held work is never stopped.
    processed: u64,
    idle_timer: Option<SpawnHandle>,
    /// Strict-order sagas: the last sequence applied, per saga (loaded from
    /// PostgreSQL the first time, then kept up to date here).
    watermarks: HashMap<String, Option<i64>>,
    /// Strict-order starts that arrived early, per saga, by sequence. Their deliveries
    /// stay unacked, so a crash hands them back to the broker.
    held: HashMap<String, BTreeMap<u64, Process>>,
    gap_timers: HashMap<String, SpawnHandle>,
}

impl AggregateActor {
    /// An actor for aggregate `key`.
    pub fn new(key: String, engine: Arc<Engine>, router: Addr<Router>, idle: Duration) -> Self {
        AggregateActor {
            key,
            engine,
            router,
            idle,
            processed: 0,
            idle_timer: None,
            watermarks: HashMap::new(),
            held: HashMap::new(),
            gap_timers: HashMap::new(),
        }
    }

    fn arm_idle_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.idle_timer.take() {
            ctx.cancel_future(timer);
        }
        self.idle_timer = Some(ctx.run_later(self.idle, |act, _| {
            act.router.do_send(Idle {
                key: act.key.clone(),
                processed: act.processed,
            });
        }));
    }

    /// The strict-order wait of a start, or `None` if it is not one.
    fn strict_start(msg: &Process) -> Option<(String, u64, Duration)> {
        let job = &msg.job;
        match (
            job.envelope.command,
            job.envelope.sequence,
            job.saga.ordering,
        ) {
            (Command::Start, Some(seq), OrderingPolicy::Strict { max_wait }) => {
                Some((job.saga.name.clone(), seq, max_wait))
            }
            _ => None,
        }
    }

    /// After a strict start with `seq` was applied: release the held successor, if any.
    fn applied(&mut self, saga: &str, seq: u64, ctx: &mut Context<Self>) {
        let wm = self.watermarks.entry(saga.to_string()).or_insert(None);
        *wm = Some(wm.map_or(seq as i64, |w| w.max(seq as i64)));
        let next = wm.map_or(0, |w| w + 1) as u64;
        let Some(held) = self.held.get_mut(saga) else {
            return;
        };
        // Anything held at or below the new watermark is stale now; the engine records
        // it as such. The successor, if it is here, goes next.
        let ready: Vec<u64> = held.range(..=next).map(|(s, _)| *s).collect();
        for s in ready {
            if let Some(msg) = held.remove(&s) {
                ctx.notify(msg);
            }
        }
        if held.is_empty() {
            self.held.remove(saga);
            if let Some(timer) = self.gap_timers.remove(saga) {
                ctx.cancel_future(timer);
            }
        }
    }
}

impl Actor for AggregateActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.arm_idle_timer(ctx);
    }
}

impl Handler<Process> for AggregateActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Process, _: &mut Context<Self>) -> Self::Result {
        let engine = self.engine.clone();
        let strict = Self::strict_start(&msg);
        let known = strict
            .as_ref()
            .and_then(|(saga, _, _)| self.watermarks.get(saga).copied());
        let key = self.key.clone();
        let strict_saga = strict.as_ref().map(|(saga, _, _)| saga.clone());
        AtomicResponse::new(Box::pin(
            async move {
                // The watermark of a strict saga, read once per actor life.
                let watermark = match (&strict_saga, known) {
                    (Some(_), Some(w)) => Some(w),
                    (Some(saga), None) => {
                        Some(engine.watermark(saga, &key).await.unwrap_or_else(|e| {
                            tracing::warn!(error = %e, "cannot read the watermark; not holding");
                            None
                        }))
                    }
                    (None, _) => None,
                };
                (engine, watermark)
            }
            .into_actor(self)
            .then(move |(engine, watermark), act, ctx| {
                let gate = match (&strict, watermark) {
                    (Some((saga, seq, _)), Some(w)) => {
                        act.watermarks.insert(saga.clone(), w);
                        // Sequences start at 0 or 1: with nothing applied, 0 and 1 go.
                        let expected = w.map_or(1, |w| w + 1);
                        if (*seq as i64) > expected { Gate::Hold } else { Gate::Go }
                    }
                    _ => Gate::Go,
                };
                match gate {
                    Gate::Hold => {
                        let (saga, seq, max_wait) = strict.clone().expect("held starts are strict");
                        tracing::debug!(saga, seq, aggregate = %act.key, "strict order: holding an early start");
                        let held = act.held.entry(saga.clone()).or_default();
                        if held.insert(seq, msg).is_some() {
                            // A redelivered copy replaces the held one (whose delivery
                            // died with its channel): it no longer counts as in flight.
                            act.engine.in_flight().leave();
                        }
                        if let std::collections::hash_map::Entry::Vacant(slot) =
                            act.gap_timers.entry(saga.clone())
                        {
                            slot.insert(ctx.notify_later(GapTimeout { saga }, max_wait));
                        }
                        let done: ResponseActFuture<Self, ()> = Box::pin(actix::fut::ready(()));
                        done
                    }
                    Gate::Go => Box::pin(
                        async move { engine.process(msg.job, msg.delivery).await }
                            .into_actor(act)
                            .map(move |(), act, ctx| {
                                act.processed += 1;
                                if let Some((saga, seq, _)) = &strict {
                                    act.applied(saga, *seq, ctx);
                                }
                                act.arm_idle_timer(ctx);
                            }),
                    ),
                }
            }),
        ))
    }
}

impl Handler<GapTimeout> for AggregateActor {
    type Result = ();

    fn handle(&mut self, msg: GapTimeout, ctx: &mut Context<Self>) {
        self.gap_timers.remove(&msg.saga);
        let Some(held) = self.held.get_mut(&msg.saga) else {
            return;
        };
        if let Some((seq, first)) = held.pop_first() {
            tracing::warn!(saga = %msg.saga, aggregate = %self.key, seq,
                "strict order: predecessor missing after the bounded wait; skipping the gap");
            // Applying it moves the watermark past the gap: a late predecessor is
            // then stale, recorded and dropped.
            self.watermarks
                .insert(msg.saga.clone(), Some(seq as i64 - 1));
            ctx.notify(first);
        }
        if held.is_empty() {
            self.held.remove(&msg.saga);
        } else {
            // More gaps may follow: wait again for the next one.
            let wait = held
                .values()
                .next()
                .and_then(Self::strict_start)
                .map_or(Duration::from_secs(1), |(_, _, w)| w);
            let saga = msg.saga.clone();
            let timer = ctx.notify_later(GapTimeout { saga }, wait);
            self.gap_timers.insert(msg.saga, timer);
        }
    }
}

impl Handler<Stop> for AggregateActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
