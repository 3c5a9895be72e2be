//! The engine's side of command steps: recording a sent command, applying a service's
//! reply once, and carrying out a reply timer — each in one transaction, each decided
//! by [`crate::saga::command`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::Utc;
use serde_json::Value;
use uuid::Uuid;

use super::{Engine, EngineError, Handled, Job, resolve, target_of};
use crate::envelope::{Envelope, Malformed, Outgoing};
use crate::metrics::CommandLabels;
use crate::participant::wire::Reply;
use crate::saga::command::{self, CommandStatus, LateReason, OnReply, OnTimer, Sent};
use crate::saga::coordinator::Cursor;
use crate::saga::decide::{self, Attempt, StepResult};
use crate::saga::definition::{CommandAction, StepDef};
use crate::store::commands::{self, NewCommand, ReplyDisposition};
use crate::store::{Disposal, InboxOutcome, NewInstance, StepRecord, StepTx};
use crate::transport::{Transport, TransportError};

/// Sends `outgoing` after its commit, each confirmed before this returns. A list
/// with a command in it is a command step's send — the command and its reply timer,
/// which go to different queues and are never ordered with each other — and is sent
/// in one confirm round (on PostgreSQL, one group commit) instead of two; any other
/// list is sent one message after the other, in its order.
pub(super) async fn send_all(
    outgoing: &[Outgoing],
    transport: &dyn Transport,
) -> Result<(), TransportError> {
    if outgoing.iter().any(|m| m.command.is_some()) {
        futures_util::future::try_join_all(outgoing.iter().map(|m| m.send(transport))).await?;
    } else {
        for msg in outgoing {
            msg.send(transport).await?;
        }
    }
    Ok(())
}

/// Whether `body` is a JSON object with `in_reply_to` at its top level: a reply,
/// however malformed otherwise (a start or run envelope has no such field).
pub(super) fn is_reply_shaped(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, Value>>(body)
        .is_ok_and(|fields| fields.contains_key("in_reply_to"))
}

/// The attempt a reply or a time-out ends: the step's cursor, decided in the context
/// (payload, outputs, errors, deadline) its command was sent in.
fn attempt_in<'a>(
    job: &'a Job,
    locked: &'a commands::Locked,
    instance_id: Uuid,
    cursor: Cursor,
) -> Attempt<'a> {
    Attempt {
        saga: &job.saga,
        envelope: &locked.context,
        aggregate_id: &job.aggregate_id,
        instance_id,
        cursor,
        deadline: locked.context.deadline,
    }
}

impl Engine {
    /// Reads a reply from a participant service into a [`Job`] routed to the aggregate
    /// and saga version it names.
    pub(super) fn read_reply(&self, body: &[u8]) -> Result<Job, Malformed> {
        let reply = Reply::parse(body)?;
        let to = &reply.reply_to;
        let envelope = Envelope {
            message_id: reply.message_id,
            traceparent: reply.traceparent.clone(),
            ..Envelope::run(
                &to.saga,
                to.saga_version,
                &reply.aggregate_id,
                to.instance_id,
                to.cursor,
                Value::Null,
            )
        };
        let saga = resolve(&self.catalog, &envelope)?.clone();
        Ok(Job {
            envelope,
            saga,
            aggregate_id: reply.aggregate_id.clone(),
            reply: Some(Arc::new(reply)),
        })
    }

    /// Records, in `tx`, that the step at `at` sent its command: the inbox row (outcome
    /// `sent`, with the command and its reply timer as what to send), the instance at
    /// its cursor (created, for a start: `new`), and the command's row; then commits.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn record_sent(
        &self,
        mut tx: StepTx,
        job: &Job,
        at: &Attempt<'_>,
        step: &StepDef,
        action: &CommandAction,
        mut sent: Sent,
        started_at: chrono::DateTime<Utc>,
        new: Option<&NewInstance<'_>>,
    ) -> Result<Handled, EngineError> {
        let env = &job.envelope;
        let incoming = env.traceparent.as_deref();
        crate::telemetry::propagate(&mut sent.outgoing, at.instance_id, incoming);
        sent.message.traceparent = crate::telemetry::outgoing_traceparent(incoming);
        let context = &sent.outgoing[0].envelope;
        let record = StepRecord {
            message_id: env.message_id,
            instance_id: at.instance_id,
            aggregate_id: &job.aggregate_id,
            payload: &env.payload,
            ran: at.cursor,
            step_name: &step.name,
            outcome: InboxOutcome::Sent,
            error: None,
            started_at,
            new_state: sent.state,
            outputs: &context.outputs,
            outgoing: &sent.outgoing,
        };
        let recorded = match new {
            Some(new) => tx.record_start(&record, new).await?,
            None => tx.record_run(&record, at.cursor).await?,
        };
        if !recorded {
            tx.rollback().await?;
            return self.dispose(job, at.instance_id, at.cursor).await;
        }
        let inserted = commands::insert(
            tx.conn(),
            &NewCommand {
                instance_id: at.instance_id,
                cursor: at.cursor,
                step_name: &step.name,
                service: &action.service,
                message: &sent.message,
                context,
            },
        )
        .await?;
        if !inserted {
            // Another message of this cursor sent the command already (it has the
            // same id): this one changes nothing.
            tx.rollback().await?;
            let mut tx = self.store.begin().await?;
            tx.record_skipped(env.message_id, at.instance_id, false)
                .await?;
            tx.commit().await?;
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(Handled::Send(Vec::new()));
        }
        self.commit(tx, &step.name, at.cursor.phase).await?;
        crate::telemetry::record_sent();
        self.stats
            .metrics
            .command_sent(&command_labels(&context.saga, step, action));
        tracing::debug!(service = %action.service, command = %action.kind,
            command_id = %sent.message.message_id, "command sent; waiting for its reply");
        Ok(Handled::Send(sent.outgoing))
    }

    /// A new reply (copies of an applied one were caught before): applied to its step
    /// exactly once, or recorded as late or unknown.
    pub(super) async fn handle_reply(
        &self,
        job: &Job,
        reply: &Reply,
        step: &StepDef,
    ) -> Result<Handled, EngineError> {
        let (instance_id, cursor) = target_of(&job.envelope);
        let mut tx = self.store.begin().await?;
        let (locked, state) = commands::lock(tx.conn(), reply.in_reply_to, instance_id).await?;
        let pending = locked.as_ref().map(|l| &l.pending);
        let (locked, result) = match (command::on_reply(reply, pending, state), locked) {
            (OnReply::Apply(result), Some(locked)) => (locked, result),
            (OnReply::Apply(_), None) | (OnReply::Record(LateReason::Unknown), _) => {
                tx.rollback().await?;
                return self
                    .unapplied_reply(reply, instance_id, LateReason::Unknown)
                    .await;
            }
            (OnReply::Record(reason), _) => {
                tx.rollback().await?;
                return self.unapplied_reply(reply, instance_id, reason).await;
            }
        };
        let (status, error, outputs) = match &result {
            StepResult::Succeeded(outputs) => (CommandStatus::Succeeded, None, outputs.as_ref()),
            StepResult::Failed { message, .. } => {
                (CommandStatus::Failed, Some(message.as_str()), None)
            }
        };
        commands::apply_reply(tx.conn(), reply, status, error, outputs).await?;
        let at = attempt_in(job, &locked, instance_id, cursor);
        tracing::info!(service = %reply.service, command_id = %reply.in_reply_to,
            status = status.as_str(), "reply applied");
        let labels = CommandLabels {
            saga: locked.context.saga.clone(),
            step: step.name.clone(),
            service: locked.service.clone(),
            r#type: locked.message.kind.clone(),
        };
        let first_sent = locked.message.dispatched_at;
        let plan = decide::decide(&at, result, Utc::now(), fastrand::f64());
        let handled = self
            .finish(tx, job, &at, step, plan, Utc::now(), None)
            .await?;
        let m = &self.stats.metrics;
        m.command_finished(&labels, status.as_str());
        let latency = first_sent.map_or(Default::default(), |t| {
            (Utc::now() - t).to_std().unwrap_or_default()
        });
        m.reply_applied(&labels, latency);
        Ok(handled)
    }

    /// Records a reply that is not applied — a copy of one applied (a `duplicate`,
    /// whose first handling's messages are re-sent), one `late` for its instance, or one
    /// for a command skald never sent (`unknown`) — in `skald.replies`, and its id in
    /// the inbox so later copies are recognised.
    async fn unapplied_reply(
        &self,
        reply: &Reply,
        instance_id: Uuid,
        reason: LateReason,
    ) -> Result<Handled, EngineError> {
        if self.store.disposal(reply.message_id, instance_id).await? == Disposal::Seen {
            return self.duplicate_reply(reply).await;
        }
        let disposition = match reason {
            LateReason::Unknown => ReplyDisposition::Unknown,
            LateReason::AlreadyAnswered | LateReason::NotCurrent => ReplyDisposition::Late,
        };
        let mut tx = self.store.begin().await?;
        commands::record_reply(tx.conn(), reply, disposition).await?;
        tx.record_skipped(reply.message_id, instance_id, false)
            .await?;
        tx.commit().await?;
        self.stats.skipped.fetch_add(1, Ordering::Relaxed);
        self.stats.metrics.reply(disposition.as_str());
        tracing::info!(service = %reply.service, command_id = %reply.in_reply_to, ?reason,
            disposition = disposition.as_str(), "reply recorded, not applied");
        Ok(Handled::Send(Vec::new()))
    }

    /// A copy of a reply handled before: recorded as `duplicate`; what its first
    /// handling sent is sent again.
    pub(super) async fn duplicate_reply(&self, reply: &Reply) -> Result<Handled, EngineError> {
        // Inside a batch, a step holds at most one connection besides the batch's (see
        // `Batcher::running`): this one goes back before `resend_copy` takes another.
        {
            let mut conn = self
                .store
                .pool()
                .acquire()
                .await
                .map_err(crate::store::StoreError::from)?;
            commands::record_reply(&mut conn, reply, ReplyDisposition::Duplicate).await?;
        }
        self.stats
            .metrics
            .reply(ReplyDisposition::Duplicate.as_str());
        self.resend_copy(reply.message_id).await
    }

    /// A reply timer: re-sends the same command and re-arms the timer, times the step
    /// out, or is recorded as skipped (see [`command::on_timer`]).
    pub(super) async fn handle_timer(
        &self,
        job: &Job,
        instance_id: Uuid,
        cursor: Cursor,
        send: u32,
        step: &StepDef,
        action: &CommandAction,
    ) -> Result<Handled, EngineError> {
        let env = &job.envelope;
        let id = command::command_id(instance_id, cursor);
        let mut tx = self.store.begin().await?;
        let (locked, state) = commands::lock(tx.conn(), id, instance_id).await?;
        let pending = locked.as_ref().map(|l| &l.pending);
        let decision = command::on_timer(step, action, cursor, send, pending, state);
        let (locked, state) = match (decision, locked, state) {
            (OnTimer::Skip(reason), _, _) => {
                tx.record_skipped(env.message_id, instance_id, false)
                    .await?;
                tx.commit().await?;
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?reason, send, "reply timer skipped");
                return Ok(Handled::Send(Vec::new()));
            }
            (OnTimer::TimedOut(result), Some(locked), _) => {
                if let StepResult::Failed { message, .. } = &result {
                    commands::finish(tx.conn(), id, CommandStatus::TimedOut, Some(message), None)
                        .await?;
                }
                let at = attempt_in(job, &locked, instance_id, cursor);
                let plan = decide::decide(&at, result, Utc::now(), fastrand::f64());
                let handled = self
                    .finish(tx, job, &at, step, plan, Utc::now(), None)
                    .await?;
                self.stats.metrics.command_finished(
                    &command_labels(&locked.context.saga, step, action),
                    CommandStatus::TimedOut.as_str(),
                );
                return Ok(handled);
            }
            (OnTimer::Resend { send, note }, Some(locked), Some(state)) => {
                ((locked, send, note), state)
            }
            // on_timer decides from a command and a state it was given.
            (_, _, _) => return Err(EngineError::Raced(instance_id)),
        };
        let (locked, next, note) = locked;
        let context = &locked.context;
        let outgoing = vec![
            Outgoing::to_service(&locked.service, locked.message.clone(), context.clone()),
            command::timer(context, action, next),
        ];
        let record = StepRecord {
            message_id: env.message_id,
            instance_id,
            aggregate_id: &job.aggregate_id,
            payload: &context.payload,
            ran: cursor,
            step_name: &step.name,
            outcome: InboxOutcome::Sent,
            error: Some(&note),
            started_at: Utc::now(),
            new_state: state,
            outputs: &context.outputs,
            outgoing: &outgoing,
        };
        if !tx.record_run(&record, cursor).await? {
            tx.rollback().await?;
            return self.dispose(job, instance_id, cursor).await;
        }
        commands::resent(tx.conn(), id, next).await?;
        self.commit(tx, &step.name, cursor.phase).await?;
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.stats
            .metrics
            .command_sent(&command_labels(&context.saga, step, action));
        tracing::info!(service = %action.service, command = %action.kind, send = next, "{note}");
        Ok(Handled::Send(outgoing))
    }
}

/// The metric labels of the command `action` of `step` of `saga` (bounded: all
/// three come from the loaded definitions).
fn command_labels(saga: &str, step: &StepDef, action: &CommandAction) -> CommandLabels {
    CommandLabels {
        saga: saga.to_string(),
        step: step.name.clone(),
        service: action.service.clone(),
        r#type: action.kind.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::is_reply_shaped;

    #[test]
    fn only_a_top_level_in_reply_to_makes_a_reply() {
        assert!(is_reply_shaped(br#"{"in_reply_to": 1, "x": 2}"#));
        assert!(!is_reply_shaped(
            br#"{"saga": "s", "payload": {"in_reply_to": "x"}}"#
        ));
        assert!(!is_reply_shaped(b"not json \"in_reply_to\""));
    }
}
