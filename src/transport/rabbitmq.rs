//! RabbitMQ (AMQP 0-9-1, through lapin) as skald's transport.
//!
//! ## Topology (declared at start, idempotently; `NS` is the namespace)
//!
//! | name | kind | what for |
//! |---|---|---|
//! | `NS` | direct exchange | intake: every start and run message, routing key `intake` |
//! | `NS.intake` | durable queue, single active consumer | what skald consumes |
//! | `NS.delay.<ms>` | durable queue, `x-message-ttl` = ms, dead-letters to `NS`/`intake` | retries waiting out their backoff |
//! | `NS.dlx` | fanout exchange | dead letters |
//! | `NS.dead` | durable queue | dead letters, kept for a person |
//!
//! A per-message TTL only expires at the head of a queue, so one queue with mixed
//! delays would hold short delays behind long ones. Each delay tier is a queue of its
//! own with a queue-level TTL instead; a delay is rounded *up* to the next tier, so a
//! retry never happens earlier than its policy says.
//!
//! The intake queue has `x-single-active-consumer`: several skald processes may
//! consume it, but one at a time, so per-aggregate order holds across processes and
//! a standby takes over (with the unacked messages) when the active one dies.
//!
//! Every publish is persistent, `mandatory` and confirmed: a nack or an unroutable
//! return is an error, not a success.

use std::sync::Arc;
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

use super::{Acknowledge, Delivery, Transport, TransportError};
use crate::envelope::Outgoing;

/// Delay tiers in milliseconds; a delay is rounded up to the next one (the last one
/// caps it).
pub const DELAY_TIERS_MS: &[u64] = &[
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000,
];

/// The routing key of the intake queue on the namespace exchange.
const INTAKE_KEY: &str = "intake";

/// The names of everything skald declares, derived from the namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The intake exchange.
    pub exchange: String,
    /// The queue skald consumes.
    pub intake_queue: String,
    /// The dead-letter exchange.
    pub dead_exchange: String,
    /// The dead-letter queue.
    pub dead_queue: String,
    namespace: String,
}

impl Topology {
    /// The names for `namespace`.
    pub fn new(namespace: &str) -> Self {
        Topology {
            exchange: namespace.to_string(),
            intake_queue: format!("{namespace}.intake"),
            dead_exchange: format!("{namespace}.dlx"),
            dead_queue: format!("{namespace}.dead"),
            namespace: namespace.to_string(),
        }
    }

    /// The queue a message delayed by `delay_ms` waits in.
    pub fn delay_queue(&self, delay_ms: u64) -> String {
        let tier = DELAY_TIERS_MS
            .iter()
            .copied()
            .find(|&t| t >= delay_ms)
            .unwrap_or(*DELAY_TIERS_MS.last().expect("tiers are not empty"));
        format!("{}.delay.{tier}", self.namespace)
    }

    /// Every queue skald declares (for tests and tools that clean up).
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues = vec![self.intake_queue.clone(), self.dead_queue.clone()];
        queues.extend(DELAY_TIERS_MS.iter().map(|&t| self.delay_queue(t)));
        queues
    }
}

struct Link {
    connection: Connection,
    publisher: Channel,
    consumer: Option<(Channel, ShortString)>,
}

/// skald's RabbitMQ transport: one connection, a confirming publish channel shared by
/// all publishers, and a consume channel with a bounded prefetch.
pub struct RabbitTransport {
    url: String,
    topology: Topology,
    prefetch: u16,
    link: Mutex<Option<Link>>,
}

fn conn_err(e: lapin::Error) -> TransportError {
    TransportError::Connection(e.to_string())
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
    /// Connects to `url` and declares the topology for `namespace`. Must be called
    /// inside a tokio runtime.
    pub async fn connect(
        url: &str,
        namespace: &str,
        prefetch: u16,
    ) -> Result<Arc<RabbitTransport>, TransportError> {
        let transport = RabbitTransport {
            url: url.to_string(),
            topology: Topology::new(namespace),
            prefetch,
            link: Mutex::new(None),
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
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(conn_err)?;
        let publisher = connection.create_channel().await.map_err(conn_err)?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(conn_err)?;
        declare(&publisher, &self.topology)
            .await
            .map_err(conn_err)?;
        *guard = Some(Link {
            connection,
            publisher: publisher.clone(),
            consumer: None,
        });
        Ok(publisher)
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
        ExchangeKind::Direct,
        durable_exchange,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        topology.dead_exchange.as_str().into(),
        ExchangeKind::Fanout,
        durable_exchange,
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        topology.intake_queue.as_str().into(),
        durable_queue,
        table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await?;
    ch.queue_bind(
        topology.intake_queue.as_str().into(),
        topology.exchange.as_str().into(),
        INTAKE_KEY.into(),
        QueueBindOptions::default(),
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
    for &tier in DELAY_TIERS_MS {
        ch.queue_declare(
            topology.delay_queue(tier).as_str().into(),
            durable_queue,
            table(&[
                ("x-message-ttl", AMQPValue::LongLongInt(tier as i64)),
                ("x-dead-letter-exchange", text(&topology.exchange)),
                ("x-dead-letter-routing-key", text(INTAKE_KEY)),
            ]),
        )
        .await?;
    }
    Ok(())
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
    fn publish<'a>(&'a self, msg: &'a Outgoing) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let body = msg.envelope.to_body();
            if let Some(note) = &msg.dead_letter {
                return self.dead_letter(&body, &note.code, &note.reason).await;
            }
            let properties = BasicProperties::default()
                .with_message_id(msg.envelope.message_id.to_string().into())
                .with_content_type("application/json".into());
            if msg.delay_ms == 0 {
                self.publish_confirmed(&self.topology.exchange, INTAKE_KEY, &body, properties)
                    .await
            } else {
                let queue = self.topology.delay_queue(msg.delay_ms);
                self.publish_confirmed("", &queue, &body, properties).await
            }
        })
    }

    fn publish_raw<'a>(&'a self, body: &'a [u8]) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let properties =
                BasicProperties::default().with_content_type("application/json".into());
            self.publish_confirmed(&self.topology.exchange, INTAKE_KEY, body, properties)
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
            self.link().await?;
            let mut guard = self.link.lock().await;
            let link = guard
                .as_mut()
                .ok_or_else(|| TransportError::Connection("no link".into()))?;
            let channel = link.connection.create_channel().await.map_err(conn_err)?;
            channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await
                .map_err(conn_err)?;
            let consumer = channel
                .basic_consume(
                    self.topology.intake_queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(conn_err)?;
            link.consumer = Some((channel, consumer.tag()));
            let stream = consumer
                .take_while(|item| {
                    if let Err(e) = item {
                        tracing::warn!(error = %e, "consumer stream failed");
                    }
                    std::future::ready(item.is_ok())
                })
                .filter_map(|item| {
                    std::future::ready(item.ok().map(|d| {
                        Delivery::new(d.data, d.redelivered, Box::new(RabbitAcker(d.acker)))
                    }))
                });
            Ok(stream.boxed())
        })
    }

    fn stop_consuming(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let guard = self.link.lock().await;
            if let Some((channel, tag)) = guard.as_ref().and_then(|l| l.consumer.as_ref())
                && let Err(e) = channel
                    .basic_cancel(tag.clone(), BasicCancelOptions::default())
                    .await
            {
                tracing::debug!(error = %e, "cancelling the consumer failed");
            }
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
