use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, AtomicResponse, Context, Handler, Message,
    SpawnHandle, WrapFuture,
};

use super::router::{Idle, Router};
use crate::engine::{Engine, Job};
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

/// Serialises the handling of one aggregate's messages.
pub struct AggregateActor {
    key: String,
    engine: Arc<Engine>,
    router: Addr<Router>,
    idle: Duration,
    /// Messages fully handled; compared with what the router dispatched before
    /// eviction, so that an actor with queued work is never stopped.
    processed: u64,
    idle_timer: Option<SpawnHandle>,
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
        AtomicResponse::new(Box::pin(
            async move { engine.process(msg.job, msg.delivery).await }
                .into_actor(self)
                .map(|(), act, ctx| {
                    act.processed += 1;
                    act.arm_idle_timer(ctx);
                }),
        ))
    }
}

impl Handler<Stop> for AggregateActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        use actix::ActorContext;
        ctx.stop();
    }
}
