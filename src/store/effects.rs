//! Running a step's action inside its transaction, and classifying its failures.

use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Either, Executor, PgConnection, Row, SqlSafeStr, Statement};

use super::{error_text, params};
use crate::saga::sql::has_keyword;

use crate::handlers::{HandlerError, HandlerInput, Handlers};
use crate::saga::context::StepInput;
use crate::saga::coordinator::{Cursor, FailureKind};
use crate::saga::definition::{Action, HandlerAction, SqlAction};

/// Why an action failed, classified for the coordinator.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct EffectError {
    /// Whether a retry may help.
    pub kind: FailureKind,
    /// What went wrong, for the attempt's error history.
    pub message: String,
}

impl EffectError {
    fn fatal(message: impl Into<String>) -> Self {
        EffectError {
            kind: FailureKind::Fatal,
            message: message.into(),
        }
    }
}

/// What an action runs with besides its connection.
#[derive(Debug, Clone, Copy)]
pub struct ActionContext<'a> {
    /// The values its parameters bind from.
    pub input: &'a StepInput<'a>,
    /// The step's name.
    pub step_name: &'a str,
    /// What runs: the step or its compensation, and which try.
    pub cursor: Cursor,
    /// One attempt longer than this fails retryably.
    pub timeout: Option<Duration>,
}

/// Runs `action` on `conn` (inside the step's transaction) and returns the step's
/// output: the captured `returning` columns of a SQL action, or a handler's object.
/// `None` when the action captures nothing.
///
/// A step timeout becomes the transaction's `statement_timeout` for SQL (the server
/// cancels the statement: SQLSTATE 57014, retryable), and a deadline for a handler.
pub async fn run_action(
    conn: &mut PgConnection,
    action: &Action,
    ctx: ActionContext<'_>,
    handlers: &Handlers,
) -> Result<Option<Value>, EffectError> {
    match action {
        Action::Sql(sql) => {
            if let Some(timeout) = ctx.timeout {
                // SET cannot take a bind parameter; the value is a number we format.
                sqlx::query(AssertSqlSafe(format!(
                    "SET LOCAL statement_timeout = {}",
                    timeout.as_millis().max(1)
                )))
                .execute(&mut *conn)
                .await
                .map_err(|e| EffectError {
                    kind: FailureKind::Retryable,
                    message: error_text(&e),
                })?;
            }
            run_sql(conn, sql, ctx.input).await
        }
        // The engine sends a command instead of running it (see `saga::command`).
        Action::Command(c) => Err(EffectError {
            kind: FailureKind::Fatal,
            message: format!(
                "command {} of service {} is sent, not run in skald's database",
                c.kind, c.service
            ),
        }),
        Action::Handler(h) => {
            let call = run_handler(conn, h, ctx.input, ctx.step_name, ctx.cursor, handlers);
            match ctx.timeout {
                None => call.await,
                Some(timeout) => tokio::time::timeout(timeout, call)
                    .await
                    .unwrap_or_else(|_| {
                        Err(EffectError {
                            kind: FailureKind::Retryable,
                            message: format!("handler timed out after {} ms", timeout.as_millis()),
                        })
                    }),
            }
        }
    }
}

async fn run_sql(
    conn: &mut PgConnection,
    action: &SqlAction,
    input: &StepInput<'_>,
) -> Result<Option<Value>, EffectError> {
    let fail = |e: sqlx::Error| EffectError {
        kind: classify(&e, &action.fatal_sqlstates),
        message: error_text(&e),
    };
    // The statement's own parameter types decide how each value is bound. Preparing is
    // cached per connection by sqlx (no round trip after the first), and the execution
    // below reuses this very prepared statement.
    let prepared = (&mut *conn)
        .prepare(AssertSqlSafe(action.statement.clone()).into_sql_str())
        .await
        .map_err(fail)?;
    let declared = match prepared.parameters() {
        Some(Either::Left(types)) => types,
        _ => &[],
    };
    // Executed as the statement just prepared: no second copy of its text.
    let mut q = prepared.query();
    for (i, r) in action.params.iter().enumerate() {
        let name = action.param_names.get(i).map_or("?", String::as_str);
        let value = r
            .resolve(input)
            .ok_or_else(|| EffectError::fatal(format!("parameter {name}: no value for {r}")))?;
        let ty = declared.get(i).ok_or_else(|| {
            EffectError::fatal(format!("parameter {name}: the statement does not use it"))
        })?;
        let bound =
            params::convert(name, &value, ty).map_err(|e| EffectError::fatal(e.to_string()))?;
        q = q.bind(bound);
    }

    let (rows, output) = if action.returning.is_empty() {
        (
            q.execute(&mut *conn).await.map_err(fail)?.rows_affected(),
            None,
        )
    } else {
        let rows: Vec<PgRow> = q.fetch_all(&mut *conn).await.map_err(fail)?;
        let first = match rows.first() {
            Some(row) => Some(capture(row, &action.returning)?),
            None => None,
        };
        (rows.len() as u64, first)
    };
    if let Some(expected) = action.expect_rows
        && rows != expected
    {
        // A query (rows out, no RETURNING clause) returns rows; anything else affects them.
        let query = !prepared.columns().is_empty() && !has_keyword(&action.sql, "returning");
        let verb = if query { "returned" } else { "affected" };
        return Err(EffectError::fatal(format!(
            "expected {expected} row(s), statement {verb} {rows}"
        )));
    }
    Ok(output)
}

/// The `returning` columns of `row` as a JSON object. Common types convert directly;
/// for any other type the error says to cast it in the `RETURNING` clause.
fn capture(row: &PgRow, columns: &[String]) -> Result<Value, EffectError> {
    let mut out = Map::new();
    for column in columns {
        let value = column_json(row, column)
            .map_err(|e| EffectError::fatal(format!("RETURNING column {column:?}: {e}")))?;
        out.insert(column.clone(), value);
    }
    Ok(Value::Object(out))
}

fn column_json(row: &PgRow, column: &str) -> Result<Value, String> {
    use sqlx::{Column, TypeInfo};
    let col = row
        .columns()
        .iter()
        .find(|c| c.name() == column)
        .ok_or("not in the statement's RETURNING clause")?;
    let get_err = |e: sqlx::Error| e.to_string();
    let type_name = col.type_info().name().to_string();
    let value = match type_name.as_str() {
        "INT2" => row
            .try_get::<Option<i16>, _>(column)
            .map_err(get_err)?
            .map(Value::from),
        "INT4" => row
            .try_get::<Option<i32>, _>(column)
            .map_err(get_err)?
            .map(Value::from),
        "INT8" => row
            .try_get::<Option<i64>, _>(column)
            .map_err(get_err)?
            .map(Value::from),
        "FLOAT4" => row
            .try_get::<Option<f32>, _>(column)
            .map_err(get_err)?
            .map(Value::from),
        "FLOAT8" => row
            .try_get::<Option<f64>, _>(column)
            .map_err(get_err)?
            .map(Value::from),
        "BOOL" => row
            .try_get::<Option<bool>, _>(column)
            .map_err(get_err)?
            .map(Value::from),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => row
            .try_get::<Option<String>, _>(column)
            .map_err(get_err)?
            .map(Value::from),
        "UUID" => row
            .try_get::<Option<uuid::Uuid>, _>(column)
            .map_err(get_err)?
            .map(|u| Value::from(u.to_string())),
        "JSON" | "JSONB" => row
            .try_get::<Option<sqlx::types::Json<Value>>, _>(column)
            .map_err(get_err)?
            .map(|j| j.0),
        "TIMESTAMPTZ" => row
            .try_get::<Option<chrono::DateTime<chrono::Utc>>, _>(column)
            .map_err(get_err)?
            .map(|t| Value::from(t.to_rfc3339())),
        other => {
            return Err(format!(
                "type {other} is not captured directly; cast it in RETURNING (e.g. {column}::text)"
            ));
        }
    };
    Ok(value.unwrap_or(Value::Null))
}

async fn run_handler(
    conn: &mut PgConnection,
    action: &HandlerAction,
    input: &StepInput<'_>,
    step_name: &str,
    cursor: Cursor,
    handlers: &Handlers,
) -> Result<Option<Value>, EffectError> {
    let handler = handlers
        .get(&action.name)
        .ok_or_else(|| EffectError::fatal(format!("no handler registered as {:?}", action.name)))?;
    let mut params = Map::new();
    for (name, r) in &action.params {
        let value = r
            .resolve(input)
            .ok_or_else(|| EffectError::fatal(format!("no value for {r}")))?;
        params.insert(name.clone(), value);
    }
    let handler_input = HandlerInput {
        instance_id: input.instance_id,
        aggregate_id: input.aggregate_id.to_string(),
        step: step_name.to_string(),
        phase: cursor.phase,
        attempt: cursor.attempt,
        idempotency_key: format!(
            "{}:{}:{}",
            input.instance_id,
            step_name,
            cursor.phase.as_str()
        ),
        params,
    };
    match handler.call(conn, handler_input).await {
        Ok(Value::Null) => Ok(None),
        Ok(v @ Value::Object(_)) => Ok(Some(v)),
        Ok(other) => Err(EffectError::fatal(format!(
            "handler {:?} returned {other}, not a JSON object",
            action.name
        ))),
        Err(e) => {
            let message = e.to_string();
            // `code: text` — a code the saga declares fatal is not retried.
            let code = message.split(':').next().unwrap_or("").trim();
            let declared_fatal = action.fatal_errors.iter().any(|f| f == code);
            Err(EffectError {
                kind: if declared_fatal {
                    FailureKind::Fatal
                } else {
                    e.kind()
                },
                message,
            })
        }
    }
}

/// SQLSTATEs that are transient by nature: serialization failure, deadlock, lock
/// not available, query cancelled (statement timeout), and the connection classes.
const TRANSIENT_SQLSTATES: &[&str] = &[
    "40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03",
];

/// SQLSTATE classes no retry can fix: data exceptions (22), syntax errors and
/// undefined objects (42), unsupported features (0A). Fatal even when undeclared.
const FATAL_CLASSES: &[&str] = &["22", "42", "0A"];

/// Whether a database error may go away on retry.
///
/// Fatal: a code listed in `fatal_sqlstates` (exact, or its two-character class), or
/// one of the fatal classes (22, 42, 0A). Retryable: known transient codes, anything that is
/// not a database error (I/O, pool timeout), and every other database error (an
/// integrity violation may clear once another service catches up), bounded by the
/// step's `max_attempts`.
pub fn classify(e: &sqlx::Error, fatal_sqlstates: &[String]) -> FailureKind {
    let Some(code) = e.as_database_error().and_then(|d| d.code()) else {
        return FailureKind::Retryable;
    };
    if TRANSIENT_SQLSTATES.contains(&code.as_ref()) {
        return FailureKind::Retryable;
    }
    let matches = |f: &str| f == code || (f.len() == 2 && code.starts_with(f));
    if fatal_sqlstates.iter().any(|f| matches(f)) || FATAL_CLASSES.iter().any(|f| matches(f)) {
        FailureKind::Fatal
    } else {
        FailureKind::Retryable
    }
}

// Here rather than in `handlers`, so that `handlers` (the trait and its types) does not
// depend on the store: the store runs handlers, not the other way round.
impl From<sqlx::Error> for HandlerError {
    /// Database errors from a handler are classified like a SQL step's.
    fn from(e: sqlx::Error) -> Self {
        match classify(&e, &[]) {
            FailureKind::Retryable => HandlerError::Retryable(e.to_string()),
            FailureKind::Fatal => HandlerError::Fatal(e.to_string()),
        }
    }
}
