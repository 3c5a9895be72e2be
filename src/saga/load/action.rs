//! Actions and compensations: exactly one of `sql`, `handler` or `command`, their
//! `params`, and what each kind allows — for SQL one statement whose `:name` parameters
//! match `params`, `expect_rows`, `returning` and `fatal_sqlstates`; for a handler its
//! name and `fatal_errors`; for a command its service, type, params, returning and
//! reply timeout.

use serde_saphyr::Spanned;

use super::Pos;
use super::checker::Checker;
use super::value_refs::{Scope, StepOutputs, is_identifier, parse_value_ref};
use std::time::Duration;

use crate::participant::wire::{MAX_TYPE_BYTES, is_command_type};
use crate::saga::definition::{Action, CommandAction, HandlerAction, SqlAction, ValueRef, limits};
use crate::saga::sql::{compile_named, has_keyword, is_single_statement};
use crate::saga::yaml::{Entries, RawAction, RawCommand};

/// A `params:` map as checked: every well-named key with its position, and the
/// references that resolved, both in YAML order.
type Params<'a> = (Vec<(&'a str, Pos)>, Vec<(&'a str, ValueRef)>);

impl Checker<'_> {
    /// An `action:` or `compensation:` block at `field`, its references seen from
    /// `scope`; `None` when anything in it is invalid.
    pub(super) fn action(
        &mut self,
        raw: &Spanned<RawAction>,
        field: &str,
        scope: Scope,
        outputs: &StepOutputs<'_>,
    ) -> Option<Action> {
        let a = &raw.value;
        let errors_before = self.errors.len();

        let (keys, resolved) = self.params(a.params.as_ref(), field, scope, outputs);

        let action = match (&a.sql, &a.handler, &a.command) {
            (Some(_), Some(_), None) => {
                self.error(
                    Pos::at(raw),
                    field,
                    "both `sql` and `handler` are given: an action has exactly one of `sql`, \
                     `handler` or `command`",
                );
                None
            }
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                self.error(
                    Pos::at(raw),
                    field,
                    "`command` is given beside `sql` or `handler`: an action has exactly one \
                     of `sql`, `handler` or `command`",
                );
                None
            }
            (None, None, None) => {
                self.error(
                    Pos::at(raw),
                    field,
                    "none of `sql`, `handler` or `command` is given: an action needs exactly \
                     one of them",
                );
                None
            }
            (None, Some(handler), None) => self.handler_action(a, handler, field, resolved),
            (Some(sql), None, None) => self.sql_action(a, sql, field, &keys, &resolved),
            (None, None, Some(command)) => self.command_action(a, command, field, scope, outputs),
        };
        action.filter(|_| self.errors.len() == errors_before)
    }

    /// The `params:` map at `{field}.params`: every well-named key, whether or not its
    /// value resolved, and the references that did, both in YAML order.
    fn params<'a>(
        &mut self,
        params: Option<&'a Spanned<Entries<Spanned<String>>>>,
        field: &str,
        scope: Scope,
        outputs: &StepOutputs<'_>,
    ) -> Params<'a> {
        let mut keys: Vec<(&str, Pos)> = Vec::new();
        let mut resolved: Vec<(&str, ValueRef)> = Vec::new();
        for (key, value) in params.iter().flat_map(|p| p.value.0.iter()) {
            let key_field = format!("{field}.params.{}", key.value);
            if !is_identifier(&key.value) {
                self.error(
                    Pos::at(key),
                    key_field,
                    format!(
                        "parameter name `{}` must match ^[A-Za-z_][A-Za-z0-9_]*$",
                        key.value
                    ),
                );
                continue;
            }
            keys.push((&key.value, Pos::at(key)));
            let checked = parse_value_ref(&value.value).and_then(|r| match &r {
                ValueRef::StepOutput { step, column } => {
                    outputs.check(step, column, scope).map(|()| r)
                }
                _ => Ok(r),
            });
            match checked {
                Ok(r) => resolved.push((&key.value, r)),
                Err(message) => self.error(Pos::at(value), key_field, message),
            }
        }
        (keys, resolved)
    }

    /// The `command:` block of an action at `field`: service, type, params, returning
    /// and the reply timeout; the SQL and handler fields are not allowed beside it.
    fn command_action(
        &mut self,
        a: &RawAction,
        command: &Spanned<RawCommand>,
        field: &str,
        scope: Scope,
        outputs: &StepOutputs<'_>,
    ) -> Option<Action> {
        let others = [
            ("params", a.params.as_ref().map(Pos::at)),
            ("expect_rows", a.expect_rows.as_ref().map(Pos::at)),
            ("returning", a.returning.as_ref().map(Pos::at)),
            ("fatal_sqlstates", a.fatal_sqlstates.as_ref().map(Pos::at)),
            ("fatal_errors", a.fatal_errors.as_ref().map(Pos::at)),
        ];
        for (name, at) in others {
            if let Some(at) = at {
                self.error(
                    at,
                    format!("{field}.{name}"),
                    format!(
                        "`{name}` is not allowed beside `command` (a command's `params` and \
                         `returning` go inside `command:`)"
                    ),
                );
            }
        }
        let c = &command.value;
        let field = format!("{field}.command");
        let service = c.service.value.as_str();
        if !is_service_name(service) {
            self.error(
                Pos::at(&c.service),
                format!("{field}.service"),
                format!(
                    "service name `{service}` must match ^[a-z][a-z0-9_-]*$ and be at most {} \
                     characters",
                    limits::MAX_SERVICE_CHARS
                ),
            );
        }
        if !is_command_type(&c.kind.value) {
            self.error(
                Pos::at(&c.kind),
                format!("{field}.type"),
                format!(
                    "command type `{}` must be 1 to {MAX_TYPE_BYTES} characters of [A-Za-z0-9_.-]",
                    c.kind.value
                ),
            );
        }
        let (_, resolved) = self.params(c.params.as_ref(), &field, scope, outputs);
        let returning = self.returning_columns(c.returning.as_ref(), &field);
        let timeout = self.millis_in(
            c.timeout_ms.as_ref(),
            &format!("{field}.timeout_ms"),
            1,
            (
                limits::MAX_COMMAND_TIMEOUT_MS,
                "the longest delay the transport holds the reply timer for",
            ),
        );
        Some(Action::Command(CommandAction {
            service: service.to_owned(),
            kind: c.kind.value.clone(),
            params: resolved
                .into_iter()
                .map(|(k, r)| (k.to_owned(), r))
                .collect(),
            returning,
            timeout: timeout.unwrap_or(Duration::from_millis(limits::DEFAULT_COMMAND_TIMEOUT_MS)),
        }))
    }

    /// The `returning:` list at `{field}.returning`: names, each once.
    fn returning_columns(
        &mut self,
        columns: Option<&Spanned<Vec<Spanned<String>>>>,
        field: &str,
    ) -> Vec<String> {
        let mut returning: Vec<String> = Vec::new();
        for (j, column) in columns.iter().flat_map(|c| c.value.iter()).enumerate() {
            if !is_identifier(&column.value) {
                self.error(
                    Pos::at(column),
                    format!("{field}.returning[{j}]"),
                    format!(
                        "column name `{}` must match ^[A-Za-z_][A-Za-z0-9_]*$",
                        column.value
                    ),
                );
            } else if returning.contains(&column.value) {
                self.error(
                    Pos::at(column),
                    format!("{field}.returning[{j}]"),
                    format!("column `{}` is listed twice", column.value),
                );
            } else {
                returning.push(column.value.clone());
            }
        }
        returning
    }

    fn handler_action(
        &mut self,
        a: &RawAction,
        handler: &Spanned<String>,
        field: &str,
        params: Vec<(&str, ValueRef)>,
    ) -> Option<Action> {
        let sql_only = [
            ("expect_rows", a.expect_rows.as_ref().map(Pos::at)),
            ("returning", a.returning.as_ref().map(Pos::at)),
            ("fatal_sqlstates", a.fatal_sqlstates.as_ref().map(Pos::at)),
        ];
        for (name, at) in sql_only {
            if let Some(at) = at {
                self.error(
                    at,
                    format!("{field}.{name}"),
                    format!("`{name}` is only allowed with `sql`, not with `handler`"),
                );
            }
        }
        let name = handler.value.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            self.error(
                Pos::at(handler),
                format!("{field}.handler"),
                format!(
                    "handler name `{}` must be non-empty and without spaces",
                    handler.value
                ),
            );
            return None;
        }
        let mut fatal_errors = Vec::new();
        for (j, code) in a
            .fatal_errors
            .iter()
            .flat_map(|l| l.value.iter())
            .enumerate()
        {
            let text = code.value.trim();
            if text.is_empty() || text.contains(char::is_whitespace) || text.contains(':') {
                self.error(
                    Pos::at(code),
                    format!("{field}.fatal_errors[{j}]"),
                    format!("error code `{}` must be one word without `:`", code.value),
                );
            } else {
                fatal_errors.push(text.to_owned());
            }
        }
        Some(Action::Handler(HandlerAction {
            name: name.to_owned(),
            params: params.into_iter().map(|(k, r)| (k.to_owned(), r)).collect(),
            fatal_errors,
        }))
    }

    fn sql_action(
        &mut self,
        a: &RawAction,
        sql: &Spanned<String>,
        field: &str,
        keys: &[(&str, Pos)],
        resolved: &[(&str, ValueRef)],
    ) -> Option<Action> {
        if let Some(codes) = &a.fatal_errors {
            self.error(
                Pos::at(codes),
                format!("{field}.fatal_errors"),
                "`fatal_errors` is only allowed with `handler`; SQL uses `fatal_sqlstates`"
                    .to_string(),
            );
        }
        let sql_field = format!("{field}.sql");
        if sql.value.trim().is_empty() {
            self.error(Pos::at(sql), sql_field, "`sql` is empty");
            return None;
        }
        if !is_single_statement(&sql.value) {
            self.error(
                Pos::at(sql),
                sql_field,
                "`sql` must be a single statement (there is more after a `;`)",
            );
            return None;
        }
        let (statement, names) = match compile_named(&sql.value) {
            Ok(compiled) => compiled,
            Err(e) => {
                self.error(
                    Pos::at(sql),
                    sql_field,
                    format!("invalid sql parameters: {e}"),
                );
                return None;
            }
        };
        for name in &names {
            if !keys.iter().any(|(k, _)| k == name) {
                self.error(
                    Pos::at(sql),
                    sql_field.clone(),
                    format!("`:{name}` in sql has no entry in `params`"),
                );
            }
        }
        for (key, at) in keys {
            if !names.iter().any(|n| n == key) {
                self.error(
                    *at,
                    format!("{field}.params.{key}"),
                    format!("parameter `{key}` is not used in sql (there is no `:{key}`)"),
                );
            }
        }

        let expect_rows = a
            .expect_rows
            .as_ref()
            .and_then(|n| match u64::try_from(n.value) {
                Ok(v) => Some(v),
                Err(_) => {
                    self.error(
                        Pos::at(n),
                        format!("{field}.expect_rows"),
                        format!("expect_rows must be an integer >= 0, found {}", n.value),
                    );
                    None
                }
            });

        let returning = self.returning_columns(a.returning.as_ref(), field);
        if let Some(columns) = &a.returning
            && !columns.value.is_empty()
            && !has_keyword(&sql.value, "returning")
        {
            self.error(
                Pos::at(columns),
                format!("{field}.returning"),
                "`returning` lists columns but the sql has no RETURNING clause",
            );
        }

        let mut fatal_sqlstates = Vec::new();
        if let Some(states) = &a.fatal_sqlstates {
            for (j, state) in states.value.iter().enumerate() {
                if is_sqlstate(&state.value) {
                    fatal_sqlstates.push(state.value.clone());
                } else {
                    self.error(
                        Pos::at(state),
                        format!("{field}.fatal_sqlstates[{j}]"),
                        format!(
                            "`{}` is not a SQLSTATE: expected 5 characters (e.g. 23505) or a \
                             2-character class (e.g. 23), each 0-9 or A-Z",
                            state.value
                        ),
                    );
                }
            }
        }

        // `$n` order; a name without a resolved value has been reported above.
        let params: Option<Vec<ValueRef>> = names
            .iter()
            .map(|name| {
                resolved
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, r)| r.clone())
            })
            .collect();
        Some(Action::Sql(SqlAction {
            sql: sql.value.clone(),
            statement,
            params: params?,
            param_names: names,
            expect_rows,
            returning,
            fatal_sqlstates,
        }))
    }
}

/// `^[a-z][a-z0-9_-]*$`, at most [`limits::MAX_SERVICE_CHARS`]: a participant
/// service's name (it becomes part of its queues' names).
pub(crate) fn is_service_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    s.len() <= limits::MAX_SERVICE_CHARS
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A five-character SQLSTATE or a two-character class, `[0-9A-Z]`.
fn is_sqlstate(s: &str) -> bool {
    (s.len() == 5 || s.len() == 2)
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{load, loaded, payload, render, sql_of};
    use super::*;

    #[test]
    fn params_follow_dollar_order_and_handler_params_yaml_order() {
        let def = loaded(
            "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
             - name: a\n  role: compensatable\n\
             \x20 action:\n    sql: SELECT :b, :a, :b RETURNING x\n    params: { a: payload.a, b: saga.instance_id }\n    returning: [x]\n\
             \x20 compensation: { handler: undo, params: { z: steps.a.x, y: saga.aggregate_id } }\n",
        );
        let action = sql_of(&def.steps[0].action);
        assert_eq!(action.statement, "SELECT $1, $2, $1 RETURNING x");
        assert_eq!(action.params, [ValueRef::InstanceId, payload(&["a"])]);
        match &def.steps[0].compensation {
            Some(Action::Handler(h)) => {
                assert_eq!(h.name, "undo");
                let keys: Vec<_> = h.params.iter().map(|(k, _)| k.as_str()).collect();
                assert_eq!(keys, ["z", "y"]);
            }
            other => panic!("{other:?}"),
        }
    }

    /// A saga with one compensatable command step whose `command:` block is `command`
    /// (flow style), and `extra` lines appended to the step.
    fn command_saga(command: &str, extra: &str) -> String {
        format!(
            "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
             - name: a\n  role: compensatable\n\
             \x20 action:\n    command: {command}\n\
             \x20 compensation: {{ command: {{ service: stock, type: undo, params: {{ r: steps.a.r }} }} }}\n{extra}\
             - name: b\n  role: pivot\n  action: {{ sql: 'SELECT :r', params: {{ r: steps.a.r }} }}\n"
        )
    }

    #[test]
    fn a_command_step_loads_and_its_returning_is_referable() {
        let def = loaded(&command_saga(
            "{ service: stock-1, type: reserve.v2, params: { sku: payload.sku, id: saga.instance_id }, returning: [r], timeout_ms: 3600000 }",
            "",
        ));
        match &def.steps[0].action {
            Action::Command(c) => {
                assert_eq!(
                    (c.service.as_str(), c.kind.as_str()),
                    ("stock-1", "reserve.v2")
                );
                assert_eq!(c.timeout.as_millis(), 3_600_000);
                assert_eq!(c.params[1], ("id".to_string(), ValueRef::InstanceId));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &def.steps[0].compensation,
            Some(Action::Command(_))
        ));
    }

    #[test]
    fn bad_command_fields_are_errors_with_line_and_field() {
        let ok = "{ service: stock, type: t, returning: [r] }";
        let cases: &[(String, &str, u32, &str)] = &[
            (
                command_saga("{ service: Stock, type: t, returning: [r] }", ""),
                "steps[0].action.command.service",
                8,
                "service name `Stock` must match ^[a-z][a-z0-9_-]*$",
            ),
            (
                command_saga(
                    &format!("{{ service: {}, type: t, returning: [r] }}", "s".repeat(64)),
                    "",
                ),
                "steps[0].action.command.service",
                8,
                "at most 63 characters",
            ),
            (
                command_saga("{ service: stock, type: 'a b', returning: [r] }", ""),
                "steps[0].action.command.type",
                8,
                "command type `a b` must be 1 to 128 characters of [A-Za-z0-9_.-]",
            ),
            (
                command_saga(
                    "{ service: stock, type: t, params: { x: payload }, returning: [r] }",
                    "",
                ),
                "steps[0].action.command.params.x",
                8,
                "unknown parameter reference `payload`",
            ),
            (
                command_saga(
                    "{ service: stock, type: t, params: { x: steps.b.r }, returning: [r] }",
                    "",
                ),
                "steps[0].action.command.params.x",
                8,
                "runs after this one",
            ),
            (
                command_saga("{ service: stock, type: t, returning: [q] }", ""),
                "steps[1].action.params.r",
                12,
                "step `a` does not return column `r` (its `returning` is [q])",
            ),
            (
                command_saga(
                    "{ service: stock, type: t, returning: [r], timeout_ms: 0 }",
                    "",
                ),
                "steps[0].action.command.timeout_ms",
                8,
                "timeout_ms must be an integer >= 1, found 0",
            ),
            (
                command_saga(
                    "{ service: stock, type: t, returning: [r], timeout_ms: 3600001 }",
                    "",
                ),
                "steps[0].action.command.timeout_ms",
                8,
                "timeout_ms must be at most 3600000",
            ),
            (
                command_saga(ok, "  timeout_ms: 10\n"),
                "steps[0].timeout_ms",
                10,
                "a command step has no statement timeout",
            ),
            (
                command_saga(&format!("{ok}\n    sql: SELECT 1"), ""),
                "steps[0].action",
                8,
                "`command` is given beside `sql` or `handler`",
            ),
            (
                command_saga(&format!("{ok}\n    returning: [r]"), ""),
                "steps[0].action.returning",
                9,
                "`returning` is not allowed beside `command`",
            ),
        ];
        for (src, field, line, message) in cases {
            let errors = load(src).expect_err(src);
            assert!(
                errors
                    .iter()
                    .any(|e| e.field == *field && e.line == *line && e.message.contains(message)),
                "wanted {field} at line {line} containing {message:?}; got:\n{}\nin:\n{src}",
                render(&errors)
            );
        }
    }

    #[test]
    fn a_check_step_cannot_send_a_command() {
        let src = "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
                   - name: a\n  role: check\n  action: { command: { service: s, type: t } }\n\
                   - name: b\n  role: pivot\n  action: { sql: 'SELECT 1' }\n";
        let errors = load(src).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.field == "steps[0].action.command" && e.message.contains("check step")),
            "{}",
            render(&errors)
        );
    }
}
