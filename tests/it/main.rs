//! Integration tests against the real PostgreSQL and RabbitMQ on this machine. One
//! binary, so it links once; each scenario isolates itself through `helpers::TestEnv`.

mod helpers;
mod rabbit_cluster;
mod redis_server;

mod api;
mod api_fuzz;
mod api_metrics;
mod api_safety;
mod api_services;
mod batching;
mod bench;
mod browser;
mod check_steps;
mod cli;
mod cluster;
mod command_steps;
mod conformance;
mod crash;
mod explore;
mod failure_groups;
mod failures;
mod handlers;
mod integrity;
mod isolation;
mod legacy_flows;
mod malformed;
mod ordering;
mod participant;
mod resilience;
mod saga_flow;
mod scaffold;
mod scale;
mod services;
mod traces;
mod versions;
