//! `skald bench --steps command`: the sample `order_services` saga (three command
//! steps) run by the three sample participant services in this process, each on a
//! scratch database of its own, beside the SQL-step run and the baseline.
//!
//! Timed like the SQL-step run: every start is published first, then skald and the
//! services consume until every instance is terminal. A step is a command answered
//! `succeeded` (two commits — the service's and skald's — and two confirmed
//! publishes); its latency is from skald's commit of the send to skald's commit of
//! the reply (`skald.commands.sent_at` to `answered_at`).

use std::time::Instant;

use anyhow::Context as _;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use serde::Serialize;
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};

use crate::app::App;
use crate::config::{Config, TransportKind};
use crate::engine::Faults;
use crate::envelope::{Envelope, Outgoing};
use crate::handlers::Handlers;
use crate::participant::sample::Sample;
use crate::participant::{Participant, ParticipantError, connect_pool};
use crate::transport::rabbitmq::Topology;
use crate::transport::{Endpoint, Transport};

use super::deadline::Deadline;

const SAMPLES: [Sample; 3] = [Sample::Stock, Sample::Payments, Sample::Shipping];

/// The reply timeout the bench gives every command step (the sample's 5 s would make
/// a queue backlog re-send commands: the bench measures steps, not re-sends).
const REPLY_TIMEOUT_MS: u64 = 600_000;

/// How long a run stopped by the deadline waits for skald and the services to stop.
const STOP_AFTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the command-step run measured.
#[derive(Debug, Serialize)]
pub struct CommandReport {
    /// Sagas that reached `completed`.
    pub completed: i64,
    /// Seconds from the first consume until every instance was terminal.
    pub seconds: f64,
    /// `completed / seconds`.
    pub sagas_per_s: f64,
    /// Command steps answered `succeeded` per second (3 per sample saga).
    pub steps_per_s: f64,
    /// `steps_per_s` over the baseline's messages/s.
    pub ratio: f64,
    /// Median command step latency (skald's send committed to its reply applied), ms.
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
}

/// What one command-step run is given.
pub struct Run<'a> {
    /// The server's connection options (any database).
    pub base: &'a PgConnectOptions,
    /// The bench's scratch name, which this run's names extend.
    pub scratch: &'a str,
    /// Sagas to run.
    pub sagas: usize,
    /// Aggregates they are spread over.
    pub aggregates: usize,
    /// The baseline's messages/s, for the ratio.
    pub baseline_msgs_per_s: f64,
    /// The whole bench's deadline.
    pub deadline: &'a Deadline,
}

/// Runs the command-step mode on scratch databases `<scratch>_cmd` (skald's) and
/// `<scratch>_cmd_<service>` under namespace `<scratch>_cmd`, and removes them (also
/// when the deadline stops it).
pub async fn run(config: &Config, run: Run<'_>) -> anyhow::Result<CommandReport> {
    let Run { base, scratch, .. } = run;
    let name = format!("{scratch}_cmd");
    let source_dir = config.sagas_dir.clone();
    let sagas_dir = std::env::temp_dir().join(&name);
    let config = &Config {
        database_url: base.clone().database(&name).to_url_lossy().to_string(),
        namespace: name.clone(),
        sagas_dir: sagas_dir.clone(),
        ..config.clone()
    };
    let result = async {
        write_saga(&source_dir, &sagas_dir)?;
        measure(config, &name, &run).await
    }
    .await;
    let _ = std::fs::remove_dir_all(&sagas_dir);
    for sample in SAMPLES {
        let endpoint = Endpoint::Service(sample.name().into()).prefix(&name);
        if config.transport == TransportKind::RabbitMq {
            delete_queues(config, &Topology::new(&endpoint, config.partitions)).await;
        }
        super::cleanup(base, config, &format!("{name}_{}", sample.name())).await;
    }
    super::cleanup(base, config, &name).await;
    result
}

/// The sample saga from the configured sagas directory `from`, with
/// [`REPLY_TIMEOUT_MS`], into `dir`.
fn write_saga(from: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<()> {
    let source = from.join("order_services.yaml");
    let saga = std::fs::read_to_string(&source)
        .with_context(|| format!("the command-step mode runs {}", source.display()))?;
    std::fs::create_dir_all(dir)?;
    let saga = saga.replace(
        "timeout_ms: 5000",
        &format!("timeout_ms: {REPLY_TIMEOUT_MS}"),
    );
    std::fs::write(dir.join("order_services.yaml"), saga)?;
    Ok(())
}

async fn measure(config: &Config, name: &str, run: &Run<'_>) -> anyhow::Result<CommandReport> {
    let Run {
        base,
        sagas,
        aggregates,
        baseline_msgs_per_s,
        deadline,
        ..
    } = *run;
    let (app, services) = deadline
        .within(
            "starting skald and the services for the command-step run",
            async {
                let app = App::build(config.clone(), Handlers::default(), Faults::none()).await?;
                let mut services = Vec::new();
                for sample in SAMPLES {
                    let url = base
                        .clone()
                        .database(&format!("{name}_{}", sample.name()))
                        .to_url_lossy()
                        .to_string();
                    services.push((sample, prepare(config, sample, &url, aggregates).await?));
                }
                Ok((app, services))
            },
        )
        .await?;
    let pool = app.store().pool().clone();
    deadline
        .within("publishing the command-step run's starts", async {
            // The configured transport, as skald's own (`App::build`) and the services' are.
            let transport = crate::transport::connect(config, Endpoint::Orchestrator).await?;
            publish_all(transport.as_ref(), sagas, aggregates).await?;
            transport.close().await;
            Ok(())
        })
        .await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut running = Vec::new();
    for (_, participant) in services {
        let mut stop = stop_rx.clone();
        running.push(tokio::spawn(participant.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    let mut stop = stop_rx.clone();
    let app = actix::spawn(app.run_until(async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    let completed =
        match super::wait_terminal(&pool, sagas as i64, deadline, "command-step run").await {
            Ok(completed) => completed,
            Err(e) => {
                // Stopped before the scratch databases are dropped, so that nothing logs
                // their loss; nothing waits long for them.
                let _ = stop_tx.send(true);
                let stopped = async {
                    let _ = app.await;
                    for service in running {
                        let _ = service.await;
                    }
                };
                let _ = tokio::time::timeout(STOP_AFTER_TIMEOUT, stopped).await;
                return Err(e);
            }
        };
    let seconds = started.elapsed().as_secs_f64();
    let (steps, p50_ms, p99_ms): (i64, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*), \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) \
         FROM (SELECT extract(epoch FROM answered_at - sent_at) * 1000 AS ms \
               FROM skald.commands WHERE status = 'succeeded') s",
    )
    .fetch_one(&pool)
    .await?;
    let _ = stop_tx.send(true);
    app.await??;
    for service in running {
        service.await??;
    }
    pool.close().await;
    let steps_per_s = steps as f64 / seconds;
    Ok(CommandReport {
        completed,
        seconds,
        sagas_per_s: completed as f64 / seconds,
        steps_per_s,
        ratio: steps_per_s / baseline_msgs_per_s,
        p50_ms: p50_ms.unwrap_or(0.0),
        p99_ms: p99_ms.unwrap_or(0.0),
    })
}

/// One sample service built on its scratch database (its tables, and a SKU and an
/// account per bench aggregate, so that sagas on different aggregates never wait on
/// each other's rows), ready to run.
async fn prepare(
    config: &Config,
    sample: Sample,
    url: &str,
    aggregates: usize,
) -> Result<Participant, ParticipantError> {
    let pool = connect_pool(url, config.db_pool).await?;
    sample.setup(&pool).await?;
    seed(&pool, sample, aggregates).await?;
    let transport =
        crate::transport::connect(config, Endpoint::Service(sample.name().into())).await?;
    let builder = Participant::builder(sample.name())
        .pool(pool)
        .transport(transport)
        .shutdown_timeout(config.shutdown_timeout);
    sample.register(builder).build().await
}

async fn seed(pool: &PgPool, sample: Sample, aggregates: usize) -> Result<(), sqlx::Error> {
    let sql = match sample {
        Sample::Stock => {
            "INSERT INTO stock.items (sku, available) SELECT 'bench-' || g, 1000000000 \
             FROM generate_series(0, $1 - 1) g ON CONFLICT DO NOTHING"
        }
        Sample::Payments => {
            "INSERT INTO payments.accounts (account, balance) SELECT 'bench-' || g, 1000000000 \
             FROM generate_series(0, $1 - 1) g ON CONFLICT DO NOTHING"
        }
        Sample::Shipping => return Ok(()),
    };
    sqlx::query(sql)
        .bind(aggregates as i64)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Every start, confirmed a window at a time, in order within each aggregate.
async fn publish_all(
    transport: &dyn Transport,
    sagas: usize,
    aggregates: usize,
) -> anyhow::Result<()> {
    let message = |i: usize| {
        let agg = format!("bench-{}", i % aggregates);
        Outgoing::to_intake(
            Envelope {
                sequence: Some((i / aggregates) as u64),
                ..Envelope::start(
                    "order_services",
                    Some(agg.clone()),
                    json!({"order_id": format!("order-{i}"), "sku": agg, "qty": 1,
                           "account": agg, "amount": 1.5}),
                )
            },
            0,
        )
    };
    for start in (0..sagas).step_by(1000) {
        let window: Vec<Outgoing> = (start..(start + 1000).min(sagas)).map(message).collect();
        let mut confirms: FuturesUnordered<_> = window.iter().map(|m| m.send(transport)).collect();
        while let Some(r) = confirms.next().await {
            r?;
        }
    }
    Ok(())
}

async fn delete_queues(config: &Config, topology: &Topology) {
    if let Ok(conn) = Connection::connect(
        &crate::transport::rabbitmq::brokers::first(&config.amqp_url),
        ConnectionProperties::default(),
    )
    .await
        && let Ok(ch) = conn.create_channel().await
    {
        for queue in topology.all_queues() {
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "bench cleanup".into()).await;
    }
}
