//! The transport seam: how messages reach skald and leave it.
//!
//! The engine and the actors only see [`Transport`] and [`Delivery`]; the transport
//! sees keys and bytes, never a saga type. RabbitMQ ([`rabbitmq::RabbitTransport`]),
//! Redis Streams ([`redis::RedisTransport`]) and PostgreSQL itself
//! ([`postgres::PgTransport`]) are the implementations a deployment chooses between
//! with `SKALD_TRANSPORT` ([`connect`]); [`memory::MemoryTransport`] is the one for
//! unit tests and `skald explore`. Another broker (NATS JetStream, SQS, Kafka)
//! implements the same promises:
//!
//! 1. [`Transport::publish`] returns only once the broker has taken responsibility
//!    for the message (a publisher confirm, not a routing failure or a nack);
//! 2. [`Transport::consume`] yields deliveries that stay owned by this consumer until
//!    [`Delivery::ack`], which acks exactly that delivery; a consumer that disappears
//!    hands them back for redelivery;
//! 3. a delayed publish is durable while it waits, and never delivered early;
//! 4. [`Transport::dead_letter`] stores a body durably where a person can find it;
//! 5. per-key FIFO: messages published under one key (the aggregate id) are delivered
//!    in publish order, to one active consumer at a time; when that consumer dies, its
//!    unacked deliveries go, in order, to the next one before anything newer of the key.
//!    Publish order is the order of the calls, also when many publishes of a key are
//!    in flight together and are confirmed in any order: a caller need not await one
//!    publish before calling the next, as long as it polls each returned future first
//!    in call order (as `FuturesUnordered` and `join_all` do). A transport fixes a
//!    publish's place at the call or at that first poll, never later (not, say, when
//!    a bounded connection queue has room for it).
//!
//! **Endpoints.** A transport is opened for one *home* [`Endpoint`] — skald's intake, or
//! a participant service's queues. Consuming, publishing (delays included),
//! dead-lettering and queue depths act on the home endpoint;
//! [`Transport::send_to`] reaches another endpoint's intake (skald sending a command to
//! a service, a service replying to skald), with the same promises 1 and 5.
//!
//! **Settling in the step's transaction.** A transport whose queue lives in skald's own
//! database offers a [`TxOutbox`] ([`Transport::in_transaction`]) and marks its
//! deliveries with a [`TxSettle`]: then the engine queues a step's messages and
//! settles its delivery inside the step's transaction, and only tells the delivery so
//! ([`Delivery::settled`]) after the commit — instead of publishing and acking.

pub mod memory;
pub mod postgres;
pub mod rabbitmq;
pub mod redis;

use std::sync::Arc;

use crate::config::{Config, TransportKind};

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

/// A set of queues one kind of consumer reads: skald's own intake, or a participant
/// service's. Each endpoint has its own partitions, delays and dead letters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// skald's intake: starts, run messages, replies from services, reply timers.
    Orchestrator,
    /// A participant service's command and event queue, by service name.
    Service(String),
}

impl Endpoint {
    /// The prefix of this endpoint's queue names in `namespace`: the namespace itself
    /// for skald, `NS.svc.<service>` for a service.
    pub fn prefix(&self, namespace: &str) -> String {
        match self {
            Endpoint::Orchestrator => namespace.to_string(),
            Endpoint::Service(name) => format!("{namespace}.svc.{name}"),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Orchestrator => f.write_str("skald"),
            Endpoint::Service(name) => write!(f, "service {name}"),
        }
    }
}

/// Connects to the transport `config` chooses (`SKALD_TRANSPORT`), for the queues of
/// `home`. Must be called inside a tokio runtime.
pub async fn connect(
    config: &Config,
    home: Endpoint,
) -> Result<Arc<dyn Transport>, TransportError> {
    Ok(match config.transport {
        TransportKind::RabbitMq => rabbitmq::RabbitTransport::connect_as(config, home).await?,
        TransportKind::Postgres => postgres::PgTransport::connect(config, home).await?,
        TransportKind::Redis => redis::RedisTransport::connect(config, home).await?,
    })
}

/// A transport failure. Once running, always treated as an infrastructure problem: the
/// caller retries later, and an unacknowledged delivery is redelivered, so nothing is
/// lost. At start-up, [`TransportError::Refused`] is fatal.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The connection or channel failed.
    #[error("broker connection: {0}")]
    Connection(String),
    /// The broker refused the message (a nack) or could not route it.
    #[error("broker did not accept the message: {0}")]
    NotAccepted(String),
    /// The server answered but refuses skald's connection or topology (wrong
    /// credentials, unknown vhost, a missing plugin, an exchange or queue that exists
    /// with other settings): a configuration error, which waiting does not fix. The
    /// message names the server and says what to change.
    #[error("the transport refuses skald's configuration: {0}")]
    Refused(String),
}

/// Acknowledges one delivery. Implementations ack exactly that delivery, never
/// several at once: aggregates finish out of order.
pub trait Acknowledge: Send + Sync {
    /// Deletes the delivery from its queue.
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>>;

    /// The delivery was settled by a committed [`TxOutbox::stage`]: the consumer
    /// forgets it, deleting nothing. Only deliveries with a [`TxSettle`] are told so;
    /// the default acks.
    fn settled(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        self.ack()
    }
}

/// What identifies a delivery to its transport's [`TxOutbox`] (for PostgreSQL, the
/// queue row's id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxSettle {
    /// The transport's own id of the delivery.
    pub id: i64,
}

/// One message to send, as the transport sees it: where, under which key, what bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// To the home endpoint's intake ([`Transport::publish`]), after `delay_ms`.
    Intake {
        /// The aggregate id.
        key: String,
        /// The body.
        body: Vec<u8>,
        /// Held back this long first (0: at once).
        delay_ms: u64,
    },
    /// To another endpoint's intake ([`Transport::send_to`]).
    Endpoint {
        /// The endpoint.
        to: Endpoint,
        /// The aggregate id.
        key: String,
        /// The body.
        body: Vec<u8>,
    },
    /// To the dead-letter store ([`Transport::dead_letter`]).
    DeadLetter {
        /// The body.
        body: Vec<u8>,
        /// The reason's code.
        reason_code: String,
        /// The reason.
        reason: String,
    },
}

impl Outbound {
    /// Sends it on `transport`, returning once confirmed.
    pub async fn send(&self, transport: &dyn Transport) -> Result<(), TransportError> {
        match self {
            Outbound::Intake {
                key,
                body,
                delay_ms,
            } => transport.publish(key, body, *delay_ms).await,
            Outbound::Endpoint { to, key, body } => transport.send_to(to, key, body).await,
            Outbound::DeadLetter {
                body,
                reason_code,
                reason,
            } => transport.dead_letter(body, reason_code, reason).await,
        }
    }
}

/// A transport's queue inside skald's database: a step's messages and its delivery's
/// settlement become part of the step's own transaction.
pub trait TxOutbox: Send + Sync {
    /// On `conn`, inside its open transaction: stores `messages` as the transport would
    /// on publish (in order, delays never early, durable once the transaction
    /// commits), and settles the delivery `settle` names. `false` when that delivery
    /// was settled already — by another consumer after a failover: the caller must
    /// then roll back everything the step did.
    fn stage<'a>(
        &'a self,
        conn: &'a mut sqlx::PgConnection,
        settle: &'a TxSettle,
        messages: &'a [Outbound],
    ) -> BoxFuture<'a, Result<bool, TransportError>>;
}

/// One message handed to skald, owned until acknowledged.
pub struct Delivery {
    /// The raw body, exactly as published.
    pub body: Vec<u8>,
    /// The broker says it delivered this message before (a hint only: the inbox is
    /// what recognises copies).
    pub redelivered: bool,
    acker: Box<dyn Acknowledge>,
    settle: Option<TxSettle>,
}

impl Delivery {
    /// Wraps a body and the way to acknowledge it.
    pub fn new(body: Vec<u8>, redelivered: bool, acker: Box<dyn Acknowledge>) -> Self {
        Delivery {
            body,
            redelivered,
            acker,
            settle: None,
        }
    }

    /// This delivery can be settled inside a step's transaction, through the
    /// transport's [`TxOutbox`], as `settle`.
    pub fn settleable(mut self, settle: TxSettle) -> Self {
        self.settle = Some(settle);
        self
    }

    /// How to settle it in a transaction, if it can be.
    pub fn settle_handle(&self) -> Option<TxSettle> {
        self.settle
    }

    /// Tells the consumer that a committed [`TxOutbox::stage`] settled this delivery
    /// (or found it settled): it forgets it.
    pub async fn settled(self) -> Result<(), TransportError> {
        self.acker.settled().await
    }

    /// Deletes the delivery from its queue. Call only after everything it caused has
    /// committed and been published.
    pub async fn ack(self) -> Result<(), TransportError> {
        self.acker.ack().await
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("bytes", &self.body.len())
            .field("redelivered", &self.redelivered)
            .finish()
    }
}

/// The broker as skald uses it.
pub trait Transport: Send + Sync + 'static {
    /// Publishes `body` to skald's intake under `key` (the aggregate id, which keeps
    /// one aggregate's messages in order), held back `delay_ms` first (durably; 0 sends
    /// at once), returning once the broker confirmed it. Its place in `key`'s order is
    /// taken at the call, or at the latest when the future is first polled (promise 5).
    fn publish<'a>(
        &'a self,
        key: &'a str,
        body: &'a [u8],
        delay_ms: u64,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Publishes `body` to the intake of endpoint `to` under `key`, at once, returning
    /// once the broker confirmed it. Creates `to`'s queues if they do not exist yet, so a
    /// message sent before its endpoint's consumer first starts is kept.
    fn send_to<'a>(
        &'a self,
        to: &'a Endpoint,
        key: &'a str,
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Stores `body` durably in the dead-letter queue with `reason` attached,
    /// returning once the broker confirmed it.
    fn dead_letter<'a>(
        &'a self,
        body: &'a [u8],
        reason_code: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Starts consuming skald's intake. The stream ends when the connection is lost
    /// or [`Transport::stop_consuming`] is called; call again to resume.
    fn consume(&self) -> BoxFuture<'_, Result<BoxStream<'static, Delivery>, TransportError>>;

    /// Asks the broker to stop sending deliveries (graceful shutdown). Deliveries
    /// already received can still be acknowledged.
    fn stop_consuming(&self) -> BoxFuture<'_, ()>;

    /// Messages ready in each of skald's queues (partitions, delay tiers, dead
    /// letters), for the dashboard.
    fn queue_depths(&self) -> BoxFuture<'_, Result<Vec<(String, u32)>, TransportError>>;

    /// Whether the broker connection is up (for readiness checks).
    fn healthy(&self) -> BoxFuture<'_, bool>;

    /// Closes the connection. Unacknowledged deliveries go back to their queue.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// The outbox that settles deliveries and queues messages inside a step's own
    /// PostgreSQL transaction, when this transport's queue lives in skald's database.
    /// `None` (the default): publish after commit, then ack.
    fn in_transaction(&self) -> Option<&dyn TxOutbox> {
        None
    }
}
