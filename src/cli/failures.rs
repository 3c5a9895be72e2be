//! `skald failures list|retry|discard`: failure groups as the dashboard shows them
//! and its buttons act on them ([`crate::failures`]). Exit codes as `skald instance`:
//! 0 done, 2 invalid arguments, 3 no such group, 1 anything else.

use std::process::ExitCode;

use uuid::Uuid;

use super::instances::{refused, store};
use crate::api::ApiError;
use crate::config::Config;
use crate::failures::{self, GroupOutcome, RetryGroup};
use crate::transport::Transport;
use crate::transport::rabbitmq::RabbitTransport;

/// `skald failures …`.
#[derive(Debug, clap::Subcommand)]
pub enum FailuresCmd {
    /// Failure groups, most failed attempts first.
    List {
        /// Only this saga.
        #[arg(long)]
        saga: Option<String>,
        /// Print the API's `{"items"}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Retry a group's members, oldest first, paced.
    Retry {
        /// The group's id.
        id: Uuid,
        /// Members per second at most, 1 to 1000.
        #[arg(long, default_value_t = failures::DEFAULT_PER_SECOND,
              value_parser = clap::value_parser!(u32).range(
                  i64::from(*failures::PER_SECOND.start())..=i64::from(*failures::PER_SECOND.end())))]
        per_second: u32,
        /// The oldest this many members, 1 to 1000.
        #[arg(long, default_value_t = failures::DEFAULT_LIMIT,
              value_parser = clap::value_parser!(i64).range(failures::LIMIT))]
        limit: i64,
        /// Who retries (recorded; default: $USER, else `cli`).
        #[arg(long)]
        by: Option<String>,
        /// Print `{"id", "done", "skipped"}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Discard the pending dead letters of a group's members (recorded, never erased).
    Discard {
        /// The group's id.
        id: Uuid,
        /// Why (recorded).
        #[arg(long)]
        note: Option<String>,
        /// Who discards (recorded; default: $USER, else `cli`).
        #[arg(long)]
        by: Option<String>,
        /// Print `{"id", "done", "skipped"}` as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `skald failures …`.
pub async fn run(config: Config, cmd: FailuresCmd) -> anyhow::Result<ExitCode> {
    let store = store(&config).await?;
    let result = match cmd {
        FailuresCmd::List { saga, json } => {
            let groups = failures::groups(&store, saga.as_deref()).await?;
            if json {
                println!("{}", serde_json::json!({ "items": groups }));
            } else if groups.is_empty() {
                println!("no failures");
            }
            for g in groups.iter().filter(|_| !json) {
                println!(
                    "{}  {} / {} ({})  {}: {}  attempts={} instances={} dead_letters={}  \
                     first={} last={}",
                    g.id,
                    g.saga,
                    g.step.as_deref().unwrap_or("-"),
                    g.phase.as_deref().unwrap_or("-"),
                    g.code.as_deref().unwrap_or("-"),
                    g.message,
                    g.attempts,
                    g.instances,
                    g.dead_letters,
                    g.first_seen.to_rfc3339(),
                    g.last_seen.to_rfc3339()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        FailuresCmd::Retry {
            id,
            per_second,
            limit,
            by,
            json,
        } => {
            let transport = RabbitTransport::connect(&config).await?;
            let how = RetryGroup {
                limit: limit as usize,
                per_second,
            };
            let outcome =
                failures::retry_group(&store, transport.as_ref(), id, how, &super::operator(by))
                    .await;
            transport.close().await;
            show(id, "retried", outcome.map_err(ApiError::from), json)
        }
        FailuresCmd::Discard { id, note, by, json } => {
            let outcome =
                failures::discard_group(&store, id, &super::operator(by), note.as_deref()).await;
            show(id, "discarded", outcome.map_err(ApiError::from), json)
        }
    };
    store.close().await;
    result
}

fn show(
    id: Uuid,
    verb: &str,
    outcome: Result<GroupOutcome, ApiError>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => return Ok(refused(e)),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "id": id, "done": outcome.done, "skipped": outcome.skipped })
        );
    } else {
        println!(
            "group {id}: {verb} {}, skipped {}",
            outcome.done.len(),
            outcome.skipped.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
