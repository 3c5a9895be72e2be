//! RabbitMQ (AMQP 0-9-1, through lapin) as skald's transport.
//!
//! ## Topology (declared at start, idempotently; `NS` is the namespace)
//!
//! | name | kind | what for |
//! |---|---|---|
//! | `NS` | consistent-hash exchange (`x-consistent-hash`) | intake: every start and run message, routing key = aggregate id |
//! | `NS.p.<i>`, i in 0..N | durable queues, single active consumer, bound to `NS` with weight 1 | the partitions skald consumes |
//! | `NS.delay` | headers exchange | retries, routed by header `skald-delay` to their tier |
//! | `NS.delay.<ms>` | durable queues, `x-message-ttl` = ms, dead-letter to `NS` | retries waiting out their backoff |
//! | `NS.dlx` → `NS.dead` | fanout exchange → durable queue | dead letters, kept for a person |
//!
//! A participant service's endpoint has the same set of names under the prefix
//! `NS.svc.<service>` (its intake exchange `NS.svc.<service>`, partitions
//! `NS.svc.<service>.p.<i>`, …). Whoever first sends to an endpoint, or consumes it,
//! declares them.
//!
//! **Partitions.** The consistent-hash exchange (shipped with RabbitMQ, enabled with
//! `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`) sends every message of
//! one aggregate to the same partition queue. Each partition queue has
//! `x-single-active-consumer`: every skald process subscribes to every partition, the
//! broker lets one consumer at a time receive from each, and when that process dies
//! (its connection closes) the broker hands the partition — unacked messages first,
//! in order — to the next subscriber. So per-aggregate order holds across processes
//! and failover needs no coordinator of skald's own. Which process is active for a
//! partition is decided by subscription order: each process subscribes from a random
//! partition, one partition every `SKALD_SUBSCRIBE_STAGGER_MS` (±50%), so processes
//! started within a few seconds of each other share the partitions, and a process
//! started later is a standby until another one goes away.
//!
//! **Delays.** A per-message TTL only expires at the head of a queue, so one queue
//! with mixed delays would hold short delays behind long ones. Each delay tier is a
//! queue of its own with a queue-level TTL; a delay is rounded *up* to the next tier,
//! so a retry never happens earlier than its policy says. Delayed messages keep their
//! routing key (the aggregate id) when dead-lettered back to `NS`, so they return to
//! their aggregate's partition.
//!
//! Every publish is persistent, `mandatory` and confirmed: a nack or an unroutable
//! return is an error, not a success.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

use super::{Acknowledge, Delivery, Endpoint, Transport, TransportError};
use crate::config::Config;
use crate::saga::definition::limits::MAX_RETRY_DELAY_MS;

/// Delay tiers in milliseconds; a delay is rounded up to the next one (the last one
/// caps it).
pub const DELAY_TIERS_MS: &[u64] = &[
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000,
];

// A saga's retry delays are capped at the longest tier, so none is ever cut short.
const _: () = assert!(DELAY_TIERS_MS[DELAY_TIERS_MS.len() - 1] >= MAX_RETRY_DELAY_MS);

/// The header that routes a delayed message to its tier queue.
// Not `x-...`: a headers exchange ignores headers starting with `x-` when matching.
const DELAY_HEADER: &str = "skald-delay";

/// The names of everything skald declares, derived from the namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The intake exchange (consistent hash on the aggregate id).
    pub exchange: String,
    /// The partition queues skald consumes.
    pub partitions: Vec<String>,
    /// The exchange delayed messages are published to.
    pub delay_exchange: String,
    /// The dead-letter exchange.
    pub dead_exchange: String,
    /// The dead-letter queue.
    pub dead_queue: String,
    namespace: String,
}

impl Topology {
    /// The names for `namespace` with `partitions` partition queues.
    pub fn new(namespace: &str, partitions: u16) -> Self {
        Topology {
            exchange: namespace.to_string(),
            partitions: (0..partitions.max(1))
                .map(|i| format!("{namespace}.p.{i}"))
                .collect(),
            delay_exchange: format!("{namespace}.delay"),
            dead_exchange: format!("{namespace}.dlx"),
            dead_queue: format!("{namespace}.dead"),
            namespace: namespace.to_string(),
        }
    }

    /// The delay tier (ms) a delay of `delay_ms` waits in: the next one up.
    pub fn delay_tier(delay_ms: u64) -> u64 {
        DELAY_TIERS_MS
            .iter()
            .copied()
            .find(|&t| t >= delay_ms)
            .unwrap_or(*DELAY_TIERS_MS.last().expect("tiers are not empty"))
    }

    /// The queue of delay tier `tier_ms`.
    pub fn delay_queue(&self, tier_ms: u64) -> String {
        format!("{}.delay.{tier_ms}", self.namespace)
    }

    /// Every queue skald declares (for tests and tools that clean up).
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues = self.partitions.clone();
        queues.push(self.dead_queue.clone());
        queues.extend(DELAY_TIERS_MS.iter().map(|&t| self.delay_queue(t)));
        queues
    }
}

struct Link {
    connection: Connection,
    publisher: Channel,
    /// Other endpoints' topologies declared on this connection (by intake exchange).
    declared: std::collections::HashSet<String>,
}

/// skald's RabbitMQ transport: one connection, a confirming publish channel shared by
/// all publishers, and a consume channel with a bounded prefetch.
pub struct RabbitTransport {
    url: String,
    namespace: String,
    topology: Topology,
    prefetch: u16,
    /// Pause between subscribing to two partitions (see `consume`).
    stagger: Duration,
    link: Mutex<Option<Link>>,
    /// The partition consumers of the current `consume`, for `stop_consuming`.
    consumers: Arc<std::sync::Mutex<Vec<(Channel, ShortString)>>>,
    /// Set by `stop_consuming`: subscribe to no further partition.
    stopping: Arc<AtomicBool>,
}

fn conn_err(e: lapin::Error) -> TransportError {
    TransportError::Connection(e.to_string())
}

/// An error while connecting or declaring the topology: a refusal the broker answered
/// with (see [`refusal_fix`]) is [`TransportError::Refused`], anything else (no route
/// to the broker, a restart) a connection error that waiting may fix.
fn setup_err(e: lapin::Error) -> TransportError {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
        && let Some(fix) = refusal_fix(amqp.get_id(), amqp.get_message().as_str())
    {
        let said = amqp.get_message().as_str().trim_end_matches('.');
        return TransportError::Refused(format!("RabbitMQ answered {said}; {fix}"));
    }
    conn_err(e)
}

/// What to change when the broker refuses skald's connection or topology with the AMQP
/// reply `code` and `message`; `None` for the replies that may clear up by themselves
/// (320 CONNECTION_FORCED: the broker is restarting; 405 RESOURCE_LOCKED; 506
/// RESOURCE_ERROR: out of a resource; 541 INTERNAL_ERROR).
fn refusal_fix(code: u16, message: &str) -> Option<&'static str> {
    Some(match code {
        320 | 405 | 506 | 541 => return None,
        403 => {
            "check the user name and password in AMQP_URL, and that user's permissions \
             on the vhost"
        }
        402 | 530 => {
            "check the vhost in AMQP_URL: it must exist and the user must have access to it"
        }
        503 if message.contains("exchange type") => {
            "the consistent-hash exchange plugin is not enabled: run \
             `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` on the broker"
        }
        406 => {
            "an exchange or queue of this SKALD_NAMESPACE already exists with other \
             settings than skald declares: delete it, or choose another SKALD_NAMESPACE"
        }
        _ => "the broker refuses skald's topology",
    })
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

impl RabbitTransport {
    /// Connects to the broker of `config` as skald's intake and declares its topology.
    /// Must be called inside a tokio runtime.
    pub async fn connect(config: &Config) -> Result<Arc<RabbitTransport>, TransportError> {
        Self::connect_as(config, Endpoint::Orchestrator).await
    }

    /// Connects to the broker of `config` for the endpoint `home` (what it consumes)
    /// and declares its topology.
    pub async fn connect_as(
        config: &Config,
        home: Endpoint,
    ) -> Result<Arc<RabbitTransport>, TransportError> {
        let transport = RabbitTransport {
            url: config.amqp_url.clone(),
            namespace: config.namespace.clone(),
            topology: Topology::new(&home.prefix(&config.namespace), config.partitions),
            prefetch: config.prefetch,
            stagger: config.subscribe_stagger,
            link: Mutex::new(None),
            consumers: Default::default(),
            stopping: Default::default(),
        };
        transport.link().await?;
        Ok(Arc::new(transport))
    }

    /// The names of the exchanges and queues in use.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The publish channel, reconnecting (and redeclaring) if the link is down.
    async fn link(&self) -> Result<Channel, TransportError> {
        let mut guard = self.link.lock().await;
        if let Some(link) = guard.as_ref()
            && link.connection.status().connected()
            && link.publisher.status().connected()
        {
            return Ok(link.publisher.clone());
        }
        if guard.is_some() {
            tracing::warn!("RabbitMQ link lost; reconnecting");
        }
        // Named after the namespace, so that operators (and tests) can tell skald's
        // connections apart in `rabbitmqctl list_connections`.
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("skald:{}", self.topology.namespace).into());
        let connection = Connection::connect(&self.url, properties)
            .await
            .map_err(setup_err)?;
        let declared = async {
            let publisher = connection.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            declare(&publisher, &self.topology).await?;
            lapin::Result::Ok(publisher)
        }
        .await;
        let publisher = match declared {
            Ok(publisher) => publisher,
            Err(e) => {
                // Not left open behind a failed attempt (start-up may try again).
                let _ = connection.close(200, "topology not declared".into()).await;
                return Err(setup_err(e));
            }
        };
        *guard = Some(Link {
            connection,
            publisher: publisher.clone(),
            declared: Default::default(),
        });
        Ok(publisher)
    }

    /// The intake exchange of `to`, declaring `to`'s topology first if this connection
    /// has not yet (it may be the first to send there).
    async fn intake_of(&self, to: &Endpoint) -> Result<String, TransportError> {
        let topology = Topology::new(
            &to.prefix(&self.namespace),
            self.topology.partitions.len() as u16,
        );
        if topology.exchange == self.topology.exchange {
            return Ok(topology.exchange);
        }
        let channel = self.link().await?;
        let known = self
            .link
            .lock()
            .await
            .as_ref()
            .is_some_and(|l| l.declared.contains(&topology.exchange));
        if !known {
            declare(&channel, &topology).await.map_err(setup_err)?;
            if let Some(link) = self.link.lock().await.as_mut() {
                link.declared.insert(topology.exchange.clone());
            }
        }
        Ok(topology.exchange)
    }

    /// A fresh channel on the current connection (reconnecting if it is down).
    async fn new_channel(&self) -> Result<Channel, TransportError> {
        self.link().await?;
        let guard = self.link.lock().await;
        let link = guard
            .as_ref()
            .ok_or_else(|| TransportError::Connection("no link".into()))?;
        link.connection.create_channel().await.map_err(conn_err)
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), TransportError> {
        let channel = self.link().await?;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .map_err(conn_err)?
            .await
            .map_err(conn_err)?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(TransportError::NotAccepted(format!(
                    "returned as unroutable ({} {})",
                    returned.reply_code, returned.reply_text
                )))
            }
            Confirmation::Nack(None) => Err(TransportError::NotAccepted("nack".into())),
            Confirmation::NotRequested => Err(TransportError::NotAccepted(
                "publisher confirms are not enabled on the channel".into(),
            )),
        }
    }
}

/// Declares the exchanges and queues of `topology` (idempotent).
async fn declare(ch: &Channel, topology: &Topology) -> lapin::Result<()> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        topology.exchange.as_str().into(),
        ExchangeKind::Custom("x-consistent-hash".into()),
        durable_exchange,
        FieldTable::default(),
    )
    .await?;
    for partition in &topology.partitions {
        ch.queue_declare(
            partition.as_str().into(),
            durable_queue,
            table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
        )
        .await?;
        // For a consistent-hash exchange the binding key is the partition's weight.
        ch.queue_bind(
            partition.as_str().into(),
            topology.exchange.as_str().into(),
            "1".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.exchange_declare(
        topology.delay_exchange.as_str().into(),
        ExchangeKind::Headers,
        durable_exchange,
        FieldTable::default(),
    )
    .await?;
    for &tier in DELAY_TIERS_MS {
        let queue = topology.delay_queue(tier);
        ch.queue_declare(
            queue.as_str().into(),
            durable_queue,
            table(&[
                ("x-message-ttl", AMQPValue::LongLongInt(tier as i64)),
                ("x-dead-letter-exchange", text(&topology.exchange)),
            ]),
        )
        .await?;
        ch.queue_bind(
            queue.as_str().into(),
            topology.delay_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[
                ("x-match", text("all")),
                (DELAY_HEADER, text(&tier.to_string())),
            ]),
        )
        .await?;
    }
    ch.exchange_declare(
        topology.dead_exchange.as_str().into(),
        ExchangeKind::Fanout,
        durable_exchange,
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        topology.dead_queue.as_str().into(),
        durable_queue,
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        topology.dead_queue.as_str().into(),
        topology.dead_exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Passes one partition's deliveries on until its consumer ends (connection lost,
/// cancelled) or nobody listens any more.
async fn forward(mut consumer: lapin::Consumer, tx: tokio::sync::mpsc::Sender<Delivery>) {
    while let Some(item) = consumer.next().await {
        match item {
            Ok(d) => {
                let delivery = Delivery::new(d.data, d.redelivered, Box::new(RabbitAcker(d.acker)));
                if tx.send(delivery).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "consumer stream failed");
                break;
            }
        }
    }
}

struct RabbitAcker(lapin::Acker);

impl Acknowledge for RabbitAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            self.0
                .ack(BasicAckOptions { multiple: false })
                .await
                .map(|_| ())
                .map_err(conn_err)
        })
    }
}

impl Transport for RabbitTransport {
    fn publish<'a>(
        &'a self,
        key: &'a str,
        body: &'a [u8],
        delay_ms: u64,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let properties =
                BasicProperties::default().with_content_type("application/json".into());
            if delay_ms == 0 {
                self.publish_confirmed(&self.topology.exchange, key, body, properties)
                    .await
            } else {
                let tier = Topology::delay_tier(delay_ms).to_string();
                let properties = properties.with_headers(table(&[(DELAY_HEADER, text(&tier))]));
                self.publish_confirmed(&self.topology.delay_exchange, key, body, properties)
                    .await
            }
        })
    }

    fn send_to<'a>(
        &'a self,
        to: &'a Endpoint,
        key: &'a str,
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let exchange = self.intake_of(to).await?;
            let properties =
                BasicProperties::default().with_content_type("application/json".into());
            self.publish_confirmed(&exchange, key, body, properties)
                .await
        })
    }

    fn dead_letter<'a>(
        &'a self,
        body: &'a [u8],
        reason_code: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let properties = BasicProperties::default().with_headers(table(&[
                ("x-skald-reason-code", text(reason_code)),
                ("x-skald-reason", text(reason)),
            ]));
            self.publish_confirmed(&self.topology.dead_exchange, "", body, properties)
                .await
        })
    }

    fn consume(&self) -> BoxFuture<'_, Result<BoxStream<'static, Delivery>, TransportError>> {
        Box::pin(async move {
            let channel = self.new_channel().await?;
            // Prefetch applies per consumer: share the budget among the partitions.
            let per_partition = (self.prefetch / self.topology.partitions.len() as u16).max(1);
            channel
                .basic_qos(per_partition, BasicQosOptions::default())
                .await
                .map_err(conn_err)?;
            self.consumers.lock().expect("consumers lock").clear();
            self.stopping.store(false, Ordering::SeqCst);

            // The first subscriber of a partition is its active consumer. Subscribing
            // from a random partition, one partition every `stagger`, lets processes
            // that start within a few seconds of each other share the partitions.
            let n = self.topology.partitions.len();
            let first = fastrand::usize(..n);
            let order: Vec<String> = (0..n)
                .map(|i| self.topology.partitions[(first + i) % n].clone())
                .collect();
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Delivery>(self.prefetch as usize);
            let consumers = self.consumers.clone();
            let stopping = self.stopping.clone();
            let stagger = self.stagger;
            tokio::spawn(async move {
                for (i, queue) in order.iter().enumerate() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let consumer = match channel
                        .basic_consume(
                            queue.as_str().into(),
                            "".into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                    {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, %queue, "cannot subscribe to a partition");
                            break;
                        }
                    };
                    consumers
                        .lock()
                        .expect("consumers lock")
                        .push((channel.clone(), consumer.tag()));
                    tokio::spawn(forward(consumer, tx.clone()));
                    if i + 1 < order.len() && !stagger.is_zero() {
                        tokio::time::sleep(stagger.mul_f64(0.5 + fastrand::f64())).await;
                    }
                }
            });
            let deliveries = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            Ok(deliveries.boxed())
        })
    }

    fn stop_consuming(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stopping.store(true, Ordering::SeqCst);
            let consumers = self.consumers.lock().expect("consumers lock").clone();
            for (channel, tag) in &consumers {
                if let Err(e) = channel
                    .basic_cancel(tag.clone(), BasicCancelOptions::default())
                    .await
                {
                    tracing::debug!(error = %e, "cancelling a consumer failed");
                }
            }
        })
    }

    fn queue_depths(&self) -> BoxFuture<'_, Result<Vec<(String, u32)>, TransportError>> {
        Box::pin(async move {
            // A passive declare of a missing queue closes its channel: use a spare one.
            let channel = self.new_channel().await?;
            let mut depths = Vec::new();
            for queue in self.topology.all_queues() {
                let q = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(conn_err)?;
                depths.push((queue, q.message_count()));
            }
            let _ = channel.close(200, "depths read".into()).await;
            Ok(depths)
        })
    }

    fn healthy(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            self.link.lock().await.as_ref().is_some_and(|l| {
                l.connection.status().connected() && l.publisher.status().connected()
            })
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(link) = self.link.lock().await.take() {
                let _ = link
                    .connection
                    .close(200, "skald shutting down".into())
                    .await;
            }
        })
    }
}

/// How long to wait before reconnecting after the broker went away.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_topology_or_login_names_its_fix() {
        // The replies RabbitMQ sends, verbatim.
        let fix = |code, message| refusal_fix(code, message).unwrap_or_default();
        assert!(
            fix(
                503,
                "COMMAND_INVALID - unknown exchange type 'x-consistent-hash'"
            )
            .contains("rabbitmq-plugins enable rabbitmq_consistent_hash_exchange")
        );
        assert!(
            fix(
                503,
                "COMMAND_INVALID - invalid exchange type 'x-consistent-hash'"
            )
            .contains("rabbitmq-plugins enable rabbitmq_consistent_hash_exchange")
        );
        assert!(
            fix(
                406,
                "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'skald' in \
                 vhost '/': received 'x-consistent-hash' but current is 'direct'"
            )
            .contains("SKALD_NAMESPACE")
        );
        assert!(
            fix(
                403,
                "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN."
            )
            .contains("password in AMQP_URL")
        );
        assert!(fix(530, "NOT_ALLOWED - vhost nope not found").contains("vhost in AMQP_URL"));
    }

    #[test]
    fn a_broker_that_is_restarting_is_waited_for() {
        for code in [320, 405, 506, 541] {
            assert_eq!(
                refusal_fix(code, "CONNECTION_FORCED - shutdown"),
                None,
                "{code}"
            );
        }
    }
}
