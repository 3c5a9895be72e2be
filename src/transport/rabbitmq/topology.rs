//! The names of everything skald declares on RabbitMQ, the arguments of each queue by
//! queue type, and the idempotent declaration itself.
//!
//! With `SKALD_QUEUE_TYPE=quorum` every queue is a quorum queue:
//!
//! - partitions keep `x-single-active-consumer`, and get `x-delivery-limit`
//!   (`SKALD_DELIVERY_LIMIT`) with the dead-letter exchange `NS.dlx`, so a message
//!   delivered that many times (each delivery ended by a lost consumer: a crash, a
//!   lost connection) goes to `NS.dead` rather than being dropped — RabbitMQ 4 drops
//!   it after 20 deliveries when no limit and no dead-letter exchange are set;
//! - delay tiers dead-letter to the intake with `x-dead-letter-strategy:
//!   at-least-once`, so a retry cannot be lost between its tier and the intake (the
//!   strategy needs `x-overflow: reject-publish`);
//! - the dead-letter queue is a plain quorum queue.
//!
//! Classic queues keep exactly the arguments they always had, so a deployment that
//! upgrades skald without choosing quorum declares what it already has.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::QueueType;
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
pub const DELAY_HEADER: &str = "skald-delay";

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
    pub(super) namespace: String,
}

/// What a queue is for: its arguments depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// A partition of the intake.
    Partition,
    /// The delay tier of this many milliseconds.
    Delay(u64),
    /// The dead-letter queue.
    Dead,
}

/// The queue settings of a deployment (`SKALD_QUEUE_TYPE`, `SKALD_DELIVERY_LIMIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// Classic or quorum.
    pub queue_type: QueueType,
    /// Quorum partitions: deliveries of one message before it is dead-lettered.
    pub delivery_limit: u32,
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
        self.queues().into_iter().map(|(q, _)| q).collect()
    }

    /// Every queue skald declares with its role: the delay tiers first, then the
    /// partitions and the dead-letter queue (the order `skald queues migrate` empties
    /// them in: see `migrate.rs`).
    pub fn queues(&self) -> Vec<(String, QueueRole)> {
        let mut queues: Vec<(String, QueueRole)> = DELAY_TIERS_MS
            .iter()
            .map(|&t| (self.delay_queue(t), QueueRole::Delay(t)))
            .collect();
        queues.extend(
            self.partitions
                .iter()
                .map(|p| (p.clone(), QueueRole::Partition)),
        );
        queues.push((self.dead_queue.clone(), QueueRole::Dead));
        queues
    }

    /// The arguments of the queue with `role` under `settings`.
    pub fn queue_arguments(
        &self,
        role: QueueRole,
        settings: QueueSettings,
    ) -> Vec<(&'static str, AMQPValue)> {
        let mut args = match role {
            QueueRole::Partition => vec![("x-single-active-consumer", AMQPValue::Boolean(true))],
            QueueRole::Delay(tier) => vec![
                ("x-message-ttl", AMQPValue::LongLongInt(tier as i64)),
                ("x-dead-letter-exchange", text(&self.exchange)),
            ],
            QueueRole::Dead => vec![],
        };
        if settings.queue_type == QueueType::Quorum {
            args.push(("x-queue-type", text("quorum")));
            match role {
                QueueRole::Partition => args.extend([
                    (
                        "x-delivery-limit",
                        AMQPValue::LongLongInt(settings.delivery_limit.into()),
                    ),
                    ("x-dead-letter-exchange", text(&self.dead_exchange)),
                    ("x-dead-letter-strategy", text("at-least-once")),
                    ("x-overflow", text("reject-publish")),
                ]),
                QueueRole::Delay(_) => args.extend([
                    ("x-dead-letter-strategy", text("at-least-once")),
                    ("x-overflow", text("reject-publish")),
                ]),
                QueueRole::Dead => {}
            }
        }
        args
    }
}

pub(super) fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

pub(super) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Declares queue `queue` with `role` under `settings` (durable; idempotent).
pub(super) async fn declare_queue(
    ch: &Channel,
    topology: &Topology,
    queue: &str,
    role: QueueRole,
    settings: QueueSettings,
) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&topology.queue_arguments(role, settings)),
    )
    .await
}

/// Declares the exchanges and queues of `topology` and their bindings (idempotent).
pub(super) async fn declare(
    ch: &Channel,
    topology: &Topology,
    settings: QueueSettings,
) -> lapin::Result<()> {
    let durable_exchange = ExchangeDeclareOptions {
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
    ch.exchange_declare(
        topology.delay_exchange.as_str().into(),
        ExchangeKind::Headers,
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
    for (queue, role) in topology.queues() {
        declare_queue(ch, topology, &queue, role, settings).await?;
        bind(ch, topology, &queue, role).await?;
    }
    Ok(())
}

/// Binds `queue` with `role` where it receives from (idempotent).
pub(super) async fn bind(
    ch: &Channel,
    topology: &Topology,
    queue: &str,
    role: QueueRole,
) -> lapin::Result<()> {
    let (exchange, key, arguments) = match role {
        // For a consistent-hash exchange the binding key is the partition's weight.
        QueueRole::Partition => (&topology.exchange, "1", FieldTable::default()),
        QueueRole::Delay(tier) => (
            &topology.delay_exchange,
            "",
            table(&[
                ("x-match", text("all")),
                (DELAY_HEADER, text(&tier.to_string())),
            ]),
        ),
        QueueRole::Dead => (&topology.dead_exchange, "", FieldTable::default()),
    };
    ch.queue_bind(
        queue.into(),
        exchange.as_str().into(),
        key.into(),
        QueueBindOptions::default(),
        arguments,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(role: QueueRole, queue_type: QueueType) -> Vec<(&'static str, String)> {
        let settings = QueueSettings {
            queue_type,
            delivery_limit: 7,
        };
        Topology::new("ns", 2)
            .queue_arguments(role, settings)
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    AMQPValue::LongString(s) => s.to_string(),
                    AMQPValue::LongLongInt(n) => n.to_string(),
                    AMQPValue::Boolean(b) => b.to_string(),
                    other => format!("{other:?}"),
                };
                (k, v)
            })
            .collect()
    }

    fn pairs(list: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        list.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn classic_queues_keep_the_arguments_they_always_had() {
        assert_eq!(
            args(QueueRole::Partition, QueueType::Classic),
            pairs(&[("x-single-active-consumer", "true")])
        );
        assert_eq!(
            args(QueueRole::Delay(250), QueueType::Classic),
            pairs(&[("x-message-ttl", "250"), ("x-dead-letter-exchange", "ns")])
        );
        assert!(args(QueueRole::Dead, QueueType::Classic).is_empty());
    }

    #[test]
    fn quorum_partitions_dead_letter_a_message_past_the_delivery_limit() {
        assert_eq!(
            args(QueueRole::Partition, QueueType::Quorum),
            pairs(&[
                ("x-single-active-consumer", "true"),
                ("x-queue-type", "quorum"),
                ("x-delivery-limit", "7"),
                ("x-dead-letter-exchange", "ns.dlx"),
                ("x-dead-letter-strategy", "at-least-once"),
                ("x-overflow", "reject-publish"),
            ])
        );
    }

    #[test]
    fn quorum_delay_tiers_dead_letter_back_to_the_intake_at_least_once() {
        assert_eq!(
            args(QueueRole::Delay(100), QueueType::Quorum),
            pairs(&[
                ("x-message-ttl", "100"),
                ("x-dead-letter-exchange", "ns"),
                ("x-queue-type", "quorum"),
                ("x-dead-letter-strategy", "at-least-once"),
                ("x-overflow", "reject-publish"),
            ])
        );
        assert_eq!(
            args(QueueRole::Dead, QueueType::Quorum),
            pairs(&[("x-queue-type", "quorum")])
        );
    }

    #[test]
    fn every_queue_has_a_role_and_delay_tiers_come_first() {
        let queues = Topology::new("ns", 2).queues();
        assert_eq!(queues.len(), DELAY_TIERS_MS.len() + 3);
        assert_eq!(queues[0], ("ns.delay.100".into(), QueueRole::Delay(100)));
        assert_eq!(
            queues[DELAY_TIERS_MS.len()],
            ("ns.p.0".into(), QueueRole::Partition)
        );
        assert_eq!(queues.last().unwrap(), &("ns.dead".into(), QueueRole::Dead));
    }
}
