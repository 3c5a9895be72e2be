//! The shape of the work `skald bench` measures: how many steps a saga has
//! (`--saga-steps`) and how large every message is (`--payload-kib`), so that the cost
//! of a step can be read against both.

use serde_json::{Value, json};

/// `--saga-steps` at most: a saga this long already shows how cost grows with steps.
pub const MAX_SAGA_STEPS: u8 = 50;
/// `--payload-kib` at most (1 MiB): larger messages measure the network, not skald.
pub const MAX_PAYLOAD_KIB: u16 = 1024;
/// The generated saga's name (`--saga-steps`).
pub const GENERATED_SAGA: &str = "bench_steps";

/// The saga of `steps` SQL steps that `--saga-steps` runs instead of the sample: every
/// step is the baseline's statement (take one item of the aggregate's stock), retriable,
/// so that the run measures the cost of a step and nothing a longer saga adds.
pub fn generated_saga(steps: u8) -> String {
    let mut yaml = format!(
        "name: {GENERATED_SAGA}\n\
         version: 1\n\
         aggregate: payload.sku\n\
         setup: |\n  \
           CREATE SCHEMA IF NOT EXISTS shop;\n  \
           CREATE TABLE IF NOT EXISTS shop.stock (sku text PRIMARY KEY, available int NOT NULL CHECK (available >= 0));\n  \
           CREATE TABLE IF NOT EXISTS shop.accounts (account_id text PRIMARY KEY, balance numeric(14,2) NOT NULL CHECK (balance >= 0));\n\
         steps:\n"
    );
    for i in 1..=steps {
        yaml.push_str(&format!(
            "  - name: step_{i}\n    \
               role: retriable\n    \
               action:\n      \
                 sql: UPDATE shop.stock SET available = available - 1 WHERE sku = :sku::text AND available >= 1\n      \
                 params: {{ sku: payload.sku }}\n      \
                 expect_rows: 1\n"
        ));
    }
    yaml
}

/// `payload` with `kib` KiB of padding in a `padding` field (none for 0), which no step
/// reads: the message is larger, the work the same.
pub fn padded(mut payload: Value, kib: u16) -> Value {
    if kib > 0 {
        payload["padding"] = json!("x".repeat(usize::from(kib) * 1024));
    }
    payload
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_generated_saga_is_valid_with_as_many_steps_as_asked() {
        for steps in [1, 3, 10, MAX_SAGA_STEPS] {
            let saga = crate::saga::load::load_str(&generated_saga(steps), Path::new("bench.yaml"))
                .expect("a valid saga");
            assert_eq!(saga.name, GENERATED_SAGA);
            assert_eq!(saga.steps.len(), usize::from(steps));
        }
    }

    #[test]
    fn padding_adds_that_many_kib_and_keeps_the_payload() {
        let p = padded(json!({"sku": "bench-1"}), 64);
        assert_eq!(p["sku"], "bench-1");
        assert_eq!(p["padding"].as_str().map(str::len), Some(64 * 1024));
        assert_eq!(padded(json!({"sku": "a"}), 0), json!({"sku": "a"}));
    }
}
