//! The scaffold's rules: one legacy statement → one step, with the compensation that
//! undoes it when the scaffold can tell, and `# TODO` notes saying why when it cannot.
//! Each rule is a pure function of the parsed statement and its text.
//!
//! | statement | action | suggested compensation |
//! |---|---|---|
//! | `INSERT … RETURNING k` | as written, `returning: [k]` | `DELETE FROM t WHERE k = :k` (the captured `k`) |
//! | `INSERT … VALUES (one row)` | as written | `DELETE FROM t WHERE c = <value> AND …` |
//! | `UPDATE t SET x = x - e` | as written | `UPDATE t SET x = x + e` (and `+` ↔ `-`) |
//! | `UPDATE t SET x = e` (overwrite) | captures the old `x` with `FROM (SELECT … FOR UPDATE) old … RETURNING` | `UPDATE t SET x = :old_x` |
//! | `DELETE FROM t …` | adds `RETURNING to_jsonb(t.*) AS old_row` | re-inserts it with `jsonb_populate_record` |
//! | `SELECT … FOR UPDATE`, a `SELECT` whose row count is checked, or one read into psql variables (`\gset`) | a `check` step | none: it changes nothing |
//! | anything else (`SELECT f()`, `CALL`, `MERGE` …) | as written | none: the scaffold cannot see what it changes, so it cannot be undone |
//!
//! An UPDATE's compensation keeps the legacy WHERE's conditions on columns it does not
//! change (`sku = :sku`) and drops those on columns it changes (`available >= :qty` held
//! before the change, not after).

use sqlparser::ast::{
    Assignment, AssignmentTarget, BinaryOperator, Delete, Expr, FromTable, Insert, ObjectName,
    OnInsert, Query, SelectItem, SetExpr, Statement, TableFactor, TableObject, Update,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::transaction::Written;

/// A SQL action or compensation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sql {
    /// The statement, with `:name` parameters.
    pub text: String,
    /// The columns it returns as step outputs.
    pub returning: Vec<String>,
    /// The row count it must affect (or return).
    pub expect_rows: Option<u64>,
}

impl Sql {
    fn new(text: impl Into<String>) -> Self {
        Sql {
            text: text.into(),
            returning: Vec::new(),
            expect_rows: None,
        }
    }
}

/// How a step's effect is undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// By this compensation.
    Suggested(Sql),
    /// It can be, but the scaffold cannot tell how (the notes say why): the user writes
    /// the compensation.
    Unknown,
    /// Nothing to undo: a read-only check.
    Nothing,
    /// The scaffold cannot see what the statement changes, so it cannot be undone: the
    /// first such step is proposed as the pivot.
    Never,
}

/// What [`super::roles::propose`] needs to know of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndoKind {
    /// Can be undone (with a suggested compensation or one to write).
    Undoable,
    /// A read-only check.
    Check,
    /// Cannot be undone.
    Never,
}

impl Undo {
    /// Its kind, for the roles.
    pub fn kind(&self) -> UndoKind {
        match self {
            Undo::Suggested(_) | Undo::Unknown => UndoKind::Undoable,
            Undo::Nothing => UndoKind::Check,
            Undo::Never => UndoKind::Never,
        }
    }
}

/// One step drafted from one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepDraft {
    /// Its proposed name (`<verb>_<table>`), before names are made unique.
    pub name: String,
    /// The action.
    pub action: Sql,
    /// How it is undone.
    pub undo: Undo,
    /// `# TODO` notes on the step: what the scaffold could not decide, and why.
    pub todos: Vec<String>,
    /// Plain notes on the compensation (what it assumes).
    pub notes: Vec<String>,
}

/// The step for one statement of the legacy transaction.
pub fn draft_step(w: &Written) -> StepDraft {
    let expect = w.expect_rows.map(|(n, _)| n);
    let mut step = match &w.statement {
        Statement::Insert(insert) => insert_step(insert, &w.sql, expect),
        Statement::Update(update) => update_step(update, &w.sql, expect),
        Statement::Delete(delete) => delete_step(delete, &w.sql, expect),
        Statement::Query(query) if expect.is_some() || !query.locks.is_empty() || w.gset => {
            let mut step = check_step(query, &w.sql);
            if w.gset {
                step.todos.push(
                    "the legacy transaction read this query's columns into psql variables \
                     (\\gset), and a check step passes nothing on: fold the query into the \
                     statements that use those variables (their parameters are taken from \
                     the payload until then)"
                        .into(),
                );
            }
            step
        }
        other => opaque_step(other, &w.sql, w.line),
    };
    step.action.expect_rows = expect;
    step
}

/// `INSERT`: delete what it inserted.
pub fn insert_step(insert: &Insert, sql: &str, expect: Option<u64>) -> StepDraft {
    let TableObject::TableName(table) = &insert.table else {
        return unknown(
            "insert",
            "table",
            sql,
            "the INSERT's target is not a table: write its compensation",
        );
    };
    let mut step = StepDraft {
        name: step_name("insert", table),
        action: Sql::new(sql),
        undo: Undo::Unknown,
        todos: Vec::new(),
        notes: Vec::new(),
    };
    if let Some(OnInsert::OnConflict(conflict)) = &insert.on
        && !matches!(conflict.action, sqlparser::ast::OnConflictAction::DoNothing)
    {
        step.todos.push(
            "write the compensation: ON CONFLICT … DO UPDATE may have changed a row that \
             existed before, which deleting would lose"
                .into(),
        );
        return step;
    }
    if let Some(items) = &insert.returning {
        let Some(columns) = returned_columns(items) else {
            step.todos.push(
                "write the compensation: name the RETURNING columns (no `*`, no unnamed \
                 expressions) so that the step can capture the inserted row's key"
                    .into(),
            );
            return step;
        };
        let condition = columns
            .iter()
            .map(|c| format!("{c} = :{c}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        step.action.returning = columns;
        step.undo = Undo::Suggested(Sql::new(format!("DELETE FROM {table} WHERE {condition}")));
        if expect != Some(1) && inserted_rows(insert) != Some(1) {
            step.todos.push(
                "the compensation deletes the first inserted row only (a step captures the \
                 first row it returns): if the INSERT can add several rows, delete them by \
                 what they share instead"
                    .into(),
            );
        }
        return step;
    }
    if insert.on.is_some() {
        step.todos.push(
            "write the compensation: with ON CONFLICT and no RETURNING, the scaffold cannot \
             tell whether the row was inserted or already there; add `RETURNING <key>` (only \
             inserted rows are returned) and `DELETE … WHERE <key> = :<key>`"
                .into(),
        );
        return step;
    }
    match single_values_row(insert) {
        Some(pairs) if !pairs.is_empty() => {
            let condition = pairs
                .iter()
                .map(|(c, v)| match v {
                    Expr::Value(value) if matches!(value.value, sqlparser::ast::Value::Null) => {
                        format!("{c} IS NULL")
                    }
                    v => format!("{c} = {v}"),
                })
                .collect::<Vec<_>>()
                .join(" AND ");
            step.undo = Undo::Suggested(Sql::new(format!("DELETE FROM {table} WHERE {condition}")));
            step.notes.push(
                "the legacy INSERT returns no key, so this deletes every row equal to the \
                 inserted one: if such a row can exist before, add `RETURNING <key>` to the \
                 action and delete by the captured key"
                    .into(),
            );
        }
        _ => step.todos.push(
            "write the compensation: this INSERT neither returns a key nor inserts one row of \
             plain values; add `RETURNING <key>` and `DELETE … WHERE <key> = :<key>`"
                .into(),
        ),
    }
    step
}

/// `UPDATE`: invert relative changes, restore overwritten values captured by the action.
pub fn update_step(update: &Update, sql: &str, expect: Option<u64>) -> StepDraft {
    let TableFactor::Table { name, alias, .. } = &update.table.relation else {
        return unknown(
            "update",
            "table",
            sql,
            "the UPDATE's target is not a table: write its compensation",
        );
    };
    let mut step = StepDraft {
        name: step_name("update", name),
        action: Sql::new(sql),
        undo: Undo::Unknown,
        todos: Vec::new(),
        notes: Vec::new(),
    };
    if !update.table.joins.is_empty()
        || update.from.is_some()
        || update.returning.is_some()
        || update.limit.is_some()
    {
        step.todos.push(
            "write the compensation: the scaffold inverts a plain `UPDATE t SET … WHERE …` \
             only, not one with FROM, RETURNING or LIMIT"
                .into(),
        );
        return step;
    }
    let mut changes = Vec::new();
    for assignment in &update.assignments {
        match change(assignment) {
            Some(c) => changes.push(c),
            None => {
                step.todos.push(format!(
                    "write the compensation: `{assignment}` assigns several columns at once, \
                     which the scaffold does not invert"
                ));
                return step;
            }
        }
    }
    let assigned: Vec<&str> = changes.iter().map(|c| c.column.as_str()).collect();
    let (kept, dropped): (Vec<&Expr>, Vec<&Expr>) = update
        .selection
        .as_ref()
        .map(conjuncts)
        .unwrap_or_default()
        .into_iter()
        .partition(|e| !mentions(&e.to_string(), &assigned));
    if kept.is_empty() {
        step.todos.push(
            "write the compensation: no condition of the legacy WHERE names the changed rows \
             by a column the UPDATE leaves alone, so the scaffold cannot tell which rows to \
             restore"
                .into(),
        );
        return step;
    }
    let relation = &update.table.relation;
    let reference = alias
        .as_ref()
        .map_or_else(|| last_part(name), |a| a.name.value.clone());
    let overwritten: Vec<&str> = changes
        .iter()
        .filter(|c| c.inverse.is_none())
        .map(|c| c.column.as_str())
        .collect();
    if !overwritten.is_empty() {
        let selection = update
            .selection
            .as_ref()
            .map(|s| format!("\n         WHERE {s}"))
            .unwrap_or_default();
        let captured = overwritten
            .iter()
            .map(|c| format!("{c} AS old_{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let returned = overwritten
            .iter()
            .map(|c| format!("to_jsonb(old.old_{c}) AS old_{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let assignments = update
            .assignments
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        step.action.text = format!(
            "UPDATE {relation}\n   SET {assignments}\n  FROM (SELECT ctid AS old_ctid, {captured}\n          FROM {relation}{selection}\n           FOR UPDATE) AS old\n WHERE {reference}.ctid = old.old_ctid\nRETURNING {returned}"
        );
        step.action.returning = overwritten.iter().map(|c| format!("old_{c}")).collect();
        step.notes.push(format!(
            "the action captures the value{} it overwrites (`old_{}`) for the compensation",
            if overwritten.len() == 1 { "" } else { "s" },
            overwritten.join("`, `old_")
        ));
        if expect != Some(1) {
            step.todos.push(
                "the compensation restores the old values of the first changed row only (a \
                 step captures the first row it returns): if the UPDATE can change several \
                 rows, write the compensation by hand"
                    .into(),
            );
        }
    }
    let restore = changes
        .iter()
        .map(|c| match &c.inverse {
            Some(inverse) => format!("{} = {inverse}", c.column),
            None => format!("{0} = :old_{0}", c.column),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let condition = kept
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" AND ");
    step.undo = Undo::Suggested(Sql::new(format!(
        "UPDATE {relation} SET {restore} WHERE {condition}"
    )));
    if !dropped.is_empty() {
        step.notes.push(format!(
            "left out of the compensation's WHERE: `{}` (it held before the action changed \
             the row, not after)",
            dropped
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("`, `")
        ));
    }
    step
}

/// `DELETE`: re-insert the captured row.
pub fn delete_step(delete: &Delete, sql: &str, expect: Option<u64>) -> StepDraft {
    let tables = match &delete.from {
        FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
    };
    let table = match tables.as_slice() {
        [only] if only.joins.is_empty() => match &only.relation {
            TableFactor::Table { name, alias, .. } => Some((name, alias)),
            _ => None,
        },
        _ => None,
    };
    let Some((name, alias)) = table else {
        return unknown(
            "delete",
            "rows",
            sql,
            "write the compensation: the DELETE has several or no plain target tables",
        );
    };
    let mut step = StepDraft {
        name: step_name("delete", name),
        action: Sql::new(sql),
        undo: Undo::Unknown,
        todos: Vec::new(),
        notes: Vec::new(),
    };
    if delete.using.is_some() || delete.returning.is_some() || delete.limit.is_some() {
        step.todos.push(
            "write the compensation: the scaffold re-inserts the row of a plain `DELETE FROM t \
             WHERE …` only, not one with USING, RETURNING or LIMIT"
                .into(),
        );
        return step;
    }
    let reference = alias
        .as_ref()
        .map_or_else(|| last_part(name), |a| a.name.value.clone());
    step.action.text = format!("{sql}\nRETURNING to_jsonb({reference}.*) AS old_row");
    step.action.returning = vec!["old_row".into()];
    step.undo = Undo::Suggested(Sql::new(format!(
        "INSERT INTO {name}\nSELECT * FROM jsonb_populate_record(NULL::{name}, :old_row::jsonb)"
    )));
    step.notes.push(
        "the action captures the deleted row as JSON (`old_row`); the compensation inserts \
         it back as it was"
            .into(),
    );
    if expect != Some(1) {
        step.todos.push(
            "the compensation re-inserts the first deleted row only (a step captures the first \
             row it returns): if the DELETE can remove several rows, write the compensation \
             by hand"
                .into(),
        );
    }
    step
}

/// A `SELECT … FOR UPDATE`, or a `SELECT` whose row count the legacy checked: a check.
pub fn check_step(query: &Query, sql: &str) -> StepDraft {
    let name = match query.body.as_ref() {
        SetExpr::Select(select) => select
            .from
            .first()
            .and_then(|t| match &t.relation {
                TableFactor::Table { name, .. } => Some(step_name("check", name)),
                _ => None,
            })
            .unwrap_or_else(|| "check".into()),
        _ => "check".into(),
    };
    let mut step = StepDraft {
        name,
        action: Sql::new(sql),
        undo: Undo::Nothing,
        todos: Vec::new(),
        notes: Vec::new(),
    };
    if !query.locks.is_empty() {
        step.notes.push(
            "the legacy transaction held this row lock until COMMIT; a check step's lock ends \
             when the check commits. If the condition must still hold when the next step \
             writes, move it into that step's WHERE and remove this step"
                .into(),
        );
    }
    step
}

/// Anything else: kept as written; the scaffold cannot see what it changes.
pub fn opaque_step(statement: &Statement, sql: &str, line: u64) -> StepDraft {
    let name = match statement {
        Statement::Call(function) => Some(step_name("call", &function.name)),
        Statement::Query(query) => match query.body.as_ref() {
            SetExpr::Select(select) => select.projection.first().and_then(|item| match item {
                SelectItem::UnnamedExpr(Expr::Function(f))
                | SelectItem::ExprWithAlias {
                    expr: Expr::Function(f),
                    ..
                } => Some(step_name("call", &f.name)),
                _ => None,
            }),
            _ => None,
        },
        _ => None,
    };
    StepDraft {
        name: name.unwrap_or_else(|| format!("statement_{line}")),
        action: Sql::new(sql),
        undo: Undo::Never,
        todos: vec![
            "the scaffold cannot see what this statement changes, so it cannot suggest a \
             compensation: it is proposed as the point of no return. If it can be undone, \
             write its compensation and make it compensatable"
                .into(),
        ],
        notes: Vec::new(),
    }
}

fn unknown(verb: &str, what: &str, sql: &str, todo: &str) -> StepDraft {
    StepDraft {
        name: format!("{verb}_{what}"),
        action: Sql::new(sql),
        undo: Undo::Unknown,
        todos: vec![todo.into()],
        notes: Vec::new(),
    }
}

/// One assignment: the column it sets and, for a relative change, its inverse.
struct Change {
    column: String,
    inverse: Option<String>,
}

/// `x = x - e` → `x + e` (and `+` ↔ `-`); anything else overwrites `x`. `None` for a
/// tuple assignment.
fn change(assignment: &Assignment) -> Option<Change> {
    let AssignmentTarget::ColumnName(target) = &assignment.target else {
        return None;
    };
    let column = last_part(target);
    let is_column = |e: &Expr| match e {
        Expr::Identifier(i) => i.value == column,
        Expr::CompoundIdentifier(parts) => parts.last().is_some_and(|i| i.value == column),
        _ => false,
    };
    let inverse = match &assignment.value {
        Expr::BinaryOp { left, op, right } => {
            let (other, op) = match op {
                BinaryOperator::Minus if is_column(left) => (right, "+"),
                BinaryOperator::Plus if is_column(left) => (right, "-"),
                BinaryOperator::Plus if is_column(right) => (left, "-"),
                _ => {
                    return Some(Change {
                        column,
                        inverse: None,
                    });
                }
            };
            let text = other.to_string();
            (!mentions(&text, &[column.as_str()])).then(|| {
                let operand = match other.as_ref() {
                    Expr::Value(_)
                    | Expr::Identifier(_)
                    | Expr::CompoundIdentifier(_)
                    | Expr::Cast { .. }
                    | Expr::Nested(_)
                    | Expr::Function(_) => text,
                    _ => format!("({text})"),
                };
                format!("{column} {op} {operand}")
            })
        }
        _ => None,
    };
    Some(Change { column, inverse })
}

/// The `AND`-ed conditions of a WHERE clause.
fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut out = conjuncts(left);
            out.extend(conjuncts(right));
            out
        }
        Expr::Nested(inner)
            if matches!(
                inner.as_ref(),
                Expr::BinaryOp {
                    op: BinaryOperator::And,
                    ..
                }
            ) =>
        {
            conjuncts(inner)
        }
        e => vec![e],
    }
}

/// Whether the SQL text names one of `columns` (as a word of code, not a `:parameter`).
fn mentions(sql: &str, columns: &[&str]) -> bool {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return true; // cannot tell: assume it does
    };
    tokens.iter().enumerate().any(|(i, t)| match t {
        Token::Word(w) => {
            let after_colon = i > 0 && tokens[i - 1] == Token::Colon;
            !after_colon
                && columns.iter().any(|c| match w.quote_style {
                    None => w.value.eq_ignore_ascii_case(c),
                    Some(_) => w.value == *c,
                })
        }
        _ => false,
    })
}

/// The names of the RETURNING items, when each is a column or has an alias.
fn returned_columns(items: &[SelectItem]) -> Option<Vec<String>> {
    items
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(Expr::Identifier(i)) => Some(i.value.clone()),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) => {
                parts.last().map(|i| i.value.clone())
            }
            SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
            _ => None,
        })
        .collect()
}

/// The (column, value) pairs of an INSERT of one VALUES row with a column list, leaving
/// out values that differ on every call (defaults, function calls).
fn single_values_row(insert: &Insert) -> Option<Vec<(String, &Expr)>> {
    let SetExpr::Values(values) = insert.source.as_ref()?.body.as_ref() else {
        return None;
    };
    let [row] = values.rows.as_slice() else {
        return None;
    };
    let row = &row.content;
    if insert.columns.len() != row.len() {
        return None;
    }
    Some(
        insert
            .columns
            .iter()
            .zip(row)
            .filter(|(_, v)| !matches!(v, Expr::Function(_)) && v.to_string() != "DEFAULT")
            .map(|(c, v)| (last_part(c), v))
            .collect(),
    )
}

/// How many rows an INSERT adds, when it says (one VALUES list).
fn inserted_rows(insert: &Insert) -> Option<usize> {
    match insert.source.as_ref()?.body.as_ref() {
        SetExpr::Values(values) => Some(values.rows.len()),
        _ => None,
    }
}

fn last_part(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map_or_else(|| name.to_string(), |i| i.value.clone())
}

/// `<verb>_<table>`, lower-cased, anything but `[a-z0-9_]` as `_`.
fn step_name(verb: &str, table: &ObjectName) -> String {
    let table: String = last_part(table)
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{verb}_{table}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::parser::Parser;

    fn statement(sql: &str) -> Statement {
        Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0)
    }

    fn step(sql: &str, expect: Option<u64>) -> StepDraft {
        let w = Written {
            statement: statement(sql),
            sql: sql.to_string(),
            line: 7,
            comment: Vec::new(),
            expect_rows: expect.map(|n| (n, 8)),
            gset: false,
        };
        draft_step(&w)
    }

    fn compensation(s: &StepDraft) -> &str {
        match &s.undo {
            Undo::Suggested(sql) => &sql.text,
            other => panic!("no compensation: {other:?} {:?}", s.todos),
        }
    }

    #[test]
    fn insert_returning_a_key_is_undone_by_deleting_that_key() {
        let s = step(
            "INSERT INTO shop.payments (order_id, amount) VALUES (:order_id, :amount) RETURNING payment_id",
            None,
        );
        assert_eq!(s.name, "insert_payments");
        assert_eq!(s.action.returning, vec!["payment_id"]);
        assert_eq!(
            compensation(&s),
            "DELETE FROM shop.payments WHERE payment_id = :payment_id"
        );
        assert!(s.todos.is_empty(), "one VALUES row: {:?}", s.todos);
    }

    #[test]
    fn insert_of_several_rows_returning_a_key_says_only_the_first_is_deleted() {
        let s = step(
            "INSERT INTO t (a) SELECT a FROM u RETURNING id AS t_id",
            None,
        );
        assert_eq!(compensation(&s), "DELETE FROM t WHERE t_id = :t_id");
        assert!(s.todos[0].contains("first inserted row only"));
    }

    #[test]
    fn insert_of_one_values_row_without_key_deletes_rows_equal_to_it() {
        let s = step(
            "INSERT INTO shop.reservations (order_id, qty, note, at) VALUES (:order_id, :qty, NULL, now())",
            None,
        );
        assert_eq!(
            compensation(&s),
            "DELETE FROM shop.reservations WHERE order_id = :order_id AND qty = :qty AND note IS NULL"
        );
        assert!(s.notes[0].contains("RETURNING <key>"));
    }

    #[test]
    fn insert_the_scaffold_cannot_undo_leaves_a_todo() {
        let s = step("INSERT INTO t SELECT * FROM u", None);
        assert_eq!(s.undo, Undo::Unknown);
        assert!(s.todos[0].starts_with("write the compensation"));
        let s = step(
            "INSERT INTO t (k, n) VALUES (:k, 1) ON CONFLICT (k) DO UPDATE SET n = t.n + 1 RETURNING id",
            None,
        );
        assert_eq!(s.undo, Undo::Unknown);
        assert!(s.todos[0].contains("ON CONFLICT"));
        let s = step("INSERT INTO t (a) VALUES (1) RETURNING *", None);
        assert_eq!(s.undo, Undo::Unknown);
        let s = step("INSERT INTO t (k) VALUES (:k) ON CONFLICT DO NOTHING", None);
        assert_eq!(s.undo, Undo::Unknown);
        assert!(s.todos[0].contains("already there"));
        // With RETURNING, only an inserted row is returned: deleting it is right.
        let s = step(
            "INSERT INTO t (k) VALUES (:k) ON CONFLICT DO NOTHING RETURNING id",
            Some(1),
        );
        assert_eq!(compensation(&s), "DELETE FROM t WHERE id = :id");
    }

    #[test]
    fn relative_update_is_inverted_and_conditions_on_changed_columns_are_dropped() {
        let s = step(
            "UPDATE shop.stock SET available = available - :qty WHERE sku = :sku AND available >= :qty",
            Some(1),
        );
        assert_eq!(s.name, "update_stock");
        assert_eq!(
            s.action.text,
            "UPDATE shop.stock SET available = available - :qty WHERE sku = :sku AND available >= :qty"
        );
        assert_eq!(s.action.expect_rows, Some(1));
        assert_eq!(
            compensation(&s),
            "UPDATE shop.stock SET available = available + :qty WHERE sku = :sku"
        );
        assert!(s.notes[0].contains("`available >= :qty`"), "{:?}", s.notes);
        let s = step(
            "UPDATE a SET bal = :amt + bal, used = used + (:amt * 2) WHERE id = :id",
            None,
        );
        assert_eq!(
            compensation(&s),
            "UPDATE a SET bal = bal - :amt, used = used - (:amt * 2) WHERE id = :id"
        );
    }

    #[test]
    fn overwriting_update_captures_the_old_value_and_restores_it() {
        let s = step(
            "UPDATE shop.orders SET status = 'shipped', shipped_at = now() WHERE order_id = :order_id AND status = 'paid'",
            Some(1),
        );
        assert_eq!(s.action.returning, vec!["old_status", "old_shipped_at"]);
        assert_eq!(
            s.action.text,
            "UPDATE shop.orders\n   SET status = 'shipped', shipped_at = now()\n  FROM (SELECT ctid AS old_ctid, status AS old_status, shipped_at AS old_shipped_at\n          FROM shop.orders\n         WHERE order_id = :order_id AND status = 'paid'\n           FOR UPDATE) AS old\n WHERE orders.ctid = old.old_ctid\nRETURNING to_jsonb(old.old_status) AS old_status, to_jsonb(old.old_shipped_at) AS old_shipped_at"
        );
        assert_eq!(
            compensation(&s),
            "UPDATE shop.orders SET status = :old_status, shipped_at = :old_shipped_at WHERE order_id = :order_id"
        );
        assert!(s.todos.is_empty());
        let s = step("UPDATE t AS x SET a = a * 2 WHERE k = :k", None);
        assert!(s.action.text.contains("WHERE x.ctid = old.old_ctid"));
        assert!(s.todos[0].contains("first changed row only"));
    }

    #[test]
    fn update_without_a_condition_on_unchanged_columns_leaves_a_todo() {
        let s = step("UPDATE t SET a = a + 1 WHERE a < 10", None);
        assert_eq!(s.undo, Undo::Unknown);
        assert!(s.todos[0].contains("which rows to restore"));
        let s = step("UPDATE t SET a = u.a FROM u WHERE t.k = u.k", None);
        assert_eq!(s.undo, Undo::Unknown);
    }

    #[test]
    fn delete_captures_the_row_and_is_undone_by_reinserting_it() {
        let s = step("DELETE FROM shop.carts WHERE cart_id = :cart_id", Some(1));
        assert_eq!(s.name, "delete_carts");
        assert_eq!(
            s.action.text,
            "DELETE FROM shop.carts WHERE cart_id = :cart_id\nRETURNING to_jsonb(carts.*) AS old_row"
        );
        assert_eq!(s.action.returning, vec!["old_row"]);
        assert_eq!(
            compensation(&s),
            "INSERT INTO shop.carts\nSELECT * FROM jsonb_populate_record(NULL::shop.carts, :old_row::jsonb)"
        );
        assert!(s.todos.is_empty());
        assert!(step("DELETE FROM t WHERE a = 1", None).todos[0].contains("first deleted row"));
    }

    #[test]
    fn a_locking_or_counted_select_is_a_check() {
        let s = step(
            "SELECT 1 FROM bank.accounts WHERE id = :id FOR UPDATE",
            Some(1),
        );
        assert_eq!(s.name, "check_accounts");
        assert_eq!(s.undo, Undo::Nothing);
        assert_eq!(s.action.expect_rows, Some(1));
        assert!(s.notes[0].contains("lock"));
        assert_eq!(
            step("SELECT 1 FROM t WHERE a = 1", Some(0)).undo,
            Undo::Nothing
        );
        let w = Written {
            statement: statement("SELECT price FROM shop.prices WHERE sku = :sku"),
            sql: "SELECT price FROM shop.prices WHERE sku = :sku".into(),
            line: 3,
            comment: Vec::new(),
            expect_rows: None,
            gset: true,
        };
        let s = draft_step(&w);
        assert_eq!((s.name.as_str(), &s.undo), ("check_prices", &Undo::Nothing));
        assert!(s.todos[0].contains("psql variables"), "{:?}", s.todos);
    }

    #[test]
    fn what_the_scaffold_cannot_see_into_cannot_be_undone() {
        let s = step("SELECT travel.rent_car(:trip_id, :city)", None);
        assert_eq!(s.name, "call_rent_car");
        assert_eq!(s.undo, Undo::Never);
        assert!(s.todos[0].contains("point of no return"));
        assert_eq!(step("CALL audit.log(:x)", None).name, "call_log");
        assert_eq!(step("SELECT 1 FROM t", None).name, "statement_7");
    }
}
