//! The `skald` command line. The only place (with `main`) that uses `anyhow`.
//! `instances.rs`: the dashboard's instance views and actions; `failures.rs`: its
//! failure groups; `queues.rs`: `skald queues migrate`.

mod failures;
mod instances;
mod queues;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::Value;
use uuid::Uuid;

use crate::app::{App, shutdown_signal};
use crate::config::Config;
use crate::engine::Faults;
use crate::envelope::{Envelope, Malformed, Outgoing, instance_id_for};
use crate::handlers::Handlers;
use crate::saga::coordinator::InstanceStatus;
use crate::saga::load_dir;
use crate::store::Store;
use crate::transport::Endpoint;

/// skald: a saga orchestrator on RabbitMQ and PostgreSQL.
///
/// Configuration comes from the environment: DATABASE_URL, AMQP_URL, and SKALD_*
/// (see README.md); the defaults point at local services.
#[derive(Debug, Parser)]
#[command(name = "skald", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the orchestrator: migrate, declare the broker topology, load sagas, consume.
    Run {
        /// What to do with live instances of a saga version no longer loaded: refuse
        /// to start (default), or park them as failed with a dead letter
        /// (`orphaned_version`). Overrides SKALD_ORPHANED.
        #[arg(long, value_enum)]
        orphaned: Option<crate::config::Orphaned>,
    },
    /// Start a saga instance; prints its ids once the broker confirmed the message.
    Start {
        /// The saga's name.
        saga: String,
        /// The aggregate id (default: read from the payload as the saga says).
        #[arg(long)]
        aggregate: Option<String>,
        /// The payload, a JSON object.
        #[arg(long, default_value = "{}")]
        data: String,
        /// The message id (default: a new UUID). The same id always means the same
        /// instance, so a retried `start` never starts a second one.
        #[arg(long)]
        message_id: Option<Uuid>,
        /// The publisher's per-aggregate sequence number, 0 to 2^63 - 1.
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=i64::MAX as u64))]
        sequence: Option<u64>,
        /// A W3C traceparent (`00-<trace id>-<span id>-<flags>`): the saga joins that
        /// trace. An invalid one is refused.
        #[arg(long, value_parser = parse_traceparent)]
        traceparent: Option<String>,
        /// Print the API's answer, `{"message_id", "instance_id"}`, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Count instances per saga and status.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check saga files without running anything.
    Validate {
        /// The directory of saga files (default: SKALD_SAGAS_DIR or `sagas`).
        dir: Option<PathBuf>,
    },
    /// Compare the saga files in DIR with the definitions live instances run; exit 1
    /// when deploying them would strand or silently change live instances.
    Diff {
        /// The directory of saga files (default: SKALD_SAGAS_DIR or `sagas`).
        dir: Option<PathBuf>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// List instances with the API's filters.
    #[command(subcommand)]
    Instances(instances::InstancesCmd),
    /// Show one instance, or retry, cancel or resume it as the dashboard does.
    #[command(subcommand)]
    Instance(instances::InstanceCmd),
    /// Failure groups: list them, retry or discard a whole group.
    #[command(subcommand)]
    Failures(failures::FailuresCmd),
    /// Inspect, replay or discard dead letters.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Measure throughput against a hand-written baseline worker (see BENCHMARKS.md).
    Bench(crate::bench::BenchArgs),
    /// Run a saga through every crash and fault point against scratch databases and
    /// check every promise held (exit 0), or report where one broke (exit 1).
    Explore(crate::explore::ExploreArgs),
    /// Draft a saga file from a legacy transaction (a psql script: BEGIN; … COMMIT;).
    Scaffold(ScaffoldArgs),
    /// Participant services: their dead letters, and the sample services.
    #[command(subcommand)]
    Participant(ParticipantCmd),
    /// RabbitMQ queues: move a deployment to another queue type (classic, quorum).
    #[command(subcommand)]
    Queues(queues::QueuesCmd),
}

/// `skald scaffold` arguments.
#[derive(Debug, clap::Args)]
struct ScaffoldArgs {
    /// The legacy transaction: a psql script holding one BEGIN; … COMMIT;.
    legacy: PathBuf,
    /// The saga's name: `[a-z][a-z0-9_]*`, at most 63 characters.
    #[arg(long, value_parser = saga_name)]
    name: String,
    /// Write the draft to this file instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Overwrite `--out` when it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
enum ParticipantCmd {
    /// List, replay or discard a participant service's dead letters (in its database).
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(ServiceDlqCmd),
    /// Run one of the sample services (stock, payments, shipping) until Ctrl-C/SIGTERM,
    /// as `cargo run --example <service>_service` does.
    Sample {
        /// Which service.
        #[arg(value_enum)]
        service: crate::participant::sample::Sample,
        /// The service's database, created if missing (default
        /// postgres://postgres@127.0.0.1:5432/skald_<service>).
        #[arg(long, env = "SERVICE_DATABASE_URL")]
        database_url: Option<String>,
    },
}

/// Which dead letters a list shows, and how.
#[derive(Debug, clap::Args)]
struct ListArgs {
    /// Only this status: pending, replayed, discarded.
    #[arg(long)]
    status: Option<String>,
    /// At most this many, 1 to 1000.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1000))]
    limit: i64,
    /// Print one JSON object per line (JSON lines) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Where a service's dead letters are.
#[derive(Debug, clap::Args)]
struct ServiceDb {
    /// The service's name.
    #[arg(long)]
    service: String,
    /// The service's database.
    #[arg(long, env = "SERVICE_DATABASE_URL")]
    database_url: String,
}

/// One dead letter of a service, and who acts on it.
#[derive(Debug, clap::Args)]
struct ServiceLetter {
    #[command(flatten)]
    db: ServiceDb,
    /// The dead letter's id.
    #[arg(long)]
    id: Uuid,
    /// Who is acting (recorded; default: $USER).
    #[arg(long)]
    by: Option<String>,
    /// Print the letter as now recorded, as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum ServiceDlqCmd {
    /// List the service's dead letters, newest first.
    List {
        #[command(flatten)]
        db: ServiceDb,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Send a pending dead letter back to the service's queue, marked replayed.
    Replay {
        #[command(flatten)]
        letter: ServiceLetter,
    },
    /// Set a pending dead letter aside for good (recorded, never erased).
    Discard {
        #[command(flatten)]
        letter: ServiceLetter,
        /// Why (recorded).
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCmd {
    /// List dead letters, newest first.
    List {
        /// Only this kind: malformed, unprocessable, exhausted, compensation_failed, orphaned.
        #[arg(long)]
        kind: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one dead letter: reason, body, error history, resolution.
    Show {
        /// Its id.
        id: Uuid,
    },
    /// Send a dead letter back for processing (again: idempotent).
    Replay {
        /// Its id.
        id: Uuid,
        /// A JSON object replacing the payload (recorded on the letter).
        #[arg(long)]
        data: Option<String>,
        /// Who is replaying (recorded; default: $USER).
        #[arg(long)]
        by: Option<String>,
        /// Print the API's answer, `{"id", "replayed", "already_replayed"}`, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a dead letter aside (recorded, never erased).
    Discard {
        /// Its id.
        id: Uuid,
        /// Who is discarding (recorded; default: $USER).
        #[arg(long)]
        by: Option<String>,
        /// Why (recorded).
        #[arg(long)]
        note: Option<String>,
        /// Print the API's answer, `{"id", "status"}`, as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the arguments, runs the command, and maps failure to a non-zero exit.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // A sample service exports under its own name, as its `examples/` binary does.
    let service = match &cli.command {
        Cmd::Participant(ParticipantCmd::Sample { service, .. }) => service.name(),
        _ => "skald",
    };
    // Dropped after the command: flushes the spans not yet exported.
    let _telemetry = match crate::telemetry::init(service).map_err(|e| e.to_string()) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `SKALD_LOG`, as text or (`SKALD_LOG_FORMAT=json`) one
/// JSON object per line carrying the fields of the spans it happened in; exports traces
/// when the `OTEL_*` variables name an endpoint ([`crate::telemetry::init`], service
/// name `skald` unless `OTEL_SERVICE_NAME` says otherwise). Keep the guard until exit.
pub fn init_tracing() -> Result<crate::telemetry::Telemetry, String> {
    crate::telemetry::init("skald").map_err(|e| e.to_string())
}

/// An actix system on a multi-threaded tokio runtime: actors run on the system's
/// thread, while the broker's and database's I/O tasks can use the other cores.
fn actix_system() -> actix::SystemRunner {
    actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = || Config::from_env().context("configuration");
    match cli.command {
        Cmd::Run { orphaned } => {
            let mut config = config()?;
            if let Some(orphaned) = orphaned {
                config.orphaned = orphaned;
            }
            let faults = Faults::from_env().map_err(anyhow::Error::msg)?;
            actix_system().block_on(async move {
                let app = App::build(config, Handlers::default(), faults).await?;
                app.run_until(shutdown_signal()).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Start {
            saga,
            aggregate,
            data,
            message_id,
            sequence,
            traceparent,
            json,
        } => {
            let config = config()?;
            let payload: Value = serde_json::from_str(&data).context("--data is not JSON")?;
            anyhow::ensure!(payload.is_object(), "--data must be a JSON object");
            // Refused here, as the API refuses it, rather than dead-lettered later.
            let def = saga_to_start(&config, &saga)?;
            // The aggregate id is the routing key (it picks the partition), so find it
            // here when not given: where the saga definition says it is.
            let aggregate = match aggregate {
                Some(a) => a,
                None => def.aggregate_of(&payload).with_context(|| {
                    format!(
                        "the payload has no {} (saga {saga}'s aggregate); pass --aggregate",
                        def.aggregate
                    )
                })?,
            };
            let envelope = Envelope {
                message_id: message_id.unwrap_or_else(Uuid::new_v4),
                sequence,
                traceparent,
                ..Envelope::start(&saga, Some(aggregate), payload)
            };
            envelope.check().context("refusing to publish this start")?;
            tokio_runtime()?.block_on(async {
                let transport = crate::transport::connect(&config, Endpoint::Orchestrator)
                    .await
                    .with_context(|| format!("connecting to {}", config.transport.server()))?;
                Outgoing::to_intake(envelope.clone(), 0)
                    .send(transport.as_ref())
                    .await
                    .context("publishing the start message")?;
                transport.close().await;
                anyhow::Ok(())
            })?;
            let instance_id = instance_id_for(envelope.message_id);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "message_id": envelope.message_id, "instance_id": instance_id })
                );
            } else {
                println!(
                    "message_id={} instance_id={instance_id}",
                    envelope.message_id
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json } => {
            let config = config()?;
            let (counts, versions) = tokio_runtime()?.block_on(async {
                let store = Store::connect(&config.database_url, 2).await?;
                store.migrate().await?;
                let counts = store.status_counts().await?;
                let versions = store.live_per_version().await?;
                store.close().await;
                anyhow::Ok((counts, versions))
            })?;
            print!("{}", render_status(&counts, &versions, json));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate { dir } => {
            let dir = match dir {
                Some(d) => d,
                None => config()?.sagas_dir,
            };
            match load_dir(&dir) {
                Ok(sagas) => {
                    for warning in crate::saga::setup::setup_warnings(&sagas) {
                        eprintln!("{warning}");
                    }
                    // A saga loaded in several versions is listed once per version.
                    let names: Vec<String> = sagas
                        .iter()
                        .map(|s| {
                            if sagas.iter().filter(|o| o.name == s.name).count() > 1 {
                                format!("{} v{}", s.name, s.version)
                            } else {
                                s.name.clone()
                            }
                        })
                        .collect();
                    println!(
                        "ok: {} saga(s) in {}: {}",
                        sagas.len(),
                        dir.display(),
                        names.join(", ")
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    eprintln!("{} error(s)", errors.len());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::Diff { dir } => {
            let config = config()?;
            let dir = dir.unwrap_or_else(|| config.sagas_dir.clone());
            let sagas = match load_dir(&dir) {
                Ok(sagas) => sagas,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    eprintln!("{} error(s)", errors.len());
                    return Ok(ExitCode::from(2));
                }
            };
            let disk = crate::saga::Catalog::new(sagas);
            let report = tokio_runtime()?.block_on(async {
                let store = Store::connect(&config.database_url, 2).await?;
                store.migrate().await?;
                let live = store.live_positions().await?;
                let recorded = store.recorded_definitions().await?;
                store.close().await;
                anyhow::Ok(crate::saga::diff::diff(&disk, &live, &recorded))
            })?;
            print!("{}", report.render());
            Ok(if report.is_safe() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Migrate => {
            let config = config()?;
            tokio_runtime()?.block_on(async {
                let store = Store::connect(&config.database_url, 2).await?;
                store.migrate().await?;
                store.close().await;
                anyhow::Ok(())
            })?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Instances(cmd) => {
            let config = config()?;
            tokio_runtime()?.block_on(instances::run_instances(config, cmd))
        }
        Cmd::Instance(cmd) => {
            let config = config()?;
            tokio_runtime()?.block_on(instances::run_instance(config, cmd))
        }
        Cmd::Failures(cmd) => {
            let config = config()?;
            tokio_runtime()?.block_on(failures::run(config, cmd))
        }
        Cmd::Dlq(cmd) => {
            let config = config()?;
            tokio_runtime()?.block_on(run_dlq(config, cmd))
        }
        Cmd::Queues(cmd) => {
            let config = config()?;
            tokio_runtime()?.block_on(queues::run(config, cmd))
        }
        Cmd::Bench(args) => {
            let config = config()?;
            actix_system().block_on(crate::bench::run(config, args))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Scaffold(args) => run_scaffold(&args),
        Cmd::Explore(args) => {
            let config = config()?;
            let report =
                tokio_runtime()?.block_on(crate::explore::explore(&config.database_url, &args))?;
            print!("{}", report.render());
            Ok(if report.held() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Participant(ParticipantCmd::DeadLetters(cmd)) => {
            tokio_runtime()?.block_on(run_service_dlq(cmd))
        }
        Cmd::Participant(ParticipantCmd::Sample {
            service,
            database_url,
        }) => {
            let config = config()?;
            let faults = crate::participant::faults::ParticipantFaults::from_env()
                .map_err(anyhow::Error::msg)?;
            let url = database_url.unwrap_or_else(|| service.default_database_url());
            tokio_runtime()?.block_on(service.run(&url, &config, faults, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints dead letters: one JSON object per line with `--json` (nothing when there are
/// none), else `line` of each, or `no dead letters`.
fn print_letters<T: serde::Serialize>(
    letters: &[T],
    json: bool,
    line: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    for letter in letters {
        if json {
            println!("{}", serde_json::to_string(letter)?);
        } else {
            println!("{}", line(letter));
        }
    }
    if !json && letters.is_empty() {
        println!("no dead letters");
    }
    Ok(())
}

/// Who runs an operator action: `--by`, else `$USER`, else `cli`.
fn operator(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "cli".to_string())
}

async fn run_service_dlq(cmd: ServiceDlqCmd) -> anyhow::Result<ExitCode> {
    use crate::participant::dead_letters::{self, DeadLetter};
    let connect = |db: &ServiceDb| {
        let url = db.database_url.clone();
        async move {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(&url)
                .await
                .context("connecting to the service's database")?;
            crate::participant::store::migrate(&pool).await?;
            anyhow::Ok(pool)
        }
    };
    let print = |letter: &DeadLetter, json: bool, verb: &str| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string(letter)?);
        } else {
            println!("{verb} {}", letter.id);
        }
        Ok(())
    };
    match cmd {
        ServiceDlqCmd::List { db, list } => {
            let pool = connect(&db).await?;
            let letters =
                dead_letters::list(&pool, &db.service, list.status.as_deref(), list.limit).await?;
            print_letters(&letters, list.json, |l| {
                format!(
                    "{}  {:<13} {:<9} {}  {}",
                    l.id,
                    l.reason_code,
                    l.status,
                    l.created_at.format("%Y-%m-%d %H:%M:%S"),
                    l.reason
                )
            })?;
        }
        ServiceDlqCmd::Replay { letter: l } => {
            let pool = connect(&l.db).await?;
            let config = Config::from_env().context("configuration")?;
            let endpoint = crate::transport::Endpoint::Service(l.db.service.clone());
            let transport = crate::transport::connect(&config, endpoint)
                .await
                .context("connecting to the transport")?;
            let by = operator(l.by);
            let replayed =
                dead_letters::replay(&pool, transport.as_ref(), &l.db.service, l.id, &by).await;
            transport.close().await;
            print(&replayed?, l.json, "replayed")?;
        }
        ServiceDlqCmd::Discard { letter: l, note } => {
            let pool = connect(&l.db).await?;
            let by = operator(l.by);
            let discarded =
                dead_letters::discard(&pool, &l.db.service, l.id, &by, note.as_deref()).await?;
            print(&discarded, l.json, "discarded")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The `skald status` report: one row per saga, one column per status; then, when
/// some instances are live, a table of live instances per saga version. As JSON:
/// `{"sagas": {saga: {status: n}}, "live_per_version": [{"saga", "version", "live"}]}`.
pub fn render_status(
    counts: &[crate::store::StatusCount],
    versions: &[crate::store::VersionCount],
    json: bool,
) -> String {
    let mut sagas: Vec<&str> = counts.iter().map(|c| c.saga.as_str()).collect();
    sagas.dedup();
    let count = |saga: &str, status: InstanceStatus| {
        counts
            .iter()
            .find(|c| c.saga == saga && c.status == status)
            .map_or(0, |c| c.count)
    };
    if json {
        let map: serde_json::Map<String, Value> = sagas
            .iter()
            .map(|&saga| {
                let row: serde_json::Map<String, Value> = InstanceStatus::ALL
                    .iter()
                    .map(|&st| (st.as_str().to_string(), count(saga, st).into()))
                    .collect();
                (saga.to_string(), Value::Object(row))
            })
            .collect();
        return format!(
            "{}\n",
            serde_json::json!({ "sagas": map, "live_per_version": versions })
        );
    }
    if sagas.is_empty() {
        return "no saga instances yet\n".to_string();
    }
    let width = sagas.iter().map(|s| s.len()).max().unwrap_or(4).max(4);
    let mut out = format!("{:width$}", "saga");
    for st in InstanceStatus::ALL {
        out += &format!("  {:>12}", st.as_str());
    }
    out.push('\n');
    for saga in sagas {
        out += &format!("{saga:width$}");
        for st in InstanceStatus::ALL {
            out += &format!("  {:>12}", count(saga, st));
        }
        out.push('\n');
    }
    out + &render_versions(versions)
}

/// Live instances per saga version, after a blank line; nothing when none is live.
fn render_versions(versions: &[crate::store::VersionCount]) -> String {
    if versions.is_empty() {
        return String::new();
    }
    let width = versions
        .iter()
        .map(|v| v.saga.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!("\n{:width$}  {:>10}  {:>12}\n", "saga", "version", "live");
    for v in versions {
        out += &format!("{:width$}  {:>10}  {:>12}\n", v.saga, v.version, v.live);
    }
    out
}

async fn run_dlq(config: Config, cmd: DlqCmd) -> anyhow::Result<ExitCode> {
    use crate::store::dead_letters::{self, DeadLetterKind, DeadLetterStatus};
    let store = Store::connect(&config.database_url, 2).await?;
    store.migrate().await?;
    match cmd {
        DlqCmd::List { kind, list } => {
            let kind = kind
                .map(|k| DeadLetterKind::parse(&k).with_context(|| format!("unknown kind {k:?}")))
                .transpose()?;
            let status = list
                .status
                .map(|s| {
                    DeadLetterStatus::parse(&s).with_context(|| format!("unknown status {s:?}"))
                })
                .transpose()?;
            let letters = dead_letters::list(store.pool(), kind, status, list.limit).await?;
            print_letters(&letters, list.json, |l| {
                format!(
                    "{}  {:<19} {:<9} {}  {}",
                    l.id,
                    l.kind.as_str(),
                    l.status.as_str(),
                    l.created_at.format("%Y-%m-%d %H:%M:%S"),
                    l.reason
                )
            })?;
        }
        DlqCmd::Show { id } => {
            let letter = dead_letters::get(store.pool(), id, false)
                .await?
                .with_context(|| format!("no dead letter {id}"))?;
            let mut json = serde_json::to_value(&letter)?;
            json["body"] = match letter.body_text() {
                Some(text) => {
                    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into()))
                }
                None => Value::String(format!("<{} bytes, not UTF-8>", letter.body.len())),
            };
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        DlqCmd::Replay { id, data, by, json } => {
            let data = data
                .map(|d| serde_json::from_str::<Value>(&d).context("--data is not JSON"))
                .transpose()?;
            let transport = crate::transport::connect(&config, Endpoint::Orchestrator).await?;
            let outcome =
                crate::dlq::replay(&store, transport.as_ref(), id, data, &operator(by)).await;
            transport.close().await;
            let outcome = outcome?;
            let already = matches!(outcome, crate::dlq::ReplayOutcome::AlreadyReplayed { .. });
            match outcome {
                _ if json => println!(
                    "{}",
                    serde_json::json!({ "id": id, "replayed": true, "already_replayed": already })
                ),
                crate::dlq::ReplayOutcome::Replayed => println!("replayed {id}"),
                crate::dlq::ReplayOutcome::AlreadyReplayed { by, at } => println!(
                    "{id} was already replayed by {} at {}; its message was sent again \
                     (dropped as a copy if the first one arrived)",
                    by.unwrap_or_default(),
                    at.map(|t| t.to_rfc3339()).unwrap_or_default()
                ),
            }
        }
        DlqCmd::Discard { id, by, note, json } => {
            match crate::dlq::discard(&store, id, &operator(by), note.as_deref()).await? {
                outcome if json => {
                    println!(
                        "{}",
                        serde_json::json!({ "id": id, "status": outcome.status() })
                    );
                }
                crate::dlq::DiscardOutcome::Discarded => println!("discarded {id}"),
                crate::dlq::DiscardOutcome::AlreadyResolved(status) => {
                    println!("{id} is already {}; nothing changed", status.as_str())
                }
            }
        }
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

/// The definition of saga `saga` in the configured sagas directory; an unknown saga
/// is refused with the API's message.
fn saga_to_start(config: &Config, saga: &str) -> anyhow::Result<crate::saga::SagaDef> {
    load_sagas(config)?
        .into_iter()
        .find(|s| s.name == saga)
        .ok_or_else(|| Malformed::UnknownSaga(saga.to_string()).into())
}

/// The sagas of the configured sagas directory, which must load.
fn load_sagas(config: &Config) -> anyhow::Result<Vec<crate::saga::SagaDef>> {
    load_dir(&config.sagas_dir).map_err(|errors| {
        anyhow::anyhow!(
            "the sagas in {} do not load ({} error(s)); see skald validate",
            config.sagas_dir.display(),
            errors.len()
        )
    })
}

/// A saga name as saga files allow it (checked again by `skald validate`).
fn saga_name(name: &str) -> Result<String, String> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63;
    if valid {
        Ok(name.to_string())
    } else {
        Err(
            "a saga name is a lower-case letter then lower-case letters, digits or _, at \
             most 63 characters"
                .into(),
        )
    }
}

/// `skald scaffold`: the draft on stdout or in `--out`; on stderr, its TODOs and whether
/// it passes `skald validate` as it is.
fn run_scaffold(args: &ScaffoldArgs) -> anyhow::Result<ExitCode> {
    if let Some(out) = &args.out
        && out.exists()
        && !args.force
    {
        anyhow::bail!("{} exists: pass --force to overwrite it", out.display());
    }
    let legacy = args.legacy.display().to_string();
    let text = std::fs::read_to_string(&args.legacy).with_context(|| legacy.clone())?;
    let draft = crate::scaffold::scaffold(&text, &legacy, &args.name)
        .map_err(|e| anyhow::anyhow!("{legacy}: {e}"))?;
    let target = match &args.out {
        Some(out) => {
            std::fs::write(out, &draft.yaml).with_context(|| out.display().to_string())?;
            out.display().to_string()
        }
        None => {
            print!("{}", draft.yaml);
            "<stdout>".to_string()
        }
    };
    eprintln!(
        "drafted saga `{}` from {legacy}: {} TODO(s)",
        args.name,
        draft.todos.len()
    );
    for (line, todo) in &draft.todos {
        eprintln!("{target}:{line}: TODO: {todo}");
    }
    let as_file = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.yaml", args.name)));
    match crate::saga::load_str(&draft.yaml, &as_file) {
        Ok(_) => eprintln!("the draft passes `skald validate` as it is"),
        Err(errors) => {
            eprintln!(
                "the draft does not pass `skald validate` yet: fill in the TODOs above; it says"
            );
            for e in errors {
                eprintln!("{e}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--traceparent`: a valid W3C traceparent, or why not.
fn parse_traceparent(value: &str) -> Result<String, String> {
    crate::telemetry::TraceParent::parse(value)
        .map(|_| value.to_string())
        .map_err(|e| format!("not a W3C traceparent: {e}"))
}
