//! `skald instances list` and `skald instance show|retry|cancel|resume`: what the
//! dashboard shows and does, from the command line. Listing and showing go through
//! [`crate::api::views`] (the API's filters, rules and documents); the actions call
//! the same [`crate::operator`] functions as the API, recorded the same way.
//!
//! Exit codes: 0 done (also when an action had been done before), 2 invalid
//! arguments, 3 no such instance, 4 the action does not apply to the instance, 1
//! anything else (PostgreSQL or RabbitMQ unreachable, sagas that do not load).

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::api::ApiError;
use crate::api::services::{ServiceDatabases, add_service_sides};
use crate::api::views::{self, ActionDone, InstancesQuery};
use crate::config::Config;
use crate::operator::ActionOutcome;
use crate::saga::Catalog;
use crate::store::Store;
use crate::transport::Transport;
use crate::transport::rabbitmq::RabbitTransport;

/// `skald instances …`.
#[derive(Debug, clap::Subcommand)]
pub enum InstancesCmd {
    /// List instances, newest first, with the API's filters (`GET /api/v1/instances`).
    List(ListArgs),
    /// Find instances by instance id, aggregate id or the id of a message they handled
    /// or sent, as the dashboard's search box does (`GET /api/v1/search`).
    Search(SearchArgs),
}

/// The arguments of `skald instances search`: those of `GET /api/v1/search`.
#[derive(Debug, clap::Args)]
pub struct SearchArgs {
    /// An instance id, an aggregate id or a message id (1 to 200 characters).
    text: String,
    /// At most this many instances, 1 to 100 (default 20).
    #[arg(long)]
    limit: Option<i64>,
    /// Print the API's answer, `{"q", "items": [{"matched", "instance"}]}`, as JSON.
    #[arg(long)]
    json: bool,
}

/// The filters of `skald instances list`: those of `GET /api/v1/instances`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only this saga.
    #[arg(long)]
    saga: Option<String>,
    /// Only this status: waiting, running, compensating, completed, compensated, failed.
    #[arg(long)]
    status: Option<String>,
    /// Only this aggregate id.
    #[arg(long)]
    aggregate: Option<String>,
    /// Created at or after this RFC 3339 time.
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// Created before this RFC 3339 time.
    #[arg(long)]
    until: Option<DateTime<Utc>>,
    /// The `next_cursor` a previous page printed.
    #[arg(long)]
    cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[arg(long)]
    limit: Option<i64>,
    /// Print the API's page, `{"items", "next_cursor"}`, as JSON.
    #[arg(long)]
    json: bool,
}

/// `skald instance …`.
#[derive(Debug, clap::Subcommand)]
pub enum InstanceCmd {
    /// One instance: its state, timeline, dead letters, commands and replies.
    Show {
        /// The instance id.
        id: Uuid,
        /// Print the API's document (`GET /api/v1/instances/{id}`) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a pending retry now (re-send the awaited command of a command step).
    Retry(ActionArgs),
    /// Stop going forward and compensate the completed steps (refused past the pivot).
    Cancel(ActionArgs),
    /// Resume a parked (failed) instance by replaying its dead letter.
    Resume(ActionArgs),
}

/// The instance an action is on, and who acts.
#[derive(Debug, clap::Args)]
pub struct ActionArgs {
    /// The instance id.
    id: Uuid,
    /// Who acts (recorded; default: $USER, else `cli`).
    #[arg(long)]
    by: Option<String>,
    /// Print `{"id", "action", "outcome"}` as JSON.
    #[arg(long)]
    json: bool,
}

/// The exit code of a refused or failed command (see the module).
pub fn exit_code(e: &ApiError) -> ExitCode {
    ExitCode::from(match e {
        ApiError::BadRequest(_) => 2,
        ApiError::NotFound(_) => 3,
        ApiError::Conflict(_) => 4,
        _ => 1,
    })
}

/// Prints `error: <message>` and returns its exit code.
pub(super) fn refused(e: ApiError) -> ExitCode {
    eprintln!("error: {e}");
    exit_code(&e)
}

pub(super) async fn store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::connect(&config.database_url, 2).await?;
    store.migrate().await?;
    Ok(store)
}

/// Runs `skald instances …`.
pub async fn run_instances(config: Config, cmd: InstancesCmd) -> anyhow::Result<ExitCode> {
    let args = match cmd {
        InstancesCmd::List(args) => args,
        InstancesCmd::Search(args) => return search(&config, args).await,
    };
    let store = store(&config).await?;
    let query = InstancesQuery {
        saga: args.saga,
        status: args.status,
        aggregate_id: args.aggregate,
        since: args.since,
        until: args.until,
        cursor: args.cursor,
        limit: args.limit,
    };
    let page = views::instance_page(&store, query).await;
    store.close().await;
    let page = match page {
        Ok(page) => page,
        Err(e) => return Ok(refused(e)),
    };
    if args.json {
        println!("{}", serde_json::to_string(&page)?);
        return Ok(ExitCode::SUCCESS);
    }
    if page.items.is_empty() {
        println!("no instances");
    }
    for i in &page.items {
        println!(
            "{}  {} v{}  {:<12} {}  {}",
            i.id,
            i.saga,
            i.saga_version,
            i.status.as_str(),
            i.created_at.format("%Y-%m-%d %H:%M:%S"),
            i.aggregate_id
        );
    }
    if let Some(cursor) = page.next_cursor {
        println!("next page: --cursor {cursor}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `skald instances search`.
async fn search(config: &Config, args: SearchArgs) -> anyhow::Result<ExitCode> {
    let store = store(config).await?;
    let found = crate::api::search::find(&store, &args.text, args.limit).await;
    store.close().await;
    let found = match found {
        Ok(found) => found,
        Err(e) => return Ok(refused(e)),
    };
    if args.json {
        println!("{}", serde_json::to_string(&found)?);
        return Ok(ExitCode::SUCCESS);
    }
    if found.items.is_empty() {
        println!("no instance matches {:?}", found.q);
    }
    for f in &found.items {
        let i = &f.instance;
        let matched = serde_json::to_value(f.matched)?;
        println!(
            "{}  {} v{}  {:<12} {}  {}  (matched {})",
            i.id,
            i.saga,
            i.saga_version,
            i.status.as_str(),
            i.created_at.format("%Y-%m-%d %H:%M:%S"),
            i.aggregate_id,
            matched.as_str().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `skald instance …`.
pub async fn run_instance(config: Config, cmd: InstanceCmd) -> anyhow::Result<ExitCode> {
    let store = store(&config).await?;
    let code = match cmd {
        InstanceCmd::Show { id, json } => match views::instance_document(&store, id).await {
            Ok(mut doc) if json => {
                // As the API serves it: each command with what its service recorded.
                let services = ServiceDatabases::lazy(&config.service_databases);
                add_service_sides(&services, &mut doc).await;
                println!("{}", serde_json::to_string(&doc)?);
                ExitCode::SUCCESS
            }
            Ok(doc) => {
                print!("{}", render_instance(&doc));
                ExitCode::SUCCESS
            }
            Err(e) => refused(e),
        },
        InstanceCmd::Retry(a) => act(&config, &store, "retry", a).await?,
        InstanceCmd::Cancel(a) => act(&config, &store, "cancel", a).await?,
        InstanceCmd::Resume(a) => act(&config, &store, "resume", a).await?,
    };
    store.close().await;
    Ok(code)
}

/// Runs one operator action as the API does: the same function, the same record.
async fn act(
    config: &Config,
    store: &Store,
    action: &'static str,
    args: ActionArgs,
) -> anyhow::Result<ExitCode> {
    let by = super::operator(args.by);
    // Cancel compensates with the instance's own saga version: the loaded files say how.
    let catalog = if action == "cancel" {
        Some(Catalog::new(super::load_sagas(config)?))
    } else {
        None
    };
    let transport = RabbitTransport::connect(config).await?;
    let outcome = match (action, &catalog) {
        ("retry", _) => crate::operator::retry_now(store, transport.as_ref(), args.id, &by).await,
        ("cancel", Some(catalog)) => {
            crate::operator::cancel(store, catalog, transport.as_ref(), args.id, &by).await
        }
        _ => crate::operator::resume(store, transport.as_ref(), args.id, &by).await,
    };
    transport.close().await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => return Ok(refused(e.into())),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&ActionDone::new(args.id, action, outcome))?
        );
    } else {
        let said = match outcome {
            ActionOutcome::Done => "done",
            ActionOutcome::AlreadyDone => "already done (its message was sent again)",
        };
        println!("{action} {}: {said}", args.id);
    }
    Ok(ExitCode::SUCCESS)
}

/// The text form of an instance document: its state, then one line per timeline
/// entry, dead letter and command.
pub fn render_instance(doc: &Value) -> String {
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = format!(
        "instance {}\nsaga {} v{}, aggregate {}\nstatus {} at step {} ({}), attempt {}\n\
         created {}, updated {}, finished {}\n",
        s(&doc["id"]),
        s(&doc["saga"]),
        s(&doc["saga_version"]),
        s(&doc["aggregate_id"]),
        s(&doc["status"]),
        s(&doc["cursor"]["step"]),
        s(&doc["cursor"]["phase"]),
        s(&doc["cursor"]["attempt"]),
        s(&doc["created_at"]),
        s(&doc["updated_at"]),
        s(&doc["finished_at"]),
    );
    let list = |key: &str| doc[key].as_array().cloned().unwrap_or_default();
    out += "timeline:\n";
    for e in list("timeline") {
        out += &format!(
            "  {}  {:<8} step {} {} ({}) attempt {}: {}{}\n",
            s(&e["finished_at"]),
            s(&e["disposition"]),
            s(&e["step"]),
            s(&e["step_name"]),
            s(&e["phase"]),
            s(&e["attempt"]),
            s(&e["outcome"]),
            match &e["error"] {
                Value::Null => String::new(),
                err => format!(" — {}", s(err)),
            }
        );
    }
    for l in list("dead_letters") {
        out += &format!(
            "dead letter {}: {} {} — {}\n",
            s(&l["id"]),
            s(&l["kind"]),
            s(&l["status"]),
            s(&l["reason"])
        );
    }
    for c in list("commands") {
        out += &format!(
            "command {} to {} ({}) for step {} {}: {}, {} send(s){}\n",
            s(&c["command_id"]),
            s(&c["service"]),
            s(&c["type"]),
            s(&c["step"]),
            s(&c["step_name"]),
            s(&c["status"]),
            s(&c["sends"]),
            match &c["error"] {
                Value::Null => String::new(),
                err => format!(" — {}", s(err)),
            }
        );
    }
    for r in list("replies") {
        out += &format!(
            "reply {} from {}: {} ({})\n",
            s(&r["message_id"]),
            s(&r["service"]),
            s(&r["status"]),
            s(&r["disposition"])
        );
    }
    out
}
