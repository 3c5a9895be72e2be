//! A saga's `setup:` SQL: where its lines are in the saga file, and a best-effort parse
//! for `skald validate`.
//!
//! PostgreSQL is the only judge of setup SQL, and only `skald run` executes it. To catch
//! typos earlier, `skald validate` parses it with `sqlparser`'s PostgreSQL dialect — but
//! that parser does not know all of PostgreSQL (some `CREATE FUNCTION`, `DO` or
//! `ALTER` forms, for instance), so what it cannot parse is a [`SetupWarning`], never
//! an error: a file PostgreSQL accepts is never refused because of it.

use std::path::PathBuf;

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::{Parser, ParserError};

use super::definition::SagaDef;

/// Where the `setup` SQL is in its saga file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetupLocation {
    /// 1-based line of the `setup:` value (of its `|` for a literal block).
    pub line: u32,
    /// 1-based column of the `setup:` value (of its `|` for a literal block).
    pub column: u32,
    /// For a literal block (`setup: |`), the indentation of its lines: line `k` (0-based)
    /// of the SQL is then file line `line + 1 + k`. `None` for any other scalar, whose
    /// inner positions are not mapped (they all point at the value).
    pub block_indent: Option<u32>,
}

impl SetupLocation {
    /// Finds the shape of the `setup:` value that the YAML parser places at
    /// `line`:`column` of `src`: for a literal block that is its first character of
    /// content, and the block's indicator (`|`, `|-`, `|+`) ends the previous non-blank
    /// line (before any comment).
    pub(crate) fn of_value(src: &str, line: u32, column: u32) -> SetupLocation {
        let lines: Vec<&str> = src.lines().collect();
        let before = lines
            .get(..line.saturating_sub(1) as usize)
            .unwrap_or_default();
        let indicator = before
            .iter()
            .enumerate()
            .rev()
            .find(|(_, l)| !l.trim().is_empty())
            .and_then(|(at, l)| {
                let code = l.split(" #").next().unwrap_or(l).trim_end();
                let block = ["|", "|-", "|+"].iter().any(|i| code.ends_with(i));
                block.then(|| (at, code.rfind('|').unwrap_or(0)))
            });
        match indicator {
            Some((at, bar)) => SetupLocation {
                line: at as u32 + 1,
                column: bar as u32 + 1,
                block_indent: Some(column.saturating_sub(1)),
            },
            None => SetupLocation {
                line,
                column,
                block_indent: None,
            },
        }
    }

    /// The file line and column (1-based) of the character at `offset` (0-based, in
    /// characters) of `sql`; the value's own position when it is not a literal block.
    pub fn of_offset(&self, sql: &str, offset: usize) -> (u32, u32) {
        let Some(indent) = self.block_indent else {
            return (self.line, self.column);
        };
        let before: Vec<char> = sql.chars().take(offset).collect();
        let newlines = before.iter().filter(|&&c| c == '\n').count() as u32;
        let in_line = before.iter().rev().take_while(|&&c| c != '\n').count() as u32;
        (self.line + 1 + newlines, indent + in_line + 1)
    }
}

/// Setup SQL that `sqlparser` could not parse: PostgreSQL may still accept it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{}:{}: setup: warning: {}", .file.display(), .line, .column, .message)]
pub struct SetupWarning {
    /// The saga file.
    pub file: PathBuf,
    /// 1-based line of the problem in the file.
    pub line: u32,
    /// 1-based column of the problem in the file.
    pub column: u32,
    /// What the parser says.
    pub message: String,
}

/// Parses the setup SQL of each saga (without running it); one warning per saga whose
/// setup does not parse, at the position the parser names.
pub fn setup_warnings(sagas: &[SagaDef]) -> Vec<SetupWarning> {
    sagas
        .iter()
        .filter_map(|saga| {
            let sql = saga.setup_sql.as_deref()?;
            let text = match Parser::parse_sql(&PostgreSqlDialect {}, sql).err()? {
                ParserError::ParserError(text) | ParserError::TokenizerError(text) => text,
                other => other.to_string(),
            };
            // sqlparser ends its messages with " at Line: L, Column: C" (1-based, chars).
            let (message, offset) = match text.rsplit_once(" at Line: ") {
                Some((message, at)) => (message.to_owned(), offset_of(sql, at)),
                None => (text, None),
            };
            let at = saga.setup_at;
            let (line, column) = offset.map_or((at.line, at.column), |o| at.of_offset(sql, o));
            Some(SetupWarning {
                file: saga.source.clone(),
                line,
                column,
                message: format!(
                    "sqlparser cannot parse this setup SQL ({message}); PostgreSQL may \
                     still accept it, `skald run` will tell"
                ),
            })
        })
        .collect()
}

/// The 0-based character offset in `sql` of `"L, Column: C"` (1-based line and column).
fn offset_of(sql: &str, at: &str) -> Option<usize> {
    let (line, column) = at.split_once(", Column: ")?;
    let (line, column): (usize, usize) = (line.trim().parse().ok()?, column.trim().parse().ok()?);
    let before: usize = sql
        .split('\n')
        .take(line.checked_sub(1)?)
        .map(|l| l.chars().count() + 1)
        .sum();
    Some(before + column.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::{load_dir, load_str};
    use std::path::Path;

    fn saga_with_setup(setup: &str) -> SagaDef {
        let src = format!(
            "name: s\nversion: 1\naggregate: payload.id\nsetup: {setup}\nsteps:\n\
             - name: a\n  role: pivot\n  action: {{ sql: SELECT 1 }}\n"
        );
        load_str(&src, Path::new("s.yaml")).expect("valid saga")
    }

    #[test]
    fn a_position_in_a_literal_block_is_a_file_line_and_column() {
        let saga = saga_with_setup("|\n  CREATE SCHEMA x;\n\n  CREAT TABLE x.t ();\n");
        let sql = saga.setup_sql.as_deref().unwrap();
        assert_eq!(saga.setup_at.block_indent, Some(2));
        assert_eq!(
            (saga.setup_at.line, saga.setup_at.column),
            (4, 8),
            "the `|`"
        );
        let offset = sql.find("CREAT TABLE").unwrap();
        assert_eq!(saga.setup_at.of_offset(sql, offset), (7, 3));
        assert_eq!(saga.setup_at.of_offset(sql, 0), (5, 3));
        // A plain scalar: every position is the value's.
        let saga = saga_with_setup("CREATE SCHEMA x");
        assert_eq!(saga.setup_at.block_indent, None);
        assert_eq!(saga.setup_at.of_offset("CREATE SCHEMA x", 7), (4, 8));
    }

    #[test]
    fn setup_sql_that_does_not_parse_is_a_warning_at_its_line() {
        let saga = saga_with_setup("|\n  CREATE SCHEMA x;\n  CREAT TABLE x.t (id int);\n");
        let warnings = setup_warnings(&[saga]);
        assert_eq!(warnings.len(), 1);
        let shown = warnings[0].to_string();
        assert!(shown.starts_with("s.yaml:6:3: setup: warning: "), "{shown}");
        assert!(shown.contains("CREAT"), "{shown}");
    }

    #[test]
    fn every_shipped_and_fixture_setup_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut checked = 0;
        for dir in [
            "sagas",
            "tests/fixtures/sagas",
            "tests/fixtures/failing",
            "tests/fixtures/handlers",
            "tests/fixtures/isolation",
            "tests/fixtures/ordering",
            "tests/fixtures/valid",
        ] {
            let sagas = load_dir(&root.join(dir)).expect("valid sagas");
            checked += sagas.iter().filter(|s| s.setup_sql.is_some()).count();
            let warnings = setup_warnings(&sagas);
            assert!(warnings.is_empty(), "{dir}: {warnings:?}");
        }
        assert!(checked >= 5, "only {checked} setups checked");
    }
}
