//! Running a step's action inside its transaction, and classifying its failures.

use serde_json::{Map, Value};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Row};

use crate::handlers::{HandlerInput, Handlers};
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

/// Runs `action` on `conn` (inside the step's transaction) and returns the step's
/// output: the captured `returning` columns of a SQL action, or a handler's object.
/// `None` when the action captures nothing.
pub async fn run_action(
    conn: &mut PgConnection,
    action: &Action,
    input: &StepInput<'_>,
    step_name: &str,
    cursor: Cursor,
    handlers: &Handlers,
) -> Result<Option<Value>, EffectError> {
    match action {
        Action::Sql(sql) => run_sql(conn, sql, input).await,
        Action::Handler(h) => run_handler(conn, h, input, step_name, cursor, handlers).await,
    }
}

async fn run_sql(
    conn: &mut PgConnection,
    action: &SqlAction,
    input: &StepInput<'_>,
) -> Result<Option<Value>, EffectError> {
    let values = action
        .params
        .iter()
        .map(|r| {
            r.resolve(input)
                .ok_or_else(|| EffectError::fatal(format!("no value for {r}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fail = |e: sqlx::Error| EffectError {
        kind: classify(&e, &action.fatal_sqlstates),
        message: e.to_string(),
    };

    let (rows, output) = if action.returning.is_empty() {
        let q = bind_all(sqlx::query(AssertSqlSafe(action.statement.clone())), values);
        (
            q.execute(&mut *conn).await.map_err(fail)?.rows_affected(),
            None,
        )
    } else {
        // A data-modifying CTE lets PostgreSQL turn the RETURNING rows into JSON,
        // whatever their column types, in the same round trip.
        let wrapped = format!(
            "WITH skald_step AS ({}) SELECT to_jsonb(skald_step) AS row FROM skald_step",
            action.statement
        );
        let q = bind_all(sqlx::query(AssertSqlSafe(wrapped)), values);
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
        return Err(EffectError::fatal(format!(
            "expected {expected} row(s), statement affected {rows}"
        )));
    }
    Ok(output)
}

fn capture(row: &PgRow, columns: &[String]) -> Result<Value, EffectError> {
    let json: Value = row
        .try_get::<sqlx::types::Json<Value>, _>("row")
        .map(|j| j.0)
        .map_err(|e| EffectError::fatal(format!("cannot read RETURNING row: {e}")))?;
    let mut out = Map::new();
    for column in columns {
        let value = json
            .get(column)
            .cloned()
            .ok_or_else(|| EffectError::fatal(format!("RETURNING has no column {column:?}")))?;
        out.insert(column.clone(), value);
    }
    Ok(Value::Object(out))
}

/// Binds JSON values with the PostgreSQL type closest to their JSON type: integers as
/// `int8`, other numbers as `float8`, strings as `text`, booleans as `bool`, objects and
/// arrays as `jsonb`, null as a `text` NULL. Casts in the SQL (`:amount::numeric`)
/// convert from there.
fn bind_all<'q>(
    mut q: Query<'q, Postgres, PgArguments>,
    values: Vec<Value>,
) -> Query<'q, Postgres, PgArguments> {
    for v in values {
        q = match v {
            Value::Null => q.bind(None::<String>),
            Value::Bool(b) => q.bind(b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => q.bind(i),
                None => q.bind(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => q.bind(s),
            other => q.bind(sqlx::types::Json(other)),
        };
    }
    q
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
        Err(e) => Err(EffectError {
            kind: e.kind(),
            message: e.to_string(),
        }),
    }
}

/// SQLSTATEs that are transient by nature: serialization failure, deadlock, lock
/// not available, query cancelled (statement timeout), and the connection classes.
const TRANSIENT_SQLSTATES: &[&str] = &[
    "40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03",
];

/// Whether a database error may go away on retry.
///
/// A code listed in `fatal_sqlstates` (exact, or its two-character class) is fatal;
/// known transient codes and anything that is not a database error (I/O, pool
/// timeout) are retryable; other database errors are retryable too, bounded by the
/// step's `max_attempts`, since skald cannot know that a missing table will not be
/// created a minute later.
pub fn classify(e: &sqlx::Error, fatal_sqlstates: &[String]) -> FailureKind {
    let Some(code) = e.as_database_error().and_then(|d| d.code()) else {
        return FailureKind::Retryable;
    };
    let declared_fatal = fatal_sqlstates
        .iter()
        .any(|f| f.as_str() == code || (f.len() == 2 && code.starts_with(f.as_str())));
    if declared_fatal && !TRANSIENT_SQLSTATES.contains(&code.as_ref()) {
        FailureKind::Fatal
    } else {
        FailureKind::Retryable
    }
}
