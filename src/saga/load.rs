//! Loading saga files: YAML in, a validated [`SagaDef`] (or every error found) out.
//!
//! # The file format
//!
//! One saga per file, one YAML document per file:
//!
//! ```yaml
//! name: order_checkout          # required, ^[a-z][a-z0-9_]*$, at most 63 characters
//! version: 1                    # required, integer 1..=2147483647
//! aggregate: payload.order_id   # required, a `payload.*` reference: where a start
//!                               # message's payload carries the aggregate id
//! setup: |                      # optional: idempotent SQL run at start-up
//!   CREATE SCHEMA IF NOT EXISTS shop;
//! timeout_ms: 600000            # optional, 1..=31536000000 (365 days): limit of a whole instance
//! ordering: strict              # latest_wins | strict (default latest_wins)
//! ordering_max_wait_ms: 2000    # 1..=600000, only with `strict` (default 5000)
//! isolation: exclusive          # interleave | exclusive (default interleave)
//! retry:                        # optional saga-level default policy, every field optional
//!   max_attempts: 5             # 1..=2147483647 (default 3)
//!   backoff: exponential        # fixed | exponential (default exponential)
//!   initial_delay_ms: 200       # 0..=3600000 (default 200)
//!   max_delay_ms: 10000         # initial_delay_ms..=3600000 (default 30000)
//!   jitter: true                # default true
//! steps:                        # required, non-empty, run in this order
//!   - name: reserve_stock       # required, ^[a-z][a-z0-9_]*$, at most 63 characters, unique
//!     role: compensatable       # required: compensatable | pivot | retriable | check
//!     action:                   # required: exactly one of `sql` or `handler`
//!       sql: |
//!         UPDATE shop.stock SET available = available - :qty
//!          WHERE sku = :sku AND available >= :qty
//!         RETURNING available
//!       params: { sku: payload.sku, qty: payload.qty }
//!       expect_rows: 1          # optional, integer >= 0
//!       returning: [available]  # optional; the sql must then have a RETURNING clause
//!       fatal_sqlstates: ["23505", "23"]   # optional SQLSTATEs or 2-character classes
//!     compensation:             # same shape as `action`; required iff compensatable
//!       sql: UPDATE shop.stock SET available = available + :qty WHERE sku = :sku
//!       params: { sku: payload.sku, qty: payload.qty }
//!     retry: { max_attempts: 10 }   # optional per-step override of the saga policy
//!     timeout_ms: 5000          # optional, 1..=2147483647: limit of one attempt
//!   - name: send_receipt
//!     role: retriable
//!     action: { handler: send_email, params: { to: payload.email } }
//! ```
//!
//! ## Actions
//!
//! A `sql` action is one statement with `:name` parameters (see
//! [`crate::saga::sql::compile_named`]): every `:name` must have a `params` entry and every
//! `params` key must be used. A `handler` action names a Rust handler; `expect_rows`,
//! `returning` and `fatal_sqlstates` are not allowed with it; instead `fatal_errors` lists
//! error codes (one word each) that make a handler's retryable error fatal — an error
//! whose message starts with `code:` is not retried. Its `params` are handed
//! over in the order written in the file. `params` keys match `^[A-Za-z_][A-Za-z0-9_]*$`.
//!
//! ## Value references
//!
//! `params` values (and `aggregate`) are strings that name a value known when the step
//! runs:
//!
//! - `payload.<key>(.<key>)*`: a field of the start payload; keys are `[A-Za-z0-9_-]+`;
//! - `steps.<step>.<column>`: a column listed in the `returning` of step `<step>`, which
//!   must run before this action (a compensation may also use its own step's output);
//! - `saga.instance_id` and `saga.aggregate_id`.
//!
//! `aggregate` only accepts `payload.*` references.
//!
//! ## Roles
//!
//! At most one step is the `pivot`. Every step before it is `compensatable` or `check` and
//! every step after it is `retriable`; without a pivot, the compensatable and check steps
//! come first. Only compensatable steps have (and must have) a `compensation`.
//!
//! A `check` step is a read-only test such as "the consumer exists" (`SELECT ... ` with
//! `expect_rows: 1`: another row count fails it fatally and the saga compensates). It
//! changes nothing, so it has no compensation, and compensating in reverse passes over it
//! without a message or a transaction. Its `sql` must read only: it starts with `SELECT`,
//! `WITH`, `VALUES` or `TABLE` and contains none of `INSERT`, `UPDATE` (except `FOR
//! UPDATE` / `FOR NO KEY UPDATE`), `DELETE`, `MERGE`, `INTO`; functions it calls are not
//! inspected, nor is a `handler` check — they must not write either.
//!
//! ## Retry policies
//!
//! A step's policy is [`RetryPolicy::default`], overridden by the fields given in the
//! saga's `retry`, overridden by the fields given in the step's `retry`.
//!
//! Delays are at most 3600000 ms (1 hour, [`limits::MAX_RETRY_DELAY_MS`]): the transport
//! holds a retry for at most its longest delay tier, and a longer delay would be cut
//! short, which would break the promise that a retry never comes early.
//!
//! ## Limits
//!
//! Every limit is in [`limits`]; a value outside its range is an error at its line,
//! `{field} must be at most {max} ({why}), found {value}` (or `must be an integer >=
//! {min}`), and a name over 63 characters is ``{saga|step} name `<first 20
//! characters>...` is {n} characters long: at most 63 are allowed``.
//!
//! ## Timeouts
//!
//! A step's `timeout_ms` (at most 2147483647, PostgreSQL's largest `statement_timeout`)
//! limits one attempt of the step: an attempt running longer fails retryably, like any
//! other transient failure, and its retry policy decides what comes next. A `sql` action
//! runs with it as its `statement_timeout`; a handler is cancelled. Without it an attempt
//! has no limit.
//!
//! The saga's `timeout_ms` limits a whole instance: one still running that long after it
//! started stops going forward and compensates. The limit is checked when the instance
//! takes its next step, so a step already running is not interrupted by it. Without it
//! an instance has no limit.
//!
//! ## Ordering
//!
//! Start messages are ordered per aggregate by their `sequence`:
//!
//! - `latest_wins` (the default): a start whose sequence is not above the aggregate's
//!   watermark (the highest sequence already applied) is stale; it is recorded and
//!   dropped, never applied over newer data.
//! - `strict`: starts are applied in sequence order without gaps. A start that arrives
//!   early is held until the missing ones arrive, for at most `ordering_max_wait_ms`
//!   (default 5000); then the gap is skipped (and recorded) and the held start applied.
//!   `ordering_max_wait_ms` is an error with any other policy.
//!
//! A start without a `sequence` is never stale.
//!
//! ## Isolation
//!
//! `isolation` says how instances of the saga on one aggregate relate: with `interleave`
//! (the default) their steps may interleave (each step still runs alone); with
//! `exclusive` one instance per aggregate runs at a time and later starts wait, in order,
//! until it is terminal (a semantic lock).
//!
//! ## Errors
//!
//! Duplicate keys in any mapping are an error. A file that is not valid YAML for this shape
//! (syntax, unknown field, wrong type) yields exactly one [`LoadError`]; otherwise every
//! semantic problem of the file is reported, sorted by position.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_saphyr::granit_parser::{Event, Marker, Parser};
use serde_saphyr::{DuplicateKeyPolicy, Location, MessageFormatter, Spanned};
use thiserror::Error;

use super::definition::{
    Action, Backoff, HandlerAction, Isolation, OrderingPolicy, RetryPolicy, SagaDef, SqlAction,
    StepDef, StepRole, ValueRef, limits,
};
use super::setup::SetupLocation;
use super::sql::{compile_named, has_keyword, is_single_statement, read_only_violation};
use super::yaml::{
    RawAction, RawBackoff, RawIsolation, RawOrdering, RawRetry, RawRole, RawSaga, RawStep,
};

/// One problem found while loading a saga file, pointing at the offending YAML.
///
/// Displays as `{file}:{line}:{column}: {field}: {message}` on one line. `line` and
/// `column` are 1-based; both are 0 when the problem has no position (I/O errors, a
/// directory without saga files). `field` is a path into the document such as
/// `steps[2].compensation` or `steps[0].action.params.qty`, `<document>` for a YAML
/// syntax error, `<file>` for an unreadable file and `<directory>` for a problem with
/// the directory as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}:{}:{}: {}: {}", .file.display(), .line, .column, .field, .message)]
pub struct LoadError {
    /// The file (or directory) the problem is in.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: u32,
    /// 1-based column (in characters), 0 when unknown.
    pub column: u32,
    /// Where in the document, e.g. `steps[0].action.params.qty`.
    pub field: String,
    /// What is wrong, on one line.
    pub message: String,
}

/// Loads one saga from YAML text; `file` is only used for error messages and
/// [`SagaDef::source`].
///
/// # Errors
/// A YAML problem (syntax, unknown field, wrong type, duplicate key) is reported alone;
/// otherwise every semantic problem found in the file is returned, sorted by position.
pub fn load_str(src: &str, file: &Path) -> Result<SagaDef, Vec<LoadError>> {
    load_named(src, file).result
}

/// Reads and loads one saga file.
///
/// # Errors
/// As [`load_str`]; a file that cannot be read yields one error at line 0.
pub fn load_file(path: &Path) -> Result<SagaDef, Vec<LoadError>> {
    load_file_named(path).result
}

/// Loads every `*.yaml` and `*.yml` file directly inside `dir` (not recursively, hidden
/// files skipped), in file-name order.
///
/// # Errors
/// The errors of all files together; also an error when two files define the same saga
/// name (at the later file's `name`, naming the earlier file), when the directory cannot
/// be read, and when it contains no saga file.
pub fn load_dir(dir: &Path) -> Result<Vec<SagaDef>, Vec<LoadError>> {
    let whole_dir = |message: String| LoadError {
        file: dir.to_path_buf(),
        line: 0,
        column: 0,
        field: "<directory>".to_owned(),
        message,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return Err(vec![whole_dir(format!("cannot read directory: {e}"))]),
    };

    let mut errors = Vec::new();
    let mut files = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                if is_saga_file_name(&path) && path.is_file() {
                    files.push(path);
                }
            }
            Err(e) => errors.push(whole_dir(format!("cannot read directory: {e}"))),
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if files.is_empty() && errors.is_empty() {
        errors.push(whole_dir(
            "no saga file (*.yaml or *.yml) in this directory".to_owned(),
        ));
    }

    let mut sagas: Vec<SagaDef> = Vec::new();
    // Saga name → the first file that uses it (valid or not, as long as it parsed).
    let mut owners: Vec<(String, &Path)> = Vec::new();
    for path in &files {
        let loaded = load_file_named(path);
        let mut duplicate = false;
        if let Some((name, name_at)) = loaded.name {
            if let Some((_, first)) = owners.iter().find(|(n, _)| *n == name) {
                duplicate = true;
                errors.push(LoadError {
                    file: path.clone(),
                    line: name_at.line,
                    column: name_at.column,
                    field: "name".to_owned(),
                    message: format!("saga `{name}` is already defined in {}", first.display()),
                });
            } else {
                owners.push((name, path));
            }
        }
        match loaded.result {
            Ok(def) if !duplicate => sagas.push(def),
            Ok(_) => {}
            Err(mut file_errors) => errors.append(&mut file_errors),
        }
    }

    if errors.is_empty() {
        Ok(sagas)
    } else {
        Err(errors)
    }
}

/// Whether a directory entry is named like a saga file (`*.yaml`, `*.yml`, not hidden).
fn is_saga_file_name(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    yaml && !hidden
}

/// The outcome of loading one file, plus the saga's name and its position when the
/// file parsed far enough to have one (even if the saga is invalid).
struct Loaded {
    result: Result<SagaDef, Vec<LoadError>>,
    name: Option<(String, Pos)>,
}

fn load_file_named(path: &Path) -> Loaded {
    match fs::read_to_string(path) {
        Ok(src) => load_named(&src, path),
        Err(e) => Loaded {
            result: Err(vec![LoadError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                field: "<file>".to_owned(),
                message: format!("cannot read file: {e}"),
            }]),
            name: None,
        },
    }
}

fn load_named(src: &str, file: &Path) -> Loaded {
    let options = serde_saphyr::options! { duplicate_keys: DuplicateKeyPolicy::Error };
    let raw: RawSaga = match serde_saphyr::from_str_with_options(src, options) {
        Ok(raw) => raw,
        Err(e) => {
            return Loaded {
                result: Err(vec![yaml_error(src, file, &e)]),
                name: None,
            };
        }
    };
    let name = Some((raw.name.value.clone(), Pos::at(&raw.name)));
    let mut checker = Checker {
        file,
        src,
        errors: Vec::new(),
    };
    let def = checker.saga(raw);
    let mut errors = checker.errors;
    let result = match def {
        Some(def) if errors.is_empty() => Ok(def),
        _ => {
            if errors.is_empty() {
                errors.push(LoadError {
                    file: file.to_path_buf(),
                    line: 0,
                    column: 0,
                    field: DOCUMENT.to_owned(),
                    message: "invalid saga (no details recorded; this is a bug)".to_owned(),
                });
            }
            errors.sort_by_key(|e| (e.line, e.column));
            Err(errors)
        }
    };
    Loaded { result, name }
}

/// The field name of errors that belong to the document as a whole.
const DOCUMENT: &str = "<document>";

/// How long a start waits for a missing predecessor under `ordering: strict` when
/// `ordering_max_wait_ms` is not given.
const DEFAULT_ORDERING_MAX_WAIT: Duration = Duration::from_millis(5000);

/// A 1-based position in the file (0 = unknown); orders by line, then column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    line: u32,
    column: u32,
}

impl Pos {
    fn of(location: &Location) -> Pos {
        Pos {
            line: u32::try_from(location.line()).unwrap_or(u32::MAX),
            column: u32::try_from(location.column()).unwrap_or(u32::MAX),
        }
    }

    fn at<T>(spanned: &Spanned<T>) -> Pos {
        Pos::of(&spanned.referenced)
    }

    /// Parser markers count lines from 1 but columns from 0.
    fn of_marker(marker: &Marker) -> Pos {
        Pos {
            line: u32::try_from(marker.line()).unwrap_or(u32::MAX),
            column: u32::try_from(marker.col().saturating_add(1)).unwrap_or(u32::MAX),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Value references
// ---------------------------------------------------------------------------------------

/// Parses the syntax of a value reference (whether a referenced step exists is checked
/// separately, since it depends on where the reference is used).
fn parse_value_ref(text: &str) -> Result<ValueRef, String> {
    let parts: Vec<&str> = text.split('.').collect();
    match parts.as_slice() {
        ["payload", keys @ ..] if !keys.is_empty() && keys.iter().all(|k| is_payload_key(k)) => {
            Ok(ValueRef::Payload {
                path: keys.iter().map(|k| (*k).to_owned()).collect(),
            })
        }
        ["steps", step, column] if is_identifier(step) && is_identifier(column) => {
            Ok(ValueRef::StepOutput {
                step: (*step).to_owned(),
                column: (*column).to_owned(),
            })
        }
        ["saga", "instance_id"] => Ok(ValueRef::InstanceId),
        ["saga", "aggregate_id"] => Ok(ValueRef::AggregateId),
        _ => Err(format!(
            "unknown parameter reference `{text}`: expected `payload.<key>[.<key>...]`, \
             `steps.<step>.<column>`, `saga.instance_id` or `saga.aggregate_id`"
        )),
    }
}

/// `^[a-z][a-z0-9_]*$`: saga and step names.
fn is_snake_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`: parameter and column names.
fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `[A-Za-z0-9_-]+`: one key of a payload path.
fn is_payload_key(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A five-character SQLSTATE or a two-character class, `[0-9A-Z]`.
fn is_sqlstate(s: &str) -> bool {
    (s.len() == 5 || s.len() == 2)
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

/// What `steps.<step>.<column>` references may point at.
struct StepOutputs<'r> {
    /// Step name → index of its first occurrence.
    index: HashMap<&'r str, usize>,
    /// Per step: the columns of its action's `returning`.
    returning: Vec<Vec<&'r str>>,
}

impl<'r> StepOutputs<'r> {
    fn new(steps: &'r [Spanned<RawStep>]) -> Self {
        let mut index = HashMap::new();
        let mut returning = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            index.entry(step.value.name.value.as_str()).or_insert(i);
            let columns = step.value.action.value.returning.as_ref();
            returning.push(
                columns
                    .map(|cols| cols.value.iter().map(|c| c.value.as_str()).collect())
                    .unwrap_or_default(),
            );
        }
        StepOutputs { index, returning }
    }

    /// Checks that `steps.<step>.<column>` is visible from `scope`.
    fn check(&self, step: &str, column: &str, scope: Scope) -> Result<(), String> {
        let reference = format!("steps.{step}.{column}");
        let Some(&at) = self.index.get(step) else {
            return Err(format!(
                "unknown parameter reference `{reference}`: there is no step `{step}` in this saga"
            ));
        };
        if at > scope.step {
            return Err(format!(
                "`{reference}` refers to step `{step}`, which runs after this one: \
                 only outputs of earlier steps are available"
            ));
        }
        if at == scope.step && !scope.compensation {
            return Err(format!(
                "`{reference}` refers to this step's own output, which only its \
                 compensation can use"
            ));
        }
        let columns = &self.returning[at];
        if !columns.contains(&column) {
            return Err(format!(
                "step `{step}` does not return column `{column}` (its `returning` is [{}])",
                columns.join(", ")
            ));
        }
        Ok(())
    }
}

/// Where a reference is used: in the action or in the compensation of step `step`.
#[derive(Debug, Clone, Copy)]
struct Scope {
    step: usize,
    compensation: bool,
}

// ---------------------------------------------------------------------------------------
// Retry policies
// ---------------------------------------------------------------------------------------

/// The fields of a `retry:` block that were given (and valid).
#[derive(Debug, Default, Clone, PartialEq)]
struct RetryOverride {
    max_attempts: Option<u32>,
    backoff: Option<Backoff>,
    initial_delay: Option<Duration>,
    max_delay: Option<Duration>,
    jitter: Option<bool>,
}

impl RetryOverride {
    /// `base` with the given fields replaced.
    fn apply(&self, base: &RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            backoff: self.backoff.unwrap_or(base.backoff),
            initial_delay: self.initial_delay.unwrap_or(base.initial_delay),
            max_delay: self.max_delay.unwrap_or(base.max_delay),
            jitter: self.jitter.unwrap_or(base.jitter),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Semantic checks
// ---------------------------------------------------------------------------------------

/// Collects every semantic error of one file while building its [`SagaDef`].
///
/// Invariant: a method returning `None` has recorded at least one error.
struct Checker<'f> {
    file: &'f Path,
    /// The file's text.
    src: &'f str,
    errors: Vec<LoadError>,
}

impl Checker<'_> {
    fn error(&mut self, at: Pos, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(LoadError {
            file: self.file.to_path_buf(),
            line: at.line,
            column: at.column,
            field: field.into(),
            message: message.into(),
        });
    }

    fn saga(&mut self, raw: RawSaga) -> Option<SagaDef> {
        let name = self.snake_name(&raw.name, "name", "saga");
        let version = self
            .integer_in(
                Some(&raw.version),
                "version",
                1,
                (limits::MAX_VERSION, "it is stored as a PostgreSQL integer"),
            )
            .map(|v| u32::try_from(v).expect("MAX_VERSION fits in u32"));
        let aggregate = match parse_value_ref(&raw.aggregate.value) {
            Ok(r @ ValueRef::Payload { .. }) => Some(r),
            _ => {
                self.error(
                    Pos::at(&raw.aggregate),
                    "aggregate",
                    format!(
                        "`aggregate` must be a payload reference such as `payload.order_id`, \
                         found `{}`",
                        raw.aggregate.value
                    ),
                );
                None
            }
        };
        let setup_at = raw.setup.as_ref().map_or_else(SetupLocation::default, |s| {
            let at = Pos::at(s);
            SetupLocation::of_value(self.src, at.line, at.column)
        });
        let setup_sql = raw.setup.map(|s| s.value).filter(|s| !s.trim().is_empty());
        let defaults = RetryPolicy::default();
        let saga_retry = match &raw.retry {
            Some(retry) => self.retry(&defaults, retry, "retry"),
            None => defaults,
        };
        let timeout = self.millis_in(
            raw.timeout_ms.as_ref(),
            "timeout_ms",
            1,
            (limits::MAX_SAGA_TIMEOUT_MS, "365 days"),
        );
        let ordering = self.ordering(raw.ordering.as_ref(), raw.ordering_max_wait_ms.as_ref());
        let isolation = match raw.isolation.as_ref().map(|i| i.value) {
            None | Some(RawIsolation::Interleave) => Isolation::Interleave,
            Some(RawIsolation::Exclusive) => Isolation::Exclusive,
        };
        let steps = self.steps(&raw.steps, &saga_retry);
        Some(SagaDef {
            name: name?,
            version: version?,
            aggregate: aggregate?,
            setup_sql,
            setup_at,
            steps: steps?,
            timeout,
            ordering,
            isolation,
            source: self.file.to_path_buf(),
        })
    }

    /// `ordering` and `ordering_max_wait_ms`; an invalid wait is reported and replaced by
    /// the default so that checking goes on.
    fn ordering(
        &mut self,
        ordering: Option<&Spanned<RawOrdering>>,
        wait: Option<&Spanned<i64>>,
    ) -> OrderingPolicy {
        match ordering.map(|o| o.value) {
            Some(RawOrdering::Strict) => OrderingPolicy::Strict {
                max_wait: self
                    .millis_in(
                        wait,
                        "ordering_max_wait_ms",
                        1,
                        (
                            limits::MAX_ORDERING_WAIT_MS,
                            "10 minutes: a held start stays unacked, and RabbitMQ's \
                             consumer_timeout is 30 minutes by default",
                        ),
                    )
                    .unwrap_or(DEFAULT_ORDERING_MAX_WAIT),
            },
            policy => {
                if let Some(wait) = wait {
                    let why = match policy {
                        Some(_) => "this saga has `ordering: latest_wins`",
                        None => "this saga has no `ordering`, so `latest_wins` applies",
                    };
                    self.error(
                        Pos::at(wait),
                        "ordering_max_wait_ms",
                        format!(
                            "`ordering_max_wait_ms` is only allowed with `ordering: strict` \
                             ({why}, which never waits)"
                        ),
                    );
                }
                OrderingPolicy::LatestWins
            }
        }
    }

    /// An integer field that must lie in `min..=max` (`max` with the reason for it);
    /// `None` when absent or out of range (then reported at `field`).
    fn integer_in(
        &mut self,
        raw: Option<&Spanned<i64>>,
        field: &str,
        min: u64,
        (max, why): (u64, &str),
    ) -> Option<u64> {
        let raw = raw?;
        let name = field.rsplit('.').next().unwrap_or(field);
        let message = match u64::try_from(raw.value) {
            Ok(v) if v < min => format!("{name} must be an integer >= {min}, found {v}"),
            Ok(v) if v > max => format!("{name} must be at most {max} ({why}), found {v}"),
            Ok(v) => return Some(v),
            Err(_) => format!("{name} must be an integer >= {min}, found {}", raw.value),
        };
        self.error(Pos::at(raw), field, message);
        None
    }

    /// [`Checker::integer_in`] for a `*_ms` field, as a duration.
    fn millis_in(
        &mut self,
        raw: Option<&Spanned<i64>>,
        field: &str,
        min: u64,
        max: (u64, &str),
    ) -> Option<Duration> {
        self.integer_in(raw, field, min, max)
            .map(Duration::from_millis)
    }

    fn snake_name(&mut self, name: &Spanned<String>, field: &str, what: &str) -> Option<String> {
        let chars = name.value.chars().count();
        let message = if chars > limits::MAX_NAME_CHARS {
            // The name itself may be huge: show its start only.
            let start: String = name.value.chars().take(20).collect();
            format!(
                "{what} name `{start}...` is {chars} characters long: at most {} are allowed",
                limits::MAX_NAME_CHARS
            )
        } else if is_snake_name(&name.value) {
            return Some(name.value.clone());
        } else {
            format!("{what} name `{}` must match ^[a-z][a-z0-9_]*$", name.value)
        };
        self.error(Pos::at(name), field, message);
        None
    }

    fn steps(
        &mut self,
        raw: &Spanned<Vec<Spanned<RawStep>>>,
        saga_retry: &RetryPolicy,
    ) -> Option<Vec<StepDef>> {
        let steps = &raw.value;
        if steps.is_empty() {
            self.error(Pos::at(raw), "steps", "a saga needs at least one step");
            return None;
        }

        let mut first_seen: HashMap<&str, Pos> = HashMap::new();
        let mut unique = true;
        for (i, step) in steps.iter().enumerate() {
            let name = &step.value.name;
            if let Some(first) = first_seen.get(name.value.as_str()) {
                let message = format!(
                    "duplicate step name `{}`: the step at line {} already has it",
                    name.value, first.line
                );
                self.error(Pos::at(name), format!("steps[{i}].name"), message);
                unique = false;
            } else {
                first_seen.insert(&name.value, Pos::at(name));
            }
        }

        let roles_ok = self.roles(steps);
        let outputs = StepOutputs::new(steps);
        let mut built = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            if let Some(step) = self.step(i, step, saga_retry, &outputs) {
                built.push(step);
            }
        }
        (unique && roles_ok && built.len() == steps.len()).then_some(built)
    }

    /// Checks the order of roles; returns whether it is valid.
    fn roles(&mut self, steps: &[Spanned<RawStep>]) -> bool {
        let errors_before = self.errors.len();
        let mut pivot: Option<(usize, &str, Pos)> = None;
        let mut first_retriable: Option<&str> = None;
        for (i, step) in steps.iter().enumerate() {
            let role = &step.value.role;
            let name = step.value.name.value.as_str();
            let field = format!("steps[{i}].role");
            match role.value {
                RawRole::Pivot => match pivot {
                    Some((_, first, at)) => self.error(
                        Pos::at(role),
                        field,
                        format!(
                            "two pivots: step `{first}` (line {}) is already the pivot and a \
                             saga has at most one",
                            at.line
                        ),
                    ),
                    None => pivot = Some((i, name, Pos::at(step))),
                },
                RawRole::Compensatable | RawRole::Check => {
                    let what = if role.value == RawRole::Check {
                        "check"
                    } else {
                        "compensatable"
                    };
                    if let Some((_, pivot_name, _)) = pivot {
                        self.error(
                            Pos::at(role),
                            field,
                            format!(
                                "{what} step after the pivot `{pivot_name}`: once the \
                                 pivot commits nothing is compensated, so the steps after it \
                                 must be retriable"
                            ),
                        );
                    } else if let Some(retriable) = first_retriable {
                        self.error(
                            Pos::at(role),
                            field,
                            format!(
                                "{what} step after the retriable step `{retriable}`: \
                                 compensatable and check steps must all come before \
                                 retriable ones"
                            ),
                        );
                    }
                }
                RawRole::Retriable => {
                    if first_retriable.is_none() {
                        first_retriable = Some(name);
                    }
                }
            }
        }
        if let Some((pivot_at, pivot_name, _)) = pivot {
            for (i, step) in steps[..pivot_at].iter().enumerate() {
                let role = &step.value.role;
                if role.value == RawRole::Retriable {
                    self.error(
                        Pos::at(role),
                        format!("steps[{i}].role"),
                        format!(
                            "retriable step before the pivot `{pivot_name}`: every step before \
                             the pivot must be compensatable (or a check)"
                        ),
                    );
                }
            }
        }
        self.errors.len() == errors_before
    }

    fn step(
        &mut self,
        i: usize,
        raw: &Spanned<RawStep>,
        saga_retry: &RetryPolicy,
        outputs: &StepOutputs<'_>,
    ) -> Option<StepDef> {
        let step = &raw.value;
        let prefix = format!("steps[{i}]");
        let name = self.snake_name(&step.name, &format!("{prefix}.name"), "step");
        let role = match step.role.value {
            RawRole::Compensatable => StepRole::Compensatable,
            RawRole::Pivot => StepRole::Pivot,
            RawRole::Retriable => StepRole::Retriable,
            RawRole::Check => StepRole::Check,
        };
        let action = self.action(
            &step.action,
            &format!("{prefix}.action"),
            Scope {
                step: i,
                compensation: false,
            },
            outputs,
        );
        let compensation = match (&step.compensation, role) {
            (Some(raw_comp), StepRole::Compensatable) => self
                .action(
                    raw_comp,
                    &format!("{prefix}.compensation"),
                    Scope {
                        step: i,
                        compensation: true,
                    },
                    outputs,
                )
                .map(Some),
            (None, StepRole::Compensatable) => {
                self.error(
                    Pos::at(raw),
                    prefix.clone(),
                    format!(
                        "step `{}` is compensatable but has no `compensation`",
                        step.name.value
                    ),
                );
                None
            }
            (Some(raw_comp), StepRole::Pivot) => {
                self.error(
                    Pos::at(raw_comp),
                    format!("{prefix}.compensation"),
                    "a pivot step cannot have a `compensation`: it is the point of no return \
                     and is never undone",
                );
                None
            }
            (Some(raw_comp), StepRole::Check) => {
                self.error(
                    Pos::at(raw_comp),
                    format!("{prefix}.compensation"),
                    "a check step cannot have a `compensation`: it only reads, so there is \
                     nothing to undo",
                );
                None
            }
            (Some(raw_comp), StepRole::Retriable) => {
                self.error(
                    Pos::at(raw_comp),
                    format!("{prefix}.compensation"),
                    "a retriable step cannot have a `compensation`: it runs after the point of \
                     no return and is retried until it succeeds",
                );
                None
            }
            (None, _) => Some(None),
        };
        if role == StepRole::Check
            && let Some(sql) = &step.action.value.sql
            && let Some(why) = read_only_violation(&sql.value)
        {
            self.error(
                Pos::at(sql),
                format!("{prefix}.action.sql"),
                format!(
                    "a check step must only read (a SELECT without data-modifying WITH or \
                     INTO), but {why}"
                ),
            );
        }
        let retry = match &step.retry {
            Some(retry) => self.retry(saga_retry, retry, &format!("{prefix}.retry")),
            None => saga_retry.clone(),
        };
        // An invalid timeout is reported; the saga then fails as a whole.
        let timeout = self.millis_in(
            step.timeout_ms.as_ref(),
            &format!("{prefix}.timeout_ms"),
            1,
            (
                limits::MAX_STEP_TIMEOUT_MS,
                "the largest PostgreSQL statement_timeout",
            ),
        );
        Some(StepDef {
            name: name?,
            role,
            action: action?,
            compensation: compensation?,
            retry,
            timeout,
        })
    }

    /// Validates a `retry:` block and applies it to `base`. Invalid fields are reported
    /// and left at `base`'s value.
    fn retry(&mut self, base: &RetryPolicy, raw: &Spanned<RawRetry>, field: &str) -> RetryPolicy {
        let r = &raw.value;
        // A longer delay would be cut to the longest delay tier: the retry would come
        // earlier than the policy says.
        let delay_cap = (
            limits::MAX_RETRY_DELAY_MS,
            "1 hour, the longest delay skald holds a retry for",
        );
        let given = RetryOverride {
            max_attempts: self
                .integer_in(
                    r.max_attempts.as_ref(),
                    &format!("{field}.max_attempts"),
                    1,
                    (
                        limits::MAX_ATTEMPTS,
                        "attempts are counted in a PostgreSQL integer",
                    ),
                )
                .map(|v| u32::try_from(v).expect("MAX_ATTEMPTS fits in u32")),
            backoff: r.backoff.as_ref().map(|b| match b.value {
                RawBackoff::Fixed => Backoff::Fixed,
                RawBackoff::Exponential => Backoff::Exponential,
            }),
            initial_delay: self.millis_in(
                r.initial_delay_ms.as_ref(),
                &format!("{field}.initial_delay_ms"),
                0,
                delay_cap,
            ),
            max_delay: self.millis_in(
                r.max_delay_ms.as_ref(),
                &format!("{field}.max_delay_ms"),
                0,
                delay_cap,
            ),
            jitter: r.jitter.as_ref().map(|j| j.value),
        };

        let merged = given.apply(base);
        // Only blame this block if it set one of the two delays; an inherited inversion has
        // already been reported where it was written.
        let blamed = r
            .max_delay_ms
            .as_ref()
            .map(|m| (m, "max_delay_ms"))
            .or(r.initial_delay_ms.as_ref().map(|m| (m, "initial_delay_ms")));
        if merged.max_delay < merged.initial_delay
            && let Some((at, name)) = blamed
        {
            self.error(
                Pos::at(at),
                format!("{field}.{name}"),
                format!(
                    "max_delay_ms ({}) must be >= initial_delay_ms ({})",
                    merged.max_delay.as_millis(),
                    merged.initial_delay.as_millis()
                ),
            );
        }
        merged
    }

    fn action(
        &mut self,
        raw: &Spanned<RawAction>,
        field: &str,
        scope: Scope,
        outputs: &StepOutputs<'_>,
    ) -> Option<Action> {
        let a = &raw.value;
        let errors_before = self.errors.len();

        // Every well-named key, whether or not its value resolved, in YAML order.
        let mut keys: Vec<(&str, Pos)> = Vec::new();
        let mut resolved: Vec<(&str, ValueRef)> = Vec::new();
        if let Some(params) = &a.params {
            for (key, value) in &params.value.0 {
                let key_field = format!("{field}.params.{}", key.value);
                if !is_identifier(&key.value) {
                    self.error(
                        Pos::at(key),
                        key_field,
                        format!(
                            "parameter name `{}` must match ^[A-Za-z_][A-Za-z0-9_]*$",
                            key.value
                        ),
                    );
                    continue;
                }
                keys.push((&key.value, Pos::at(key)));
                let checked = parse_value_ref(&value.value).and_then(|r| match &r {
                    ValueRef::StepOutput { step, column } => {
                        outputs.check(step, column, scope).map(|()| r)
                    }
                    _ => Ok(r),
                });
                match checked {
                    Ok(r) => resolved.push((&key.value, r)),
                    Err(message) => self.error(Pos::at(value), key_field, message),
                }
            }
        }

        let action = match (&a.sql, &a.handler) {
            (Some(_), Some(_)) => {
                self.error(
                    Pos::at(raw),
                    field,
                    "both `sql` and `handler` are given: an action has exactly one of them",
                );
                None
            }
            (None, None) => {
                self.error(
                    Pos::at(raw),
                    field,
                    "neither `sql` nor `handler` is given: an action needs exactly one of them",
                );
                None
            }
            (None, Some(handler)) => self.handler_action(a, handler, field, resolved),
            (Some(sql), None) => self.sql_action(a, sql, field, &keys, &resolved),
        };
        action.filter(|_| self.errors.len() == errors_before)
    }

    fn handler_action(
        &mut self,
        a: &RawAction,
        handler: &Spanned<String>,
        field: &str,
        params: Vec<(&str, ValueRef)>,
    ) -> Option<Action> {
        let sql_only = [
            ("expect_rows", a.expect_rows.as_ref().map(Pos::at)),
            ("returning", a.returning.as_ref().map(Pos::at)),
            ("fatal_sqlstates", a.fatal_sqlstates.as_ref().map(Pos::at)),
        ];
        for (name, at) in sql_only {
            if let Some(at) = at {
                self.error(
                    at,
                    format!("{field}.{name}"),
                    format!("`{name}` is only allowed with `sql`, not with `handler`"),
                );
            }
        }
        let name = handler.value.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            self.error(
                Pos::at(handler),
                format!("{field}.handler"),
                format!(
                    "handler name `{}` must be non-empty and without spaces",
                    handler.value
                ),
            );
            return None;
        }
        let mut fatal_errors = Vec::new();
        for (j, code) in a
            .fatal_errors
            .iter()
            .flat_map(|l| l.value.iter())
            .enumerate()
        {
            let text = code.value.trim();
            if text.is_empty() || text.contains(char::is_whitespace) || text.contains(':') {
                self.error(
                    Pos::at(code),
                    format!("{field}.fatal_errors[{j}]"),
                    format!("error code `{}` must be one word without `:`", code.value),
                );
            } else {
                fatal_errors.push(text.to_owned());
            }
        }
        Some(Action::Handler(HandlerAction {
            name: name.to_owned(),
            params: params.into_iter().map(|(k, r)| (k.to_owned(), r)).collect(),
            fatal_errors,
        }))
    }

    fn sql_action(
        &mut self,
        a: &RawAction,
        sql: &Spanned<String>,
        field: &str,
        keys: &[(&str, Pos)],
        resolved: &[(&str, ValueRef)],
    ) -> Option<Action> {
        if let Some(codes) = &a.fatal_errors {
            self.error(
                Pos::at(codes),
                format!("{field}.fatal_errors"),
                "`fatal_errors` is only allowed with `handler`; SQL uses `fatal_sqlstates`"
                    .to_string(),
            );
        }
        let sql_field = format!("{field}.sql");
        if sql.value.trim().is_empty() {
            self.error(Pos::at(sql), sql_field, "`sql` is empty");
            return None;
        }
        if !is_single_statement(&sql.value) {
            self.error(
                Pos::at(sql),
                sql_field,
                "`sql` must be a single statement (there is more after a `;`)",
            );
            return None;
        }
        let (statement, names) = match compile_named(&sql.value) {
            Ok(compiled) => compiled,
            Err(e) => {
                self.error(
                    Pos::at(sql),
                    sql_field,
                    format!("invalid sql parameters: {e}"),
                );
                return None;
            }
        };
        for name in &names {
            if !keys.iter().any(|(k, _)| k == name) {
                self.error(
                    Pos::at(sql),
                    sql_field.clone(),
                    format!("`:{name}` in sql has no entry in `params`"),
                );
            }
        }
        for (key, at) in keys {
            if !names.iter().any(|n| n == key) {
                self.error(
                    *at,
                    format!("{field}.params.{key}"),
                    format!("parameter `{key}` is not used in sql (there is no `:{key}`)"),
                );
            }
        }

        let expect_rows = a
            .expect_rows
            .as_ref()
            .and_then(|n| match u64::try_from(n.value) {
                Ok(v) => Some(v),
                Err(_) => {
                    self.error(
                        Pos::at(n),
                        format!("{field}.expect_rows"),
                        format!("expect_rows must be an integer >= 0, found {}", n.value),
                    );
                    None
                }
            });

        let mut returning: Vec<String> = Vec::new();
        if let Some(columns) = &a.returning {
            for (j, column) in columns.value.iter().enumerate() {
                if !is_identifier(&column.value) {
                    self.error(
                        Pos::at(column),
                        format!("{field}.returning[{j}]"),
                        format!(
                            "column name `{}` must match ^[A-Za-z_][A-Za-z0-9_]*$",
                            column.value
                        ),
                    );
                } else if returning.contains(&column.value) {
                    self.error(
                        Pos::at(column),
                        format!("{field}.returning[{j}]"),
                        format!("column `{}` is listed twice", column.value),
                    );
                } else {
                    returning.push(column.value.clone());
                }
            }
            if !columns.value.is_empty() && !has_keyword(&sql.value, "returning") {
                self.error(
                    Pos::at(columns),
                    format!("{field}.returning"),
                    "`returning` lists columns but the sql has no RETURNING clause",
                );
            }
        }

        let mut fatal_sqlstates = Vec::new();
        if let Some(states) = &a.fatal_sqlstates {
            for (j, state) in states.value.iter().enumerate() {
                if is_sqlstate(&state.value) {
                    fatal_sqlstates.push(state.value.clone());
                } else {
                    self.error(
                        Pos::at(state),
                        format!("{field}.fatal_sqlstates[{j}]"),
                        format!(
                            "`{}` is not a SQLSTATE: expected 5 characters (e.g. 23505) or a \
                             2-character class (e.g. 23), each 0-9 or A-Z",
                            state.value
                        ),
                    );
                }
            }
        }

        // `$n` order; a name without a resolved value has been reported above.
        let params: Option<Vec<ValueRef>> = names
            .iter()
            .map(|name| {
                resolved
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, r)| r.clone())
            })
            .collect();
        Some(Action::Sql(SqlAction {
            sql: sql.value.clone(),
            statement,
            params: params?,
            param_names: names,
            expect_rows,
            returning,
            fatal_sqlstates,
        }))
    }
}

// ---------------------------------------------------------------------------------------
// YAML (serde-saphyr) errors
// ---------------------------------------------------------------------------------------

/// Turns a serde-saphyr error into one [`LoadError`] with a one-line message and, when
/// the position can be mapped back to a node, the path of that node.
fn yaml_error(src: &str, file: &Path, err: &serde_saphyr::Error) -> LoadError {
    let inner = innermost(err);
    let mut at = err
        .location()
        .map_or(Pos { line: 0, column: 0 }, |l| Pos::of(&l));
    // serde-saphyr reports a missing field at the mapping's last key (or at the mapping
    // itself when it is empty).
    let prefer = match inner {
        serde_saphyr::Error::SerdeUnknownField { .. }
        | serde_saphyr::Error::DuplicateMappingKey { .. }
        | serde_saphyr::Error::SerdeMissingField { .. } => Prefer::Key,
        _ => Prefer::Container,
    };
    let located = if at.line == 0 {
        Located::Nothing
    } else {
        locate(src, at, prefer)
    };
    let (path, scalar, is_key, parent_start) = match located {
        Located::Node {
            path,
            scalar,
            is_key,
            parent_start,
        } => (Some(path), scalar, is_key, parent_start),
        Located::Syntax | Located::Nothing => (None, None, false, None),
    };
    let field = match (inner, path) {
        (serde_saphyr::Error::SerdeMissingField { field, .. }, path) => {
            let mut path = path.unwrap_or_default();
            if is_key {
                // Point at the mapping the field is missing from, not at its last key.
                path.pop();
                at = parent_start.unwrap_or(at);
            }
            path.push(Seg::Key((*field).to_owned()));
            render_path(&path)
        }
        (_, Some(path)) => render_path(&path),
        (_, None) => DOCUMENT.to_owned(),
    };
    LoadError {
        file: file.to_path_buf(),
        line: at.line,
        column: at.column,
        field,
        message: one_line(&yaml_message(inner, scalar.as_deref())),
    }
}

/// The error itself, without the snippet and alias wrappers.
fn innermost(mut err: &serde_saphyr::Error) -> &serde_saphyr::Error {
    loop {
        match err {
            serde_saphyr::Error::WithSnippet { error, .. }
            | serde_saphyr::Error::AliasError { error, .. } => err = error,
            _ => return err,
        }
    }
}

/// The message of an (innermost) error, without location or snippet; `scalar` is the
/// source text at the error position when it is a scalar.
fn yaml_message(err: &serde_saphyr::Error, scalar: Option<&str>) -> String {
    use serde_saphyr::Error as E;
    let found = scalar
        .map(|s| {
            const MAX: usize = 40;
            let cut: String = s.chars().take(MAX).collect();
            let more = if s.chars().count() > MAX { "..." } else { "" };
            format!(", found `{cut}{more}`")
        })
        .unwrap_or_default();
    match err {
        E::InvalidScalar { ty, .. } => match *ty {
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" | "u8" | "u16" | "u32" | "u64"
            | "u128" | "usize" => format!("expected an integer{found}"),
            "f32" | "f64" => format!("expected a number{found}"),
            "bool" => format!("expected true or false{found}"),
            other => format!("invalid {other}{found}"),
        },
        E::DuplicateMappingKey { key: Some(key), .. } => {
            format!("duplicate key `{key}` in the same mapping")
        }
        E::DuplicateMappingKey { key: None, .. } => "duplicate key in the same mapping".to_owned(),
        E::Eof { .. } => "unexpected end of file: expected a saga mapping".to_owned(),
        E::Unexpected { expected, .. } => match *expected {
            "mapping start" => "expected a mapping (`key: value` pairs)".to_owned(),
            "sequence start" => "expected a sequence (a `- item` list or `[...]`)".to_owned(),
            "string scalar" | "scalar" => {
                "expected a single value, not a list or mapping".to_owned()
            }
            other => format!("expected {other}{found}"),
        },
        other => serde_saphyr::UserMessageFormatter
            .format_message(other)
            .into_owned(),
    }
}

/// Collapses control characters and runs of whitespace into single spaces.
fn one_line(message: &str) -> String {
    message
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// `steps[2].action.params.qty`; the empty path is `<document>`.
fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    if out.is_empty() {
        DOCUMENT.to_owned()
    } else {
        out
    }
}

/// Which node to pick when several start at the error position (a block mapping starts
/// where its first key does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefer {
    /// The outermost node: the mapping a field is missing from, the value of a wrong type.
    Container,
    /// The mapping key: an unknown or duplicate field.
    Key,
}

/// What [`locate`] found at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Located {
    /// The YAML does not parse up to that position.
    Syntax,
    /// The node at (or the last one before) the position.
    Node {
        /// Its path; a mapping key's path ends with the key itself.
        path: Vec<Seg>,
        /// Its text when it is a scalar.
        scalar: Option<String>,
        /// Whether it is a mapping key.
        is_key: bool,
        /// Where the mapping or sequence holding it starts.
        parent_start: Option<Pos>,
    },
    /// No node starts at or before the position.
    Nothing,
}

/// Re-reads the YAML events up to `at` to find the path of the node there.
fn locate(src: &str, at: Pos, prefer: Prefer) -> Located {
    enum Kind {
        Map { key: Option<String>, want_key: bool },
        Seq { next: usize },
    }
    struct Frame {
        seg: Option<Seg>,
        kind: Kind,
        start: Pos,
    }

    let mut frames: Vec<Frame> = Vec::new();
    let mut exact: Option<Located> = None;
    let mut before: Option<Located> = None;
    let mut parser = Parser::new_from_str(src);
    while let Some(next) = parser.next_event() {
        let (event, span) = match next {
            Ok(event) => event,
            Err(e) => {
                if Pos::of_marker(e.marker()) <= at {
                    return Located::Syntax;
                }
                break;
            }
        };
        let (opens, scalar) = match &event {
            Event::Scalar(text, ..) => (None, Some(text.to_string())),
            Event::Alias(..) => (None, None),
            Event::MappingStart(..) => (
                Some(Kind::Map {
                    key: None,
                    want_key: true,
                }),
                None,
            ),
            Event::SequenceStart(..) => (Some(Kind::Seq { next: 0 }), None),
            Event::MappingEnd | Event::SequenceEnd => {
                frames.pop();
                continue;
            }
            _ => continue,
        };
        let start = Pos::of_marker(&span.start);
        if start > at {
            break;
        }

        let (seg, is_key) = match frames.last_mut().map(|f| &mut f.kind) {
            None => (None, false),
            Some(Kind::Map { key, want_key }) => {
                if *want_key {
                    *want_key = false;
                    let name = scalar.clone().unwrap_or_else(|| "?".to_owned());
                    *key = Some(name.clone());
                    (Some(Seg::Key(name)), true)
                } else {
                    *want_key = true;
                    (key.clone().map(Seg::Key), false)
                }
            }
            Some(Kind::Seq { next }) => {
                let index = *next;
                *next += 1;
                (Some(Seg::Index(index)), false)
            }
        };
        let path: Vec<Seg> = frames
            .iter()
            .filter_map(|f| f.seg.clone())
            .chain(seg.clone())
            .collect();

        let node = Located::Node {
            path,
            scalar,
            is_key,
            parent_start: frames.last().map(|f| f.start),
        };
        if start == at {
            if prefer == Prefer::Key && is_key {
                return node;
            }
            if exact.is_none() {
                exact = Some(node.clone());
            }
        }
        before = Some(node);
        if let Some(kind) = opens {
            frames.push(Frame { seg, kind, start });
        }
    }
    exact.or(before).unwrap_or(Located::Nothing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_path(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    fn load(src: &str) -> Result<SagaDef, Vec<LoadError>> {
        load_str(src, Path::new("test.yaml"))
    }

    fn loaded(src: &str) -> SagaDef {
        match load(src) {
            Ok(def) => def,
            Err(errors) => panic!("unexpected errors:\n{}", render(&errors)),
        }
    }

    fn render(errors: &[LoadError]) -> String {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn sql_of(action: &Action) -> &SqlAction {
        match action {
            Action::Sql(sql) => sql,
            Action::Handler(h) => panic!("expected sql, got handler {}", h.name),
        }
    }

    fn payload(path: &[&str]) -> ValueRef {
        ValueRef::Payload {
            path: path.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn value_refs_parse() {
        assert_eq!(
            parse_value_ref("payload.order_id"),
            Ok(payload(&["order_id"]))
        );
        assert_eq!(
            parse_value_ref("payload.customer.e-mail"),
            Ok(payload(&["customer", "e-mail"]))
        );
        assert_eq!(
            parse_value_ref("steps.charge.payment_id"),
            Ok(ValueRef::StepOutput {
                step: "charge".into(),
                column: "payment_id".into()
            })
        );
        assert_eq!(
            parse_value_ref("saga.instance_id"),
            Ok(ValueRef::InstanceId)
        );
        assert_eq!(
            parse_value_ref("saga.aggregate_id"),
            Ok(ValueRef::AggregateId)
        );
        for bad in [
            "",
            "payload",
            "payload.",
            "payload..a",
            "payload.a b",
            "steps.a",
            "steps.a.b.c",
            "steps.a.1col",
            "saga.name",
            "saga",
            "order_id",
            "Payload.x",
        ] {
            let err = parse_value_ref(bad).expect_err(bad);
            assert!(
                err.starts_with("unknown parameter reference"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_documented_example_loads() {
        let example: String = include_str!("load.rs")
            .lines()
            .skip_while(|l| *l != "//! ```yaml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or("")))
            .collect();
        let def = loaded(&example);
        assert_eq!(def.timeout, Some(Duration::from_secs(600)));
        assert_eq!(
            def.ordering,
            OrderingPolicy::Strict {
                max_wait: Duration::from_secs(2)
            }
        );
        assert_eq!(def.isolation, Isolation::Exclusive);
        assert_eq!(def.steps[0].timeout, Some(Duration::from_secs(5)));
        assert_eq!(def.steps[1].timeout, None);
        assert_eq!(def.steps.len(), 2);
        assert_eq!(def.steps[0].retry.max_attempts, 10);
        assert_eq!(def.steps[0].retry.max_delay, Duration::from_secs(10));
        assert_eq!(def.steps[1].retry.max_attempts, 5);
    }

    /// A one-step saga with `saga_extra` lines after `aggregate` and `step_extra` lines
    /// at the end of its step (each line already indented for the step).
    fn with_fields(saga_extra: &str, step_extra: &str) -> String {
        format!(
            "name: s\nversion: 1\naggregate: payload.id\n{saga_extra}steps:\n\
             - name: a\n  role: retriable\n  action: {{ handler: h }}\n{step_extra}"
        )
    }

    #[test]
    fn timeouts_ordering_and_isolation_default() {
        let def = loaded(&with_fields("", ""));
        assert_eq!(def.timeout, None);
        assert_eq!(def.ordering, OrderingPolicy::LatestWins);
        assert_eq!(def.isolation, Isolation::Interleave);
        assert_eq!(def.steps[0].timeout, None);

        let def = loaded(&with_fields("ordering: strict\n", ""));
        assert_eq!(
            def.ordering,
            OrderingPolicy::Strict {
                max_wait: Duration::from_millis(5000)
            }
        );
        assert_eq!(DEFAULT_ORDERING_MAX_WAIT, Duration::from_millis(5000));
    }

    #[test]
    fn timeouts_ordering_and_isolation_parse() {
        // (saga lines, step lines, check)
        type Check = fn(&SagaDef) -> bool;
        let cases: &[(&str, &str, Check)] = &[
            ("timeout_ms: 1\n", "", |d| {
                d.timeout == Some(Duration::from_millis(1))
            }),
            ("timeout_ms: 60000\n", "", |d| {
                d.timeout == Some(Duration::from_secs(60))
            }),
            ("ordering: latest_wins\n", "", |d| {
                d.ordering == OrderingPolicy::LatestWins
            }),
            ("ordering: strict\nordering_max_wait_ms: 250\n", "", |d| {
                d.ordering
                    == OrderingPolicy::Strict {
                        max_wait: Duration::from_millis(250),
                    }
            }),
            // The order of the two keys does not matter.
            ("ordering_max_wait_ms: 1\nordering: strict\n", "", |d| {
                d.ordering
                    == OrderingPolicy::Strict {
                        max_wait: Duration::from_millis(1),
                    }
            }),
            ("isolation: interleave\n", "", |d| {
                d.isolation == Isolation::Interleave
            }),
            ("isolation: exclusive\n", "", |d| {
                d.isolation == Isolation::Exclusive
            }),
            ("", "  timeout_ms: 1500\n", |d| {
                d.steps[0].timeout == Some(Duration::from_millis(1500)) && d.timeout.is_none()
            }),
            ("", "  timeout_ms: 2147483647\n", |d| {
                d.steps[0].timeout == Some(Duration::from_millis(2_147_483_647))
            }),
            (
                "timeout_ms: 9000\nordering: strict\nisolation: exclusive\n",
                "  timeout_ms: 300\n",
                |d| {
                    d.timeout == Some(Duration::from_secs(9))
                        && d.ordering
                            == OrderingPolicy::Strict {
                                max_wait: DEFAULT_ORDERING_MAX_WAIT,
                            }
                        && d.isolation == Isolation::Exclusive
                        && d.steps[0].timeout == Some(Duration::from_millis(300))
                },
            ),
        ];
        for (saga, step, check) in cases {
            let def = loaded(&with_fields(saga, step));
            assert!(check(&def), "{saga:?} {step:?}: {def:?}");
        }
    }

    #[test]
    fn timeouts_ordering_and_isolation_are_checked() {
        // (saga lines, step lines, line, field, phrase): exactly this one error.
        let cases: &[(&str, &str, u32, &str, &str)] = &[
            (
                "timeout_ms: 0\n",
                "",
                4,
                "timeout_ms",
                "timeout_ms must be an integer >= 1, found 0",
            ),
            (
                "timeout_ms: -1\n",
                "",
                4,
                "timeout_ms",
                "integer >= 1, found -1",
            ),
            (
                "timeout_ms: 1.5\n",
                "",
                4,
                "timeout_ms",
                "expected an integer, found `1.5`",
            ),
            ("timeout_ms: [1]\n", "", 4, "timeout_ms", "expected"),
            (
                "timeout_ms: 99999999999999999999\n",
                "",
                4,
                "timeout_ms",
                "expected an integer",
            ),
            (
                "ordering: newest\n",
                "",
                4,
                "ordering",
                "unknown variant `newest`",
            ),
            ("ordering: 1\n", "", 4, "ordering", "unknown variant `1`"),
            (
                "ordering: Strict\n",
                "",
                4,
                "ordering",
                "unknown variant `Strict`",
            ),
            (
                "ordering_max_wait_ms: 10\n",
                "",
                4,
                "ordering_max_wait_ms",
                "no `ordering`, so `latest_wins` applies",
            ),
            (
                "ordering: latest_wins\nordering_max_wait_ms: 10\n",
                "",
                5,
                "ordering_max_wait_ms",
                "this saga has `ordering: latest_wins`",
            ),
            (
                // Not allowed at all, so its value is not checked on top.
                "ordering_max_wait_ms: 0\n",
                "",
                4,
                "ordering_max_wait_ms",
                "only allowed with `ordering: strict`",
            ),
            (
                "ordering: strict\nordering_max_wait_ms: 0\n",
                "",
                5,
                "ordering_max_wait_ms",
                "ordering_max_wait_ms must be an integer >= 1, found 0",
            ),
            (
                "ordering: strict\nordering_max_wait_ms: soon\n",
                "",
                5,
                "ordering_max_wait_ms",
                "expected an integer, found `soon`",
            ),
            (
                "isolation: serial\n",
                "",
                4,
                "isolation",
                "unknown variant `serial`",
            ),
            (
                "isolation: true\n",
                "",
                4,
                "isolation",
                "unknown variant `true`",
            ),
            (
                "",
                "  timeout_ms: 0\n",
                8,
                "steps[0].timeout_ms",
                "integer >= 1, found 0",
            ),
            (
                "",
                "  timeout_ms: -30\n",
                8,
                "steps[0].timeout_ms",
                "integer >= 1, found -30",
            ),
            (
                "",
                "  timeout_ms: 2147483648\n",
                8,
                "steps[0].timeout_ms",
                "at most 2147483647",
            ),
            (
                "",
                "  timeout_ms: true\n",
                8,
                "steps[0].timeout_ms",
                "expected an integer, found `true`",
            ),
            (
                "",
                "  timeout: 5000\n",
                8,
                "steps[0].timeout",
                "unknown field `timeout`",
            ),
        ];
        let mut failures = Vec::new();
        for &(saga, step, line, field, phrase) in cases {
            match load(&with_fields(saga, step)) {
                Ok(def) => failures.push(format!("{saga:?} {step:?}: loaded as {def:?}")),
                Err(errors) => {
                    let one = errors.len() == 1
                        && errors[0].line == line
                        && errors[0].field == field
                        && errors[0].message.contains(phrase)
                        && errors[0].column >= 1;
                    if !one {
                        failures.push(format!(
                            "{saga:?} {step:?}: wanted one error at line {line}, field \
                             {field}, containing {phrase:?}; got:\n{}",
                            render(&errors)
                        ));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn new_field_errors_are_collected_with_the_others() {
        let errors = load(&with_fields(
            "timeout_ms: 0\nordering_max_wait_ms: 5\n",
            "  timeout_ms: -1\n",
        ))
        .expect_err("three errors");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["timeout_ms", "ordering_max_wait_ms", "steps[0].timeout_ms"],
            "{}",
            render(&errors)
        );
    }

    #[test]
    fn retry_override_replaces_only_given_fields() {
        let base = RetryPolicy::default();
        let over = RetryOverride {
            max_attempts: Some(9),
            jitter: Some(false),
            ..RetryOverride::default()
        };
        let merged = over.apply(&base);
        assert_eq!(merged.max_attempts, 9);
        assert!(!merged.jitter);
        assert_eq!(merged.backoff, base.backoff);
        assert_eq!(merged.initial_delay, base.initial_delay);
        assert_eq!(merged.max_delay, base.max_delay);
        assert_eq!(RetryOverride::default().apply(&base), base);
    }

    #[test]
    fn retry_merges_defaults_saga_and_step() {
        let def = loaded(
            "name: s\nversion: 1\naggregate: payload.id\n\
             retry: { max_attempts: 5, backoff: fixed, initial_delay_ms: 100 }\n\
             steps:\n\
             - name: a\n  role: retriable\n  action: { handler: h }\n\
             - name: b\n  role: retriable\n  action: { handler: h }\n\
             \x20 retry: { max_attempts: 10, max_delay_ms: 1000, jitter: false }\n",
        );
        let a = &def.steps[0].retry;
        assert_eq!(
            *a,
            RetryPolicy {
                max_attempts: 5,
                backoff: Backoff::Fixed,
                initial_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(30),
                jitter: true,
            }
        );
        let b = &def.steps[1].retry;
        assert_eq!(
            *b,
            RetryPolicy {
                max_attempts: 10,
                backoff: Backoff::Fixed,
                initial_delay: Duration::from_millis(100),
                max_delay: Duration::from_millis(1000),
                jitter: false,
            }
        );
    }

    #[test]
    fn retry_without_any_block_is_the_default() {
        let def = loaded(
            "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
             - name: a\n  role: retriable\n  action: { handler: h }\n",
        );
        assert_eq!(def.steps[0].retry, RetryPolicy::default());
        assert_eq!(def.setup_sql, None);
    }

    #[test]
    fn retry_values_are_checked() {
        let errors = load(
            "name: s\nversion: 1\naggregate: payload.id\n\
             retry: { max_attempts: 0, initial_delay_ms: -1 }\nsteps:\n\
             - name: a\n  role: retriable\n  action: { handler: h }\n\
             \x20 retry: { initial_delay_ms: 5000, max_delay_ms: 10 }\n",
        )
        .expect_err("invalid retry");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "retry.max_attempts",
                "retry.initial_delay_ms",
                "steps[0].retry.max_delay_ms"
            ],
            "{}",
            render(&errors)
        );
        assert!(errors[2].message.contains("must be >= initial_delay_ms"));
    }

    #[test]
    fn sample_saga_loads() {
        let def = load_file(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/sagas/order_checkout.yaml"
        )))
        .unwrap_or_else(|errors| panic!("{}", render(&errors)));
        assert_eq!(def.name, "order_checkout");
        assert_eq!(def.aggregate, payload(&["order_id"]));
        assert!(
            def.setup_sql
                .as_deref()
                .is_some_and(|s| s.contains("CREATE SCHEMA IF NOT EXISTS shop"))
        );
        let names: Vec<_> = def.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["reserve_stock", "charge_account", "create_shipment"]
        );
        let roles: Vec<_> = def.steps.iter().map(|s| s.role).collect();
        assert_eq!(
            roles,
            [
                StepRole::Compensatable,
                StepRole::Compensatable,
                StepRole::Pivot
            ]
        );

        let charge = sql_of(&def.steps[1].action);
        assert_eq!(charge.returning, ["payment_id"]);
        assert_eq!(charge.expect_rows, Some(1));
        assert!(
            charge.statement.contains("$1::numeric"),
            "{}",
            charge.statement
        );
        let refund = def.steps[1]
            .compensation
            .as_ref()
            .map(sql_of)
            .expect("charge_account has a compensation");
        assert_eq!(
            refund.params,
            [ValueRef::StepOutput {
                step: "charge_account".into(),
                column: "payment_id".into()
            }]
        );
        assert!(def.steps[2].compensation.is_none());
        for step in &def.steps {
            let actions = std::iter::once(&step.action).chain(step.compensation.as_ref());
            for action in actions {
                let sql = sql_of(action);
                let (statement, names) = compile_named(&sql.sql).expect("compiles");
                assert_eq!(statement, sql.statement);
                assert_eq!(names.len(), sql.params.len(), "{}", step.name);
            }
        }
    }

    #[test]
    fn params_follow_dollar_order_and_handler_params_yaml_order() {
        let def = loaded(
            "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
             - name: a\n  role: compensatable\n\
             \x20 action:\n    sql: SELECT :b, :a, :b RETURNING x\n    params: { a: payload.a, b: saga.instance_id }\n    returning: [x]\n\
             \x20 compensation: { handler: undo, params: { z: steps.a.x, y: saga.aggregate_id } }\n",
        );
        let action = sql_of(&def.steps[0].action);
        assert_eq!(action.statement, "SELECT $1, $2, $1 RETURNING x");
        assert_eq!(action.params, [ValueRef::InstanceId, payload(&["a"])]);
        match &def.steps[0].compensation {
            Some(Action::Handler(h)) => {
                assert_eq!(h.name, "undo");
                let keys: Vec<_> = h.params.iter().map(|(k, _)| k.as_str()).collect();
                assert_eq!(keys, ["z", "y"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn step_output_visibility() {
        let saga = |action_ref: &str, comp_ref: &str| {
            format!(
                "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
                 - name: a\n  role: compensatable\n\
                 \x20 action: {{ sql: 'SELECT 1 RETURNING x', returning: [x] }}\n\
                 \x20 compensation: {{ sql: 'SELECT :p', params: {{ p: {comp_ref} }} }}\n\
                 - name: b\n  role: pivot\n\
                 \x20 action: {{ sql: 'SELECT :p', params: {{ p: {action_ref} }} }}\n"
            )
        };
        loaded(&saga("steps.a.x", "steps.a.x"));

        let errors = load(&saga("steps.b.x", "steps.a.x")).expect_err("own output");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "steps[1].action.params.p");
        assert!(errors[0].message.contains("own output"), "{}", errors[0]);

        let errors = load(&saga("steps.a.y", "steps.b.x")).expect_err("two errors");
        let messages: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(errors.len(), 2, "{}", render(&errors));
        assert!(
            messages[0].contains("runs after this one"),
            "{}",
            messages[0]
        );
        assert!(
            messages[1].contains("does not return column `y`"),
            "{}",
            messages[1]
        );
    }

    /// A saga with every limited field set from `values`: (field, value) replaces the
    /// `{field}` placeholder; the others keep a valid value.
    fn with_limits(values: &[(&str, String)]) -> String {
        let mut src = "name: {name}\nversion: {version}\naggregate: payload.id\n\
                       timeout_ms: {saga_timeout}\nordering: strict\n\
                       ordering_max_wait_ms: {wait}\n\
                       retry: { max_attempts: {attempts}, initial_delay_ms: {initial}, \
                       max_delay_ms: {max_delay} }\n\
                       steps:\n\
                       - name: {step}\n  role: retriable\n  action: { handler: h }\n\
                       \x20 timeout_ms: {step_timeout}\n"
            .to_owned();
        let defaults = [
            ("name", "s"),
            ("version", "1"),
            ("saga_timeout", "1000"),
            ("wait", "1000"),
            ("attempts", "3"),
            ("initial", "100"),
            ("max_delay", "1000"),
            ("step", "a"),
            ("step_timeout", "1000"),
        ];
        for (field, default) in defaults {
            let value = values
                .iter()
                .find(|(f, _)| *f == field)
                .map_or(default.to_owned(), |(_, v)| v.clone());
            src = src.replace(&format!("{{{field}}}"), &value);
        }
        src
    }

    #[test]
    fn every_limit_is_accepted_at_its_maximum() {
        let def = loaded(&with_limits(&[
            ("name", "n".repeat(limits::MAX_NAME_CHARS)),
            ("version", limits::MAX_VERSION.to_string()),
            ("saga_timeout", limits::MAX_SAGA_TIMEOUT_MS.to_string()),
            ("wait", limits::MAX_ORDERING_WAIT_MS.to_string()),
            ("attempts", limits::MAX_ATTEMPTS.to_string()),
            ("initial", limits::MAX_RETRY_DELAY_MS.to_string()),
            ("max_delay", limits::MAX_RETRY_DELAY_MS.to_string()),
            ("step", "s".repeat(limits::MAX_NAME_CHARS)),
            ("step_timeout", limits::MAX_STEP_TIMEOUT_MS.to_string()),
        ]));
        assert_eq!(def.version, 2_147_483_647);
        assert_eq!(def.timeout, Some(Duration::from_secs(365 * 24 * 3600)));
        assert_eq!(def.steps[0].retry.max_delay, Duration::from_secs(3600));
    }

    #[test]
    fn every_value_above_its_limit_is_an_error_naming_line_and_field() {
        let over = |max: u64| (max + 1).to_string();
        let cases = [
            (
                "name",
                "n".repeat(64),
                1,
                "name",
                "is 64 characters long: at most 63",
            ),
            (
                "name",
                "n".repeat(1 << 20),
                1,
                "name",
                "is 1048576 characters long",
            ),
            (
                "version",
                over(limits::MAX_VERSION),
                2,
                "version",
                "version must be at most 2147483647",
            ),
            (
                "version",
                i64::MAX.to_string(),
                2,
                "version",
                "found 9223372036854775807",
            ),
            (
                "saga_timeout",
                over(limits::MAX_SAGA_TIMEOUT_MS),
                4,
                "timeout_ms",
                "timeout_ms must be at most 31536000000",
            ),
            (
                "wait",
                i64::MAX.to_string(),
                6,
                "ordering_max_wait_ms",
                "ordering_max_wait_ms must be at most 600000",
            ),
            (
                "attempts",
                over(limits::MAX_ATTEMPTS),
                7,
                "retry.max_attempts",
                "max_attempts must be at most 2147483647",
            ),
            (
                "max_delay",
                over(limits::MAX_RETRY_DELAY_MS),
                7,
                "retry.max_delay_ms",
                "max_delay_ms must be at most 3600000 (1 hour",
            ),
            (
                "max_delay",
                i64::MAX.to_string(),
                7,
                "retry.max_delay_ms",
                "max_delay_ms must be at most 3600000",
            ),
            (
                "step",
                "s".repeat(64),
                9,
                "steps[0].name",
                "step name `ssssssssssssssssssss...` is 64 characters long",
            ),
            (
                "step_timeout",
                i64::MAX.to_string(),
                12,
                "steps[0].timeout_ms",
                "timeout_ms must be at most 2147483647",
            ),
        ];
        for (field, value, line, path, phrase) in cases {
            let errors = load(&with_limits(&[(field, value)])).expect_err(path);
            assert_eq!(errors.len(), 1, "{path}: {}", render(&errors));
            let e = &errors[0];
            assert_eq!((e.line, e.field.as_str()), (line, path), "{e}");
            assert!(e.message.contains(phrase), "{e}");
            assert!(e.message.len() < 200, "a huge value is not echoed: {e}");
        }
        // initial_delay_ms alone: its own limit, before the comparison with max_delay_ms.
        let errors = load(&with_limits(&[
            ("initial", over(limits::MAX_RETRY_DELAY_MS)),
            ("max_delay", over(limits::MAX_RETRY_DELAY_MS)),
        ]))
        .expect_err("both delays");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["retry.initial_delay_ms", "retry.max_delay_ms"],
            "{}",
            render(&errors)
        );
    }

    #[test]
    fn a_check_step_reads_only_has_no_compensation_and_stands_before_the_pivot() {
        let saga = |check: &str, after: &str| {
            format!(
                "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
                 - name: consumer_exists\n  role: check\n{check}\
                 - name: ship\n  role: pivot\n  action: {{ handler: ship }}\n{after}"
            )
        };
        let select = "  action:\n    sql: SELECT 1 FROM c WHERE id = :id\n    \
                      params: { id: payload.id }\n    expect_rows: 1\n";
        let def = loaded(&saga(select, ""));
        assert_eq!(def.steps[0].role, StepRole::Check);
        assert!(def.steps[0].compensation.is_none());
        loaded(&saga("  action: { handler: verify }\n", ""));

        let errors = load(&saga(
            &format!("{select}  compensation: {{ sql: SELECT 1 }}\n"),
            "",
        ))
        .expect_err("check with compensation");
        assert_eq!(errors.len(), 1, "{}", render(&errors));
        assert_eq!(
            (errors[0].line, errors[0].field.as_str()),
            (11, "steps[0].compensation")
        );
        assert!(
            errors[0].message.contains("nothing to undo"),
            "{}",
            errors[0]
        );

        let errors = load(&saga(
            "  action: { sql: 'WITH d AS (DELETE FROM c RETURNING 1) SELECT * FROM d' }\n",
            "",
        ))
        .expect_err("check that writes");
        assert_eq!(errors.len(), 1, "{}", render(&errors));
        assert_eq!(
            (errors[0].line, errors[0].field.as_str()),
            (7, "steps[0].action.sql")
        );
        assert!(
            errors[0]
                .message
                .contains("contains `DELETE`, which writes"),
            "{}",
            errors[0]
        );

        let errors = load(&saga(
            select,
            "- name: late\n  role: check\n  action: { sql: SELECT 1 }\n",
        ))
        .expect_err("check after the pivot");
        assert_eq!(errors.len(), 1, "{}", render(&errors));
        assert_eq!(errors[0].field, "steps[2].role");
        assert!(
            errors[0]
                .message
                .contains("check step after the pivot `ship`"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn all_semantic_errors_of_a_file_are_collected() {
        let errors = load(
            "name: Bad-Name\nversion: 0\naggregate: saga.instance_id\nsteps:\n\
             - name: a\n  role: compensatable\n  action: { sql: 'SELECT :x' }\n\
             - name: a\n  role: retriable\n  action: { handler: h, expect_rows: 1 }\n\
             \x20 compensation: { handler: h }\n",
        )
        .expect_err("many errors");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "name",
                "version",
                "aggregate",
                "steps[0]",
                "steps[0].action.sql",
                "steps[1].name",
                "steps[1].action.expect_rows",
                "steps[1].compensation",
            ],
            "{}",
            render(&errors)
        );
    }

    #[test]
    fn error_display_is_one_line() {
        let errors = load("name: [").expect_err("syntax");
        assert_eq!(errors.len(), 1);
        let shown = errors[0].to_string();
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.starts_with("test.yaml:"), "{shown}");
        let e = LoadError {
            file: "a/b.yaml".into(),
            line: 3,
            column: 7,
            field: "steps[0].role".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "a/b.yaml:3:7: steps[0].role: bad");
    }

    #[test]
    fn empty_file_is_an_error() {
        let errors = load("").expect_err("empty");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, DOCUMENT);
    }

    #[test]
    fn missing_required_field_names_it() {
        let errors = load(
            "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
             - name: a\n  action: { handler: h }\n",
        )
        .expect_err("missing role");
        assert_eq!(errors.len(), 1);
        assert_eq!(
            (errors[0].line, errors[0].field.as_str()),
            (5, "steps[0].role")
        );
        assert!(errors[0].message.contains("missing field `role`"));
    }

    /// `(file, line, field, phrase)`: each invalid fixture has exactly this one error.
    const INVALID: &[(&str, u32, &str, &str)] = &[
        ("bad_syntax.yaml", 8, DOCUMENT, "unclosed quote"),
        (
            "unknown_field.yaml",
            19,
            "steps[1].retires",
            "unknown field `retires`",
        ),
        (
            "duplicate_step_name.yaml",
            14,
            "steps[1].name",
            "duplicate step name `reserve`",
        ),
        (
            "unknown_param_reference.yaml",
            12,
            "steps[0].action.params.sku",
            "unknown parameter reference `steps.nope.x`",
        ),
        (
            "later_step_output.yaml",
            12,
            "steps[0].action.params.id",
            "runs after this one",
        ),
        (
            "sql_param_without_entry.yaml",
            11,
            "steps[0].action.sql",
            "`:qty` in sql has no entry in `params`",
        ),
        (
            "unused_param.yaml",
            12,
            "steps[0].action.params.extra",
            "is not used in sql",
        ),
        (
            "missing_compensation.yaml",
            8,
            "steps[0]",
            "compensatable but has no `compensation`",
        ),
        (
            "compensation_on_pivot.yaml",
            14,
            "steps[0].compensation",
            "a pivot step cannot have a `compensation`",
        ),
        (
            "two_pivots.yaml",
            20,
            "steps[2].role",
            "two pivots: step `ship`",
        ),
        (
            "compensatable_after_pivot.yaml",
            15,
            "steps[1].role",
            "compensatable step after the pivot `ship`",
        ),
        ("empty_steps.yaml", 7, "steps", "at least one step"),
        (
            "duplicate_key.yaml",
            12,
            "steps[0].action.sql",
            "duplicate key `sql`",
        ),
        (
            "sql_and_handler.yaml",
            10,
            "steps[0].action",
            "both `sql` and `handler`",
        ),
        (
            "returning_without_clause.yaml",
            13,
            "steps[0].action.returning",
            "no RETURNING clause",
        ),
        (
            "bad_role.yaml",
            9,
            "steps[0].role",
            "unknown variant `pivto`",
        ),
        (
            "wrong_type.yaml",
            3,
            "version",
            "expected an integer, found `abc`",
        ),
        (
            "retriable_before_pivot.yaml",
            9,
            "steps[0].role",
            "retriable step before the pivot `ship`",
        ),
        (
            "handler_with_expect_rows.yaml",
            12,
            "steps[0].action.expect_rows",
            "only allowed with `sql`",
        ),
        (
            "sql_with_fatal_errors.yaml",
            11,
            "steps[0].action.fatal_errors",
            "only allowed with `handler`",
        ),
        (
            "aggregate_not_payload.yaml",
            4,
            "aggregate",
            "must be a payload reference",
        ),
        (
            "missing_field.yaml",
            6,
            "steps[0].action",
            "missing field `action`",
        ),
        (
            "ordering_max_wait_without_strict.yaml",
            6,
            "ordering_max_wait_ms",
            "only allowed with `ordering: strict`",
        ),
        (
            "bad_isolation.yaml",
            5,
            "isolation",
            "unknown variant `serial`",
        ),
        (
            "step_timeout_zero.yaml",
            13,
            "steps[1].timeout_ms",
            "timeout_ms must be an integer >= 1, found 0",
        ),
        (
            "bad_ordering.yaml",
            5,
            "ordering",
            "unknown variant `newest`",
        ),
        (
            "saga_timeout_wrong_type.yaml",
            5,
            "timeout_ms",
            "expected an integer, found `10s`",
        ),
        (
            "strict_max_wait_negative.yaml",
            6,
            "ordering_max_wait_ms",
            "ordering_max_wait_ms must be an integer >= 1, found -100",
        ),
        (
            "retry_delay_over_an_hour.yaml",
            5,
            "retry.max_delay_ms",
            "max_delay_ms must be at most 3600000",
        ),
        (
            "version_too_large.yaml",
            3,
            "version",
            "version must be at most 2147483647",
        ),
    ];

    #[test]
    fn each_invalid_fixture_reports_its_one_problem() {
        let dir = manifest_path("tests/fixtures/invalid");
        let mut failures = Vec::new();
        for &(name, line, field, phrase) in INVALID {
            let path = dir.join(name);
            match load_file(&path) {
                Ok(_) => failures.push(format!("{name}: loaded without error")),
                Err(errors) => {
                    let one = errors.len() == 1
                        && errors[0].line == line
                        && errors[0].field == field
                        && errors[0].message.contains(phrase)
                        && errors[0].file == path
                        && errors[0].column >= 1;
                    if !one {
                        failures.push(format!(
                            "{name}: wanted one error at line {line}, field {field}, \
                             containing {phrase:?}; got:\n{}",
                            render(&errors)
                        ));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn load_dir_collects_the_errors_of_every_file() {
        let dir = manifest_path("tests/fixtures/invalid");
        let errors = load_dir(&dir).expect_err("all fixtures are invalid");
        let mut files: Vec<String> = errors
            .iter()
            .map(|e| {
                e.file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let mut expected: Vec<String> = INVALID.iter().map(|(f, ..)| (*f).to_owned()).collect();
        expected.sort();
        assert_eq!(files, expected, "in file-name order, one error each");
        files.dedup();
        assert_eq!(files.len(), INVALID.len());
        // Every fixture in the directory is covered by the table.
        let on_disk = fs::read_dir(&dir)
            .expect("fixture dir")
            .filter_map(Result::ok)
            .filter(|e| is_saga_file_name(&e.path()))
            .count();
        assert_eq!(on_disk, INVALID.len());
    }

    #[test]
    fn valid_fixtures_load() {
        let sagas = load_dir(&manifest_path("tests/fixtures/valid"))
            .unwrap_or_else(|errors| panic!("{}", render(&errors)));
        assert!(sagas.len() >= 2);
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir()
                .join(format!("skald-load-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const MINIMAL: &str = "name: same\nversion: 1\naggregate: payload.id\nsteps:\n\
                           - name: a\n  role: retriable\n  action: { handler: h }\n";

    #[test]
    fn load_dir_rejects_two_files_with_the_same_saga_name() {
        let tmp = TempDir::new("dup");
        fs::write(tmp.0.join("b.yml"), MINIMAL).expect("write");
        fs::write(tmp.0.join("a.yaml"), MINIMAL).expect("write");
        fs::write(tmp.0.join("notes.txt"), "not a saga").expect("write");
        fs::write(tmp.0.join(".hidden.yaml"), "not: [a saga").expect("write");
        let errors = load_dir(&tmp.0).expect_err("duplicate saga name");
        assert_eq!(errors.len(), 1, "{}", render(&errors));
        let e = &errors[0];
        assert_eq!(e.file, tmp.0.join("b.yml"));
        assert_eq!((e.line, e.column, e.field.as_str()), (1, 7, "name"));
        assert!(
            e.message.contains("saga `same` is already defined in"),
            "{e}"
        );
        assert!(e.message.contains("a.yaml"), "{e}");
    }

    #[test]
    fn load_dir_reports_a_duplicate_name_even_when_the_first_file_is_invalid() {
        let tmp = TempDir::new("dup-invalid");
        fs::write(
            tmp.0.join("a.yaml"),
            MINIMAL.replace("version: 1", "version: 0"),
        )
        .expect("write");
        fs::write(tmp.0.join("b.yaml"), MINIMAL).expect("write");
        let errors = load_dir(&tmp.0).expect_err("invalid and duplicate");
        let found: Vec<_> = errors
            .iter()
            .map(|e| (e.file.clone(), e.field.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (tmp.0.join("a.yaml"), "version"),
                (tmp.0.join("b.yaml"), "name")
            ],
            "{}",
            render(&errors)
        );
    }

    #[test]
    fn load_dir_loads_in_file_name_order() {
        let tmp = TempDir::new("order");
        fs::write(tmp.0.join("b.yaml"), MINIMAL.replace("same", "second")).expect("write");
        fs::write(tmp.0.join("a.yml"), MINIMAL.replace("same", "first")).expect("write");
        let sagas = load_dir(&tmp.0).unwrap_or_else(|errors| panic!("{}", render(&errors)));
        let names: Vec<_> = sagas.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["first", "second"]);
        assert_eq!(sagas[0].source, tmp.0.join("a.yml"));
    }

    #[test]
    fn load_dir_without_saga_files_is_an_error() {
        let tmp = TempDir::new("empty");
        let errors = load_dir(&tmp.0).expect_err("no saga");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "<directory>");
        assert!(errors[0].message.contains("no saga file"));

        let errors = load_dir(&tmp.0.join("missing")).expect_err("no dir");
        assert!(errors[0].message.contains("cannot read directory"));
    }

    #[test]
    fn unreadable_file_is_reported_at_line_zero() {
        let errors = load_file(Path::new("/nonexistent/skald/saga.yaml")).expect_err("io");
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].line, errors[0].column), (0, 0));
        assert!(errors[0].message.contains("cannot read file"));
    }
}
