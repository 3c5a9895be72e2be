//! `skald queues migrate --to <type>`: moves a deployment's queues to another queue
//! type (classic ↔ quorum) without losing what they hold.
//!
//! A queue's type cannot change in place, and two queues cannot share a name, so each
//! queue that has the other type is emptied into a holding queue `<queue>.migrating`
//! (of the target type), deleted, declared again with the target type, and filled
//! back from its holding queue, which is then deleted. In three phases, across all the
//! endpoints given:
//!
//! 1. **Empty**: every queue of the other type, delay tiers first, is moved into its
//!    holding queue and deleted. Holding queues have no TTL: nothing expires out of
//!    them while the partitions are being replaced (a delayed retry that expired into
//!    a missing partition would be dropped by the broker).
//! 2. **Declare**: the whole topology, with the target type, as `skald run` would.
//! 3. **Refill**: every holding queue is moved back into its queue, then deleted.
//!    Delayed retries are published to the delay exchange with their original routing
//!    key (the aggregate id), so they still return to their aggregate's partition; they
//!    wait their tier again from this moment (later than planned, never earlier).
//!
//! Each move is in batches: get, publish to the destination with confirms, then ack
//! the batch at the source — a crash in between leaves copies (which skald's inbox
//! drops), never a gap. Running the command again after an interruption finishes the
//! job: phase 1 appends to an existing holding queue, phase 3 refills from any holding
//! queue it finds. Order within a queue is kept. It refuses to start while any queue
//! it would replace has a consumer: stop every skald process and participant service
//! first.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Confirmation, Connection};

use super::refusal::{conn_err, of_other_type, setup_err};
use super::topology::{QueueRole, QueueSettings, Topology, declare, declare_queue};
use super::{TransportError, brokers, connect_any};
use crate::config::QueueType;

/// The header that keeps a message's routing key while it sits in a holding queue.
const KEY_HEADER: &str = "skald-migrate-routing-key";

/// Messages got, published and acked as one batch.
const BATCH: usize = 200;

/// What the migration did to one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The queue.
    pub queue: String,
    /// Messages it held, all moved back into it with its new type.
    pub messages: u64,
}

/// The holding queue of `queue`.
pub fn holding_queue(queue: &str) -> String {
    format!("{queue}.migrating")
}

/// Moves every queue of `topologies` that is not of `settings.queue_type` to it,
/// keeping their messages (see the module documentation); the queues it replaced. A
/// queue already of the target type is left alone, so running it twice is harmless.
pub async fn migrate(
    amqp_url: &str,
    topologies: &[Topology],
    settings: QueueSettings,
) -> Result<Vec<Moved>, TransportError> {
    let addresses = brokers::addresses(amqp_url).map_err(TransportError::Refused)?;
    let order: Vec<usize> = (0..addresses.len()).collect();
    let (connection, _) = connect_any(&addresses, &order, "skald:queues-migrate").await?;
    let result = run(&connection, topologies, settings).await;
    let _ = connection.close(200, "migration done".into()).await;
    result
}

async fn run(
    connection: &Connection,
    topologies: &[Topology],
    settings: QueueSettings,
) -> Result<Vec<Moved>, TransportError> {
    let mover = confirming(connection).await?;

    // 1. Empty the queues of the other type into their holding queues.
    for topology in topologies {
        for (queue, role) in topology.queues() {
            if !has_other_type(connection, topology, &queue, role, settings).await? {
                continue;
            }
            let consumers = spare(connection)
                .await?
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(conn_err)?
                .consumer_count();
            if consumers > 0 {
                return Err(TransportError::Refused(format!(
                    "queue {queue} has {consumers} consumer(s): stop every skald process \
                     and participant service of this SKALD_NAMESPACE before migrating"
                )));
            }
            let hold = holding_queue(&queue);
            declare_holding(&mover, &hold, settings.queue_type).await?;
            let moved = empty(connection, &mover, &queue, |key| {
                (String::new(), hold.clone(), key)
            })
            .await?;
            tracing::info!(%queue, moved, "emptied into {hold}");
        }
    }

    // 2. Declare everything with the target type.
    for topology in topologies {
        declare(&spare(connection).await?, topology, settings)
            .await
            .map_err(setup_err)?;
    }

    // 3. Refill every queue from its holding queue, on a channel of its own: a
    // channel that knew a queue before it was replaced keeps treating it as its old
    // type (RabbitMQ 3.10 closes the connection with INTERNAL_ERROR on a publish).
    let _ = mover.close(200, "queues emptied".into()).await;
    let mover = confirming(connection).await?;
    let mut report = Vec::new();
    for topology in topologies {
        for (queue, role) in topology.queues() {
            let hold = holding_queue(&queue);
            if !exists(connection, &hold).await? {
                continue;
            }
            let messages = empty(connection, &mover, &hold, |key| match role {
                // Through the delay exchange, so that the retry keeps its aggregate id
                // as routing key for its return to the intake.
                QueueRole::Delay(_) => (topology.delay_exchange.clone(), key, String::new()),
                QueueRole::Partition | QueueRole::Dead => {
                    (String::new(), queue.clone(), String::new())
                }
            })
            .await?;
            report.push(Moved { queue, messages });
        }
    }
    let _ = mover.close(200, "migration done".into()).await;
    Ok(report)
}

/// A fresh channel with publisher confirms.
async fn confirming(connection: &Connection) -> Result<Channel, TransportError> {
    let channel = spare(connection).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(conn_err)?;
    Ok(channel)
}

/// A fresh channel, for an operation whose failure closes its channel.
async fn spare(connection: &Connection) -> Result<Channel, TransportError> {
    connection.create_channel().await.map_err(conn_err)
}

/// Whether `queue` exists with another type than `settings` asks for (declaring it
/// with the target type when it does not exist, as phase 2 would).
async fn has_other_type(
    connection: &Connection,
    topology: &Topology,
    queue: &str,
    role: QueueRole,
    settings: QueueSettings,
) -> Result<bool, TransportError> {
    let channel = spare(connection).await?;
    match declare_queue(&channel, topology, queue, role, settings).await {
        Ok(_) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(false)
        }
        Err(e) => match of_other_type(connection, topology, settings, &e).await {
            Some(_) => Ok(true),
            None => Err(setup_err(e)),
        },
    }
}

/// Moves every message of `queue` as [`transfer`] does, then deletes it once it is
/// seen empty (quorum queues do not support deleting only if empty); the number of
/// messages moved.
async fn empty(
    connection: &Connection,
    mover: &Channel,
    queue: &str,
    route: impl Fn(String) -> (String, String, String),
) -> Result<u64, TransportError> {
    let mut moved = 0;
    loop {
        moved += transfer(mover, queue, &route).await?;
        let left = spare(connection)
            .await?
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(conn_err)?
            .message_count();
        if left == 0 {
            break;
        }
    }
    mover
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .map_err(conn_err)?;
    Ok(moved)
}

/// Whether `queue` exists.
async fn exists(connection: &Connection, queue: &str) -> Result<bool, TransportError> {
    let channel = spare(connection).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404 => Ok(false),
            _ => Err(conn_err(e)),
        },
    }
}

async fn declare_holding(
    channel: &Channel,
    hold: &str,
    queue_type: QueueType,
) -> Result<(), TransportError> {
    let mut arguments = FieldTable::default();
    if queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(hold.into(), durable, arguments)
        .await
        .map_err(setup_err)?;
    Ok(())
}

/// Moves every message of `from` (oldest first) to where `route` says — given the
/// message's original routing key, `(exchange, routing key, key to keep)`: when the
/// key to keep is not empty it travels in a header, otherwise that header is removed.
/// The number of messages moved.
async fn transfer(
    channel: &Channel,
    from: &str,
    route: &impl Fn(String) -> (String, String, String),
) -> Result<u64, TransportError> {
    let mut moved = 0;
    loop {
        let mut batch = Vec::new();
        while batch.len() < BATCH {
            match channel
                .basic_get(from.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(conn_err)?
            {
                Some(message) => batch.push(message.delivery),
                None => break,
            }
        }
        let Some(last) = batch.last().map(|d| d.delivery_tag) else {
            return Ok(moved);
        };
        let mut confirms = Vec::with_capacity(batch.len());
        for delivery in &batch {
            let mut headers = delivery.properties.headers().clone().unwrap_or_default();
            let original = match headers.inner().get(KEY_HEADER) {
                Some(AMQPValue::LongString(key)) => key.to_string(),
                _ => delivery.routing_key.to_string(),
            };
            let (exchange, routing_key, keep) = route(original);
            let mut kept = FieldTable::default();
            for (name, value) in headers.inner() {
                if name.as_str() != KEY_HEADER {
                    kept.insert(name.clone(), value.clone());
                }
            }
            headers = kept;
            if !keep.is_empty() {
                headers.insert(
                    ShortString::from(KEY_HEADER),
                    AMQPValue::LongString(LongString::from(keep.as_str())),
                );
            }
            let properties = delivery.properties.clone().with_headers(headers);
            let confirm = channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &delivery.data,
                    properties,
                )
                .await
                .map_err(conn_err)?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            match confirm.await.map_err(conn_err)? {
                Confirmation::Ack(None) => {}
                other => {
                    return Err(TransportError::NotAccepted(format!(
                        "moving a message out of {from}: {other:?}"
                    )));
                }
            }
        }
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .map_err(conn_err)?;
        moved += batch.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holding_queue_is_named_after_its_queue() {
        assert_eq!(holding_queue("ns.p.3"), "ns.p.3.migrating");
    }
}
