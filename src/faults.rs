//! Faults injected on purpose: the engine asks at each point of a message's handling
//! whether something should go wrong there.
//!
//! Two users: the crash tests (`SKALD_CRASH_AT`, which aborts the process as `kill -9`
//! would) and `skald explore`, which drives a saga through every point with a
//! [`FaultPlan`] of its own and simulates the crash without ending the process.

use std::fmt;
use std::sync::Arc;

use crate::saga::coordinator::{FailureKind, Phase};

/// A point in the handling of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Before the step's effect runs (where a failure can be injected).
    BeforeEffect,
    /// After the step's record, before its transaction commits — in a batch, before
    /// the batch's commit, with the batch-mates run so far uncommitted too.
    BeforeCommit,
    /// After the step's transaction committed (in a batch: the whole batch), before
    /// publishing what follows.
    AfterCommit,
    /// After publishing what follows, before acking the delivery.
    AfterPublish,
}

impl FaultPoint {
    /// The spelling of `SKALD_CRASH_AT` and of `skald explore`'s report.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultPoint::BeforeEffect => "before_effect",
            FaultPoint::BeforeCommit => "before_commit",
            FaultPoint::AfterCommit => "after_commit",
            FaultPoint::AfterPublish => "after_publish",
        }
    }
}

/// What happens at a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Nothing: carry on.
    Nothing,
    /// The process dies here: nothing more of this message happens, its delivery stays
    /// unacked (and an open transaction rolls back).
    Crash,
    /// The step's effect fails this way instead of running (only at
    /// [`FaultPoint::BeforeEffect`]).
    Fail(FailureKind),
}

/// Decides, at each point, what to inject.
pub trait FaultPlan: Send + Sync {
    /// What happens when step `step` (in `phase`) reaches `point`.
    fn at(&self, point: FaultPoint, step: &str, phase: Phase) -> Injected;
}

/// The faults an engine runs with.
#[derive(Clone, Default)]
pub struct Faults {
    mode: Mode,
}

#[derive(Clone, Default)]
enum Mode {
    #[default]
    None,
    /// `SKALD_CRASH_AT`: abort the process the first time `step` reaches `point`.
    Abort(FaultPoint, String),
    /// `skald explore`: whatever the plan says.
    Plan(Arc<dyn FaultPlan>),
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mode {
            Mode::None => f.write_str("Faults::none"),
            Mode::Abort(point, step) => write!(f, "Faults::abort({}:{step})", point.as_str()),
            Mode::Plan(_) => f.write_str("Faults::plan"),
        }
    }
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Faults::default()
    }

    /// Faults decided by `plan`; a crash ends the message's handling, not the process.
    pub fn plan(plan: Arc<dyn FaultPlan>) -> Self {
        Faults {
            mode: Mode::Plan(plan),
        }
    }

    /// Reads `SKALD_CRASH_AT=<point>:<step>`, `<point>` being `before_commit`,
    /// `after_commit` or `after_publish`.
    pub fn from_env() -> Result<Self, String> {
        let Ok(spec) = std::env::var("SKALD_CRASH_AT") else {
            return Ok(Faults::none());
        };
        let (point, step) = spec
            .split_once(':')
            .ok_or_else(|| format!("SKALD_CRASH_AT={spec:?}: expected <point>:<step>"))?;
        let point = match point {
            "before_commit" => FaultPoint::BeforeCommit,
            "after_commit" => FaultPoint::AfterCommit,
            "after_publish" => FaultPoint::AfterPublish,
            other => return Err(format!("SKALD_CRASH_AT: unknown point {other:?}")),
        };
        Ok(Faults {
            mode: Mode::Abort(point, step.to_string()),
        })
    }

    /// What happens when `step` (in `phase`) reaches `point`. An abort ends the process
    /// here and does not return.
    pub fn at(&self, point: FaultPoint, step: &str, phase: Phase) -> Injected {
        match &self.mode {
            Mode::None => Injected::Nothing,
            Mode::Abort(p, s) if *p == point && s == step => {
                tracing::error!(
                    point = point.as_str(),
                    step,
                    "SKALD_CRASH_AT: aborting the process"
                );
                std::process::abort();
            }
            Mode::Abort(..) => Injected::Nothing,
            Mode::Plan(plan) => plan.at(point, step, phase),
        }
    }
}
