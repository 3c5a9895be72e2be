//! The values a running step can refer to, and how a [`ValueRef`] finds its value.

use serde_json::Value;
use uuid::Uuid;

use super::definition::ValueRef;

/// Everything a step's parameters may be bound from.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// The saga instance running the step.
    pub instance_id: Uuid,
    /// The aggregate the instance belongs to.
    pub aggregate_id: &'a str,
    /// The start message's payload.
    pub payload: &'a Value,
    /// Columns captured by earlier steps, as `{ "<step>": { "<column>": value } }`.
    pub outputs: &'a Value,
}

impl ValueRef {
    /// The referenced value, or `None` when the payload or an output lacks it (which
    /// no retry can fix, so callers treat it as a fatal failure).
    pub fn resolve(&self, input: &StepInput<'_>) -> Option<Value> {
        match self {
            ValueRef::Payload { path } => path
                .iter()
                .try_fold(input.payload, |v, key| v.get(key))
                .cloned(),
            ValueRef::StepOutput { step, column } => {
                input.outputs.get(step).and_then(|o| o.get(column)).cloned()
            }
            ValueRef::InstanceId => Some(Value::String(input.instance_id.to_string())),
            ValueRef::AggregateId => Some(Value::String(input.aggregate_id.to_string())),
        }
    }
}

impl super::SagaDef {
    /// The aggregate id a start payload carries where the saga's `aggregate` says
    /// (a string, or a number in its decimal form); `None` when it has none.
    pub fn aggregate_of(&self, payload: &Value) -> Option<String> {
        let input = StepInput {
            instance_id: Uuid::nil(),
            aggregate_id: "",
            payload,
            outputs: &Value::Null,
        };
        match self.aggregate.resolve(&input)? {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

impl std::fmt::Display for ValueRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValueRef::Payload { path } => write!(f, "payload.{}", path.join(".")),
            ValueRef::StepOutput { step, column } => write!(f, "steps.{step}.{column}"),
            ValueRef::InstanceId => f.write_str("saga.instance_id"),
            ValueRef::AggregateId => f.write_str("saga.aggregate_id"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_resolve_against_payload_outputs_and_identity() {
        let payload = json!({"order": {"id": "o-1"}, "qty": 2});
        let outputs = json!({"charge": {"payment_id": 7}});
        let id = Uuid::new_v4();
        let input = StepInput {
            instance_id: id,
            aggregate_id: "agg",
            payload: &payload,
            outputs: &outputs,
        };
        let payload_ref = |p: &[&str]| ValueRef::Payload {
            path: p.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            payload_ref(&["order", "id"]).resolve(&input),
            Some(json!("o-1"))
        );
        assert_eq!(payload_ref(&["qty"]).resolve(&input), Some(json!(2)));
        assert_eq!(payload_ref(&["missing"]).resolve(&input), None);
        let out = ValueRef::StepOutput {
            step: "charge".into(),
            column: "payment_id".into(),
        };
        assert_eq!(out.resolve(&input), Some(json!(7)));
        assert_eq!(
            ValueRef::InstanceId.resolve(&input),
            Some(json!(id.to_string()))
        );
        assert_eq!(ValueRef::AggregateId.resolve(&input), Some(json!("agg")));
    }
}
