//! PostgreSQL, the only source of truth. All of skald's SQL lives in this module and
//! in `migrations/`.
//!
//! - [`Store`]: the pool, database creation, migrations, saga setup SQL, reports.
//! - [`steps`]: the statements of one step's transaction (the guarded record).
//! - [`effects`]: running a step's action in that transaction.
//! - [`commands`]: command steps' commands and the replies received.

pub mod commands;
pub mod dead_letters;
pub mod effects;
pub mod failures;
pub mod params;
pub mod queries;
pub mod steps;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::envelope::{Envelope, Outgoing};
use crate::saga::Catalog;
use crate::saga::SagaDef;
use crate::saga::coordinator::{Cursor, InstanceState, InstanceStatus, Phase};
use crate::saga::diff::{LiveAt, Recorded};
use crate::saga::versions::StoredVersion;
pub use steps::{InboxOutcome, NewInstance, Promoted, SharedTx, StepRecord, StepTx};

/// What can go wrong talking to PostgreSQL. Every variant is an infrastructure
/// problem (the step itself did not fail): callers retry the whole message later.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A query or connection failed.
    #[error("database: {}", error_text(.0))]
    Database(#[from] sqlx::Error),
    /// A migration could not be applied.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// `DATABASE_URL` could not be used.
    #[error("DATABASE_URL: {0}")]
    Url(String),
    /// A saga's `setup` SQL failed.
    #[error("setup SQL of saga {saga:?} version {version} failed: {source}")]
    Setup {
        /// The saga whose setup failed.
        saga: String,
        /// Its version (each loaded version's setup runs).
        version: u32,
        /// The database's error.
        source: sqlx::Error,
    },
    /// A stored row holds a value skald never writes (edited by hand?).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// A database error as a person reads it — `SQLSTATE <code>: <message>`, then
/// `; detail: …` and `; hint: …` when the server gave them — not the server's C
/// source line. Other errors as they display.
pub fn error_text(e: &sqlx::Error) -> String {
    let Some(db) = e.as_database_error() else {
        return e.to_string();
    };
    let mut text = match db.code() {
        Some(code) => format!("SQLSTATE {code}: {}", db.message()),
        None => db.message().to_string(),
    };
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        for (label, extra) in [("detail", pg.detail()), ("hint", pg.hint())] {
            if let Some(extra) = extra {
                text.push_str(&format!("; {label}: {extra}"));
            }
        }
    }
    text
}

impl StoreError {
    /// Whether PostgreSQL refused the *data* rather than failed: a data exception
    /// (SQLSTATE class 22, e.g. a value out of range or a NUL in text), an integrity
    /// violation (class 23) or a protocol violation from a value it could not read
    /// (08P01), or a value sqlx could not encode. Trying again cannot help.
    pub fn is_data_error(&self) -> bool {
        matches!(self, StoreError::Database(e) if is_data_error(e))
    }
}

/// Whether `e` is PostgreSQL refusing the data (see [`StoreError::is_data_error`]).
pub fn is_data_error(e: &sqlx::Error) -> bool {
    if matches!(e, sqlx::Error::Encode(_)) {
        return true;
    }
    let Some(code) = e.as_database_error().and_then(|d| d.code()) else {
        return false;
    };
    code.starts_with("22") || code.starts_with("23") || code == "08P01"
}

pub use crate::saga::decide::Disposal;

/// Count of instances of one saga in one status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatusCount {
    /// The saga's name.
    pub saga: String,
    /// The status counted.
    pub status: InstanceStatus,
    /// How many instances are in it.
    pub count: i64,
}

/// Live instances (waiting, running, compensating) of one saga version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VersionCount {
    /// The saga's name.
    pub saga: String,
    /// The version they started with.
    pub version: i32,
    /// How many are live.
    pub live: i64,
}

/// A handle on skald's database. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects to `database_url` with at most `max_connections`, creating the
    /// database first if it does not exist.
    pub async fn connect(database_url: &str, max_connections: u32) -> Result<Store, StoreError> {
        let options =
            PgConnectOptions::from_str(database_url).map_err(|e| StoreError::Url(e.to_string()))?;
        create_database_if_missing(&options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    /// The connection pool, for callers (tests, benchmarks) that query directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations in `migrations/` (embedded at build time). The
    /// bookkeeping table lives in skald's own schema, not in `public`.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.create_schema("skald");
        migrator.dangerous_set_table_name("skald._sqlx_migrations");
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// Runs each saga's `setup` SQL (idempotent by contract), in saga order, under an
    /// advisory lock: `CREATE ... IF NOT EXISTS` is not safe against a concurrent
    /// twin, and several processes may start at once.
    pub async fn run_setup(&self, sagas: &[SagaDef]) -> Result<(), StoreError> {
        const SETUP_LOCK: i64 = 0x736b_616c_6401; // "skald" + 1
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(SETUP_LOCK)
            .execute(&mut *conn)
            .await?;
        let mut result = Ok(());
        for saga in sagas {
            if let Some(sql) = &saga.setup_sql
                && let Err(source) = sqlx::raw_sql(AssertSqlSafe(sql.clone()))
                    .execute(&mut *conn)
                    .await
            {
                result = Err(StoreError::Setup {
                    saga: saga.name.clone(),
                    version: saga.version,
                    source,
                });
                break;
            }
        }
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(SETUP_LOCK)
            .execute(&mut *conn)
            .await?;
        result
    }

    /// Opens the transaction one message is handled in.
    pub async fn begin(&self) -> Result<StepTx, StoreError> {
        StepTx::begin(&self.pool).await
    }

    /// What the first handling of `message_id` sent on, to send again when a copy of
    /// it arrives; empty if it sent nothing (or was never handled).
    pub async fn outgoing_of(&self, message_id: Uuid) -> Result<Vec<Outgoing>, StoreError> {
        let row = sqlx::query("SELECT outgoing FROM skald.inbox WHERE message_id = $1")
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            None => Ok(Vec::new()),
            Some(row) => {
                let json: sqlx::types::Json<Vec<Outgoing>> = row.try_get("outgoing")?;
                Ok(json.0)
            }
        }
    }

    /// Why a message's record did not apply: it was handled before, its instance
    /// does not exist, or the instance is in another state than the message expected.
    pub async fn disposal(
        &self,
        message_id: Uuid,
        instance_id: Uuid,
    ) -> Result<Disposal, StoreError> {
        let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM skald.inbox WHERE message_id = $1) AS seen, \
                    i.status, i.step, i.phase, i.attempt \
             FROM (SELECT 1) one LEFT JOIN skald.instances i ON i.id = $2",
        )
        .bind(message_id)
        .bind(instance_id)
        .fetch_one(&self.pool)
        .await?;
        if row.try_get::<bool, _>("seen")? {
            return Ok(Disposal::Seen);
        }
        if row.try_get::<Option<String>, _>("status")?.is_none() {
            return Ok(Disposal::NoInstance);
        }
        Ok(Disposal::Live(state_from_row(&row)?))
    }

    /// The highest start sequence applied for `saga` on `aggregate_id`, if any.
    pub async fn watermark(
        &self,
        saga: &str,
        aggregate_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT sequence FROM skald.watermarks WHERE saga = $1 AND aggregate_id = $2",
        )
        .bind(saga)
        .bind(aggregate_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Instances per saga and status, for `skald status` and the dashboard.
    pub async fn status_counts(&self) -> Result<Vec<StatusCount>, StoreError> {
        let rows = sqlx::query(
            "SELECT saga, status, count(*) AS n FROM skald.instances \
             GROUP BY saga, status ORDER BY saga, status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                Ok(StatusCount {
                    saga: row.try_get("saga")?,
                    status: InstanceStatus::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?,
                    count: row.try_get("n")?,
                })
            })
            .collect()
    }

    /// Every (saga, version, hash) the database has instances of, with how many of
    /// them are live (waiting, running, compensating), sorted. Read once at start-up
    /// (it scans the instances).
    pub async fn stored_versions(&self) -> Result<Vec<StoredVersion>, StoreError> {
        let rows = sqlx::query(
            "SELECT saga, saga_version, saga_hash, \
                    count(*) FILTER (WHERE status IN ('waiting', 'running', 'compensating')) \
                      AS live \
             FROM skald.instances GROUP BY saga, saga_version, saga_hash \
             ORDER BY saga, saga_version, saga_hash",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let version: i32 = row.try_get("saga_version")?;
                Ok(StoredVersion {
                    saga: row.try_get("saga")?,
                    version: u32::try_from(version)
                        .map_err(|_| StoreError::Corrupt(format!("saga_version {version}")))?,
                    hash: row.try_get("saga_hash")?,
                    live: row.try_get("live")?,
                })
            })
            .collect()
    }

    /// Parks every live (waiting, running, compensating) instance of `saga` version
    /// `version`, which is no longer loaded: each becomes `failed` where it stood, with
    /// a pending dead letter of kind `orphaned` (code `orphaned_version`) holding the
    /// run message of its cursor, so that a replay resumes it once the version is
    /// loaded again. One transaction; returns how many were parked.
    pub async fn park_orphaned(&self, saga: &str, version: u32) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "UPDATE skald.instances SET status = 'failed', finished_at = now(), updated_at = now() \
             WHERE saga = $1 AND saga_version = $2 \
               AND status IN ('waiting', 'running', 'compensating') \
             RETURNING id, aggregate_id, status, step, phase, attempt, payload, outputs, deadline",
        )
        .bind(saga)
        .bind(version as i32)
        .fetch_all(&mut *tx)
        .await?;
        let reason = format!(
            "saga `{saga}` version {version} is not loaded: parked at start-up \
             (--orphaned=park); replay once the version is loaded again"
        );
        for row in &rows {
            let id: Uuid = row.try_get("id")?;
            let aggregate_id: String = row.try_get("aggregate_id")?;
            let cursor = state_from_row(row)?.cursor;
            let json = |column| {
                row.try_get::<sqlx::types::Json<serde_json::Value>, _>(column)
                    .map(|j| j.0)
            };
            let envelope = Envelope {
                outputs: json("outputs")?,
                deadline: row.try_get("deadline")?,
                ..Envelope::run(saga, version, &aggregate_id, id, cursor, json("payload")?)
            };
            let body = envelope.to_body();
            dead_letters::insert(
                &mut *tx,
                &dead_letters::NewDeadLetter {
                    id: Uuid::new_v5(&envelope.message_id, b"orphaned"),
                    kind: dead_letters::DeadLetterKind::Orphaned,
                    reason_code: "orphaned_version",
                    reason: &reason,
                    body: &body,
                    message_id: Some(envelope.message_id),
                    instance_id: Some(id),
                    saga: Some(saga),
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    /// Live instances per saga version (only versions that have some), sorted: what
    /// must drain before a version is removed.
    pub async fn live_per_version(&self) -> Result<Vec<VersionCount>, StoreError> {
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT saga, saga_version, count(*) FROM skald.instances \
             WHERE status IN ('waiting', 'running', 'compensating') \
             GROUP BY saga, saga_version ORDER BY saga, saga_version",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(saga, version, live)| VersionCount {
                saga,
                version,
                live,
            })
            .collect())
    }

    /// Records every loaded saga definition by (saga, version, hash), once: what
    /// `skald diff` compares the files on disk with.
    pub async fn record_definitions(&self, catalog: &Catalog) -> Result<(), StoreError> {
        for def in catalog.all() {
            sqlx::query(
                "INSERT INTO skald.saga_definitions (saga, version, hash, definition) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(&def.name)
            .bind(def.version as i32)
            .bind(def.content_hash())
            .bind(sqlx::types::Json(def.normalised()))
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Every recorded saga definition.
    pub async fn recorded_definitions(&self) -> Result<Vec<Recorded>, StoreError> {
        let rows: Vec<(String, i32, String, sqlx::types::Json<serde_json::Value>)> =
            sqlx::query_as(
                "SELECT saga, version, hash, definition FROM skald.saga_definitions \
                 ORDER BY saga, version, hash",
            )
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|(saga, version, hash, definition)| {
                Ok(Recorded {
                    saga,
                    version: version_of(version)?,
                    hash,
                    definition: definition.0,
                })
            })
            .collect()
    }

    /// Live instances (waiting, running, compensating) per saga, version, hash and
    /// step index.
    pub async fn live_positions(&self) -> Result<Vec<LiveAt>, StoreError> {
        let rows: Vec<(String, i32, Option<String>, i32, i64)> = sqlx::query_as(
            "SELECT saga, saga_version, saga_hash, step, count(*) FROM skald.instances \
             WHERE status IN ('waiting', 'running', 'compensating') \
             GROUP BY saga, saga_version, saga_hash, step \
             ORDER BY saga, saga_version, saga_hash, step",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(saga, version, hash, step, count)| {
                Ok(LiveAt {
                    saga,
                    version: version_of(version)?,
                    hash,
                    step: u32::try_from(step)
                        .map_err(|_| StoreError::Corrupt("negative step".into()))?,
                    count,
                })
            })
            .collect()
    }

    /// Closes every pooled connection, waiting for those in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A stored `integer` saga version as skald's `u32`.
fn version_of(version: i32) -> Result<u32, StoreError> {
    u32::try_from(version).map_err(|_| StoreError::Corrupt(format!("saga_version {version}")))
}

/// `CREATE DATABASE` through the server's `postgres` database when the target is
/// missing. Two processes racing to create it are both fine.
pub async fn create_database_if_missing(options: &PgConnectOptions) -> Result<(), StoreError> {
    let name = options.get_database().unwrap_or("postgres").to_string();
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let created = sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
            .execute(&mut admin)
            .await;
        match created {
            Ok(_) => tracing::info!(database = %name, "created database"),
            Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    admin.close().await?;
    Ok(())
}

/// An instance as an operator action needs it.
#[derive(Debug, Clone)]
pub struct InstanceSnapshot {
    /// The saga.
    pub saga: String,
    /// The saga version the instance started with: the one it runs, compensates and
    /// resumes on.
    pub saga_version: u32,
    /// The aggregate.
    pub aggregate_id: String,
    /// Status and cursor.
    pub state: InstanceState,
    /// The start payload.
    pub payload: serde_json::Value,
    /// The outputs so far.
    pub outputs: serde_json::Value,
    /// The saga's deadline, if it has a timeout.
    pub deadline: Option<chrono::DateTime<chrono::Utc>>,
}

/// Reads an instance and locks its row (inside a transaction) for an operator action.
pub async fn lock_instance(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<InstanceSnapshot>, StoreError> {
    let row = sqlx::query(
        "SELECT saga, saga_version, aggregate_id, status, step, phase, attempt, payload, outputs, deadline \
         FROM skald.instances WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(InstanceSnapshot {
        saga: row.try_get("saga")?,
        saga_version: u32::try_from(row.try_get::<i32, _>("saga_version")?)
            .map_err(|_| StoreError::Corrupt("negative saga_version".into()))?,
        aggregate_id: row.try_get("aggregate_id")?,
        state: state_from_row(&row)?,
        payload: row
            .try_get::<sqlx::types::Json<serde_json::Value>, _>("payload")?
            .0,
        outputs: row
            .try_get::<sqlx::types::Json<serde_json::Value>, _>("outputs")?
            .0,
        deadline: row.try_get("deadline")?,
    }))
}

/// Moves a parked instance back to life at `state`, with `payload` (possibly edited).
pub async fn resume_instance(
    conn: &mut PgConnection,
    id: Uuid,
    state: InstanceState,
    payload: &serde_json::Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE skald.instances SET status = $2, step = $3, phase = $4, attempt = $5, \
           payload = $6, finished_at = NULL, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(state.status.as_str())
    .bind(state.cursor.step as i32)
    .bind(state.cursor.phase.as_str())
    .bind(state.cursor.attempt as i32)
    .bind(sqlx::types::Json(payload))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The status and cursor columns (`status`, `step`, `phase`, `attempt`) of a row.
pub(crate) fn state_from_row(row: &sqlx::postgres::PgRow) -> Result<InstanceState, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(InstanceState {
        status: InstanceStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?,
        cursor: cursor_from_row(row)?,
    })
}

/// The cursor columns (`step`, `phase`, `attempt`) of a row.
pub(crate) fn cursor_from_row(row: &sqlx::postgres::PgRow) -> Result<Cursor, StoreError> {
    let phase: String = row.try_get("phase")?;
    let corrupt = |what: String| StoreError::Corrupt(what);
    Ok(Cursor {
        step: u32::try_from(row.try_get::<i32, _>("step")?)
            .map_err(|_| corrupt("negative step".into()))?,
        phase: Phase::parse(&phase).ok_or_else(|| corrupt(format!("phase {phase:?}")))?,
        attempt: u32::try_from(row.try_get::<i32, _>("attempt")?)
            .map_err(|_| corrupt("negative attempt".into()))?,
    })
}
