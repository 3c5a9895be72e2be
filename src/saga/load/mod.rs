//! Loading saga files: YAML in, a validated [`SagaDef`] (or every error found) out.
//!
//! # The file format
//!
//! One saga version per file, one YAML document per file; several versions of a saga
//! are several files (README, *Changing a saga*):
//!
//! ```yaml
//! name: order_checkout          # required, ^[a-z][a-z0-9_]*$, at most 63 characters
//! version: 1                    # required, integer 1..=2147483647; (name, version) unique
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
//!     action:                   # required: exactly one of `sql`, `handler` or `command`
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
//!   - name: ship
//!     role: retriable
//!     action:
//!       command:                # a command step: sent to a participant service
//!         service: shipping     # required, ^[a-z][a-z0-9_-]*$, at most 63 characters
//!         type: create_shipment # required, 1..=128 of [A-Za-z0-9_.-]
//!         params: { order_id: payload.order_id }
//!         returning: [shipment_id]   # optional: reply fields later steps may reference
//!         timeout_ms: 5000      # optional, 1..=3600000 (default 30000): reply timeout
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
//! A `command` action holds its own `params` and `returning` inside `command:`; no other
//! action key is allowed beside it, nor a step-level `timeout_ms`, nor `role: check`
//! (see [`crate::saga::command`] for how it runs).
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
//!
//! [`RetryPolicy::default`]: super::definition::RetryPolicy::default
//! [`limits`]: super::definition::limits
//! [`limits::MAX_RETRY_DELAY_MS`]: super::definition::limits::MAX_RETRY_DELAY_MS

// A file is read into the raw shape of `super::yaml` (a serde error becomes one
// `LoadError` in `yaml_error`); then one `Checker` walks it, collecting every semantic
// error: `structure` checks the saga and its steps, `retry` the retry policies, `action`
// the `sql` and `handler` actions, `value_refs` the references their `params` make.
mod action;
mod checker;
mod retry;
mod structure;
#[cfg(test)]
mod test_support;
mod value_refs;
mod yaml_error;

use std::fs;
use std::path::{Path, PathBuf};

use serde_saphyr::granit_parser::Marker;
use serde_saphyr::{DuplicateKeyPolicy, Location, Spanned};
use thiserror::Error;

use self::checker::Checker;
use self::yaml_error::yaml_error;
use super::definition::SagaDef;
use super::yaml::RawSaga;

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
/// Several versions of one saga may be loaded at once, one file each (the layout the
/// README recommends: `order_checkout.v1.yaml`, `order_checkout.v2.yaml`).
///
/// # Errors
/// The errors of all files together; also an error when two files define the same saga
/// name *and* version (at the later file's `version`, naming the earlier file and its
/// line), when the directory cannot be read, and when it contains no saga file.
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
    // (name, version) → the first file that uses it and the line of its `version`
    // (valid or not, as long as it parsed).
    let mut owners: Vec<(String, i64, &Path, u32)> = Vec::new();
    for path in &files {
        let loaded = load_file_named(path);
        let mut duplicate = false;
        if let Some(id) = loaded.id {
            if let Some((.., first, first_line)) = owners
                .iter()
                .find(|(n, v, ..)| *n == id.name && *v == id.version)
            {
                duplicate = true;
                errors.push(LoadError {
                    file: path.clone(),
                    line: id.version_at.line,
                    column: id.version_at.column,
                    field: "version".to_owned(),
                    message: format!(
                        "saga `{}` version {} is already defined in {}:{first_line}",
                        id.name,
                        id.version,
                        first.display()
                    ),
                });
            } else {
                owners.push((id.name, id.version, path, id.version_at.line));
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

/// The outcome of loading one file, plus the saga's name and version when the file
/// parsed far enough to have them (even if the saga is invalid).
struct Loaded {
    result: Result<SagaDef, Vec<LoadError>>,
    id: Option<SagaId>,
}

/// What a saga file says it is: name and version (as written), and where `version` is.
struct SagaId {
    name: String,
    version: i64,
    version_at: Pos,
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
            id: None,
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
                id: None,
            };
        }
    };
    let id = Some(SagaId {
        name: raw.name.value.clone(),
        version: raw.version.value,
        version_at: Pos::at(&raw.version),
    });
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
    Loaded { result, id }
}

/// The field name of errors that belong to the document as a whole.
pub(super) const DOCUMENT: &str = "<document>";

/// A 1-based position in the file (0 = unknown); orders by line, then column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Pos {
    pub(super) line: u32,
    pub(super) column: u32,
}

impl Pos {
    /// A serde-saphyr location (1-based line and column).
    pub(super) fn of(location: &Location) -> Pos {
        Pos {
            line: u32::try_from(location.line()).unwrap_or(u32::MAX),
            column: u32::try_from(location.column()).unwrap_or(u32::MAX),
        }
    }

    /// Where `spanned`'s value starts.
    pub(super) fn at<T>(spanned: &Spanned<T>) -> Pos {
        Pos::of(&spanned.referenced)
    }

    /// Parser markers count lines from 1 but columns from 0.
    pub(super) fn of_marker(marker: &Marker) -> Pos {
        Pos {
            line: u32::try_from(marker.line()).unwrap_or(u32::MAX),
            column: u32::try_from(marker.col().saturating_add(1)).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::test_support::{load, loaded, payload, render, sql_of};
    use super::*;
    use crate::saga::definition::{Action, Isolation, OrderingPolicy, StepRole, ValueRef};
    use crate::saga::sql::compile_named;

    fn manifest_path(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    #[test]
    fn the_documented_example_loads() {
        let example: String = include_str!("mod.rs")
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
        assert_eq!(def.steps.len(), 3);
        assert!(
            matches!(&def.steps[2].action, Action::Command(c) if c.timeout == Duration::from_secs(5))
        );
        assert_eq!(def.steps[0].retry.max_attempts, 10);
        assert_eq!(def.steps[0].retry.max_delay, Duration::from_secs(10));
        assert_eq!(def.steps[1].retry.max_attempts, 5);
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
        (
            "command_bad_service.yaml",
            10,
            "steps[0].action.command.service",
            "service name `Shipping Dept` must match ^[a-z][a-z0-9_-]*$",
        ),
        (
            "command_timeout_too_long.yaml",
            12,
            "steps[0].action.command.timeout_ms",
            "timeout_ms must be at most 3600000",
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
    fn load_dir_rejects_two_files_with_the_same_saga_name_and_version() {
        let tmp = TempDir::new("dup");
        fs::write(tmp.0.join("b.yml"), MINIMAL).expect("write");
        fs::write(tmp.0.join("a.yaml"), MINIMAL).expect("write");
        fs::write(tmp.0.join("notes.txt"), "not a saga").expect("write");
        fs::write(tmp.0.join(".hidden.yaml"), "not: [a saga").expect("write");
        let errors = load_dir(&tmp.0).expect_err("duplicate saga name and version");
        assert_eq!(errors.len(), 1, "{}", render(&errors));
        let e = &errors[0];
        assert_eq!(e.file, tmp.0.join("b.yml"));
        assert_eq!((e.line, e.column, e.field.as_str()), (2, 10, "version"));
        assert!(
            e.message.contains(&format!(
                "saga `same` version 1 is already defined in {}:2",
                tmp.0.join("a.yaml").display()
            )),
            "{e}"
        );
    }

    #[test]
    fn load_dir_loads_several_versions_of_one_saga() {
        let tmp = TempDir::new("versions");
        fs::write(tmp.0.join("same.v1.yaml"), MINIMAL).expect("write");
        fs::write(
            tmp.0.join("same.v2.yaml"),
            MINIMAL.replace("version: 1", "version: 2"),
        )
        .expect("write");
        let sagas = load_dir(&tmp.0).unwrap_or_else(|errors| panic!("{}", render(&errors)));
        let ids: Vec<_> = sagas.iter().map(|s| (s.name.as_str(), s.version)).collect();
        assert_eq!(ids, [("same", 1), ("same", 2)]);
    }

    #[test]
    fn load_dir_reports_a_duplicate_version_even_when_the_first_file_is_invalid() {
        let tmp = TempDir::new("dup-invalid");
        fs::write(
            tmp.0.join("a.yaml"),
            MINIMAL.replace("payload.id", "saga.instance_id"),
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
                (tmp.0.join("a.yaml"), "aggregate"),
                (tmp.0.join("b.yaml"), "version")
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
