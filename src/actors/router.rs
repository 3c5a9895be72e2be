use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::{Actor, Addr, AsyncContext, Context, Handler, Message};

use super::aggregate::{AggregateActor, Process, Stop};
use crate::engine::{Engine, Job};
use crate::transport::Delivery;

/// A message for some aggregate, to be handled in arrival order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Dispatch {
    /// The read message.
    pub job: Job,
    /// Its delivery, acked once handled.
    pub delivery: Delivery,
}

/// An actor saying it has been idle since it processed `processed` messages.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Idle {
    pub key: String,
    pub processed: u64,
}

struct Entry {
    addr: Addr<AggregateActor>,
    dispatched: u64,
}

/// Creates, feeds and evicts the aggregate actors of one process.
pub struct Router {
    engine: Arc<Engine>,
    idle: Duration,
    actors: HashMap<String, Entry>,
}

impl Router {
    /// A router whose actors stop after `idle` without work.
    pub fn new(engine: Arc<Engine>, idle: Duration) -> Self {
        Router {
            engine,
            idle,
            actors: HashMap::new(),
        }
    }
}

impl Actor for Router {
    type Context = Context<Self>;
}

impl Handler<Dispatch> for Router {
    type Result = ();

    fn handle(&mut self, msg: Dispatch, ctx: &mut Context<Self>) {
        let key = msg.job.aggregate_id.clone();
        let engine = &self.engine;
        let entry = self.actors.entry(key.clone()).or_insert_with(|| {
            engine.stats().live_actors.fetch_add(1, Ordering::Relaxed);
            Entry {
                addr: AggregateActor::new(key, engine.clone(), ctx.address(), self.idle).start(),
                dispatched: 0,
            }
        });
        entry.dispatched += 1;
        entry.addr.do_send(Process {
            job: msg.job,
            delivery: msg.delivery,
        });
    }
}

impl Handler<Idle> for Router {
    type Result = ();

    fn handle(&mut self, msg: Idle, _: &mut Context<Self>) {
        // A message dispatched after the actor reported idle makes the report stale.
        if self
            .actors
            .get(&msg.key)
            .is_some_and(|e| e.dispatched == msg.processed)
            && let Some(entry) = self.actors.remove(&msg.key)
        {
            self.engine
                .stats()
                .live_actors
                .fetch_sub(1, Ordering::Relaxed);
            entry.addr.do_send(Stop);
            // Give the map's memory back once it is mostly empty.
            if self.actors.capacity() > 1024 && self.actors.len() < self.actors.capacity() / 4 {
                self.actors.shrink_to_fit();
            }
        }
    }
}
