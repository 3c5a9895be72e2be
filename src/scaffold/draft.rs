//! The draft saga file: YAML in the format of `skald validate`, with a comment per step
//! saying where it came from, and a `# TODO` comment wherever the scaffold could not
//! decide, saying why.

use std::collections::HashMap;

use super::roles::Role;
use super::rules::{Sql, StepDraft, Undo};
use super::transaction::Written;
use crate::saga::sql::compile_named;

/// Width comments are wrapped to.
const WIDTH: usize = 88;

/// A draft saga file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    /// The YAML text.
    pub yaml: String,
    /// Each `# TODO` of the text: its line (1-based) and what it says.
    pub todos: Vec<(usize, String)>,
}

/// The draft of saga `name` from the statements of `source`'s transaction, their steps
/// and roles (one each, in order).
pub fn render(
    name: &str,
    source: &str,
    statements: &[Written],
    steps: &[StepDraft],
    roles: &[Role],
) -> Draft {
    let names = unique_names(steps);
    // Step outputs a later statement reads as psql variables (`RETURNING k \gset`).
    let mut outputs: HashMap<String, String> = HashMap::new();
    let mut w = Writer::default();
    w.comment(
        "",
        &format!(
            "Draft of saga `{name}`, made by `skald scaffold` from {source}: one step per \
             statement of its transaction. Review every step, and every `# TODO` (what the \
             scaffold could not decide, and why)."
        ),
    );
    w.line("#");
    w.todo(
        "",
        "setup: the tables these steps use must exist where skald runs them: add their SQL \
         under `setup:` (idempotent: CREATE TABLE IF NOT EXISTS …), or create them beforehand.",
    );
    w.line(&format!("name: {name}"));
    w.line("version: 1");
    let params: Vec<String> = steps
        .iter()
        .flat_map(|s| param_names(&s.action.text))
        .collect();
    // An id names what the instance works on better than a quantity does.
    let aggregate = params
        .iter()
        .find(|p| p.ends_with("_id"))
        .or(params.first());
    match aggregate {
        Some(p) => {
            w.todo(
                "",
                &format!(
                    "aggregate: the start payload's field naming what one instance works on \
                     (an order, an account): its messages are handled one at a time, in \
                     order. `{p}` was taken: the first parameter named `…_id`, else the \
                     first parameter."
                ),
            );
            w.line(&format!("aggregate: payload.{p}"));
        }
        None => {
            w.todo(
                "",
                "aggregate: name the start payload's field that identifies what one instance \
                 works on (the legacy statements have no parameter to take it from).",
            );
            w.line("aggregate: payload.TODO");
        }
    }
    if !roles.contains(&Role::Pivot) {
        w.todo(
            "",
            "roles: every statement can be undone, so every step is compensatable and the \
             saga has no pivot. If one step is the point of no return (a shipment handed \
             over, money paid out), make it `role: pivot` and remove its compensation, and \
             make the steps after it `role: retriable` without compensations.",
        );
    }
    w.line("steps:");
    for (i, ((stmt, step), role)) in statements.iter().zip(steps).zip(roles).enumerate() {
        let step_name = &names[i];
        w.line("");
        for line in &stmt.comment {
            w.line(&format!("  #{line}"));
        }
        w.comment(
            "  ",
            &format!("From line {} of the legacy transaction.", stmt.line),
        );
        w.line(&format!("  - name: {step_name}"));
        w.line(&format!("    role: {}", role.as_str()));
        for todo in &step.todos {
            w.todo("    ", todo);
        }
        if *role == Role::Retriable && matches!(step.undo, Undo::Suggested(_)) {
            w.todo(
                "    ",
                "after the pivot: retried until it succeeds, never undone, so the \
                 compensation the scaffold would suggest is left out.",
            );
        }
        w.line("    action:");
        let known = outputs.clone();
        let resolve = move |name: &str| {
            known
                .get(name)
                .cloned()
                .unwrap_or_else(|| format!("payload.{name}"))
        };
        w.sql(
            "      ",
            &step.action,
            &resolve,
            stmt.expect_rows.map(|(_, l)| l),
        );
        if stmt.gset {
            for column in &step.action.returning {
                outputs.insert(column.clone(), format!("steps.{step_name}.{column}"));
            }
        }
        if let (Role::Compensatable, Undo::Suggested(compensation)) = (role, &step.undo) {
            for note in &step.notes {
                w.comment("    ", note);
            }
            w.line("    compensation:");
            let own = |name: &str| {
                if step.action.returning.iter().any(|c| c == name) {
                    format!("steps.{step_name}.{name}")
                } else {
                    resolve(name)
                }
            };
            w.sql("      ", compensation, &own, None);
        } else if *role == Role::Compensatable {
            w.todo(
                "    ",
                "compensation: write the SQL that undoes this step (`compensation: { sql: …, \
                 params: … }`); until then `skald validate` refuses the step.",
            );
        } else if *role == Role::Check {
            for note in &step.notes {
                w.comment("    ", note);
            }
        }
    }
    Draft {
        yaml: w.out,
        todos: w.todos,
    }
}

/// Step names made unique in order: the second `update_stock` is `update_stock_2`.
fn unique_names(steps: &[StepDraft]) -> Vec<String> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    steps
        .iter()
        .map(|s| {
            let n = seen.entry(s.name.as_str()).or_insert(0);
            *n += 1;
            if *n == 1 {
                s.name.clone()
            } else {
                format!("{}_{n}", s.name)
            }
        })
        .collect()
}

/// The `:name` parameters of a statement, in order of first appearance (none when it
/// does not compile: `skald validate` will say why).
fn param_names(sql: &str) -> Vec<String> {
    compile_named(sql)
        .map(|(_, names)| names)
        .unwrap_or_default()
}

/// The YAML text being written, line by line, with its TODOs.
#[derive(Default)]
struct Writer {
    out: String,
    lines: usize,
    todos: Vec<(usize, String)>,
}

impl Writer {
    fn line(&mut self, text: &str) {
        self.out.push_str(text.trim_end());
        self.out.push('\n');
        self.lines += 1;
    }

    /// A comment, wrapped, at `indent`.
    fn comment(&mut self, indent: &str, text: &str) {
        for line in wrap(text, WIDTH.saturating_sub(indent.len() + 2)) {
            self.line(&format!("{indent}# {line}"));
        }
    }

    /// A `# TODO: …` comment, recorded with its line.
    fn todo(&mut self, indent: &str, text: &str) {
        self.todos.push((self.lines + 1, text.to_string()));
        self.comment(indent, &format!("TODO: {text}"));
    }

    /// `sql:`, `params:`, `expect_rows:`, `returning:` of an action or compensation.
    fn sql(
        &mut self,
        indent: &str,
        sql: &Sql,
        resolve: &dyn Fn(&str) -> String,
        checked_at: Option<u64>,
    ) {
        self.line(&format!("{indent}sql: |"));
        for line in sql.text.lines() {
            self.line(&format!("{indent}  {line}"));
        }
        let params = param_names(&sql.text);
        if !params.is_empty() {
            self.line(&format!("{indent}params:"));
            for p in params {
                self.line(&format!("{indent}  {p}: {}", resolve(&p)));
            }
        }
        if let Some(rows) = sql.expect_rows {
            let why = checked_at
                .map(|l| format!("  # the legacy transaction checked it (line {l})"))
                .unwrap_or_default();
            self.line(&format!("{indent}expect_rows: {rows}{why}"));
        }
        if !sql.returning.is_empty() {
            self.line(&format!(
                "{indent}returning: [{}]",
                sql.returning.join(", ")
            ));
        }
    }
}

/// `text` in lines of at most `width` characters (a longer word stands alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::super::scaffold;
    use crate::saga::load_str;
    use std::path::Path;

    const CHECKOUT: &str = "\\set ON_ERROR_STOP on\nBEGIN;\n-- Take it.\nUPDATE shop.stock SET available = available - :qty\n WHERE sku = :'sku' AND available >= :qty;\nSELECT :ROW_COUNT = 1 AS ok \\gset\n\\if :ok\n\\else\n  ROLLBACK;\n  \\quit\n\\endif\nINSERT INTO shop.payments (order_id, amount) VALUES (:'order_id', :amount) RETURNING payment_id \\gset\nINSERT INTO shop.invoices (payment_id) VALUES (:payment_id);\nSELECT shop.ship(:'order_id');\nUPDATE shop.orders SET state = 'done' WHERE order_id = :'order_id';\nCOMMIT;\n";

    #[test]
    fn the_draft_loads_with_steps_params_roles_and_compensations_from_the_rules() {
        let draft = scaffold(CHECKOUT, "checkout.sql", "place_order").unwrap();
        let def = load_str(&draft.yaml, Path::new("draft.yaml"))
            .unwrap_or_else(|e| panic!("{e:?}\n{}", draft.yaml));
        let names: Vec<&str> = def.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "update_stock",
                "insert_payments",
                "insert_invoices",
                "call_ship",
                "update_orders"
            ]
        );
        let y = &draft.yaml;
        assert!(y.contains("aggregate: payload.order_id"), "{y}");
        assert!(y.contains("  # Take it.\n"), "{y}");
        assert!(
            y.contains("expect_rows: 1  # the legacy transaction checked it (line 6)"),
            "{y}"
        );
        // The payment id captured with \gset is the invoice's parameter.
        assert!(
            y.contains("payment_id: steps.insert_payments.payment_id"),
            "{y}"
        );
        assert!(y.contains("role: pivot"), "{y}");
        assert!(y.contains("    role: retriable\n"), "{y}");
        // The TODO list points at lines that say TODO.
        let lines: Vec<&str> = y.lines().collect();
        for (line, text) in &draft.todos {
            assert!(lines[line - 1].contains("# TODO: "), "{line}: {text}\n{y}");
        }
        assert!(draft.todos.iter().any(|(_, t)| t.starts_with("setup:")));
        assert!(draft.todos.iter().any(|(_, t)| t.starts_with("aggregate:")));
        assert!(
            !draft.todos.iter().any(|(_, t)| t.starts_with("roles:")),
            "a pivot exists"
        );
    }

    #[test]
    fn a_compensation_the_scaffold_cannot_write_is_a_todo_and_the_draft_says_so() {
        let draft = scaffold(
            "BEGIN;\nINSERT INTO t (a) SELECT a FROM u;\nCOMMIT;\n",
            "x.sql",
            "copy_rows",
        )
        .unwrap();
        assert!(
            draft
                .todos
                .iter()
                .any(|(_, t)| t.starts_with("compensation: write the SQL")),
            "{}",
            draft.yaml
        );
        assert!(draft.todos.iter().any(|(_, t)| t.starts_with("roles:")));
        let errors = load_str(&draft.yaml, Path::new("d.yaml")).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.to_string().contains("compensation")),
            "{errors:?}"
        );
    }

    #[test]
    fn comments_wrap_within_the_width() {
        let lines = super::wrap(&"word ".repeat(40), 20);
        assert!(lines.iter().all(|l| l.len() <= 20));
        assert_eq!(lines.join(" "), "word ".repeat(40).trim());
    }
}
