//! The participant services of command steps, played by `skald explore` on the
//! in-memory transport: every command is answered `succeeded`, with each field the
//! step's `returning` declares set to `"<type>:<aggregate>"` (deterministic, so a
//! re-sent command gets the same answer, as from a service that de-duplicates). One
//! step may be *silent*: its service answers none of its sends in time, and its
//! replies arrive late, once nothing else is left to deliver.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Map, Value};

use crate::participant::wire::{Reply, ReplyOutcome, ServiceMessage, reply_id};
use crate::saga::coordinator::Phase;
use crate::saga::{Action, Catalog};
use crate::transport::memory::MemoryTransport;
use crate::transport::{Endpoint, Transport, TransportError};

/// The services of every command step in a catalog.
pub(super) struct Services {
    /// Service names.
    names: BTreeSet<String>,
    /// Command type → the output fields its step declares.
    returning: HashMap<String, Vec<String>>,
    /// The step (index and phase) whose service does not answer in time.
    silent: Option<(usize, Phase)>,
    /// Late replies, held back: (aggregate id, body).
    held: Vec<(String, Vec<u8>)>,
}

impl Services {
    pub(super) fn new(catalog: &Catalog, silent: Option<(usize, Phase)>) -> Services {
        let mut names = BTreeSet::new();
        let mut returning = HashMap::new();
        let actions = catalog
            .all()
            .into_iter()
            .flat_map(|s| s.steps.iter())
            .flat_map(|step| std::iter::once(&step.action).chain(step.compensation.as_ref()));
        for action in actions {
            if let Action::Command(c) = action {
                names.insert(c.service.clone());
                returning.insert(c.kind.clone(), c.returning.clone());
            }
        }
        Services {
            names,
            returning,
            silent,
            held: Vec::new(),
        }
    }

    /// Answers every command waiting at a service (acking it); a silent step's replies
    /// are held back. Returns how many commands were read.
    pub(super) async fn play(&mut self, broker: &MemoryTransport) -> Result<usize, TransportError> {
        let mut read = 0;
        for name in &self.names {
            let service = broker.endpoint(&Endpoint::Service(name.clone()));
            while let Some(delivery) = service.next() {
                read += 1;
                let body = delivery.body.clone();
                delivery.ack().await?;
                let Ok(command) = ServiceMessage::parse(&body) else {
                    continue;
                };
                let Some(to) = command.reply_to.clone() else {
                    continue;
                };
                let outputs: Map<String, Value> = self
                    .returning
                    .get(&command.kind)
                    .into_iter()
                    .flatten()
                    .map(|f| {
                        let value = format!("{}:{}", command.kind, command.aggregate_id);
                        (f.clone(), Value::String(value))
                    })
                    .collect();
                let silent = self.silent == Some((to.cursor.step as usize, to.cursor.phase));
                let reply = Reply {
                    message_id: reply_id(command.message_id),
                    in_reply_to: command.message_id,
                    service: name.clone(),
                    aggregate_id: command.aggregate_id.clone(),
                    reply_to: to,
                    outcome: ReplyOutcome::Succeeded { outputs },
                    traceparent: None,
                };
                if silent {
                    self.held
                        .push((reply.aggregate_id.clone(), reply.to_body()));
                } else {
                    service
                        .send_to(
                            &Endpoint::Orchestrator,
                            &reply.aggregate_id,
                            &reply.to_body(),
                        )
                        .await?;
                }
            }
        }
        Ok(read)
    }

    /// Sends the held-back late replies; whether there were any.
    pub(super) async fn flush_late(
        &mut self,
        broker: &MemoryTransport,
    ) -> Result<bool, TransportError> {
        let held = std::mem::take(&mut self.held);
        for (key, body) in &held {
            broker.publish(key, body, 0).await?;
        }
        Ok(!held.is_empty())
    }
}
