//! # skald — a saga orchestrator on PostgreSQL (and, if you like, RabbitMQ)
//!
//! skald runs business flows that used to be one database transaction as *sagas*:
//! ordered steps defined in YAML, each committing in PostgreSQL, compensated in
//! reverse when a later step fails. Messages travel with at-least-once delivery on a
//! queue in PostgreSQL itself or over RabbitMQ; PostgreSQL is the only source of truth.
//!
//! ## Where things are
//!
//! - [`saga`]: saga definitions (YAML), their validation, and every rule as a pure
//!   function — no I/O but reading saga files: [`saga::coordinator`] (the next state
//!   after an attempt, admission, cancel), [`saga::decide`] (everything one message
//!   leads to: its target, the deadline, the plan of an attempt, what a record that did
//!   not apply is, resume, the exclusive lock hand-over), [`saga::command`] (command
//!   steps: sending a command, applying its reply once, its reply timer's re-sends and
//!   time-out) and [`saga::strict`] (strict
//!   per-aggregate order of starts), [`saga::versions`] (what start-up refuses about
//!   loaded versions: same number with other content, live instances of a removed
//!   version) and [`saga::diff`] (`skald diff`: what deploying files would do to live
//!   instances). [`saga::Catalog`] holds several versions of a saga at once, keyed by
//!   (name, version). [`saga::load`] reads and checks them, one concern a file:
//!   `load/mod.rs` (the entry points, [`saga::LoadError`] and the file format),
//!   `checker.rs` (the error collector; names and integers within their limits),
//!   `structure.rs` (saga and step rules: roles and the pivot, check steps, ordering,
//!   isolation, timeouts), `retry.rs` (retry policies), `action.rs` (`sql`, `handler`
//!   and `command` actions), `value_refs.rs` (`payload.…`, `steps.…`, `saga.…` references) and
//!   `yaml_error.rs` (a serde-saphyr error as one error with its document path).
//! - [`envelope`]: the JSON message every start and step travels in, and how a raw
//!   body is read (or found malformed).
//! - [`store`]: PostgreSQL. All of skald's SQL lives here and in `migrations/`
//!   ([`store::commands`]: command steps' commands and every reply received).
//! - [`handlers`]: steps written in Rust, registered by name. Depends on [`saga`] only;
//!   [`store::effects`] runs them (and classifies their database errors).
//! - [`transport`]: the [`transport::Transport`] seam (publish with confirm, consume
//!   with manual ack, delay, dead-letter) and [`transport::connect`], which builds the
//!   one `SKALD_TRANSPORT` names: [`transport::postgres`] (the default: queue tables in
//!   skald's own database — `publisher.rs` group-commits publishes, `consumer.rs` is the
//!   session that owns partitions by advisory lock, fetches and acks, `partition.rs`
//!   the lock keys and fair share as pure functions), [`transport::rabbitmq`], or Redis
//!   Streams ([`transport::redis`]: `keys.rs` names and the partition hash,
//!   `scripts.rs` the Lua scripts, `consumer.rs` leases and the reader, `durability.rs`
//!   the server's persistence settings judged); and an in-memory one
//!   ([`transport::memory`], for unit tests and `explore`, with injectable faults).
//! - [`faults`]: faults injected on purpose at the points of a message's handling
//!   (`SKALD_CRASH_AT`, and `explore`'s plans).
//! - [`explore`]: `skald explore`, a saga through every crash and fault point against
//!   scratch databases, checked against the legacy transaction; it plays command
//!   steps' participant services itself (`explore/service.rs`).
//! - [`scaffold`]: `skald scaffold`, a draft saga from a legacy psql transaction: the
//!   script read with `sqlparser`'s tokenizer, its one transaction parsed, one rule per
//!   statement shape (step and suggested compensation), proposed roles, the YAML with
//!   its `# TODO`s. Depends on [`saga`] only.
//! - [`engine`]: one message, end to end: effect, guarded record, commit, publish, ack —
//!   an interpreter of [`saga::decide`]'s plans (`engine/commands.rs`: a command
//!   step's send, its reply and its reply timer). A plain component, driven by the
//!   actors but testable without them.
//! - [`actors`]: per-aggregate actix actors that serialise the engine's work for
//!   one aggregate, and the router that creates and evicts them.
//! - [`app`]: wiring: build everything from a [`config::Config`], consume until
//!   shutdown, drain in-flight work.
//! - [`api`]: the dashboard's HTTP API (actix-web) and `/metrics`; [`api::views`]: the
//!   instances page and instance document it and the CLI both show.
//! - [`seen`]: the message ids this process recorded lately, so a copy is looked up
//!   in the inbox before its step runs again.
//! - [`dlq`]: operator actions on dead letters (replay, discard); [`operator`]:
//!   on instances (retry now, cancel, resume); [`failures`]: failure groups —
//!   failed attempts and dead letters grouped by saga, step and error signature
//!   ([`failures::signature`](mod@failures::signature), pure), and retry or discard of a whole group
//!   (SQL in [`store::failures`]).
//! - [`participant`]: the library a *participant service* (its own PostgreSQL
//!   database, its own endpoint on the broker) uses to handle saga commands and plain
//!   events with skald's guarantees: [`participant::wire`] (the service message and the
//!   reply on the wire), a builder and handler contract, the consume loop
//!   ([`participant::consumer`]), pure rules ([`participant::decide`],
//!   [`participant::policy`]), per-aggregate lanes, its own schema `skald_participant`
//!   (migrations in `src/participant/migrations/`), dead-letter tooling, crash faults,
//!   and the three sample services ([`participant::sample`], run by `examples/`).
//! - [`bench`](mod@bench): `skald bench`, skald against a hand-written baseline in one run;
//!   `bench/command.rs` its command-step mode (the three sample services in-process).
//! - [`telemetry`]: the process's logs (text or JSON) and, with the standard
//!   `OTEL_*` variables, one OpenTelemetry trace per saga instance: the `message` span
//!   per attempt, the W3C `traceparent` carried in envelopes, commands and replies
//!   (`traceparent.rs`, pure), OTLP/HTTP export (`setup.rs`).
//! - [`cli`]: the `skald` command line (`cli/instances.rs`: `skald instances` and
//!   `skald instance`, the dashboard's views and actions; `cli/failures.rs`: `skald
//!   failures`).
//!
//! ## The path of one message
//!
//! consumer → [`envelope::Envelope::parse`] (malformed → dead-letter queue) →
//! [`actors::Router`] → the aggregate's [`actors::AggregateActor`] →
//! [`engine::Engine::process`]: one PostgreSQL transaction holding the step's effect,
//! the inbox row, the instance's new state and the messages to send next; commit;
//! publish those messages with confirms; only then ack the delivery.

#![warn(missing_docs)]

pub mod actors;
pub mod api;
pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod dlq;
pub mod engine;
pub mod envelope;
pub mod explore;
pub mod failures;
pub mod faults;
pub mod handlers;
pub mod metrics;
pub mod operator;
pub mod participant;
pub mod saga;
pub mod scaffold;
pub mod seen;
pub mod store;
pub mod telemetry;
pub mod transport;
