//! The raw shape of a saga file, exactly as written in YAML.
//!
//! These types only describe the syntax: unknown fields, wrong types and bad enum values
//! are rejected by serde, while every semantic rule (names, references, roles, ranges) is
//! checked in [`super::load`], which turns them into a [`super::SagaDef`]. Values that a
//! later semantic error may point at are wrapped in [`Spanned`] to keep their position.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;

/// A whole saga file.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a saga mapping (name, version, aggregate, steps, ...)"
)]
pub(crate) struct RawSaga {
    /// `name:`: the saga's name.
    pub name: Spanned<String>,
    /// `version:`: kept signed so that `0` or `-1` get a semantic error, not a serde one.
    pub version: Spanned<i64>,
    /// `aggregate:`: a value reference into the start payload.
    pub aggregate: Spanned<String>,
    /// `setup:`: optional idempotent SQL.
    #[serde(default)]
    pub setup: Option<Spanned<String>>,
    /// `retry:`: the saga-level default policy.
    #[serde(default)]
    pub retry: Option<Spanned<RawRetry>>,
    /// `timeout_ms:`: the whole saga's time limit; signed so that `0` or `-1` get a
    /// semantic error.
    #[serde(default)]
    pub timeout_ms: Option<Spanned<i64>>,
    /// `ordering:`: the per-aggregate ordering policy of start messages.
    #[serde(default)]
    pub ordering: Option<Spanned<RawOrdering>>,
    /// `ordering_max_wait_ms:`: only with `ordering: strict`.
    #[serde(default)]
    pub ordering_max_wait_ms: Option<Spanned<i64>>,
    /// `isolation:`: whether instances on one aggregate may interleave.
    #[serde(default)]
    pub isolation: Option<Spanned<RawIsolation>>,
    /// `steps:`: in execution order.
    pub steps: Spanned<Vec<Spanned<RawStep>>>,
}

/// One entry of `steps:`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a step mapping (name, role, action, ...)"
)]
pub(crate) struct RawStep {
    /// `name:`
    pub name: Spanned<String>,
    /// `role:`
    pub role: Spanned<RawRole>,
    /// `action:`
    pub action: Spanned<RawAction>,
    /// `compensation:`
    #[serde(default)]
    pub compensation: Option<Spanned<RawAction>>,
    /// `retry:`: overrides of the saga-level policy.
    #[serde(default)]
    pub retry: Option<Spanned<RawRetry>>,
    /// `timeout_ms:`: the time limit of one attempt of the step.
    #[serde(default)]
    pub timeout_ms: Option<Spanned<i64>>,
}

/// `ordering:` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawOrdering {
    /// `latest_wins`
    LatestWins,
    /// `strict`
    Strict,
}

/// `isolation:` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawIsolation {
    /// `interleave`
    Interleave,
    /// `exclusive`
    Exclusive,
}

/// `role:` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawRole {
    /// `compensatable`
    Compensatable,
    /// `pivot`
    Pivot,
    /// `retriable`
    Retriable,
    /// `check`
    Check,
}

/// An `action:` or `compensation:` block: either `sql` or `handler` (checked later).
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an action mapping (sql or handler, params, ...)"
)]
pub(crate) struct RawAction {
    /// `sql:`: a statement with `:name` parameters.
    #[serde(default)]
    pub sql: Option<Spanned<String>>,
    /// `handler:`: the name of a registered handler.
    #[serde(default)]
    pub handler: Option<Spanned<String>>,
    /// `params:`: parameter name to value reference, in YAML order.
    #[serde(default)]
    pub params: Option<Spanned<Entries<Spanned<String>>>>,
    /// `expect_rows:`
    #[serde(default)]
    pub expect_rows: Option<Spanned<i64>>,
    /// `returning:`
    #[serde(default)]
    pub returning: Option<Spanned<Vec<Spanned<String>>>>,
    /// `fatal_sqlstates:`
    #[serde(default)]
    pub fatal_sqlstates: Option<Spanned<Vec<Spanned<String>>>>,
    /// `fatal_errors:` (handler actions only)
    #[serde(default)]
    pub fatal_errors: Option<Spanned<Vec<Spanned<String>>>>,
    /// `command:`: a command sent to a participant service.
    #[serde(default)]
    pub command: Option<Spanned<RawCommand>>,
}

/// A `command:` block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCommand {
    /// `service:`: the participant service.
    pub service: Spanned<String>,
    /// `type:`: the command type.
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    /// `params:`: parameter name to value reference, in YAML order.
    #[serde(default)]
    pub params: Option<Spanned<Entries<Spanned<String>>>>,
    /// `returning:`: the reply's output fields later steps may reference.
    #[serde(default)]
    pub returning: Option<Spanned<Vec<Spanned<String>>>>,
    /// `timeout_ms:`: how long to wait for the reply.
    #[serde(default)]
    pub timeout_ms: Option<Spanned<i64>>,
}

/// A `retry:` block; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a retry mapping (max_attempts, backoff, ...)"
)]
pub(crate) struct RawRetry {
    /// `max_attempts:`
    #[serde(default)]
    pub max_attempts: Option<Spanned<i64>>,
    /// `backoff:`
    #[serde(default)]
    pub backoff: Option<Spanned<RawBackoff>>,
    /// `initial_delay_ms:`
    #[serde(default)]
    pub initial_delay_ms: Option<Spanned<i64>>,
    /// `max_delay_ms:`
    #[serde(default)]
    pub max_delay_ms: Option<Spanned<i64>>,
    /// `jitter:`
    #[serde(default)]
    pub jitter: Option<Spanned<bool>>,
}

/// `backoff:` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawBackoff {
    /// `fixed`
    Fixed,
    /// `exponential`
    Exponential,
}

/// A mapping with string keys kept in document order, each key with its position.
/// Duplicate keys never reach it: the loader parses with `DuplicateKeyPolicy::Error`.
#[derive(Debug)]
pub(crate) struct Entries<V>(pub Vec<(Spanned<String>, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}
