use std::collections::HashMap;
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
use crate::saga::strict::{Offer, StrictOrder};
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

/// Serialises the handling of one aggregate's messages. It holds no rule of its own:
/// strict order is decided by [`StrictOrder`]; the actor keeps its timers.
pub struct AggregateActor {
    key: String,
    engine: Arc<Engine>,
    router: Addr<Router>,
    idle: Duration,
    /// Messages fully handled; compared with what the router dispatched before
    /// eviction, so that an actor with queued or held work is never stopped.
    processed: u64,
    idle_timer: Option<SpawnHandle>,
    /// Strict-order starts: which go, which wait. Held deliveries stay unacked, so a
    /// crash hands them back to the broker.
    strict: StrictOrder<Process>,
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
            strict: StrictOrder::default(),
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

    /// The saga, sequence and bounded wait of a strict-order start, or `None` if the
    /// message is not one.
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

    fn arm_gap_timer(&mut self, saga: String, wait: Duration, ctx: &mut Context<Self>) {
        let timer = ctx.notify_later(GapTimeout { saga: saga.clone() }, wait);
        if let Some(old) = self.gap_timers.insert(saga, timer) {
            ctx.cancel_future(old);
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
        // The watermark of a strict saga is read once per actor life.
        let to_learn = strict
            .as_ref()
            .filter(|(saga, _, _)| !self.strict.knows(saga))
            .cloned();
        let key = self.key.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let learned = match to_learn {
                    Some((saga, _, max_wait)) => match engine.watermark(&saga, &key).await {
                        Ok(w) => Some((saga, w, max_wait)),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the watermark; not holding");
                            None
                        }
                    },
                    None => None,
                };
                (engine, learned)
            }
            .into_actor(self)
            .then(move |(engine, learned), act, ctx| {
                if let Some((saga, w, max_wait)) = learned {
                    act.strict.learn(&saga, w, max_wait);
                }
                let offer = match &strict {
                    Some((saga, seq, _)) => act.strict.offer(saga, *seq, msg),
                    None => Offer::Go(msg),
                };
                let msg = match offer {
                    Offer::Go(msg) => msg,
                    Offer::Held {
                        arm_timer,
                        replaced,
                    } => {
                        let (saga, seq, _) = strict.clone().expect("only strict starts are held");
                        tracing::debug!(saga, seq, aggregate = %act.key, "strict order: holding an early start");
                        if replaced.is_some() {
                            // A redelivered copy replaced the held one (whose delivery
                            // died with its channel): that one is no longer in flight.
                            act.engine.in_flight().leave();
                        }
                        if let Some(wait) = arm_timer {
                            act.arm_gap_timer(saga, wait, ctx);
                        }
                        let done: ResponseActFuture<Self, ()> = Box::pin(actix::fut::ready(()));
                        return done;
                    }
                };
                Box::pin(
                    async move { engine.process(msg.job, msg.delivery).await }
                        .into_actor(act)
                        .map(move |(), act, ctx| {
                            act.processed += 1;
                            if let Some((saga, seq, _)) = &strict {
                                let released = act.strict.applied(saga, *seq);
                                for next in released.ready {
                                    ctx.notify(next);
                                }
                                if released.cancel_timer
                                    && let Some(timer) = act.gap_timers.remove(saga)
                                {
                                    ctx.cancel_future(timer);
                                }
                            }
                            act.arm_idle_timer(ctx);
                        }),
                )
            }),
        ))
    }
}

impl Handler<GapTimeout> for AggregateActor {
    type Result = ();

    fn handle(&mut self, msg: GapTimeout, ctx: &mut Context<Self>) {
        self.gap_timers.remove(&msg.saga);
        let skip = self.strict.gap_timeout(&msg.saga);
        if let Some(next) = skip.next {
            tracing::warn!(saga = %msg.saga, aggregate = %self.key,
                "strict order: predecessor missing after the bounded wait; skipping the gap");
            ctx.notify(next);
        }
        if let Some(wait) = skip.rearm_timer {
            self.arm_gap_timer(msg.saga, wait, ctx);
        }
    }
}

impl Handler<Stop> for AggregateActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
