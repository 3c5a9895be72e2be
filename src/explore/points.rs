//! Which faults `skald explore` injects, where, and how the saga must end after each.

use std::fmt;

use crate::faults::FaultPoint;
use crate::saga::coordinator::{FailureKind, InstanceStatus, Phase};
use crate::saga::{Action, SagaDef, StepRole};

/// One fault, injected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The process dies at this point of the step's handling.
    Crash(FaultPoint),
    /// The broker's confirm of what the step publishes is lost (it did go out).
    LostConfirm,
    /// The step's message is delivered twice.
    Duplicate,
    /// After the step's message, the message before it comes again (an older message
    /// of the same aggregate arriving after a newer one).
    Overtaken,
    /// The step's effect fails this way.
    Fail(FailureKind),
    /// A command step: the process dies at this point of handling the service's reply
    /// (the second message of the step to reach it; the first sent the command).
    ReplyCrash(FaultPoint),
    /// A command step: the service's reply is delivered twice.
    ReplyDuplicated,
    /// A command step: the service answers none of the sends in time (the step times
    /// out, as a failure for good); its replies arrive late, after everything else.
    NoReply,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Crash(p) => write!(f, "crash {}", p.as_str().replace('_', " ")),
            Fault::LostConfirm => f.write_str("publish confirm lost"),
            Fault::Duplicate => f.write_str("delivery duplicated"),
            Fault::Overtaken => f.write_str("older message after it"),
            Fault::Fail(FailureKind::Retryable) => f.write_str("retryable failure"),
            Fault::Fail(FailureKind::Fatal) => f.write_str("fatal failure"),
            Fault::ReplyCrash(p) => write!(f, "reply: crash {}", p.as_str().replace('_', " ")),
            Fault::ReplyDuplicated => f.write_str("reply delivered twice"),
            Fault::NoReply => f.write_str("no reply in time, late reply"),
        }
    }
}

/// Where a fault is injected: at one step, in one phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// The step's index.
    pub step: usize,
    /// Its action or its compensation.
    pub phase: Phase,
    /// What goes wrong.
    pub fault: Fault,
}

impl Point {
    /// For a compensation point, the forward step whose fatal failure makes the
    /// instance compensate (the step right after this one).
    pub fn trigger(&self) -> Option<usize> {
        (self.phase == Phase::Compensate).then_some(self.step + 1)
    }
}

/// Every fault at every step's action, and at every compensation (reached by a fatal
/// failure of the step after it).
pub fn all(saga: &SagaDef) -> Vec<Point> {
    let faults = [
        Fault::Crash(FaultPoint::BeforeCommit),
        Fault::Crash(FaultPoint::AfterCommit),
        Fault::Crash(FaultPoint::AfterPublish),
        Fault::LostConfirm,
        Fault::Duplicate,
        Fault::Overtaken,
        Fault::Fail(FailureKind::Retryable),
        Fault::Fail(FailureKind::Fatal),
    ];
    let reply_faults = [
        Fault::ReplyCrash(FaultPoint::BeforeCommit),
        Fault::ReplyCrash(FaultPoint::AfterCommit),
        Fault::ReplyCrash(FaultPoint::AfterPublish),
        Fault::ReplyDuplicated,
        Fault::NoReply,
    ];
    let is_command = |a: Option<&Action>| matches!(a, Some(Action::Command(_)));
    let mut points = Vec::new();
    for (step, def) in saga.steps.iter().enumerate() {
        let mut at = |phase, command: bool, endless: bool| {
            let extra = if command { &reply_faults[..] } else { &[] };
            for &fault in faults.iter().chain(extra) {
                // A retriable step re-sends without end: it never times out.
                if !(endless && fault == Fault::NoReply) {
                    points.push(Point { step, phase, fault });
                }
            }
        };
        at(
            Phase::Forward,
            is_command(Some(&def.action)),
            def.role == StepRole::Retriable,
        );
        if def.compensation.is_some() && step + 1 < saga.steps.len() {
            at(
                Phase::Compensate,
                is_command(def.compensation.as_ref()),
                false,
            );
        }
    }
    points
}

/// How the instance must end after `point`: like the legacy transaction committing
/// (`Completed`), rolling back (`Compensated`), or parked for a person (`Failed`: a
/// compensation, or a step after the pivot, that fails for good).
pub fn expected(saga: &SagaDef, point: &Point) -> InstanceStatus {
    let step = &saga.steps[point.step];
    // A retryable failure with no attempt left is a failure for good.
    let fatal = point.fault == Fault::Fail(FailureKind::Fatal)
        || point.fault == Fault::NoReply
        || (point.fault == Fault::Fail(FailureKind::Retryable)
            && step.retry.max_attempts <= 1
            && !(point.phase == Phase::Forward && step.role == StepRole::Retriable));
    match point.phase {
        Phase::Compensate if fatal => InstanceStatus::Failed,
        Phase::Compensate => InstanceStatus::Compensated,
        Phase::Forward if !fatal => InstanceStatus::Completed,
        Phase::Forward if step.role == StepRole::Retriable => InstanceStatus::Failed,
        Phase::Forward => InstanceStatus::Compensated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::load_str;

    fn sample() -> SagaDef {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sagas/order_checkout.yaml"),
        )
        .unwrap();
        load_str(&text, std::path::Path::new("order_checkout.yaml")).unwrap()
    }

    #[test]
    fn every_fault_at_every_action_and_reachable_compensation() {
        let saga = sample();
        let points = all(&saga);
        // 3 actions and 2 compensations (the pivot has none), 8 faults each.
        assert_eq!(points.len(), 5 * 8);
        assert!(
            points
                .iter()
                .all(|p| p.phase == Phase::Forward || p.step < 2)
        );
        let comp = points
            .iter()
            .find(|p| p.phase == Phase::Compensate)
            .unwrap();
        assert_eq!(comp.trigger(), Some(comp.step + 1));
    }

    #[test]
    fn the_expected_end_follows_the_fault() {
        let saga = sample();
        let at = |step, phase, fault| expected(&saga, &Point { step, phase, fault });
        let fatal = Fault::Fail(FailureKind::Fatal);
        assert_eq!(
            at(0, Phase::Forward, Fault::Duplicate),
            InstanceStatus::Completed
        );
        assert_eq!(at(2, Phase::Forward, fatal), InstanceStatus::Compensated);
        assert_eq!(
            at(0, Phase::Compensate, Fault::Crash(FaultPoint::AfterCommit)),
            InstanceStatus::Compensated
        );
        assert_eq!(at(1, Phase::Compensate, fatal), InstanceStatus::Failed);
        assert_eq!(
            at(1, Phase::Forward, Fault::NoReply),
            InstanceStatus::Compensated
        );
        assert_eq!(
            at(0, Phase::Compensate, Fault::NoReply),
            InstanceStatus::Failed
        );
        assert_eq!(
            at(0, Phase::Forward, Fault::ReplyDuplicated),
            InstanceStatus::Completed
        );
    }

    #[test]
    fn command_steps_add_the_reply_faults() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sagas/order_services.yaml"),
        )
        .unwrap();
        let saga = load_str(&text, std::path::Path::new("order_services.yaml")).unwrap();
        // 3 actions and 2 compensations, all commands: 8 + 5 faults each.
        assert_eq!(all(&saga).len(), 5 * 13);
        assert!(all(&saga).iter().any(|p| p.phase == Phase::Compensate
            && p.fault == Fault::ReplyCrash(FaultPoint::AfterCommit)));
    }
}
