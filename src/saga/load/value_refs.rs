//! Value references (`payload.…`, `steps.<step>.<column>`, `saga.instance_id`,
//! `saga.aggregate_id`): their syntax, and which step outputs a reference may see from
//! where it is used.

use std::collections::HashMap;

use serde_saphyr::Spanned;

use crate::saga::definition::ValueRef;
use crate::saga::yaml::RawStep;

/// Parses the syntax of a value reference (whether a referenced step exists is checked
/// separately, since it depends on where the reference is used).
pub(super) fn parse_value_ref(text: &str) -> Result<ValueRef, String> {
    let parts: Vec<&str> = text.split('.').collect();
    match parts.as_slice() {
        ["payload", keys @ ..] if !keys.is_empty() && keys.iter().all(|k| is_payload_key(k)) => {
            Ok(ValueRef::Payload {
                path: keys.iter().map(|k| (*k).to_owned()).collect(),
            })
        }
        ["steps", step, column] if is_identifier(step) && is_identifier(column) => {
            Ok(ValueRef::StepOutput {
                step: (*step).to_owned(),
                column: (*column).to_owned(),
            })
        }
        ["saga", "instance_id"] => Ok(ValueRef::InstanceId),
        ["saga", "aggregate_id"] => Ok(ValueRef::AggregateId),
        _ => Err(format!(
            "unknown parameter reference `{text}`: expected `payload.<key>[.<key>...]`, \
             `steps.<step>.<column>`, `saga.instance_id` or `saga.aggregate_id`"
        )),
    }
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`: parameter and column names.
pub(super) fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `[A-Za-z0-9_-]+`: one key of a payload path.
fn is_payload_key(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What `steps.<step>.<column>` references may point at.
pub(super) struct StepOutputs<'r> {
    /// Step name → index of its first occurrence.
    index: HashMap<&'r str, usize>,
    /// Per step: the columns of its action's `returning`.
    returning: Vec<Vec<&'r str>>,
}

impl<'r> StepOutputs<'r> {
    pub(super) fn new(steps: &'r [Spanned<RawStep>]) -> Self {
        let mut index = HashMap::new();
        let mut returning = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            index.entry(step.value.name.value.as_str()).or_insert(i);
            let action = &step.value.action.value;
            // A command's reply fields are declared inside its `command:` block.
            let columns = match &action.command {
                Some(command) => command.value.returning.as_ref(),
                None => action.returning.as_ref(),
            };
            returning.push(
                columns
                    .map(|cols| cols.value.iter().map(|c| c.value.as_str()).collect())
                    .unwrap_or_default(),
            );
        }
        StepOutputs { index, returning }
    }

    /// Checks that `steps.<step>.<column>` is visible from `scope`.
    pub(super) fn check(&self, step: &str, column: &str, scope: Scope) -> Result<(), String> {
        let reference = format!("steps.{step}.{column}");
        let Some(&at) = self.index.get(step) else {
            return Err(format!(
                "unknown parameter reference `{reference}`: there is no step `{step}` in this saga"
            ));
        };
        if at > scope.step {
            return Err(format!(
                "`{reference}` refers to step `{step}`, which runs after this one: \
                 only outputs of earlier steps are available"
            ));
        }
        if at == scope.step && !scope.compensation {
            return Err(format!(
                "`{reference}` refers to this step's own output, which only its \
                 compensation can use"
            ));
        }
        let columns = &self.returning[at];
        if !columns.contains(&column) {
            return Err(format!(
                "step `{step}` does not return column `{column}` (its `returning` is [{}])",
                columns.join(", ")
            ));
        }
        Ok(())
    }
}

/// Where a reference is used: in the action or in the compensation of step `step`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scope {
    pub(super) step: usize,
    pub(super) compensation: bool,
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{load, loaded, payload, render};
    use super::*;

    #[test]
    fn value_refs_parse() {
        assert_eq!(
            parse_value_ref("payload.order_id"),
            Ok(payload(&["order_id"]))
        );
        assert_eq!(
            parse_value_ref("payload.customer.e-mail"),
            Ok(payload(&["customer", "e-mail"]))
        );
        assert_eq!(
            parse_value_ref("steps.charge.payment_id"),
            Ok(ValueRef::StepOutput {
                step: "charge".into(),
                column: "payment_id".into()
            })
        );
        assert_eq!(
            parse_value_ref("saga.instance_id"),
            Ok(ValueRef::InstanceId)
        );
        assert_eq!(
            parse_value_ref("saga.aggregate_id"),
            Ok(ValueRef::AggregateId)
        );
        for bad in [
            "",
            "payload",
            "payload.",
            "payload..a",
            "payload.a b",
            "steps.a",
            "steps.a.b.c",
            "steps.a.1col",
            "saga.name",
            "saga",
            "order_id",
            "Payload.x",
        ] {
            let err = parse_value_ref(bad).expect_err(bad);
            assert!(
                err.starts_with("unknown parameter reference"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn step_output_visibility() {
        let saga = |action_ref: &str, comp_ref: &str| {
            format!(
                "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
                 - name: a\n  role: compensatable\n\
                 \x20 action: {{ sql: 'SELECT 1 RETURNING x', returning: [x] }}\n\
                 \x20 compensation: {{ sql: 'SELECT :p', params: {{ p: {comp_ref} }} }}\n\
                 - name: b\n  role: pivot\n\
                 \x20 action: {{ sql: 'SELECT :p', params: {{ p: {action_ref} }} }}\n"
            )
        };
        loaded(&saga("steps.a.x", "steps.a.x"));

        let errors = load(&saga("steps.b.x", "steps.a.x")).expect_err("own output");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "steps[1].action.params.p");
        assert!(errors[0].message.contains("own output"), "{}", errors[0]);

        let errors = load(&saga("steps.a.y", "steps.b.x")).expect_err("two errors");
        let messages: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(errors.len(), 2, "{}", render(&errors));
        assert!(
            messages[0].contains("runs after this one"),
            "{}",
            messages[0]
        );
        assert!(
            messages[1].contains("does not return column `y`"),
            "{}",
            messages[1]
        );
    }
}
