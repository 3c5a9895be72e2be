//! The validated saga model: what the engine runs.
//!
//! Values of these types only come out of [`crate::saga::load`], which checks every
//! structural rule (roles, unique names, parameter references) first. The engine can
//! therefore index steps and resolve references without re-checking them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// The limits of a saga file's values, each checked by [`crate::saga::load`] with an error
/// naming the file, line and field (README, *Saga files*, lists them).
pub mod limits {
    /// Saga and step names: at most this many characters (PostgreSQL's identifier length).
    pub const MAX_NAME_CHARS: usize = 63;
    /// The largest `version`: it is stored in a PostgreSQL `integer` column.
    pub const MAX_VERSION: u64 = i32::MAX as u64;
    /// The largest `max_attempts`: attempt numbers are stored as PostgreSQL `integer`s.
    pub const MAX_ATTEMPTS: u64 = i32::MAX as u64;
    /// The largest `initial_delay_ms` and `max_delay_ms` (1 hour): the longest delay the
    /// transport holds a retry for without sending it early (its longest delay tier).
    pub const MAX_RETRY_DELAY_MS: u64 = 3_600_000;
    /// The largest step `timeout_ms`: PostgreSQL's `statement_timeout` is an `int` of
    /// milliseconds (about 24.8 days).
    pub const MAX_STEP_TIMEOUT_MS: u64 = i32::MAX as u64;
    /// The largest saga `timeout_ms` (365 days).
    pub const MAX_SAGA_TIMEOUT_MS: u64 = 365 * 24 * 3_600_000;
    /// The largest `ordering_max_wait_ms` (10 minutes): a held start's delivery stays
    /// unacked while it waits, and RabbitMQ closes the channel of a delivery left unacked
    /// longer than its `consumer_timeout` (30 minutes by default).
    pub const MAX_ORDERING_WAIT_MS: u64 = 600_000;
    /// The largest command `timeout_ms` (1 hour): the reply timer is a delayed message,
    /// and the transport's longest delay tier holds one for at most an hour.
    pub const MAX_COMMAND_TIMEOUT_MS: u64 = 3_600_000;
    /// A command's reply timeout when `timeout_ms` is not given (30 seconds).
    pub const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 30_000;
    /// Service names: at most this many characters (`[a-z][a-z0-9_-]*`).
    pub const MAX_SERVICE_CHARS: usize = 63;
}

/// One saga: an ordered list of steps run one after another for one aggregate.
#[derive(Debug, Clone, Serialize)]
pub struct SagaDef {
    /// Unique among the loaded sagas; the `saga` field of a start message names it.
    pub name: String,
    /// Bumped by the author when the steps change; recorded on every instance.
    pub version: u32,
    /// The line of `version:` in `source` (1-based; 0 when unknown), to point at it.
    #[serde(skip)]
    pub version_line: u32,
    /// Where the aggregate id is found in a start message's payload when the envelope
    /// does not carry `aggregate_id` itself.
    pub aggregate: ValueRef,
    /// Idempotent SQL run once at start-up before consuming (samples and self-owned
    /// tables); `None` for sagas whose tables belong to someone else.
    pub setup_sql: Option<String>,
    /// Where `setup_sql` is in `source`, to point at a failing statement.
    #[serde(skip)]
    pub setup_at: crate::saga::setup::SetupLocation,
    /// In execution order; never empty.
    pub steps: Vec<StepDef>,
    /// An instance still running this long after it started stops going forward and
    /// compensates (checked whenever it takes its next step); `None`: no limit.
    #[serde(with = "opt_millis")]
    pub timeout: Option<Duration>,
    /// What happens to a start message older than what its aggregate already applied.
    pub ordering: OrderingPolicy,
    /// Whether instances of this saga on one aggregate may interleave their steps.
    pub isolation: Isolation,
    /// The file the saga was loaded from, for error messages and the dashboard.
    pub source: PathBuf,
}

impl SagaDef {
    /// The definition's identity by content: SHA-256, as 64 lowercase hex digits, of
    /// its serde JSON without `source` and `setup_sql`. So the same steps, policies and
    /// references give the same hash whatever the file's name, comments, key order or
    /// YAML style, and whatever its start-up SQL (which no instance runs); any change
    /// to what an instance runs (SQL text, parameters, roles, compensations, retry
    /// policies, timeouts, ordering, isolation, version) changes it.
    pub fn content_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        // serde_json's map is sorted by key (no `preserve_order`), so the text is
        // canonical for a given definition.
        let digest = Sha256::digest(self.normalised().to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The definition as [`SagaDef::content_hash`] hashes it: its serde JSON without
    /// `source` and `setup_sql`. Stored per hash, for `skald diff`.
    pub fn normalised(&self) -> serde_json::Value {
        let mut json = serde_json::to_value(self).expect("a saga definition serialises");
        if let Some(fields) = json.as_object_mut() {
            fields.remove("source");
            fields.remove("setup_sql");
        }
        json
    }

    /// The index of the step called `name`, if there is one.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

/// One step of a saga.
#[derive(Debug, Clone, Serialize)]
pub struct StepDef {
    /// Unique inside its saga; earlier-output references use it.
    pub name: String,
    /// Where the step stands relative to the point of no return.
    pub role: StepRole,
    /// The forward effect.
    pub action: Action,
    /// The semantic undo; present exactly when `role` is [`StepRole::Compensatable`]
    /// (a [`StepRole::Check`] changes nothing, so it has nothing to undo).
    pub compensation: Option<Action>,
    /// How failed attempts of this step (and of its compensation) are retried.
    pub retry: RetryPolicy,
    /// One attempt running longer than this fails (retryably); `None`: no limit.
    #[serde(with = "opt_millis")]
    pub timeout: Option<Duration>,
}

/// Per-aggregate ordering of start messages, by their `sequence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum OrderingPolicy {
    /// A start whose sequence is not above the aggregate's watermark is stale: it is
    /// recorded and dropped, never applied over newer data.
    LatestWins,
    /// Starts are applied in sequence order without gaps: a start that arrives early
    /// is held until the missing ones arrive, for at most `max_wait`; then the gap is
    /// skipped (and recorded) and the held start applied.
    Strict {
        /// The longest a start waits for a missing predecessor.
        #[serde(with = "millis")]
        max_wait: Duration,
    },
}

/// How instances of one saga on the same aggregate relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Their steps interleave (each step still runs alone).
    Interleave,
    /// One at a time: a later start waits, in order, until the running instance of
    /// the aggregate is terminal (a semantic lock).
    Exclusive,
}

/// The role a step plays in the saga (Garcia-Molina & Salem's classification).
///
/// Validation guarantees: every step before the pivot is compensatable or a check, every
/// step after it is retriable, and there is at most one pivot. Without a pivot a saga may
/// be compensatable steps and checks followed by retriable ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepRole {
    /// Has a compensation that semantically undoes it.
    Compensatable,
    /// The point of no return: once it commits, the saga can only go forward.
    Pivot,
    /// After the pivot: must eventually succeed, so it is retried without a cap.
    Retriable,
    /// A read-only check that stands where a compensatable step may (e.g. "the consumer
    /// exists", with `expect_rows`): it changes nothing, so it has no compensation and
    /// compensating in reverse passes over it (no message, no transaction).
    Check,
}

/// What a step (or its compensation) does.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Parameterised SQL run inside the step's own PostgreSQL transaction.
    Sql(SqlAction),
    /// A Rust handler registered by name by the library user.
    Handler(HandlerAction),
    /// A command sent to a participant service; the step ends with its reply.
    Command(CommandAction),
}

/// A command step: a message to another service, answered by a reply to skald's intake.
#[derive(Debug, Clone, Serialize)]
pub struct CommandAction {
    /// The participant service that runs it (`[a-z][a-z0-9_-]*`, 1 to
    /// [`limits::MAX_SERVICE_CHARS`]).
    pub service: String,
    /// The command type: which of the service's handlers runs it.
    #[serde(rename = "type")]
    pub kind: String,
    /// Named parameters, resolved and sent as the command's `payload`, in YAML order.
    pub params: Vec<(String, ValueRef)>,
    /// The reply's output fields later steps may reference as `steps.<step>.<field>`.
    pub returning: Vec<String>,
    /// How long skald waits for the reply before re-sending the same command (each
    /// send counts as an attempt of the step's retry policy).
    #[serde(with = "millis")]
    pub timeout: Duration,
}

/// A SQL statement whose parameters are bound, never pasted into the text.
#[derive(Debug, Clone, Serialize)]
pub struct SqlAction {
    /// The statement as written in YAML, with `:name` parameters.
    pub sql: String,
    /// The same statement with `:name` replaced by `$1..$n`, ready to prepare.
    pub statement: String,
    /// What to bind to `$1..$n`, in order (`params[0]` is `$1`).
    pub params: Vec<ValueRef>,
    /// The parameters' names in the saga file, in the same order (`param_names[0]` is
    /// `$1`), for error messages.
    pub param_names: Vec<String>,
    /// When set, a different number of affected rows is a fatal (business) failure.
    pub expect_rows: Option<u64>,
    /// Columns of the statement's `RETURNING` clause captured (from the first row) as
    /// the step's output, visible to later steps as `steps.<step>.<column>`.
    pub returning: Vec<String>,
    /// SQLSTATE codes (or two-character classes such as `23`) that mean the step can
    /// never succeed, so it is not retried.
    pub fatal_sqlstates: Vec<String>,
}

/// A call to a registered Rust handler.
#[derive(Debug, Clone, Serialize)]
pub struct HandlerAction {
    /// The name the handler was registered under.
    pub name: String,
    /// Named arguments, resolved and handed to the handler as a JSON object.
    pub params: Vec<(String, ValueRef)>,
    /// Error codes that make a handler's retryable error fatal: a
    /// `HandlerError::Retryable("card_declined: …")` is not retried when
    /// `card_declined` is listed.
    pub fatal_errors: Vec<String>,
}

/// A reference to a value known when a step runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum ValueRef {
    /// `payload.a.b`: a field of the start message's payload.
    Payload {
        /// The object keys from the payload's root, in order.
        path: Vec<String>,
    },
    /// `steps.<step>.<column>`: a column captured by an earlier step's `returning`.
    StepOutput {
        /// The step that captured it.
        step: String,
        /// The captured column.
        column: String,
    },
    /// `saga.instance_id`: the instance's UUID (stable across redeliveries).
    InstanceId,
    /// `saga.aggregate_id`: the aggregate the instance belongs to.
    AggregateId,
}

/// How a failed attempt is retried: delays grow from `initial_delay` up to `max_delay`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; `1` means no retry. Ignored (unbounded) for
    /// retriable steps.
    pub max_attempts: u32,
    /// How the delay grows between attempts.
    pub backoff: Backoff,
    /// The delay before the first retry.
    #[serde(with = "millis")]
    pub initial_delay: Duration,
    /// No delay is longer than this.
    #[serde(with = "millis")]
    pub max_delay: Duration,
    /// Spread each delay randomly over [delay/2, delay] so retries do not synchronise.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::Exponential,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
            jitter: true,
        }
    }
}

/// The shape of the delay curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// Every retry waits `initial_delay`.
    Fixed,
    /// Retry `n` waits `initial_delay * 2^(n-1)`.
    Exponential,
}

mod opt_millis {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }
}

mod millis {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::saga::load_str;

    const SAGA: &str = "name: s\nversion: 1\naggregate: payload.id\n\
                        setup: CREATE SCHEMA IF NOT EXISTS s\nsteps:\n\
                        - name: a\n  role: compensatable\n\
                        \x20 action: { sql: 'UPDATE t SET n = n - 1 WHERE id = :id', params: { id: payload.id } }\n\
                        \x20 compensation: { sql: 'UPDATE t SET n = n + 1 WHERE id = :id', params: { id: payload.id } }\n\
                        - name: b\n  role: pivot\n  action: { handler: h }\n";

    fn hash_of(src: &str, file: &str) -> String {
        load_str(src, Path::new(file))
            .expect("valid saga")
            .content_hash()
    }

    #[test]
    fn the_hash_is_64_hex_digits_and_stable() {
        let h = hash_of(SAGA, "s.yaml");
        assert_eq!(h.len(), 64);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(h, hash_of(SAGA, "s.yaml"));
    }

    #[test]
    fn the_file_name_comments_style_and_setup_do_not_count() {
        let h = hash_of(SAGA, "s.yaml");
        assert_eq!(h, hash_of(SAGA, "elsewhere/s.v1.yml"));
        let restyled = format!(
            "# a comment\n{}",
            SAGA.replace("version: 1\n", "version:   1   # v1\n")
        );
        assert_eq!(h, hash_of(&restyled, "s.yaml"));
        let other_setup = SAGA.replace("CREATE SCHEMA IF NOT EXISTS s", "SELECT 1");
        assert_eq!(h, hash_of(&other_setup, "s.yaml"));
    }

    #[test]
    fn any_change_to_what_an_instance_runs_changes_the_hash() {
        let h = hash_of(SAGA, "s.yaml");
        let changes = [
            ("version: 1", "version: 2"),
            ("n = n - 1", "n = n - 2"),
            ("n = n + 1", "n = n + 2"),
            ("handler: h", "handler: g"),
            ("role: pivot", "role: retriable"),
            (
                "params: { id: payload.id } }\n  compensation",
                "params: { id: payload.other } }\n  compensation",
            ),
            ("steps:\n", "retry: { max_attempts: 7 }\nsteps:\n"),
        ];
        for (from, to) in changes {
            let changed = SAGA.replace(from, to);
            assert_ne!(changed, SAGA, "{from} is in the saga");
            assert_ne!(h, hash_of(&changed, "s.yaml"), "{from} → {to}");
        }
    }
}
