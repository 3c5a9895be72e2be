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
//!
//! **Clusters.** `SKALD_QUEUE_TYPE=quorum` makes every queue above a replicated quorum
//! queue (arguments in `topology.rs`); `AMQP_URL` may list the nodes (`brokers.rs`),
//! and a lost connection is re-made to the next node that answers. `skald queues
//! migrate` moves a deployment's queued messages between queue types (`migrate.rs`).
//!
//! One concept a file: `topology.rs` (names, queue arguments, declaration),
//! `brokers.rs` (the address list and the order they are tried in), `refusal.rs` (the
//! broker's refusals and their fixes), `migrate.rs` (changing the queue type).

pub mod brokers;
pub mod migrate;
mod refusal;
pub mod topology;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::{Acknowledge, Delivery, Endpoint, Transport, TransportError};
use crate::config::Config;
use refusal::{conn_err, setup_err};
use topology::{DELAY_HEADER, declare, table, text};
pub use topology::{DELAY_TIERS_MS, QueueRole, QueueSettings, Topology};

/// How long one connection attempt to one address may take before the next address
/// is tried (a host that does not answer at all would otherwise hold start-up).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

struct Link {
    connection: Connection,
    publisher: Channel,
    /// Other endpoints' topologies declared on this connection (by intake exchange).
    declared: std::collections::HashSet<String>,
}

/// skald's RabbitMQ transport: one connection (to one node of `AMQP_URL` at a time), a
/// confirming publish channel shared by all publishers, and a consume channel with a
/// bounded prefetch.
pub struct RabbitTransport {
    addresses: Vec<String>,
    /// The index in `addresses` of the node last connected to.
    current: std::sync::atomic::AtomicUsize,
    namespace: String,
    topology: Topology,
    settings: QueueSettings,
    prefetch: u16,
    /// Pause between subscribing to two partitions (see `consume`).
    stagger: Duration,
    link: Mutex<Option<Link>>,
    /// The partition consumers of the current `consume`, for `stop_consuming`.
    consumers: Arc<std::sync::Mutex<Vec<(Channel, ShortString)>>>,
    /// Set by `stop_consuming`: subscribe to no further partition.
    stopping: Arc<AtomicBool>,
}

/// Connects to the first of `addresses` (in `order`, indexes into it) that answers,
/// naming the connection `name`; the connection and its index. A refusal (wrong
/// password, unknown vhost) ends the search: every node of a cluster would say the
/// same.
pub(crate) async fn connect_any(
    addresses: &[String],
    order: &[usize],
    name: &str,
) -> Result<(Connection, usize), TransportError> {
    let mut failures = Vec::new();
    for &i in order {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let attempt = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(&addresses[i], properties),
        )
        .await;
        match attempt {
            Ok(Ok(connection)) => return Ok((connection, i)),
            Ok(Err(e)) => match setup_err(e) {
                refused @ TransportError::Refused(_) => return Err(refused),
                other => failures.push(format!("{}: {other}", brokers::redacted(&addresses[i]))),
            },
            Err(_) => failures.push(format!(
                "{}: no answer within {CONNECT_TIMEOUT:?}",
                brokers::redacted(&addresses[i])
            )),
        }
    }
    Err(TransportError::Connection(failures.join("; ")))
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
        let addresses = brokers::addresses(&config.amqp_url).map_err(TransportError::Refused)?;
        let transport = RabbitTransport {
            addresses,
            current: Default::default(),
            namespace: config.namespace.clone(),
            topology: Topology::new(&home.prefix(&config.namespace), config.partitions),
            settings: QueueSettings {
                queue_type: config.queue_type,
                delivery_limit: config.delivery_limit,
            },
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
        let lost = guard.is_some();
        let current = self.current.load(Ordering::SeqCst);
        if lost {
            tracing::warn!(
                node = %brokers::redacted(&self.addresses[current]),
                "RabbitMQ link lost; reconnecting"
            );
        }
        // Named after the namespace, so that operators (and tests) can tell skald's
        // connections apart in `rabbitmqctl list_connections`.
        let order = brokers::attempt_order(self.addresses.len(), current, !lost);
        let name = format!("skald:{}", self.topology.namespace);
        let (connection, node) = connect_any(&self.addresses, &order, &name).await?;
        if lost || node != current {
            tracing::info!(node = %brokers::redacted(&self.addresses[node]), "connected to RabbitMQ");
        }
        self.current.store(node, Ordering::SeqCst);
        let declared = async {
            let publisher = connection.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            declare(&publisher, &self.topology, self.settings).await?;
            lapin::Result::Ok(publisher)
        }
        .await;
        let publisher = match declared {
            Ok(publisher) => publisher,
            Err(e) => {
                let refused =
                    refusal::declare_err(&connection, &self.topology, self.settings, e).await;
                // Not left open behind a failed attempt (start-up may try again).
                let _ = connection.close(200, "topology not declared".into()).await;
                return Err(refused);
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
            if let Err(e) = declare(&channel, &topology, self.settings).await {
                let guard = self.link.lock().await;
                return Err(match guard.as_ref() {
                    Some(link) => {
                        refusal::declare_err(&link.connection, &topology, self.settings, e).await
                    }
                    None => setup_err(e),
                });
            }
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
