//! The one transaction of a legacy script: its statements between `BEGIN` and
//! `COMMIT`, each parsed with `sqlparser`'s PostgreSQL dialect, with the row counts the
//! script checked attached to the statements they check.
//!
//! The check the legacy application made is the psql idiom
//! `SELECT :ROW_COUNT = <n> AS ok \gset` followed by an `\if :ok … \else … ROLLBACK; …
//! \endif` block: the statement before it must have changed (or returned) `n` rows,
//! or the transaction rolls back — a saga step's `expect_rows: n`. Only `ROLLBACK` and
//! psql commands may sit inside `\if` blocks: any other statement there runs or not
//! depending on psql variables, which a saga step cannot express.

use sqlparser::ast::{BinaryOperator, Expr, SelectItem, SetExpr, Statement, Value};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::ScaffoldError;
use super::script::{self, Item};

/// Leading keywords of schema changes.
const DDL: &[&str] = &[
    "CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "GRANT", "REVOKE", "REINDEX", "CLUSTER",
    "VACUUM", "SECURITY",
];

/// One statement of the transaction.
#[derive(Debug, Clone)]
pub struct Written {
    /// As parsed.
    pub statement: Statement,
    /// As written (psql variables as `:name`).
    pub sql: String,
    /// Where it starts in the legacy file.
    pub line: u64,
    /// The comment lines before it.
    pub comment: Vec<String>,
    /// The row count the script checked, and the line of that check.
    pub expect_rows: Option<(u64, u64)>,
    /// Its output columns became psql variables (`\gset`).
    pub gset: bool,
}

/// The statements of the one transaction in `items`.
///
/// # Errors
/// Each names its line: no `BEGIN`, a `BEGIN` without `COMMIT`, a second transaction,
/// a statement outside the transaction, DDL, a statement the parser rejects, a statement
/// inside a psql `\if`, a `ROLLBACK` outside one, a row-count check with nothing before
/// it, and psql commands the scaffold does not know.
pub fn read(items: Vec<Item>) -> Result<Vec<Written>, ScaffoldError> {
    let mut out: Vec<Written> = Vec::new();
    let mut begun: Option<u64> = None;
    let mut committed: Option<u64> = None;
    let mut depth = 0usize;
    for item in items {
        let stmt = match item {
            Item::Psql(cmd) => {
                match cmd.name.as_str() {
                    "if" => depth += 1,
                    "endif" => depth = depth.saturating_sub(1),
                    "elif" | "else" | "set" | "unset" | "echo" | "quit" | "q" | "qecho"
                    | "warn" | "gset" | "g" | "timing" | "pset" | "encoding" => {}
                    other => {
                        return Err(ScaffoldError::Unsupported {
                            line: cmd.line,
                            message: format!(
                                "psql command \\{other}: the scaffold reads SQL statements, \
                                 \\set/\\echo/\\quit and row-count checks (\\gset, \\if) only"
                            ),
                        });
                    }
                }
                continue;
            }
            Item::Sql(stmt) => stmt,
        };
        let line = stmt.line;
        let leading = leading_keywords(&stmt.sql);
        if let Some(first) = leading.first()
            && DDL.contains(&first.as_str())
        {
            return Err(ScaffoldError::Ddl {
                line,
                what: leading.join(" "),
            });
        }
        let statement = parse(&stmt)?;
        match (&statement, begun, committed) {
            (Statement::StartTransaction { .. }, _, Some(first_end)) => {
                return Err(ScaffoldError::SecondTransaction { line, first_end });
            }
            (Statement::StartTransaction { .. }, Some(first), None) => {
                return Err(ScaffoldError::Unsupported {
                    line,
                    message: format!("BEGIN inside the transaction begun at line {first}"),
                });
            }
            (Statement::StartTransaction { .. }, None, None) => begun = Some(line),
            (Statement::Rollback { .. }, _, _) if depth > 0 => {}
            (Statement::Rollback { .. }, _, _) => {
                return Err(ScaffoldError::Unsupported {
                    line,
                    message: "ROLLBACK outside an \\if block: the transaction never commits".into(),
                });
            }
            (Statement::Commit { .. }, Some(_), None) => committed = Some(line),
            (_, None, _) | (_, _, Some(_)) => {
                return Err(ScaffoldError::Unsupported {
                    line,
                    message: "a statement outside BEGIN … COMMIT: the scaffold drafts a saga \
                              from one transaction"
                        .into(),
                });
            }
            _ if depth > 0 => {
                return Err(ScaffoldError::Unsupported {
                    line,
                    message: "a statement inside a psql \\if block runs or not depending on \
                              psql variables, which a saga step cannot express: move it out \
                              of the block, or leave it out and add it to the draft by hand"
                        .into(),
                });
            }
            _ => match row_count_check(&statement) {
                Some(rows) => {
                    let Some(checked) = out.last_mut() else {
                        return Err(ScaffoldError::Unsupported {
                            line,
                            message: ":ROW_COUNT checked before any statement of the transaction"
                                .into(),
                        });
                    };
                    checked.expect_rows = Some((rows, line));
                }
                None if mentions_row_count(&stmt.sql) => {
                    return Err(ScaffoldError::Unsupported {
                        line,
                        message: "`:ROW_COUNT` used otherwise than `SELECT :ROW_COUNT = <n> …`: \
                                  a step's expect_rows is one exact count; write the check that way"
                            .into(),
                    });
                }
                None => out.push(Written {
                    statement,
                    sql: stmt.sql,
                    line,
                    comment: stmt.comment,
                    expect_rows: None,
                    gset: stmt.gset,
                }),
            },
        }
    }
    match (begun, committed) {
        (None, _) => Err(ScaffoldError::Unsupported {
            line: 0,
            message: "no transaction: the file has no BEGIN".into(),
        }),
        (Some(line), None) => Err(ScaffoldError::Unsupported {
            line,
            message: "BEGIN without COMMIT".into(),
        }),
        _ if out.is_empty() => Err(ScaffoldError::Unsupported {
            line: begun.unwrap_or(0),
            message: "the transaction has no statement to make a step of".into(),
        }),
        _ => Ok(out),
    }
}

fn parse(stmt: &script::Statement) -> Result<Statement, ScaffoldError> {
    let fail = |message: String| ScaffoldError::Parse {
        line: stmt.line,
        message,
    };
    let mut parsed =
        Parser::parse_sql(&PostgreSqlDialect {}, &stmt.sql).map_err(|e| fail(e.to_string()))?;
    match parsed.len() {
        1 => Ok(parsed.remove(0)),
        n => Err(fail(format!("expected one statement, found {n}"))),
    }
}

/// The first two words of a statement, upper-cased (`CREATE TABLE`), read with the
/// SQL tokenizer (so a leading comment is not a word).
fn leading_keywords(sql: &str) -> Vec<String> {
    use sqlparser::tokenizer::{Token, Tokenizer};
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return Vec::new();
    };
    tokens
        .into_iter()
        .filter_map(|t| match t {
            Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_ascii_uppercase()),
            _ => None,
        })
        .take(2)
        .collect()
}

/// Whether the statement reads psql's `:ROW_COUNT` variable.
fn mentions_row_count(sql: &str) -> bool {
    crate::saga::sql::compile_named(sql)
        .is_ok_and(|(_, names)| names.iter().any(|n| n.eq_ignore_ascii_case("row_count")))
}

/// `n` when the statement is the psql row-count idiom `SELECT :ROW_COUNT = n …`.
pub fn row_count_check(statement: &Statement) -> Option<u64> {
    let Statement::Query(query) = statement else {
        return None;
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    if !select.from.is_empty() || select.projection.len() != 1 {
        return None;
    }
    let expr = match &select.projection[0] {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
        _ => return None,
    };
    let Expr::BinaryOp {
        left,
        op: BinaryOperator::Eq,
        right,
    } = expr
    else {
        return None;
    };
    let value = |e: &Expr| match e {
        Expr::Value(v) => Some(v.value.clone()),
        _ => None,
    };
    match (value(left)?, value(right)?) {
        (Value::Placeholder(p), Value::Number(n, _))
        | (Value::Number(n, _), Value::Placeholder(p))
            if p.eq_ignore_ascii_case(":row_count") =>
        {
            n.to_string().parse().ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transaction(text: &str) -> Result<Vec<Written>, ScaffoldError> {
        read(script::read(text)?)
    }

    const CHECKED: &str = "\\set ON_ERROR_STOP on\nBEGIN;\nUPDATE t SET a = a - :q WHERE k = :'k';\nSELECT :ROW_COUNT = 1 AS ok \\gset\n\\if :ok\n\\else\n  \\echo 'no'\n  ROLLBACK;\n  \\quit\n\\endif\nINSERT INTO u (k) VALUES (:'k');\nCOMMIT;\n";

    #[test]
    fn a_row_count_check_becomes_the_expected_rows_of_the_statement_before_it() {
        let w = transaction(CHECKED).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].expect_rows, Some((1, 4)));
        assert_eq!(w[0].line, 3);
        assert_eq!(w[1].expect_rows, None);
        assert_eq!(w[1].line, 11);
    }

    #[test]
    fn two_transactions_are_refused_at_the_second_begin() {
        let text = "BEGIN;\nDELETE FROM t;\nCOMMIT;\n\nBEGIN;\nDELETE FROM u;\nCOMMIT;\n";
        let e = transaction(text).unwrap_err();
        assert_eq!(
            e,
            ScaffoldError::SecondTransaction {
                line: 5,
                first_end: 3
            }
        );
        assert!(
            e.to_string().starts_with("line 5: a second transaction"),
            "{e}"
        );
    }

    #[test]
    fn ddl_is_refused_naming_its_line_and_kind() {
        let e =
            transaction("BEGIN;\nINSERT INTO t VALUES (1);\n  create table x (a int);\nCOMMIT;")
                .unwrap_err();
        assert_eq!(
            e,
            ScaffoldError::Ddl {
                line: 3,
                what: "CREATE TABLE".into()
            }
        );
        let e = transaction("BEGIN;\nTRUNCATE t;\nCOMMIT;").unwrap_err();
        assert_eq!(e.line(), 2);
    }

    #[test]
    fn a_statement_the_parser_rejects_names_its_line() {
        let e =
            transaction("BEGIN;\nUPDATE t SET a = 1;\nUPDATE t SETT a = 2;\nCOMMIT;").unwrap_err();
        assert!(matches!(e, ScaffoldError::Parse { line: 3, .. }), "{e:?}");
        assert!(
            e.to_string().starts_with("line 3: the SQL parser rejects"),
            "{e}"
        );
    }

    #[test]
    fn what_is_not_one_committed_transaction_is_refused() {
        for (text, line, words) in [
            ("UPDATE t SET a = 1;", 1, "outside BEGIN"),
            ("BEGIN;\nUPDATE t SET a = 1;\n", 1, "BEGIN without COMMIT"),
            ("-- nothing\n", 0, "no transaction"),
            (
                "BEGIN;\nUPDATE t SET a = 1;\nROLLBACK;\n",
                3,
                "never commits",
            ),
            (
                "BEGIN;\n\\if :x\nUPDATE t SET a = 1;\n\\endif\nCOMMIT;",
                3,
                "\\if",
            ),
            ("BEGIN;\n\\copy t from 'f'\nCOMMIT;", 2, "\\copy"),
            (
                "BEGIN;\nSELECT :ROW_COUNT = 1 AS ok \\gset\nCOMMIT;",
                2,
                "before any",
            ),
            (
                "BEGIN;\nDELETE FROM t;\nSELECT :ROW_COUNT > 0 AS ok \\gset\nCOMMIT;",
                3,
                "one exact count",
            ),
        ] {
            let e = transaction(text).unwrap_err();
            assert_eq!(e.line(), line, "{text}: {e}");
            assert!(e.to_string().contains(words), "{text}: {e}");
        }
    }
}
