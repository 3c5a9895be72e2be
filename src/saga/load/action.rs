//! Actions and compensations: exactly one of `sql` or `handler`, their `params`, and
//! what each kind allows — for SQL one statement whose `:name` parameters match
//! `params`, `expect_rows`, `returning` and `fatal_sqlstates`; for a handler its name
//! and `fatal_errors`.

use serde_saphyr::Spanned;

use super::Pos;
use super::checker::Checker;
use super::value_refs::{Scope, StepOutputs, is_identifier, parse_value_ref};
use crate::saga::definition::{Action, HandlerAction, SqlAction, ValueRef};
use crate::saga::sql::{compile_named, has_keyword, is_single_statement};
use crate::saga::yaml::RawAction;

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

        // Every well-named key, whether or not its value resolved, in YAML order.
        let mut keys: Vec<(&str, Pos)> = Vec::new();
        let mut resolved: Vec<(&str, ValueRef)> = Vec::new();
        if let Some(params) = &a.params {
            for (key, value) in &params.value.0 {
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
        }

        let action = match (&a.sql, &a.handler) {
            (Some(_), Some(_)) => {
                self.error(
                    Pos::at(raw),
                    field,
                    "both `sql` and `handler` are given: an action has exactly one of them",
                );
                None
            }
            (None, None) => {
                self.error(
                    Pos::at(raw),
                    field,
                    "neither `sql` nor `handler` is given: an action needs exactly one of them",
                );
                None
            }
            (None, Some(handler)) => self.handler_action(a, handler, field, resolved),
            (Some(sql), None) => self.sql_action(a, sql, field, &keys, &resolved),
        };
        action.filter(|_| self.errors.len() == errors_before)
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

        let mut returning: Vec<String> = Vec::new();
        if let Some(columns) = &a.returning {
            for (j, column) in columns.value.iter().enumerate() {
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
            if !columns.value.is_empty() && !has_keyword(&sql.value, "returning") {
                self.error(
                    Pos::at(columns),
                    format!("{field}.returning"),
                    "`returning` lists columns but the sql has no RETURNING clause",
                );
            }
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

/// A five-character SQLSTATE or a two-character class, `[0-9A-Z]`.
fn is_sqlstate(s: &str) -> bool {
    (s.len() == 5 || s.len() == 2)
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{loaded, payload, sql_of};
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
}
