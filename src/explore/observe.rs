//! What the business sees: the queries `skald explore` compares after every fault, and
//! the legacy transaction it compares them with.
//!
//! An *observe file* (`<saga>.observe.sql` beside the saga file, or `--observe`) holds
//! read-only queries separated by `;`. Their `:name` parameters are the start
//! payload's top-level fields, bound with the types the queries declare. Each query's
//! rows, as JSON, are one part of an observation; two observations are equal when
//! every query returned the same rows in the same order (so write `ORDER BY` where a
//! query can return several rows, and leave out what differs between runs of the
//! same business outcome, such as generated ids).

use std::path::Path;

use serde_json::Value;
use sqlx::{AssertSqlSafe, Either, Executor, PgPool, SqlSafeStr, Statement};

use super::ExploreError;
use crate::saga::sql::{compile_named, split_statements};
use crate::store::params;

/// One query of an observe file.
#[derive(Debug, Clone)]
struct Query {
    /// As written, for reports.
    text: String,
    /// Wrapped to return its rows as one JSON text, with `$n` parameters.
    statement: String,
    /// The payload fields bound to `$1..$n`.
    names: Vec<String>,
}

/// The queries of an observe file.
#[derive(Debug, Clone)]
pub struct Observer {
    queries: Vec<Query>,
}

/// What the queries returned, one JSON text per query.
pub type Observation = Vec<String>;

impl Observer {
    /// Reads the queries of `file`.
    pub fn read(file: &Path) -> Result<Observer, ExploreError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ExploreError::Input(format!("{}: {e}", file.display())))?;
        let statements = split_statements(&text)
            .map_err(|e| ExploreError::Input(format!("{}: {e}", file.display())))?;
        let queries = statements
            .into_iter()
            .map(|q| {
                let (statement, names) = compile_named(q)
                    .map_err(|e| ExploreError::Input(format!("{}: {e}", file.display())))?;
                Ok(Query {
                    text: q.to_string(),
                    statement: format!(
                        "SELECT coalesce(json_agg(q)::text, '[]') FROM ({statement}) q"
                    ),
                    names,
                })
            })
            .collect::<Result<Vec<_>, ExploreError>>()?;
        if queries.is_empty() {
            return Err(ExploreError::Input(format!(
                "{}: no query to observe",
                file.display()
            )));
        }
        Ok(Observer { queries })
    }

    /// Runs every query against `pool` with parameters from `payload`.
    pub async fn observe(
        &self,
        pool: &PgPool,
        payload: &Value,
    ) -> Result<Observation, ExploreError> {
        let mut conn = pool.acquire().await.map_err(ExploreError::db)?;
        let mut out = Vec::with_capacity(self.queries.len());
        for q in &self.queries {
            let fail = |e: sqlx::Error| {
                ExploreError::Input(format!(
                    "observe query `{}`: {}",
                    q.text,
                    crate::store::error_text(&e)
                ))
            };
            let prepared = (&mut *conn)
                .prepare(AssertSqlSafe(q.statement.clone()).into_sql_str())
                .await
                .map_err(fail)?;
            let declared = match prepared.parameters() {
                Some(Either::Left(types)) => types.to_vec(),
                _ => Vec::new(),
            };
            let mut query = sqlx::query_scalar::<_, String>(AssertSqlSafe(q.statement.clone()));
            for (name, ty) in q.names.iter().zip(&declared) {
                let value = payload.get(name).cloned().unwrap_or(Value::Null);
                let bound = params::convert(name, &value, ty)
                    .map_err(|e| ExploreError::Input(format!("observe query `{}`: {e}", q.text)))?;
                query = query.bind(bound);
            }
            out.push(query.fetch_one(&mut *conn).await.map_err(fail)?);
        }
        Ok(out)
    }

    /// The queries as written, for a report of what differed.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.queries.iter().map(|q| q.text.as_str())
    }
}

/// Runs the legacy transaction in `file` with `psql` against `database_url`, each
/// top-level payload field given as a psql variable (`-v name=value`; strings as
/// they are, other values as JSON), as the legacy application ran it.
pub async fn run_legacy(
    database_url: &str,
    file: &Path,
    payload: &Value,
) -> Result<(), ExploreError> {
    let mut cmd = tokio::process::Command::new("psql");
    cmd.args([
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        database_url,
        "-f",
    ])
    .arg(file);
    if let Some(fields) = payload.as_object() {
        for (name, value) in fields {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            cmd.arg("-v").arg(format!("{name}={text}"));
        }
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| ExploreError::Input(format!("cannot run psql for the legacy file: {e}")))?;
    if !out.status.success() {
        return Err(ExploreError::Input(format!(
            "the legacy file {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
