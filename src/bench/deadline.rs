//! The overall deadline of one `skald bench` run (`--timeout`): every phase that
//! waits (start-up, the baseline, publishing, consuming until every saga is
//! terminal) stops at it, and the run ends with [`TimedOut`], which says what
//! finished and where it stood, instead of waiting forever.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The deadline of one run, and what finished before it.
#[derive(Debug)]
pub struct Deadline {
    at: Instant,
    limit: Duration,
    finished: Mutex<Vec<String>>,
}

/// A run that did not finish within `--timeout`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "bench timed out after {} s (--timeout {}): finished: {}; unfinished: {}",
    .limit.as_secs(), .limit.as_secs(), finished_text(.finished), .unfinished
)]
pub struct TimedOut {
    /// The `--timeout`.
    pub limit: Duration,
    /// The phases that finished, with what they measured, in order.
    pub finished: Vec<String>,
    /// The phase the deadline stopped, with how far it got.
    pub unfinished: String,
}

fn finished_text(finished: &[String]) -> String {
    if finished.is_empty() {
        "nothing".to_string()
    } else {
        finished.join("; ")
    }
}

impl Deadline {
    /// A deadline `limit` from now.
    pub fn after(limit: Duration) -> Self {
        Deadline {
            at: Instant::now() + limit,
            limit,
            finished: Mutex::new(Vec::new()),
        }
    }

    /// The instant it falls at.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Whether it has passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// Notes that a phase finished, with what it measured (said on a time-out).
    pub fn finished(&self, what: impl Into<String>) {
        self.finished
            .lock()
            .expect("deadline lock")
            .push(what.into());
    }

    /// The time-out of the phase `unfinished` (with how far it got).
    pub fn timed_out(&self, unfinished: impl Into<String>) -> TimedOut {
        TimedOut {
            limit: self.limit,
            finished: self.finished.lock().expect("deadline lock").clone(),
            unfinished: unfinished.into(),
        }
    }

    /// Runs `phase` (named `what`) until the deadline: its result, or [`TimedOut`]
    /// naming it.
    pub async fn within<T>(
        &self,
        what: &str,
        phase: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout_at(self.at, phase).await {
            Ok(result) => result,
            Err(_) => Err(self.timed_out(what).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_says_what_finished_and_where_the_run_stood() {
        let deadline = Deadline::after(Duration::from_secs(60));
        assert_eq!(
            deadline.timed_out("starting skald").to_string(),
            "bench timed out after 60 s (--timeout 60): finished: nothing; unfinished: starting skald"
        );
        deadline.finished("baseline 2896.2 msgs/s over 6000 messages");
        deadline.finished("SQL steps: 2000 of 2000 sagas completed in 3.9 s");
        assert_eq!(
            deadline
                .timed_out("command steps: 12 of 2000 sagas terminal (12 completed)")
                .to_string(),
            "bench timed out after 60 s (--timeout 60): finished: baseline 2896.2 msgs/s over \
             6000 messages; SQL steps: 2000 of 2000 sagas completed in 3.9 s; unfinished: \
             command steps: 12 of 2000 sagas terminal (12 completed)"
        );
    }

    #[tokio::test]
    async fn a_phase_past_the_deadline_is_stopped_and_named() {
        let deadline = Deadline::after(Duration::from_millis(50));
        let quick = deadline.within("quick", async { Ok(7) }).await.unwrap();
        assert_eq!(quick, 7);
        let err = deadline
            .within(
                "waiting forever",
                std::future::pending::<anyhow::Result<()>>(),
            )
            .await
            .unwrap_err();
        let timed_out = err.downcast::<TimedOut>().expect("a TimedOut");
        assert_eq!(timed_out.unfinished, "waiting forever");
        assert!(deadline.passed());
    }
}
