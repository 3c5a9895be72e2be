//! `skald bench`: skald's throughput against a hand-written baseline, in one run.
//!
//! Both run in a scratch database (created and dropped) and scratch queues on the
//! configured PostgreSQL and RabbitMQ (skald itself on the transport `SKALD_TRANSPORT`
//! names, its scratch namespace deleted afterwards), with the same pool size and
//! prefetch:
//!
//! - **baseline**: a minimal lapin + sqlx worker. Per message: one transaction with an
//!   inbox row and the sample saga's first effect (`reserve_stock`'s statement),
//!   commit, ack. This is the ceiling: the commit is the cost of a step.
//! - **skald**: `N` instances of the sample `order_checkout` saga (3 steps, so 3
//!   commits and 3 published messages per saga), started by pre-published messages,
//!   timed from the first consume until every instance is terminal.
//!
//! - **command** (with `--steps command`, after the two above): the sample
//!   `order_services` saga, its three steps run by the three sample participant
//!   services ([`command`]).
//!
//! The shape of the work can change ([`shape`]): a generated saga of `--saga-steps`
//! steps instead of the sample, and `--payload-kib` of padding in every message.
//!
//! The ratio is skald's steps/s over the baseline's messages/s.
//!
//! The whole run stops at `--timeout` ([`deadline`]): a run that cannot finish ends
//! with an error saying what finished and where it stood.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Serialize;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection as _, PgConnection};
use uuid::Uuid;

use crate::app::App;
use crate::config::Config;
use crate::config::TransportKind;
use crate::engine::Faults;
use crate::envelope::{Envelope, Outgoing};
use crate::handlers::Handlers;
use crate::transport::rabbitmq::Topology;
use crate::transport::{Endpoint, Transport};

pub mod command;
pub mod deadline;
pub mod shape;

use deadline::Deadline;

/// `--timeout`'s default, seconds.
pub const DEFAULT_TIMEOUT_S: u64 = 600;

/// Which kinds of steps `skald bench` runs besides the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StepsMode {
    /// The SQL-step sample `order_checkout` only.
    Sql,
    /// The SQL-step sample, then the command-step sample `order_services` with the
    /// three sample services in this process.
    Command,
}

/// Arguments of `skald bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// How many sample sagas to run.
    #[arg(long, default_value_t = 10_000)]
    pub sagas: usize,
    /// Over how many aggregates they are spread (default: one each).
    #[arg(long)]
    pub aggregates: Option<usize>,
    /// How many skald processes consume (this one plus `processes - 1` children
    /// running `skald run` on the same scratch database and namespace).
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// How many messages the baseline worker handles (default: 3 per saga).
    #[arg(long)]
    pub baseline_messages: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// `command`: also run the command-step sample through the three sample services.
    #[arg(long, value_enum, default_value = "sql")]
    pub steps: StepsMode,
    /// Start the sagas at this many per second while skald runs, instead of queueing
    /// them all first: the latency at a given load, not the throughput at full load.
    #[arg(long)]
    pub rate: Option<f64>,
    /// The longest the whole run may take, seconds (1 or more): past it the run stops,
    /// says what finished, and exits 1.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_S,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Run a generated saga of this many SQL steps (1 to 50; `bench_steps`, every step
    /// the baseline's statement) instead of the sample `order_checkout` (3 steps).
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(shape::MAX_SAGA_STEPS)))]
    pub saga_steps: Option<u8>,
    /// Pad every start message and every baseline message with this many KiB (0 to
    /// 1024) that no step reads.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u16).range(0..=i64::from(shape::MAX_PAYLOAD_KIB)))]
    pub payload_kib: u16,
}

/// What one bench run measured.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The transport skald ran on (`SKALD_TRANSPORT`); the baseline is on RabbitMQ.
    pub transport: &'static str,
    /// Sagas started.
    pub sagas: usize,
    /// Aggregates they were spread over.
    pub aggregates: usize,
    /// skald processes that consumed.
    pub processes: usize,
    /// Sagas that reached `completed`.
    pub completed: i64,
    /// Seconds from the first consume until every instance was terminal.
    pub seconds: f64,
    /// `completed / seconds`.
    pub sagas_per_s: f64,
    /// Steps committed per second.
    pub steps_per_s: f64,
    /// Steps per saga: 3 (the sample), or `--saga-steps`.
    pub saga_steps: usize,
    /// KiB of padding in every message (`--payload-kib`).
    pub payload_kib: u16,
    /// The baseline worker's messages per second.
    pub baseline_msgs_per_s: f64,
    /// `steps_per_s / baseline_msgs_per_s`.
    pub ratio: f64,
    /// Median time to handle one message (taken by its actor to acked), milliseconds;
    /// only with one process (children's latencies are not collected).
    pub p50_ms: Option<f64>,
    /// 99th percentile of the same.
    pub p99_ms: Option<f64>,
    /// Steps each process committed: how the partitions were shared.
    pub per_process_steps: Vec<u64>,
    /// Peak resident memory of the whole bench process, MiB.
    pub peak_rss_mb: f64,
    /// PostgreSQL connections used by each side.
    pub db_pool: u32,
    /// Prefetch used by each side.
    pub prefetch: u16,
    /// The sagas' start rate (`--rate`), if they were not all queued first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// `SKALD_BATCH_MAX` and `SKALD_BATCH_WINDOW_MS` of this process.
    pub batch_max: usize,
    /// See `batch_max`.
    pub batch_window_ms: u64,
    /// Batch transactions this process committed.
    pub batches: u64,
    /// Steps per committed batch, on average.
    pub mean_batch: f64,
    /// The most steps one batch held.
    pub largest_batch: u64,
    /// The command-step run (`--steps command`), on the same number of sagas and
    /// aggregates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<command::CommandReport>,
}

/// Runs the benchmark and prints its report. Must run inside an actix system.
pub async fn run(config: Config, args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.sagas > 0, "--sagas must be at least 1");
    anyhow::ensure!(
        args.rate.is_none_or(|r| r.is_finite() && r > 0.0),
        "--rate must be a positive number of sagas per second"
    );
    let aggregates = args.aggregates.unwrap_or(args.sagas).clamp(1, args.sagas);
    let scratch = format!("skald_bench_{}", Uuid::new_v4().simple());
    let base: PgConnectOptions = config.database_url.parse().context("DATABASE_URL")?;
    let db_url = base.clone().database(&scratch).to_url_lossy().to_string();
    // `--saga-steps`: the generated saga, alone in a folder of its own.
    let generated = match args.saga_steps {
        Some(steps) => {
            let dir = std::env::temp_dir().join(&scratch);
            std::fs::create_dir_all(&dir).context("the generated saga's folder")?;
            std::fs::write(
                dir.join(format!("{}.yaml", shape::GENERATED_SAGA)),
                shape::generated_saga(steps),
            )
            .context("the generated saga")?;
            Some(dir)
        }
        None => None,
    };
    let config = Config {
        database_url: db_url.clone(),
        namespace: scratch.clone(),
        // Any free port: the bench must not collide with a running skald.
        http_addr: "127.0.0.1:0".parse().expect("a valid address"),
        sagas_dir: generated.clone().unwrap_or(config.sagas_dir.clone()),
        ..config
    };
    eprintln!("bench: scratch database and namespace {scratch}");
    let deadline = Deadline::after(Duration::from_secs(args.timeout));

    let result = measure(&config, &args, aggregates, &deadline).await;
    cleanup(&base, &config, &scratch).await;
    if let Some(dir) = generated {
        let _ = std::fs::remove_dir_all(dir);
    }
    let mut report = result?;
    if args.steps == StepsMode::Command {
        let baseline = report.baseline_msgs_per_s;
        let run = command::Run {
            base: &base,
            scratch: &scratch,
            sagas: args.sagas,
            aggregates,
            baseline_msgs_per_s: baseline,
            deadline: &deadline,
        };
        report.command = Some(command::run(&config, run).await?);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: sagas {} of {} steps over {} aggregates, {} KiB padding, {} process(es): \
             {} completed in {:.2}s\n\
             skald     {:>9.1} sagas/s  {:>9.1} steps/s  p50 {} ms  p99 {} ms\n\
             steps per process {:?}\n\
             baseline  {:>9.1} msgs/s\n\
             ratio     {:.3} (steps/s over baseline msgs/s)\n\
             peak RSS  {:.1} MiB (pool {}, prefetch {})\n\
             batches   {} (mean {:.1} steps, largest {}; max {}, window {} ms)",
            report.transport,
            report.sagas,
            report.saga_steps,
            report.aggregates,
            report.payload_kib,
            report.processes,
            report.completed,
            report.seconds,
            report.sagas_per_s,
            report.steps_per_s,
            millis(report.p50_ms),
            millis(report.p99_ms),
            report.per_process_steps,
            report.baseline_msgs_per_s,
            report.ratio,
            report.peak_rss_mb,
            report.db_pool,
            report.prefetch,
            report.batches,
            report.mean_batch,
            report.largest_batch,
            report.batch_max,
            report.batch_window_ms,
        );
        if let Some(c) = &report.command {
            println!(
                "command   {:>9.1} sagas/s  {:>9.1} steps/s  p50 {:.1} ms  p99 {:.1} ms  \
                 ratio {:.3} ({} completed in {:.2}s)",
                c.sagas_per_s, c.steps_per_s, c.p50_ms, c.p99_ms, c.ratio, c.completed, c.seconds
            );
        }
    }
    Ok(())
}

/// A latency for the text report: tenths of a millisecond, or `-` when it was not
/// measured (several processes).
fn millis(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1}"))
}

async fn measure(
    config: &Config,
    args: &BenchArgs,
    aggregates: usize,
    deadline: &Deadline,
) -> anyhow::Result<BenchReport> {
    // Build skald first: it creates the database, its schema and the sample tables
    // that the baseline's statement also uses.
    let app = deadline
        .within("starting skald for the SQL-step run", async {
            let app = App::build(config.clone(), Handlers::default(), Faults::none()).await?;
            seed(app.store().pool(), aggregates).await?;
            Ok(app)
        })
        .await?;

    let baseline_messages = args.baseline_messages.unwrap_or(args.sagas * 3);
    let baseline = deadline
        .within(
            &format!("the baseline worker ({baseline_messages} messages)"),
            baseline(config, baseline_messages, aggregates, args.payload_kib),
        )
        .await?;
    eprintln!("bench: baseline {baseline:.1} msgs/s over {baseline_messages} messages");
    deadline.finished(format!(
        "baseline {baseline:.1} msgs/s over {baseline_messages} messages"
    ));

    let transport = deadline
        .within("publishing the SQL-step run's starts", async {
            let transport = crate::transport::connect(config, Endpoint::Orchestrator).await?;
            if args.rate.is_none() {
                publish_all(transport.as_ref(), args, aggregates, None).await?;
                transport.close().await;
            }
            Ok(transport)
        })
        .await?;

    let engine = app.engine().clone();
    let pool = app.store().pool().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    // One process: this one. Several: that many `skald run` children, started
    // together so that they share the partitions; this process only watches.
    let multi = args.processes > 1;
    let mut children = spawn_children(config, if multi { args.processes } else { 0 })?;
    let runner = (!multi).then(|| {
        actix::spawn(app.run_until(async {
            let _ = stop_rx.await;
        }))
    });
    let paced = args.rate.map(|rate| {
        let (args, transport) = (args.clone(), transport.clone());
        tokio::spawn(async move {
            let published = publish_all(transport.as_ref(), &args, aggregates, Some(rate)).await;
            transport.close().await;
            published
        })
    });
    let completed = match wait_terminal(&pool, args.sagas as i64, deadline, "SQL-step run").await {
        Ok(completed) => completed,
        Err(e) => {
            // Children would outlive the run (and hold the scratch database).
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            if let Some(paced) = paced {
                paced.abort();
            }
            return Err(e);
        }
    };
    if let Some(paced) = paced {
        paced.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    deadline.finished(format!(
        "SQL-step run: {completed} of {} sagas completed in {seconds:.1} s",
        args.sagas
    ));
    let steps: i64 =
        sqlx::query_scalar("SELECT count(*) FROM skald.inbox WHERE disposition = 'applied'")
            .fetch_one(&pool)
            .await?;
    let steps = steps as f64;
    let _ = stop_tx.send(());
    if let Some(runner) = runner {
        runner.await??;
    }
    let mut per_process_steps = Vec::new();
    for child in &mut children {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        per_process_steps.push(applied_by(child));
        let _ = child.wait();
    }
    if !multi {
        per_process_steps.push(engine.stats().applied.load(Ordering::Relaxed));
    }
    // Latencies are only seen for this process's own work.
    let latency = |q: f64| (!multi).then(|| engine.stats().step_latency.quantile_ms(q));

    let steps_per_s = steps / seconds;
    Ok(BenchReport {
        transport: config.transport.as_str(),
        sagas: args.sagas,
        aggregates,
        processes: args.processes.max(1),
        completed,
        seconds,
        sagas_per_s: completed as f64 / seconds,
        steps_per_s,
        saga_steps: args.saga_steps.map_or(3, usize::from),
        payload_kib: args.payload_kib,
        baseline_msgs_per_s: baseline,
        ratio: steps_per_s / baseline,
        p50_ms: latency(0.50),
        p99_ms: latency(0.99),
        per_process_steps,
        peak_rss_mb: peak_rss_mb(),
        db_pool: config.db_pool,
        prefetch: config.prefetch,
        rate: args.rate,
        batch_max: config.batching.max,
        batch_window_ms: config.batching.window.as_millis() as u64,
        batches: engine.stats().batches.load(Ordering::Relaxed),
        mean_batch: {
            let stats = engine.stats();
            let batches = stats.batches.load(Ordering::Relaxed).max(1);
            stats.batched_steps.load(Ordering::Relaxed) as f64 / batches as f64
        },
        largest_batch: engine.stats().largest_batch.load(Ordering::Relaxed),
        command: None,
    })
}

/// Waits until `target` instances are terminal; how many completed. At the deadline:
/// [`deadline::TimedOut`] saying how many of the `run`'s sagas were terminal.
async fn wait_terminal(
    pool: &sqlx::PgPool,
    target: i64,
    deadline: &Deadline,
    run: &str,
) -> anyhow::Result<i64> {
    let mut last = (0, 0);
    loop {
        let until = tokio::time::Instant::now() + Duration::from_millis(100);
        tokio::time::sleep_until(until.min(deadline.at())).await;
        if deadline.passed() {
            let (terminal, completed) = last;
            return Err(deadline
                .timed_out(format!(
                    "{run}: {terminal} of {target} sagas terminal ({completed} completed)"
                ))
                .into());
        }
        let counted = tokio::time::timeout_at(
            deadline.at(),
            sqlx::query_as(
                "SELECT count(*) FILTER (WHERE status IN ('completed','compensated','failed')), \
                        count(*) FILTER (WHERE status = 'completed') FROM skald.instances",
            )
            .fetch_one(pool),
        )
        .await;
        // A count the deadline cut short: the last one is said.
        let Ok(counted) = counted else { continue };
        let (terminal, completed): (i64, i64) = counted?;
        if terminal >= target {
            return Ok(completed);
        }
        last = (terminal, completed);
    }
}

/// Starts `n` `skald run` processes on the bench's scratch database and namespace
/// (the same binary as this one), their logs piped for [`applied_by`].
fn spawn_children(config: &Config, n: usize) -> anyhow::Result<Vec<std::process::Child>> {
    let exe = std::env::current_exe()?;
    (0..n)
        .map(|_| {
            std::process::Command::new(&exe)
                .arg("run")
                .env("DATABASE_URL", &config.database_url)
                .env("AMQP_URL", &config.amqp_url)
                .env("SKALD_TRANSPORT", config.transport.as_str())
                .env("REDIS_URL", &config.redis_url)
                .env("SKALD_NAMESPACE", &config.namespace)
                .env("SKALD_SAGAS_DIR", &config.sagas_dir)
                .env("SKALD_PARTITIONS", config.partitions.to_string())
                .env("SKALD_PREFETCH", config.prefetch.to_string())
                .env("SKALD_DB_POOL", config.db_pool.to_string())
                .env("SKALD_LOG", "warn,skald::app=info")
                .env("SKALD_HTTP_ADDR", "127.0.0.1:0")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("spawning a skald process")
        })
        .collect()
}

/// The steps a child reported when it stopped (its `stopped applied=N` log line).
fn applied_by(child: &mut std::process::Child) -> u64 {
    use std::io::Read;
    let mut log = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut log);
    }
    log.lines()
        .filter(|l| l.contains("stopped"))
        .find_map(|l| {
            l.split("applied=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Stock and accounts for every bench aggregate, so that sagas on different
/// aggregates never wait on each other's rows.
async fn seed(pool: &sqlx::PgPool, aggregates: usize) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO shop.stock (sku, available) \
         SELECT 'bench-' || g, 1000000000 FROM generate_series(0, $1 - 1) g ON CONFLICT DO NOTHING",
    )
    .bind(aggregates as i64)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO shop.accounts (account_id, balance) \
         SELECT 'bench-' || g, 1000000000 FROM generate_series(0, $1 - 1) g ON CONFLICT DO NOTHING",
    )
    .bind(aggregates as i64)
    .execute(pool)
    .await?;
    Ok(())
}

/// Publishes the `args.sagas` starts (of the sample, or of the generated saga with
/// `--saga-steps`): all at once, or paced at `rate` per second.
async fn publish_all(
    transport: &dyn Transport,
    args: &BenchArgs,
    aggregates: usize,
    rate: Option<f64>,
) -> anyhow::Result<()> {
    let sagas = args.sagas;
    let message = |i: usize| {
        let agg = i % aggregates;
        let (saga, payload) = match args.saga_steps {
            Some(_) => (
                shape::GENERATED_SAGA,
                json!({"sku": format!("bench-{agg}")}),
            ),
            None => (
                "order_checkout",
                json!({
                    "order_id": format!("order-{i}"),
                    "sku": format!("bench-{agg}"),
                    "qty": 1,
                    "account": format!("bench-{agg}"),
                    "amount": 1.5,
                }),
            ),
        };
        Outgoing::to_intake(
            Envelope {
                sequence: Some((i / aggregates) as u64),
                dispatched_at: None,
                ..Envelope::start(
                    saga,
                    Some(format!("bench-{agg}")),
                    shape::padded(payload, args.payload_kib),
                )
            },
            0,
        )
    };
    // Built and confirmed a window at a time, so that the bench's own messages do
    // not count in its peak RSS. Order within one aggregate is kept, though a
    // window's publishes are in flight together: `FuturesUnordered` polls each first
    // in window order, which calls the publishes in that order, and the transport
    // keeps the call order (`Transport`'s promise 5).
    // Paced: a window every 20 ms or so, each due when its first start is.
    let window_size = rate.map_or(1000, |r| ((r / 50.0).ceil() as usize).clamp(1, 1000));
    let began = Instant::now();
    for start in (0..sagas).step_by(window_size) {
        if let Some(rate) = rate {
            let due = began + Duration::from_secs_f64(start as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let window: Vec<Outgoing> = (start..(start + window_size).min(sagas))
            .map(message)
            .collect();
        let mut confirms: FuturesUnordered<_> = window.iter().map(|m| m.send(transport)).collect();
        while let Some(r) = confirms.next().await {
            r?;
        }
    }
    Ok(())
}

/// The hand-written worker: consume, one transaction (inbox row + effect), commit, ack.
async fn baseline(
    config: &Config,
    messages: usize,
    aggregates: usize,
    payload_kib: u16,
) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(config.db_pool)
        .connect(&config.database_url)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS public.baseline_inbox (message_id uuid PRIMARY KEY)")
        .execute(&pool)
        .await?;
    let conn = Connection::connect(
        &crate::transport::rabbitmq::brokers::first(&config.amqp_url),
        ConnectionProperties::default(),
    )
    .await?;
    let queue = format!("{}.baseline", config.namespace);
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    for chunk_start in (0..messages).step_by(1000) {
        let mut confirms = FuturesUnordered::new();
        for i in chunk_start..(chunk_start + 1000).min(messages) {
            let body = shape::padded(
                json!({"message_id": Uuid::new_v4(), "sku": format!("bench-{}", i % aggregates)}),
                payload_kib,
            );
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&body)?,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            confirms.push(confirm);
        }
        while let Some(c) = confirms.next().await {
            anyhow::ensure!(c?.is_ack(), "baseline publish not confirmed");
        }
    }

    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let started = Instant::now();
    let mut received = 0;
    while received < messages {
        let Some(delivery) = consumer.next().await else {
            anyhow::bail!("baseline consumer ended early");
        };
        let delivery = delivery?;
        received += 1;
        let (pool, done, all_done) = (pool.clone(), done.clone(), all_done.clone());
        tokio::spawn(async move {
            let body: serde_json::Value = serde_json::from_slice(&delivery.data).expect("own body");
            let id: Uuid = body["message_id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("id");
            let sku = body["sku"].as_str().expect("sku").to_string();
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query("INSERT INTO public.baseline_inbox (message_id) VALUES ($1)")
                .bind(id)
                .execute(&mut *tx)
                .await
                .expect("inbox");
            sqlx::query(
                "UPDATE shop.stock SET available = available - $1 WHERE sku = $2 AND available >= $1",
            )
            .bind(1i64)
            .bind(&sku)
            .execute(&mut *tx)
            .await
            .expect("effect");
            tx.commit().await.expect("commit");
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            if done.fetch_add(1, Ordering::SeqCst) + 1 == messages {
                all_done.notify_one();
            }
        });
    }
    if done.load(Ordering::SeqCst) < messages {
        all_done.notified().await;
    }
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    let _ = consumer_channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bench done".into()).await;
    pool.close().await;
    Ok(rate)
}

async fn cleanup(base: &PgConnectOptions, config: &Config, scratch: &str) {
    if config.transport == TransportKind::Redis
        && let Err(e) = crate::transport::redis::delete_namespace(&config.redis_url, scratch).await
    {
        eprintln!("bench: could not delete the scratch namespace from Redis: {e}");
    }
    if let Ok(conn) = Connection::connect(
        &crate::transport::rabbitmq::brokers::first(&config.amqp_url),
        ConnectionProperties::default(),
    )
    .await
        && let Ok(ch) = conn.create_channel().await
    {
        for queue in Topology::new(scratch, config.partitions).all_queues() {
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "bench cleanup".into()).await;
    }
    let admin = base.clone().database("postgres");
    if let Ok(mut conn) = PgConnection::connect_with(&admin).await {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{scratch}\" WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
        let _ = conn.close().await;
    }
}

/// The process's peak resident set size (VmHWM), in MiB; 0 where /proc is missing.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
