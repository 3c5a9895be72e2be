//! `skald explore`: run one saga through every fault point, one at a time, and check
//! that every promise held — and that it ends as the legacy transaction would.
//!
//! For each [`points::Point`] the saga runs from a fresh copy of a scratch PostgreSQL
//! database (migrated, the saga's `setup` applied), on the in-memory transport, with
//! the real engine and the fault injected once. When no message is left, it checks:
//! - **ends**: the instance ended as [`points::expected`] says (completed like a
//!   commit, compensated like a rollback, or parked for a person);
//! - **once**: no step or compensation succeeded twice (the inbox says so);
//! - **atomic**: what the business sees (the observe queries) equals what it saw after
//!   the legacy transaction committed (for a completed saga) or before it ran (for a
//!   compensated one);
//! - **nothing lost**: no message is left undelivered or unacked, and a parked
//!   instance has its dead letter.
//!
//! The references: *rollback* is the fresh database; *commit* is the legacy file run
//! by `psql` (with `--legacy`), else the saga's own fault-free run — and with
//! `--legacy`, that fault-free run must equal the legacy commit too.

pub mod observe;
pub mod points;
pub mod random;
mod service;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection as _, PgConnection};
use uuid::Uuid;

use crate::engine::Engine;
use crate::envelope::{Envelope, Outgoing, instance_id_for};
use crate::faults::{FaultPlan, FaultPoint, Faults, Injected};
use crate::handlers::Handlers;
use crate::saga::coordinator::{FailureKind, InstanceStatus, Phase};
use crate::saga::{Catalog, SagaDef, load_file};
use crate::store::{Store, StoreError, error_text};
use crate::transport::Transport;
use crate::transport::memory::MemoryTransport;
use observe::{Observation, Observer};
use points::{Fault, Point};

/// Deliveries one run may take before it is declared stuck.
const MAX_DELIVERIES: usize = 10_000;

/// Why `explore` could not run (not a broken promise: those are in the report).
#[derive(Debug, thiserror::Error)]
pub enum ExploreError {
    /// A file or argument is unusable.
    #[error("{0}")]
    Input(String),
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(String),
    /// One delivery was not handled in time (a slow step, or the engine retrying a
    /// failure it logged), so the run cannot say whether the saga keeps its promises.
    #[error(
        "a delivery ({0}) was not handled within {1} s (--delivery-timeout): its step's \
         SQL is that slow, or skald kept retrying a failure (see the warnings above); \
         nothing was checked"
    )]
    Stuck(String, u64),
    /// skald's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ExploreError {
    fn db(e: sqlx::Error) -> Self {
        ExploreError::Database(error_text(&e))
    }
}

/// `skald explore` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ExploreArgs {
    /// The saga file to explore.
    pub saga: PathBuf,
    /// The start payload, a JSON object.
    #[arg(long)]
    pub data: String,
    /// The legacy transaction the saga replaces: a psql script, run with each payload
    /// field as a psql variable (`:qty`, `:'sku'`).
    #[arg(long)]
    pub legacy: Option<PathBuf>,
    /// The queries that show what the business sees (default: `<saga>.observe.sql`
    /// beside the saga file, if it exists).
    #[arg(long)]
    pub observe: Option<PathBuf>,
    /// Instead of the points one at a time: this many random schedules of several
    /// faults over several instances.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub random: Option<u64>,
    /// The first random schedule's seed (schedule k uses seed + k).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The longest one delivery may take, seconds (1 to 3600): past it, explore stops
    /// with an error instead of waiting on an engine that keeps retrying.
    #[arg(long, default_value_t = DEFAULT_DELIVERY_TIMEOUT_S,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub delivery_timeout: u64,
}

/// `--delivery-timeout`'s default, seconds: a delivery on a scratch database takes
/// milliseconds, unless a step's own SQL is slow.
pub const DEFAULT_DELIVERY_TIMEOUT_S: u64 = 60;

/// What `explore` found: the points one at a time, or random schedules.
#[derive(Debug, Clone)]
pub enum Findings {
    /// One run per point.
    Points(Report),
    /// Random schedules.
    Random(random::RandomReport),
}

impl Findings {
    /// Every promise held.
    pub fn held(&self) -> bool {
        match self {
            Findings::Points(r) => r.held(),
            Findings::Random(r) => r.held(),
        }
    }

    /// For a person.
    pub fn render(&self) -> String {
        match self {
            Findings::Points(r) => r.render(),
            Findings::Random(r) => r.render(),
        }
    }
}

/// The outcome of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Where the fault was injected; `None` for the fault-free run.
    pub point: Option<Point>,
    /// How the instance ended (`None`: it never started, or never ended).
    pub ended: Option<InstanceStatus>,
    /// How it had to end.
    pub expected: InstanceStatus,
    /// Ended as expected.
    pub ends: bool,
    /// No step or compensation succeeded twice.
    pub once: bool,
    /// The business state matches the reference (`None`: not checked — no observe
    /// queries, or parked for a person).
    pub atomic: Option<bool>,
    /// Nothing left undelivered or unacked, and a parked instance has its dead letter.
    pub nothing_lost: bool,
}

impl Row {
    /// Every promise held.
    pub fn held(&self) -> bool {
        self.ends && self.once && self.atomic != Some(false) && self.nothing_lost
    }
}

/// What `explore` found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The saga's name.
    pub saga: String,
    /// Its steps' names, by index.
    pub steps: Vec<String>,
    /// With `--legacy`: whether the fault-free saga run left what the legacy commit
    /// leaves.
    pub matches_legacy: Option<bool>,
    /// The fault-free run first, then one row per point.
    pub rows: Vec<Row>,
}

impl Report {
    /// Every promise held at every point (and the saga matches the legacy commit).
    pub fn held(&self) -> bool {
        self.matches_legacy != Some(false) && self.rows.iter().all(Row::held)
    }

    /// The report as a table, then one line saying whether every promise held.
    pub fn render(&self) -> String {
        let mark = |ok: bool| if ok { "ok" } else { "BROKEN" };
        let mut out = format!(
            "{:<4} {:<20} {:<10} {:<30} {:<12} {:<12} {:<6} {:<6} {:<6} {:<6}\n",
            "#", "step", "phase", "injected", "ended", "expected", "ends", "once", "atomic", "lost"
        );
        for (i, row) in self.rows.iter().enumerate() {
            let (step, phase, fault) = match &row.point {
                Some(p) => (
                    self.steps.get(p.step).cloned().unwrap_or_default(),
                    p.phase.as_str().to_string(),
                    p.fault.to_string(),
                ),
                None => ("-".into(), "-".into(), "nothing (baseline)".into()),
            };
            out.push_str(&format!(
                "{:<4} {:<20} {:<10} {:<30} {:<12} {:<12} {:<6} {:<6} {:<6} {:<6}\n",
                i,
                step,
                phase,
                fault,
                row.ended.map_or("-", InstanceStatus::as_str),
                row.expected.as_str(),
                mark(row.ends),
                mark(row.once),
                row.atomic.map_or("-", mark),
                if row.nothing_lost { "none" } else { "BROKEN" },
            ));
        }
        if let Some(matches) = self.matches_legacy {
            out.push_str(&format!(
                "fault-free saga vs legacy commit: {}\n",
                if matches {
                    "same business state"
                } else {
                    "BROKEN: different business state"
                }
            ));
        }
        let broken = self.rows.iter().filter(|r| !r.held()).count();
        if self.held() {
            out.push_str(&format!(
                "{}: every promise held at all {} points\n",
                self.saga,
                self.rows.len() - 1
            ));
        } else {
            out.push_str(&format!(
                "{}: promises broken at {broken} of {} runs\n",
                self.saga,
                self.rows.len()
            ));
        }
        out
    }
}

/// Runs the exploration against scratch databases on the server of `database_url`.
pub async fn explore(database_url: &str, args: &ExploreArgs) -> Result<Findings, ExploreError> {
    let saga = load_file(&args.saga).map_err(|errors| {
        ExploreError::Input(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        )
    })?;
    let handlers = Catalog::new(vec![saga.clone()]).missing_handlers(|_| false);
    if !handlers.is_empty() {
        return Err(ExploreError::Input(format!(
            "explore runs SQL steps only; this saga uses handler(s): {}",
            handlers.join(", ")
        )));
    }
    let payload: Value = serde_json::from_str(&args.data)
        .map_err(|e| ExploreError::Input(format!("--data is not JSON: {e}")))?;
    if !payload.is_object() {
        return Err(ExploreError::Input("--data must be a JSON object".into()));
    }
    let observe_file = args.observe.clone().or_else(|| {
        let beside = args.saga.with_extension("observe.sql");
        beside.exists().then_some(beside)
    });
    let observer = observe_file.as_deref().map(Observer::read).transpose()?;
    if args.legacy.is_some() && observer.is_none() {
        return Err(ExploreError::Input(
            "--legacy needs observe queries to compare (a <saga>.observe.sql file or --observe)"
                .into(),
        ));
    }

    let base: PgConnectOptions = database_url
        .parse()
        .map_err(|e| ExploreError::Input(format!("DATABASE_URL: {e}")))?;
    let delivery_timeout = Duration::from_secs(args.delivery_timeout);
    let scratch = Scratch::new(database_url, base, &saga, delivery_timeout).await?;
    let result = match args.random {
        Some(n) => {
            let catalog = Catalog::new(vec![saga.clone()]);
            random::run(&scratch, &catalog, &saga, &payload, args.seed, n)
                .await
                .map(Findings::Random)
        }
        None => run_all(&scratch, &saga, &payload, observer.as_ref(), args)
            .await
            .map(Findings::Points),
    };
    scratch.drop_all().await;
    result
}

async fn run_all(
    scratch: &Scratch,
    saga: &SagaDef,
    payload: &Value,
    observer: Option<&Observer>,
    args: &ExploreArgs,
) -> Result<Report, ExploreError> {
    let catalog = Catalog::new(vec![saga.clone()]);
    // The references: the business before anything ran, and after a commit.
    let rollback = match observer {
        Some(o) => Some(scratch.observe_fresh(o, payload).await?),
        None => None,
    };
    let baseline = run_one(scratch, &catalog, saga, payload, observer, None).await?;
    let legacy_commit = match (&args.legacy, observer) {
        (Some(file), Some(o)) => {
            let copy = scratch.fresh().await?;
            let seen = async {
                observe::run_legacy(&copy.url, file, payload).await?;
                o.observe(copy.store.pool(), payload).await
            }
            .await;
            scratch.discard(copy).await;
            Some(seen?)
        }
        _ => None,
    };
    let commit = legacy_commit
        .clone()
        .or_else(|| baseline.observation.clone());
    let matches_legacy = legacy_commit
        .as_ref()
        .map(|l| baseline.observation.as_ref() == Some(l));

    let mut rows = vec![baseline.row(&commit, &rollback)];
    for point in points::all(saga) {
        let run = run_one(scratch, &catalog, saga, payload, observer, Some(point)).await?;
        rows.push(run.row(&commit, &rollback));
    }
    Ok(Report {
        saga: saga.name.clone(),
        steps: saga.steps.iter().map(|s| s.name.clone()).collect(),
        matches_legacy,
        rows,
    })
}

/// One run's raw findings.
struct Run {
    point: Option<Point>,
    expected: InstanceStatus,
    ended: Option<InstanceStatus>,
    once: bool,
    drained: bool,
    parked_recorded: bool,
    observation: Option<Observation>,
}

impl Run {
    fn row(&self, commit: &Option<Observation>, rollback: &Option<Observation>) -> Row {
        let reference = match self.ended {
            Some(InstanceStatus::Completed) => commit.as_ref(),
            Some(InstanceStatus::Compensated) => rollback.as_ref(),
            _ => None,
        };
        Row {
            point: self.point,
            ended: self.ended,
            expected: self.expected,
            ends: self.ended == Some(self.expected),
            once: self.once,
            atomic: reference
                .zip(self.observation.as_ref())
                .map(|(want, seen)| want == seen),
            nothing_lost: self.drained
                && (self.ended != Some(InstanceStatus::Failed) || self.parked_recorded),
        }
    }
}

/// The faults of one run, on both sides: the engine's (a [`FaultPlan`]) and the
/// transport's, decided as each delivery is taken.
trait Chaos: FaultPlan {
    /// The transport fault to inject around the delivery at `here` (its step and
    /// phase), if any: [`Fault::Duplicate`], [`Fault::LostConfirm`] or
    /// [`Fault::Overtaken`].
    fn on_delivery(&self, here: (usize, Phase)) -> Option<Fault>;

    /// Whether an injected crash happened since the last call.
    fn take_crash(&self) -> bool;

    /// The command step (index and phase) whose service answers nothing in time.
    fn silent(&self) -> Option<(usize, Phase)> {
        None
    }
}

/// The fault plan of one point: its fault, once, and for a compensation point the
/// fatal failure of the step after it that starts compensating.
struct Plan {
    steps: Vec<String>,
    point: Option<Point>,
    fired: AtomicBool,
    triggered: AtomicBool,
    transport_fired: AtomicBool,
    crashed: AtomicBool,
    /// Messages of the point's step that reached its crash point (for a reply fault).
    arrivals: AtomicU32,
    /// Deliveries of the point's step (for a reply fault).
    deliveries: AtomicU32,
}

impl Plan {
    fn new(saga: &SagaDef, point: Option<Point>) -> Plan {
        Plan {
            steps: saga.steps.iter().map(|s| s.name.clone()).collect(),
            point,
            fired: AtomicBool::new(false),
            triggered: AtomicBool::new(false),
            transport_fired: AtomicBool::new(false),
            crashed: AtomicBool::new(false),
            arrivals: AtomicU32::new(0),
            deliveries: AtomicU32::new(0),
        }
    }

    fn index(&self, step: &str) -> Option<usize> {
        self.steps.iter().position(|s| s == step)
    }
}

/// Sets `flag` and says whether it was clear: a fault fires once.
fn first_time(flag: &AtomicBool) -> bool {
    !flag.swap(true, Ordering::SeqCst)
}

impl FaultPlan for Plan {
    fn at(&self, at: FaultPoint, step: &str, phase: Phase) -> Injected {
        let Some(point) = self.point else {
            return Injected::Nothing;
        };
        let index = self.index(step);
        if at == FaultPoint::BeforeEffect
            && phase == Phase::Forward
            && index.is_some()
            && index == point.trigger()
            && first_time(&self.triggered)
        {
            return Injected::Fail(FailureKind::Fatal);
        }
        if index != Some(point.step) || phase != point.phase {
            return Injected::Nothing;
        }
        let injected = match point.fault {
            Fault::Crash(p) if p == at => Injected::Crash,
            // The first message of the step at this point sent the command; the second
            // is its reply.
            Fault::ReplyCrash(p)
                if p == at && self.arrivals.fetch_add(1, Ordering::SeqCst) == 1 =>
            {
                Injected::Crash
            }
            Fault::Fail(kind) if at == FaultPoint::BeforeEffect => Injected::Fail(kind),
            _ => return Injected::Nothing,
        };
        if !first_time(&self.fired) {
            return Injected::Nothing;
        }
        if injected == Injected::Crash {
            self.crashed.store(true, Ordering::SeqCst);
        }
        injected
    }
}

impl Chaos for Plan {
    fn on_delivery(&self, here: (usize, Phase)) -> Option<Fault> {
        let point = self.point?;
        if (point.step, point.phase) != here {
            return None;
        }
        let transport_fault = matches!(
            point.fault,
            Fault::Duplicate | Fault::LostConfirm | Fault::Overtaken
        );
        // The step's first delivery is its run message, the second the reply.
        let reply = point.fault == Fault::ReplyDuplicated
            && self.deliveries.fetch_add(1, Ordering::SeqCst) == 1;
        if reply && first_time(&self.transport_fired) {
            return Some(Fault::Duplicate);
        }
        (transport_fault && first_time(&self.transport_fired)).then_some(point.fault)
    }

    fn silent(&self) -> Option<(usize, Phase)> {
        self.point
            .filter(|p| p.fault == Fault::NoReply)
            .map(|p| (p.step, p.phase))
    }

    fn take_crash(&self) -> bool {
        self.crashed.swap(false, Ordering::SeqCst)
    }
}

/// Where a message is in its saga: the step index and phase it runs.
fn position(envelope: &Envelope) -> (usize, Phase) {
    match envelope.command.target() {
        None => (0, Phase::Forward),
        Some((_, cursor)) => (cursor.step as usize, cursor.phase),
    }
}

async fn run_one(
    scratch: &Scratch,
    catalog: &Catalog,
    saga: &SagaDef,
    payload: &Value,
    observer: Option<&Observer>,
    point: Option<Point>,
) -> Result<Run, ExploreError> {
    let copy = scratch.fresh().await?;
    let run = async {
        let start = Envelope::start(&saga.name, None, payload.clone());
        let instance = instance_id_for(start.message_id);
        let plan = Arc::new(Plan::new(saga, point));
        let transport = deliver_all(scratch, &copy.store, catalog, vec![start], plan).await?;
        let end = look(&copy.store, instance).await?;
        let observation = match observer {
            Some(o) => Some(o.observe(copy.store.pool(), payload).await?),
            None => None,
        };
        Ok(Run {
            point,
            expected: point.map_or(InstanceStatus::Completed, |p| points::expected(saga, &p)),
            ended: end.ended,
            once: end.once,
            drained: transport.pending() == (0, 0, 0),
            parked_recorded: end.parked,
            observation,
        })
    }
    .await;
    scratch.discard(copy).await;
    run
}

/// Publishes `starts`, then delivers every message until none is left (or
/// [`MAX_DELIVERIES`]), with `chaos`'s faults. A crash puts the unacked deliveries
/// back and replaces the engine (a new process, with nothing in memory). Returns the
/// transport, to see what is left in it.
async fn deliver_all(
    scratch: &Scratch,
    store: &Store,
    catalog: &Catalog,
    starts: Vec<Envelope>,
    chaos: Arc<dyn Chaos>,
) -> Result<MemoryTransport, ExploreError> {
    let transport = MemoryTransport::logical_time();
    let plan: Arc<dyn FaultPlan> = chaos.clone();
    let engine = || {
        Engine::new(
            store.clone(),
            Arc::new(transport.clone()),
            catalog.clone(),
            Handlers::default(),
            Faults::plan(plan.clone()),
        )
    };
    let mut current = engine();
    for start in starts {
        Outgoing::to_intake(start, 0)
            .send(&transport)
            .await
            .map_err(|e| ExploreError::Input(e.to_string()))?;
    }
    let mut services = service::Services::new(catalog, chaos.silent());
    let broker_error = |e: crate::transport::TransportError| ExploreError::Input(e.to_string());
    let mut previous: Option<Vec<u8>> = None;
    for _ in 0..MAX_DELIVERIES {
        services.play(&transport).await.map_err(broker_error)?;
        let Some(delivery) = transport.next() else {
            if services
                .flush_late(&transport)
                .await
                .map_err(broker_error)?
            {
                continue;
            }
            break;
        };
        let body = delivery.body.clone();
        current.in_flight().enter();
        let job = match current.read(&delivery.body) {
            Ok(job) => job,
            Err(reason) => {
                current.dead_letter(delivery, reason).await;
                continue;
            }
        };
        let mut overtake = None;
        let key = job.aggregate_id.clone();
        match chaos.on_delivery(position(&job.envelope)) {
            Some(Fault::Duplicate) => {
                let _ = transport.publish(&job.aggregate_id, &body, 0).await;
            }
            Some(Fault::LostConfirm) => transport.lose_next_confirm(),
            Some(Fault::Overtaken) => overtake = previous.clone(),
            _ => {}
        }
        let (step, phase) = position(&job.envelope);
        let what = format!(
            "{} step {} {}",
            job.saga.name,
            job.saga.steps.get(step).map_or("?", |s| s.name.as_str()),
            phase.as_str()
        );
        let limit = scratch.delivery_timeout;
        if tokio::time::timeout(limit, current.process(job, delivery))
            .await
            .is_err()
        {
            return Err(ExploreError::Stuck(what, limit.as_secs()));
        }
        if let Some(old) = overtake {
            let _ = transport.publish(&key, &old, 0).await;
        }
        if chaos.take_crash() {
            // The process died: its unacked deliveries go back to the broker, and a
            // new process (with nothing in memory) takes over.
            transport.crash();
            current = engine();
        }
        previous = Some(body);
    }
    Ok(transport)
}

/// How one instance ended, as PostgreSQL records it.
struct End {
    ended: Option<InstanceStatus>,
    /// No step or compensation succeeded twice.
    once: bool,
    /// It has a dead letter.
    parked: bool,
}

async fn look(store: &Store, instance: Uuid) -> Result<End, ExploreError> {
    let pool = store.pool();
    let ended: Option<String> =
        sqlx::query_scalar("SELECT status FROM skald.instances WHERE id = $1")
            .bind(instance)
            .fetch_optional(pool)
            .await
            .map_err(ExploreError::db)?;
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM skald.inbox WHERE instance_id = $1 \
           AND outcome = 'succeeded' GROUP BY step, phase HAVING count(*) > 1) twice",
    )
    .bind(instance)
    .fetch_one(pool)
    .await
    .map_err(ExploreError::db)?;
    let parked: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM skald.dead_letters WHERE instance_id = $1)",
    )
    .bind(instance)
    .fetch_one(pool)
    .await
    .map_err(ExploreError::db)?;
    Ok(End {
        ended: ended.as_deref().and_then(InstanceStatus::parse),
        once: twice == 0,
        parked,
    })
}

/// The scratch databases of one exploration: a template (migrated, setup applied) and
/// a fresh copy of it per run.
struct Scratch {
    /// `DATABASE_URL` as given: copies' URLs are made from it (not from sqlx's options,
    /// whose URL carries parameters psql does not know).
    database_url: String,
    base: PgConnectOptions,
    template: String,
    /// Copies made so far, and the ones not dropped yet.
    copies: Mutex<(usize, Vec<String>)>,
    /// `--delivery-timeout`.
    delivery_timeout: Duration,
}

/// One fresh copy of the template.
struct Copy {
    name: String,
    url: String,
    store: Store,
}

impl Scratch {
    async fn new(
        database_url: &str,
        base: PgConnectOptions,
        saga: &SagaDef,
        delivery_timeout: Duration,
    ) -> Result<Scratch, ExploreError> {
        let template = format!(
            "skald_explore_{}",
            &Uuid::new_v4().simple().to_string()[..12]
        );
        let scratch = Scratch {
            database_url: database_url.to_string(),
            base,
            template,
            copies: Mutex::new((0, Vec::new())),
            delivery_timeout,
        };
        let url = scratch.url(&scratch.template);
        let prepared = async {
            let store = Store::connect(&url, 1).await?;
            store.migrate().await?;
            let setup = store.run_setup(std::slice::from_ref(saga)).await;
            store.close().await;
            setup
        }
        .await;
        if let Err(e) = prepared {
            scratch.drop_all().await;
            return Err(e.into());
        }
        Ok(scratch)
    }

    /// `DATABASE_URL` with its database replaced by `database`.
    fn url(&self, database: &str) -> String {
        let (location, query) = match self.database_url.split_once('?') {
            Some((l, q)) => (l, Some(q)),
            None => (self.database_url.as_str(), None),
        };
        // The database is the path after the authority (`scheme://authority/db`).
        let authority_end = location.find("://").map_or(0, |i| i + 3);
        let root = match location[authority_end..].find('/') {
            Some(i) => &location[..authority_end + i],
            None => location,
        };
        match query {
            Some(q) => format!("{root}/{database}?{q}"),
            None => format!("{root}/{database}"),
        }
    }

    async fn admin(&self) -> Result<PgConnection, ExploreError> {
        PgConnection::connect_with(&self.base.clone().database("postgres"))
            .await
            .map_err(ExploreError::db)
    }

    /// A fresh copy of the template, and a store on it.
    async fn fresh(&self) -> Result<Copy, ExploreError> {
        let name = {
            let mut copies = self.copies.lock().expect("scratch lock");
            copies.0 += 1;
            let name = format!("{}_{}", self.template, copies.0);
            copies.1.push(name.clone());
            name
        };
        let mut admin = self.admin().await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\" TEMPLATE \"{}\"",
            self.template
        )))
        .execute(&mut admin)
        .await
        .map_err(ExploreError::db)?;
        let _ = admin.close().await;
        let url = self.url(&name);
        let store = Store::connect(&url, 2).await?;
        Ok(Copy { name, url, store })
    }

    /// Closes the copy's store and drops the copy.
    async fn discard(&self, copy: Copy) {
        copy.store.close().await;
        if let Ok(mut admin) = self.admin().await {
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                copy.name
            )))
            .execute(&mut admin)
            .await;
            let _ = admin.close().await;
            self.copies
                .lock()
                .expect("scratch lock")
                .1
                .retain(|n| *n != copy.name);
        }
    }

    async fn observe_fresh(
        &self,
        o: &Observer,
        payload: &Value,
    ) -> Result<Observation, ExploreError> {
        let copy = self.fresh().await?;
        let seen = o.observe(copy.store.pool(), payload).await;
        self.discard(copy).await;
        seen
    }

    async fn drop_all(&self) {
        let Ok(mut admin) = self.admin().await else {
            return;
        };
        let copies = std::mem::take(&mut self.copies.lock().expect("scratch lock").1);
        for name in copies.iter().chain(std::iter::once(&self.template)) {
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await;
        }
        let _ = admin.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::load_str;

    fn services_saga() -> SagaDef {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sagas/order_services.yaml"),
        )
        .unwrap();
        load_str(&text, std::path::Path::new("order_services.yaml")).unwrap()
    }

    fn plan(fault: Fault) -> Plan {
        Plan::new(
            &services_saga(),
            Some(Point {
                step: 1,
                phase: Phase::Forward,
                fault,
            }),
        )
    }

    #[test]
    fn a_reply_crash_hits_the_second_message_of_the_step_at_its_point_only() {
        let p = plan(Fault::ReplyCrash(FaultPoint::AfterCommit));
        let at = |point, step| p.at(point, step, Phase::Forward);
        // Other steps and points are untouched.
        assert_eq!(
            at(FaultPoint::AfterCommit, "reserve_stock"),
            Injected::Nothing
        );
        assert_eq!(
            at(FaultPoint::BeforeCommit, "charge_card"),
            Injected::Nothing
        );
        // The command's send passes; its reply crashes; nothing after.
        assert_eq!(
            at(FaultPoint::AfterCommit, "charge_card"),
            Injected::Nothing
        );
        assert_eq!(at(FaultPoint::AfterCommit, "charge_card"), Injected::Crash);
        assert!(p.take_crash());
        assert_eq!(
            at(FaultPoint::AfterCommit, "charge_card"),
            Injected::Nothing
        );
    }

    #[test]
    fn a_duplicated_reply_is_the_second_delivery_and_no_reply_silences_the_step() {
        let p = plan(Fault::ReplyDuplicated);
        assert_eq!(p.on_delivery((0, Phase::Forward)), None);
        assert_eq!(p.on_delivery((1, Phase::Forward)), None);
        assert_eq!(p.on_delivery((1, Phase::Forward)), Some(Fault::Duplicate));
        assert_eq!(p.on_delivery((1, Phase::Forward)), None);
        assert_eq!(p.silent(), None);
        assert_eq!(plan(Fault::NoReply).silent(), Some((1, Phase::Forward)));
    }
}
