//! Faults injected on purpose in a participant service, for crash tests:
//! `SKALD_PARTICIPANT_CRASH_AT=<point>[:<type>]` aborts the process (as `kill -9`
//! would) the first time a message (of that type, if given) reaches the point.

/// A point in the handling of one message at a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The message's transaction committed; its reply is not sent yet.
    AfterCommit,
    /// Its reply was sent (confirmed); the delivery is not acked yet.
    AfterReply,
}

impl CrashPoint {
    /// The spelling in `SKALD_PARTICIPANT_CRASH_AT`.
    pub fn as_str(self) -> &'static str {
        match self {
            CrashPoint::AfterCommit => "after_commit",
            CrashPoint::AfterReply => "after_reply",
        }
    }
}

/// The faults a participant runs with: none, or an abort at one point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParticipantFaults {
    abort: Option<(CrashPoint, Option<String>)>,
}

/// The variable naming the crash point.
pub const CRASH_AT_VAR: &str = "SKALD_PARTICIPANT_CRASH_AT";

impl ParticipantFaults {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads `SKALD_PARTICIPANT_CRASH_AT` (`after_commit` or `after_reply`, optionally
    /// `:<message type>`); unset means none.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(CRASH_AT_VAR) {
            Ok(spec) => Self::parse(&spec),
            Err(_) => Ok(Self::none()),
        }
    }

    /// Reads a crash spec, `<point>[:<type>]`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (point, kind) = match spec.split_once(':') {
            Some((p, k)) => (p, Some(k.to_string())),
            None => (spec, None),
        };
        let point = match point {
            "after_commit" => CrashPoint::AfterCommit,
            "after_reply" => CrashPoint::AfterReply,
            other => {
                return Err(format!(
                    "{CRASH_AT_VAR}: unknown point {other:?} (after_commit or after_reply)"
                ));
            }
        };
        Ok(ParticipantFaults {
            abort: Some((point, kind)),
        })
    }

    /// Aborts the process if a message of type `kind` reaching `point` is the fault.
    pub fn at(&self, point: CrashPoint, kind: &str) {
        if let Some((p, k)) = &self.abort
            && *p == point
            && k.as_deref().is_none_or(|k| k == kind)
        {
            tracing::error!(
                point = point.as_str(),
                kind,
                "{CRASH_AT_VAR}: aborting the process"
            );
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_spec_names_a_point_and_optionally_a_type() {
        assert_eq!(
            ParticipantFaults::parse("after_commit").unwrap().abort,
            Some((CrashPoint::AfterCommit, None))
        );
        assert_eq!(
            ParticipantFaults::parse("after_reply:reserve_stock")
                .unwrap()
                .abort,
            Some((CrashPoint::AfterReply, Some("reserve_stock".into())))
        );
        assert!(
            ParticipantFaults::parse("before_lunch")
                .unwrap_err()
                .contains("unknown point")
        );
        // Another point or type passes.
        ParticipantFaults::parse("after_commit:x")
            .unwrap()
            .at(CrashPoint::AfterCommit, "y");
        ParticipantFaults::parse("after_commit")
            .unwrap()
            .at(CrashPoint::AfterReply, "y");
    }
}
