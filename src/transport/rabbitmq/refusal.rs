//! The broker's refusals of skald's connection or topology, and what to change for
//! each: a configuration error is reported once, clearly, not retried in a loop.

use lapin::Connection;

use super::super::TransportError;
use super::topology::{QueueSettings, Topology, declare_queue};
use crate::config::QueueType;

pub(super) fn conn_err(e: lapin::Error) -> TransportError {
    TransportError::Connection(e.to_string())
}

/// An error while connecting or declaring the topology: a refusal the broker answered
/// with (see [`refusal_fix`]) is [`TransportError::Refused`], anything else (no route
/// to the broker, a restart) a connection error that waiting may fix.
pub(super) fn setup_err(e: lapin::Error) -> TransportError {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
        && let Some(fix) = refusal_fix(amqp.get_id(), amqp.get_message().as_str())
    {
        let said = amqp.get_message().as_str().trim_end_matches('.');
        return TransportError::Refused(format!("RabbitMQ answered {said}; {fix}"));
    }
    conn_err(e)
}

/// [`setup_err`] for an error while declaring `topology` with `settings` on
/// `connection`; when the broker refused a queue because it exists with the other
/// queue type, a refusal that says so and names `SKALD_QUEUE_TYPE`.
pub(super) async fn declare_err(
    connection: &Connection,
    topology: &Topology,
    settings: QueueSettings,
    e: lapin::Error,
) -> TransportError {
    match of_other_type(connection, topology, settings, &e).await {
        Some((queue, found)) => {
            TransportError::Refused(other_type(&queue, settings.queue_type, found))
        }
        None => setup_err(e),
    }
}

/// When `e` is the broker's refusal of a queue of `topology` that exists with the
/// other queue type than `settings` asks for: that queue and its type. (RabbitMQ names
/// whichever argument it compares first, not always `x-queue-type`, so the queue is
/// declared again, on a channel of its own, exactly as the other type would declare it:
/// that changes nothing when it is one.)
pub(super) async fn of_other_type(
    connection: &Connection,
    topology: &Topology,
    settings: QueueSettings,
    e: &lapin::Error,
) -> Option<(String, QueueType)> {
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    if amqp.get_id() != 406 {
        return None;
    }
    let queue = queue_named(amqp.get_message().as_str())?;
    let (_, role) = topology.queues().into_iter().find(|(q, _)| q == queue)?;
    let other = match settings.queue_type {
        QueueType::Classic => QueueType::Quorum,
        QueueType::Quorum => QueueType::Classic,
    };
    let as_other = QueueSettings {
        queue_type: other,
        ..settings
    };
    let channel = connection.create_channel().await.ok()?;
    declare_queue(&channel, topology, queue, role, as_other)
        .await
        .ok()?;
    let _ = channel.close(200, "queue type checked".into()).await;
    Some((queue.to_string(), other))
}

/// The refusal of a queue that exists as `found` where `asked` is configured.
fn other_type(queue: &str, asked: QueueType, found: QueueType) -> String {
    let (asked, found) = (asked.as_str(), found.as_str());
    format!(
        "queue {queue} exists as a {found} queue but SKALD_QUEUE_TYPE={asked}; a queue's \
         type cannot change in place: set SKALD_QUEUE_TYPE={found}, or move the queues with \
         `skald queues migrate --to {asked}` while no skald process runs (README: Running \
         against a RabbitMQ cluster)"
    )
}

/// The queue a 406 reply is about: `… for queue '<name>' in vhost …`.
fn queue_named(message: &str) -> Option<&str> {
    let rest = &message[message.find("for queue '")? + "for queue '".len()..];
    Some(&rest[..rest.find("' in vhost")?])
}

/// What to change when the broker refuses skald's connection or topology with the AMQP
/// reply `code` and `message`; `None` for the replies that may clear up by themselves
/// (320 CONNECTION_FORCED: the broker is restarting; 405 RESOURCE_LOCKED; 506
/// RESOURCE_ERROR: out of a resource; 541 INTERNAL_ERROR).
pub(super) fn refusal_fix(code: u16, message: &str) -> Option<&'static str> {
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
        406 if message.contains("'x-queue-type'") => {
            "the queue exists with another type than SKALD_QUEUE_TYPE asks for, and a \
             queue's type cannot change in place: set SKALD_QUEUE_TYPE to the type the \
             deployment's queues have, or move them with `skald queues migrate --to \
             <type>` while no skald process runs (README: Running against a RabbitMQ \
             cluster)"
        }
        406 if message.contains("'x-delivery-limit'") => {
            "the quorum queue exists with another delivery limit: set SKALD_DELIVERY_LIMIT \
             to the value it was declared with"
        }
        406 => {
            "an exchange or queue of this SKALD_NAMESPACE already exists with other \
             settings than skald declares: delete it, or choose another SKALD_NAMESPACE"
        }
        _ => "the broker refuses skald's topology",
    })
}

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
    fn a_queue_of_the_other_type_names_the_setting_and_the_migration() {
        // RabbitMQ 3.10's reply to declaring a quorum queue where a classic one is.
        let fix = refusal_fix(
            406,
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'skald.p.0' \
             in vhost '/': received the value 'quorum' of type 'longstr' but current is none",
        )
        .unwrap();
        assert!(fix.contains("SKALD_QUEUE_TYPE"), "{fix}");
        assert!(fix.contains("skald queues migrate"), "{fix}");
        let fix = refusal_fix(
            406,
            "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'skald.p.0' \
             in vhost '/': received the value '5' of type 'signedint' but current is the \
             value '20' of type 'signedint'",
        )
        .unwrap();
        assert!(fix.contains("SKALD_DELIVERY_LIMIT"), "{fix}");
    }

    #[test]
    fn a_queue_of_the_other_type_is_named_with_both_types_and_the_setting() {
        let said = "PRECONDITION_FAILED - inequivalent arg 'x-overflow' for queue \
                    'ns.delay.100' in vhost '/': received the value 'reject-publish' of type \
                    'longstr' but current is none";
        assert_eq!(queue_named(said), Some("ns.delay.100"));
        assert_eq!(queue_named("PRECONDITION_FAILED - for exchange 'ns'"), None);
        let message = other_type("ns.p.0", QueueType::Quorum, QueueType::Classic);
        assert!(
            message
                .starts_with("queue ns.p.0 exists as a classic queue but SKALD_QUEUE_TYPE=quorum;"),
            "{message}"
        );
        assert!(
            message.contains("skald queues migrate --to quorum"),
            "{message}"
        );
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
