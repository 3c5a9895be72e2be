//! The stock service of the three-service sample, in its own database (created if
//! missing): `SERVICE_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/skald_stock`), `AMQP_URL`, `SKALD_NAMESPACE`,
//! `SKALD_PARTITIONS`. Its handlers are in `skald::participant::sample`.
//!
//! ```sh
//! cargo run --release --example stock_service
//! ```

fn main() -> std::process::ExitCode {
    skald::participant::sample::main(skald::participant::sample::Sample::Stock)
}
