//! `skald queues migrate --to classic|quorum`: moves a RabbitMQ deployment's queues to
//! another queue type without losing what they hold
//! ([`crate::transport::rabbitmq::migrate`]).

use std::process::ExitCode;

use crate::config::{Config, QueueType, TransportKind};
use crate::transport::Endpoint;
use crate::transport::rabbitmq::migrate::migrate;
use crate::transport::rabbitmq::{QueueSettings, Topology};

/// `skald queues …`.
#[derive(Debug, clap::Subcommand)]
pub enum QueuesCmd {
    /// Move every queue of SKALD_NAMESPACE (and of the services named) to another
    /// queue type, keeping their messages. Stop every skald process and participant
    /// service of the namespace first; then start them with SKALD_QUEUE_TYPE set to
    /// the new type.
    Migrate {
        /// The queue type to move to.
        #[arg(long, value_enum)]
        to: QueueType,
        /// Also move the queues of this participant service (`NS.svc.<service>`);
        /// repeat for several.
        #[arg(long = "service")]
        services: Vec<String>,
    },
}

/// Runs `cmd`; exit 0 when every queue has the new type.
pub async fn run(config: Config, cmd: QueuesCmd) -> anyhow::Result<ExitCode> {
    let QueuesCmd::Migrate { to, services } = cmd;
    if config.transport != TransportKind::RabbitMq {
        anyhow::bail!(
            "queue types are RabbitMQ's: set SKALD_TRANSPORT=rabbitmq (it is {})",
            config.transport.as_str()
        );
    }
    let endpoints =
        std::iter::once(Endpoint::Orchestrator).chain(services.into_iter().map(Endpoint::Service));
    let topologies: Vec<Topology> = endpoints
        .map(|e| Topology::new(&e.prefix(&config.namespace), config.partitions))
        .collect();
    let settings = QueueSettings {
        queue_type: to,
        delivery_limit: config.delivery_limit,
    };
    let moved = migrate(&config.amqp_url, &topologies, settings).await?;
    for m in &moved {
        println!("{}: {} message(s) moved", m.queue, m.messages);
    }
    println!(
        "every queue of {} is {}: run skald (and its services) with SKALD_QUEUE_TYPE={}",
        config.namespace,
        to.as_str(),
        to.as_str()
    );
    Ok(ExitCode::SUCCESS)
}
