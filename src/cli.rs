//! The `skald` command line. The only place (with `main`) that uses `anyhow`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::Value;
use uuid::Uuid;

use crate::app::{App, shutdown_signal};
use crate::config::Config;
use crate::engine::Faults;
use crate::envelope::{Command, Envelope, Outgoing, instance_id_for};
use crate::handlers::Handlers;
use crate::saga::coordinator::InstanceStatus;
use crate::saga::load_dir;
use crate::store::Store;
use crate::transport::Transport;
use crate::transport::rabbitmq::RabbitTransport;

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
    Run,
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
        /// The publisher's per-aggregate sequence number.
        #[arg(long)]
        sequence: Option<u64>,
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
    /// Apply database migrations and exit.
    Migrate,
    /// Measure throughput against a hand-written baseline worker (see BENCHMARKS.md).
    Bench(crate::bench::BenchArgs),
}

/// Parses the arguments, runs the command, and maps failure to a non-zero exit.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKALD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
        Cmd::Run => {
            let config = config()?;
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
        } => {
            let config = config()?;
            let payload: Value = serde_json::from_str(&data).context("--data is not JSON")?;
            anyhow::ensure!(payload.is_object(), "--data must be a JSON object");
            let envelope = Envelope {
                message_id: message_id.unwrap_or_else(Uuid::new_v4),
                saga,
                aggregate_id: aggregate,
                sequence,
                dispatched_at: Some(chrono::Utc::now()),
                command: Command::Start,
                payload,
                outputs: Value::Null,
            };
            tokio_runtime()?.block_on(async {
                let transport = RabbitTransport::connect(&config.amqp_url, &config.namespace, 1)
                    .await
                    .context("connecting to RabbitMQ")?;
                transport
                    .publish(&Outgoing {
                        envelope: envelope.clone(),
                        delay_ms: 0,
                    })
                    .await
                    .context("publishing the start message")?;
                transport.close().await;
                anyhow::Ok(())
            })?;
            println!(
                "message_id={} instance_id={}",
                envelope.message_id,
                instance_id_for(envelope.message_id)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json } => {
            let config = config()?;
            let counts = tokio_runtime()?.block_on(async {
                let store = Store::connect(&config.database_url, 2).await?;
                store.migrate().await?;
                let counts = store.status_counts().await?;
                store.close().await;
                anyhow::Ok(counts)
            })?;
            print!("{}", render_status(&counts, json));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate { dir } => {
            let dir = match dir {
                Some(d) => d,
                None => config()?.sagas_dir,
            };
            match load_dir(&dir) {
                Ok(sagas) => {
                    let names: Vec<_> = sagas.iter().map(|s| s.name.as_str()).collect();
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
        Cmd::Bench(args) => {
            let config = config()?;
            actix_system().block_on(crate::bench::run(config, args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The `skald status` report: one row per saga, one column per status.
pub fn render_status(counts: &[crate::store::StatusCount], json: bool) -> String {
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
        return format!("{}\n", serde_json::json!({ "sagas": map }));
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
    out
}
