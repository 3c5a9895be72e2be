//! A legacy psql script read as what psql would send and do: SQL statements and psql
//! commands (`\set`, `\if`, `\gset` …), in order, each with the line it starts on.
//!
//! The text is cut with `sqlparser`'s PostgreSQL tokenizer, so a `;` or a backslash
//! inside a string, a quoted identifier, a comment or a dollar quote is left alone.
//! psql's own rules on top: a backslash command runs to the end of its line, and
//! `\g`/`\gset` end the statement before them as `;` does. psql's variable references
//! become saga parameters: `:name` and `:'name'` are both `:name` (bound by skald, not
//! pasted in); `:"name"` (an identifier) has no saga equivalent and is an error.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Location, Token, Tokenizer, Whitespace};

use super::ScaffoldError;

/// One SQL statement as psql would send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Its text without the `;` (psql variables as `:name`), trimmed.
    pub sql: String,
    /// The line it starts on (1-based).
    pub line: u64,
    /// The comment lines just before it (without `--`), to carry into the draft.
    pub comment: Vec<String>,
    /// It ended with `\gset`: its output columns became psql variables.
    pub gset: bool,
}

/// One psql backslash command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Its name without the backslash, e.g. `if`.
    pub name: String,
    /// The rest of its line, trimmed.
    pub args: String,
    /// Its line (1-based).
    pub line: u64,
}

/// A statement or a psql command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// SQL sent to the server.
    Sql(Statement),
    /// A psql command, run by psql itself.
    Psql(Command),
}

/// Reads a psql script into its statements and commands, in order.
///
/// # Errors
/// [`ScaffoldError::Parse`] when the tokenizer fails (an unterminated string, say), and
/// [`ScaffoldError::Unsupported`] for a psql identifier variable (`:"name"`) or a
/// `:'…'` that does not name a variable.
pub fn read(text: &str) -> Result<Vec<Item>, ScaffoldError> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
        .tokenize_with_location()
        .map_err(|e| ScaffoldError::Parse {
            line: e.location.line,
            message: e.message,
        })?;
    let lines = Lines::new(text);
    let mut items = Vec::new();
    let mut current = Pending::default();
    let mut i = 0;
    while i < tokens.len() {
        let token = &tokens[i];
        let start = token.span.start;
        let slice = &text[lines.offset(start)..lines.offset(token.span.end)];
        match &token.token {
            Token::Backslash => {
                // A psql command: the rest of its line.
                let line_end = lines.line_end(start.line);
                let body = text[lines.offset(token.span.end)..line_end].trim();
                let (name, args) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
                if name.starts_with('g') {
                    current.finish(&mut items, name == "gset");
                } else {
                    current.comment.clear();
                }
                items.push(Item::Psql(Command {
                    name: name.to_string(),
                    args: args.trim().to_string(),
                    line: start.line,
                }));
                while i < tokens.len() && tokens[i].span.start.line == start.line {
                    i += 1;
                }
                continue;
            }
            Token::SemiColon => current.finish(&mut items, false),
            Token::Colon if adjacent(token.span.end, tokens.get(i + 1)) => {
                let next = &tokens[i + 1];
                match &next.token {
                    Token::SingleQuotedString(name) => {
                        if !is_variable_name(name) {
                            return Err(ScaffoldError::Unsupported {
                                line: start.line,
                                message: format!(
                                    ":'{name}' does not name a psql variable (letters, digits \
                                     and _ only)"
                                ),
                            });
                        }
                        current.push(start.line, &format!(":{name}"));
                        i += 2;
                        continue;
                    }
                    Token::Word(w) if w.quote_style == Some('"') => {
                        return Err(ScaffoldError::Unsupported {
                            line: start.line,
                            message: format!(
                                ":\"{}\" pastes a psql variable in as an identifier: a saga \
                                 binds values only; write the name itself",
                                w.value
                            ),
                        });
                    }
                    _ => current.push(start.line, slice),
                }
            }
            Token::Whitespace(Whitespace::SingleLineComment { comment, .. })
                if current.sql.is_empty() =>
            {
                current.comment.push(comment.trim_end().to_string());
            }
            Token::Whitespace(Whitespace::MultiLineComment(comment)) if current.sql.is_empty() => {
                current
                    .comment
                    .extend(comment.lines().map(|l| l.trim().to_string()));
            }
            Token::Whitespace(Whitespace::Newline) if current.sql.is_empty() => {
                // A blank line between a comment and a statement parts them.
                let blank = i > 0
                    && match &tokens[i - 1].token {
                        Token::Whitespace(Whitespace::Newline) => true,
                        Token::Whitespace(Whitespace::SingleLineComment { comment, .. }) => {
                            comment.ends_with('\n')
                        }
                        _ => false,
                    };
                if blank {
                    current.comment.clear();
                }
            }
            Token::Whitespace(_) if current.sql.is_empty() => {}
            _ => current.push(start.line, slice),
        }
        i += 1;
    }
    current.finish(&mut items, false);
    Ok(items)
}

/// The statement being collected.
#[derive(Debug, Default)]
struct Pending {
    sql: String,
    line: u64,
    comment: Vec<String>,
}

impl Pending {
    fn push(&mut self, line: u64, text: &str) {
        if self.sql.is_empty() {
            self.line = line;
        }
        self.sql.push_str(text);
    }

    /// Ends the statement (if it has any code) and starts the next one.
    fn finish(&mut self, items: &mut Vec<Item>, gset: bool) {
        let sql = self.sql.trim();
        if !sql.is_empty() {
            items.push(Item::Sql(Statement {
                sql: sql.to_string(),
                line: self.line,
                comment: std::mem::take(&mut self.comment),
                gset,
            }));
        }
        *self = Pending::default();
    }
}

/// Whether the next token starts right where the previous one ended (`:'x'`, not `: 'x'`).
fn adjacent(end: Location, next: Option<&sqlparser::tokenizer::TokenWithSpan>) -> bool {
    next.is_some_and(|n| n.span.start == end)
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Byte offsets of the tokenizer's (line, column) locations.
struct Lines<'t> {
    text: &'t str,
    starts: Vec<usize>,
}

impl<'t> Lines<'t> {
    fn new(text: &'t str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines { text, starts }
    }

    /// The byte offset of a location (1-based line and character column).
    fn offset(&self, at: Location) -> usize {
        let Some(&start) = self.starts.get((at.line as usize).saturating_sub(1)) else {
            return self.text.len();
        };
        self.text[start..]
            .char_indices()
            .nth((at.column as usize).saturating_sub(1))
            .map_or(self.text.len(), |(i, _)| start + i)
    }

    /// The byte offset of the end of `line` (before its newline).
    fn line_end(&self, line: u64) -> usize {
        self.starts
            .get(line as usize)
            .map_or(self.text.len(), |next| next - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statements(text: &str) -> Vec<Statement> {
        read(text)
            .unwrap()
            .into_iter()
            .filter_map(|i| match i {
                Item::Sql(s) => Some(s),
                Item::Psql(_) => None,
            })
            .collect()
    }

    #[test]
    fn statements_end_at_semicolons_outside_strings_and_carry_their_line_and_comment() {
        let s = statements(
            "BEGIN;\n\n-- take it\n-- all\nUPDATE t SET a = 'x;y' -- c;\n WHERE k = $$;$$;\nCOMMIT;",
        );
        assert_eq!(s.len(), 3);
        assert_eq!(s[1].sql, "UPDATE t SET a = 'x;y' -- c;\n WHERE k = $$;$$");
        assert_eq!(s[1].line, 5);
        assert_eq!(s[1].comment, vec![" take it", " all"]);
        assert_eq!(s[2].line, 7);
    }

    #[test]
    fn psql_variables_become_parameters_and_commands_run_to_their_line_end() {
        let items = read("\\set ON_ERROR_STOP on\nSELECT :ROW_COUNT = 1 AS ok \\gset\nUPDATE t SET a = :'a', b = :b::int WHERE s = ':''x''';").unwrap();
        assert_eq!(
            items[0],
            Item::Psql(Command {
                name: "set".into(),
                args: "ON_ERROR_STOP on".into(),
                line: 1
            })
        );
        let Item::Sql(check) = &items[1] else {
            panic!("{items:?}")
        };
        assert_eq!(check.sql, "SELECT :ROW_COUNT = 1 AS ok");
        assert!(check.gset);
        let Item::Sql(update) = &items[3] else {
            panic!("{items:?}")
        };
        assert_eq!(
            update.sql,
            "UPDATE t SET a = :a, b = :b::int WHERE s = ':''x'''"
        );
        assert_eq!(update.line, 3);
    }

    #[test]
    fn text_after_multibyte_characters_is_cut_where_the_tokens_are() {
        let s =
            statements("-- café — naïve\nBEGIN; UPDATE t SET a = 'é…' WHERE k = :'k';\r\nCOMMIT;");
        assert_eq!(s[1].sql, "UPDATE t SET a = 'é…' WHERE k = :k");
        assert_eq!((s[1].line, s[2].line), (2, 3));
    }

    #[test]
    fn an_identifier_variable_is_refused_with_its_line() {
        let e = read("BEGIN;\nSELECT * FROM :\"tbl\";").unwrap_err();
        assert_eq!(e.line(), 2);
        assert!(e.to_string().contains(":\"tbl\""), "{e}");
    }

    #[test]
    fn an_unterminated_string_is_a_parse_error_naming_its_line() {
        let e = read("BEGIN;\n\nUPDATE t SET a = 'oops;\n").unwrap_err();
        assert!(matches!(e, ScaffoldError::Parse { line: 3, .. }), "{e:?}");
    }
}
