//! Named SQL parameters: saga files write `:name`, PostgreSQL wants `$1..$n`.
//!
//! [`compile_named`] runs a small lexer that knows just enough of PostgreSQL's lexical
//! rules to leave alone everything that is not a parameter: `::` casts, single-quoted
//! strings (with `''` escapes, and `E'..'` strings with backslash escapes), double-quoted
//! identifiers, `--` line comments, nested `/* */` comments and dollar-quoted strings
//! (`$$..$$`, `$tag$..$tag$`).
//!
//! Known limitation: an array slice whose lower bound is followed by an identifier
//! (`arr[lo:hi]`) reads as parameter `:hi`; write `arr[lo : hi]` or `arr[lo:(hi)]`.

use thiserror::Error;

/// Why a statement's parameters could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SqlParamError {
    /// A positional parameter (`$1`) appears in code: saga SQL uses named parameters
    /// only, so the two styles cannot be mixed.
    #[error(
        "positional parameter `${number}` at byte {offset}: use named parameters (`:name`) only"
    )]
    Positional {
        /// The digits after `$`.
        number: String,
        /// Byte offset of the `$` in the statement.
        offset: usize,
    },
    /// A string, quoted identifier, block comment or dollar-quoted string never ends.
    #[error("unterminated {what} starting at byte {offset}")]
    Unterminated {
        /// What was left open, e.g. `string literal`.
        what: &'static str,
        /// Byte offset where it starts.
        offset: usize,
    },
}

/// Replaces every `:name` parameter (name = `[A-Za-z_][A-Za-z0-9_]*`) with `$1..$n`,
/// numbered in order of first appearance; a repeated name reuses its number.
///
/// Returns the rewritten statement and the parameter names in `$n` order (`names[0]` is
/// `$1`). Text inside strings, quoted identifiers, comments and dollar-quoted strings is
/// copied unchanged, and so are `::` casts (`:qty::int` is parameter `qty` then a cast).
///
/// # Errors
/// [`SqlParamError::Positional`] when the statement already uses `$n` parameters, and
/// [`SqlParamError::Unterminated`] when a quoted section or comment is never closed.
pub fn compile_named(sql: &str) -> Result<(String, Vec<String>), SqlParamError> {
    let lexed = lex(sql)?;
    Ok((lexed.statement, lexed.names))
}

/// Whether `keyword` (compared ASCII-case-insensitively) appears as a whole word in the
/// code of `sql`, ignoring strings, quoted identifiers, comments and parameters. A
/// statement that does not compile (see [`compile_named`]) contains no keyword.
pub(crate) fn has_keyword(sql: &str, keyword: &str) -> bool {
    let Ok(lexed) = lex(sql) else {
        return false;
    };
    code_words(sql, &lexed.code).any(|(_, word)| word.eq_ignore_ascii_case(keyword))
}

/// Why `sql` is not a read-only query, or `None` when it looks like one: its first word
/// is `SELECT`, `WITH`, `VALUES` or `TABLE`, and no data-modifying keyword (`INSERT`,
/// `UPDATE`, `DELETE`, `MERGE`, `INTO`) appears in its code — so neither a
/// data-modifying `WITH` nor `SELECT ... INTO` passes. `FOR UPDATE` / `FOR NO KEY
/// UPDATE` row locks are allowed (they change nothing). Functions the query calls are
/// not inspected. A statement that does not compile gets no verdict here (its own error
/// is reported by [`compile_named`]).
pub(crate) fn read_only_violation(sql: &str) -> Option<String> {
    let lexed = lex(sql).ok()?;
    let words: Vec<&str> = code_words(sql, &lexed.code).map(|(_, w)| w).collect();
    let first = words.first()?;
    if !["select", "with", "values", "table"]
        .iter()
        .any(|k| first.eq_ignore_ascii_case(k))
    {
        return Some(format!(
            "it starts with `{first}`, not SELECT, WITH, VALUES or TABLE"
        ));
    }
    let modifying = ["insert", "update", "delete", "merge", "into"];
    words.iter().enumerate().find_map(|(i, word)| {
        let lock = i > 0
            && word.eq_ignore_ascii_case("update")
            && (words[i - 1].eq_ignore_ascii_case("for")
                || words[i - 1].eq_ignore_ascii_case("key"));
        (!lock && modifying.iter().any(|k| word.eq_ignore_ascii_case(k)))
            .then(|| format!("it contains `{word}`, which writes"))
    })
}

/// Whether `sql` holds at most one statement: nothing but whitespace and `;` may follow
/// the first `;` in code. A statement that does not compile counts as one (its own error
/// is reported by [`compile_named`]).
pub(crate) fn is_single_statement(sql: &str) -> bool {
    let Ok(lexed) = lex(sql) else {
        return true;
    };
    let b = sql.as_bytes();
    let Some(first) = (0..b.len()).find(|&i| lexed.code[i] && b[i] == b';') else {
        return true;
    };
    (first..b.len()).all(|i| !lexed.code[i] || b[i] == b';' || b[i].is_ascii_whitespace())
}

/// The statements of `sql`, split at every `;` in code (not inside strings, quoted
/// identifiers, comments or dollar quotes), trimmed, empty ones (and comment-only
/// ones) left out.
///
/// # Errors
/// As [`compile_named`], for a quoted section or comment that never ends.
pub fn split_statements(sql: &str) -> Result<Vec<&str>, SqlParamError> {
    let lexed = lex(sql)?;
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..=b.len() {
        if i == b.len() || (lexed.code[i] && b[i] == b';') {
            let has_code = (start..i).any(|k| lexed.code[k] && !b[k].is_ascii_whitespace());
            if has_code {
                out.push(sql[start..i].trim());
            }
            start = i + 1;
        }
    }
    Ok(out)
}

/// The words (runs of identifier bytes) of the code of `sql`, with their byte offsets.
fn code_words<'s>(sql: &'s str, code: &'s [bool]) -> impl Iterator<Item = (usize, &'s str)> {
    let b = sql.as_bytes();
    let is_word = move |i: usize| code[i] && is_ident_byte(b[i]);
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < b.len() && !is_word(i) {
            i += 1;
        }
        if i >= b.len() {
            return None;
        }
        let start = i;
        while i < b.len() && is_word(i) {
            i += 1;
        }
        // Word boundaries are ASCII bytes or the ends, so these are char boundaries.
        Some((start, &sql[start..i]))
    })
}

/// The result of one pass over a statement.
struct Lexed {
    /// The statement with `$n` in place of `:name`.
    statement: String,
    /// Parameter names in `$n` order.
    names: Vec<String>,
    /// Per byte of the input: whether it is code (not inside a string, quoted identifier,
    /// comment or parameter).
    code: Vec<bool>,
}

/// Bytes at which the plain-code fast path must stop and look closer.
fn is_special(b: u8) -> bool {
    matches!(b, b'\'' | b'"' | b'-' | b'/' | b'$' | b':' | b'E' | b'e')
}

/// A byte that can continue an unquoted identifier (non-ASCII letters included).
fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// A byte that can appear in a dollar-quote tag.
fn is_tag_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

fn lex(sql: &str) -> Result<Lexed, SqlParamError> {
    let b = sql.as_bytes();
    let n = b.len();
    let mut statement = String::with_capacity(n + 8);
    let mut code = vec![false; n];
    let mut names: Vec<String> = Vec::new();
    let mut i = 0;

    while i < n {
        let prev_is_ident = i > 0 && is_ident_byte(b[i - 1]);
        let next = b.get(i + 1).copied();
        // Every branch finds the end `j` of one token; all split points are ASCII bytes,
        // so slicing `sql[i..j]` stays on character boundaries.
        let (j, is_code) = match b[i] {
            b'\'' => (quoted_end(b, i, b'\'', false, "string literal")?, false),
            b'E' | b'e' if next == Some(b'\'') && !prev_is_ident => {
                (quoted_end(b, i + 1, b'\'', true, "string literal")?, false)
            }
            b'"' => (quoted_end(b, i, b'"', false, "quoted identifier")?, false),
            b'-' if next == Some(b'-') => {
                let end = b[i..].iter().position(|&c| c == b'\n').map_or(n, |p| i + p);
                (end, false)
            }
            b'/' if next == Some(b'*') => (block_comment_end(b, i)?, false),
            b'$' if !prev_is_ident => match dollar(sql, i)? {
                Some(end) => (end, false),
                None => (i + 1, true),
            },
            b':' if next == Some(b':') => (i + 2, true),
            b':' if next.is_some_and(|c| c.is_ascii_alphabetic() || c == b'_') => {
                let mut end = i + 1;
                while end < n && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                    end += 1;
                }
                let name = &sql[i + 1..end];
                let number = match names.iter().position(|known| known == name) {
                    Some(p) => p + 1,
                    None => {
                        names.push(name.to_owned());
                        names.len()
                    }
                };
                statement.push('$');
                statement.push_str(&number.to_string());
                i = end;
                continue;
            }
            _ => {
                let mut end = i + 1;
                while end < n && !is_special(b[end]) {
                    end += 1;
                }
                (end, true)
            }
        };
        statement.push_str(&sql[i..j]);
        if is_code {
            code[i..j].fill(true);
        }
        i = j;
    }

    Ok(Lexed {
        statement,
        names,
        code,
    })
}

/// The end (exclusive) of a quoted section opening at `start` with `quote`; a doubled
/// quote is an escaped quote, and with `backslash` a backslash escapes the next byte.
fn quoted_end(
    b: &[u8],
    start: usize,
    quote: u8,
    backslash: bool,
    what: &'static str,
) -> Result<usize, SqlParamError> {
    let mut k = start + 1;
    while k < b.len() {
        if b[k] == quote {
            if b.get(k + 1) == Some(&quote) {
                k += 2;
                continue;
            }
            return Ok(k + 1);
        }
        if backslash && b[k] == b'\\' {
            k += 2;
            continue;
        }
        k += 1;
    }
    Err(SqlParamError::Unterminated {
        what,
        offset: start,
    })
}

/// The end (exclusive) of a `/* */` comment opening at `start`; PostgreSQL nests them.
fn block_comment_end(b: &[u8], start: usize) -> Result<usize, SqlParamError> {
    let mut depth = 0usize;
    let mut k = start;
    while k + 1 < b.len() {
        if b[k] == b'/' && b[k + 1] == b'*' {
            depth += 1;
            k += 2;
        } else if b[k] == b'*' && b[k + 1] == b'/' {
            depth -= 1;
            k += 2;
            if depth == 0 {
                return Ok(k);
            }
        } else {
            k += 1;
        }
    }
    Err(SqlParamError::Unterminated {
        what: "block comment",
        offset: start,
    })
}

/// At a `$` that does not continue an identifier: a positional parameter is an error, a
/// dollar quote returns the end (exclusive) of the quoted string, anything else `None`.
fn dollar(sql: &str, start: usize) -> Result<Option<usize>, SqlParamError> {
    let b = sql.as_bytes();
    let mut k = start + 1;
    if b.get(k).is_some_and(u8::is_ascii_digit) {
        while k < b.len() && b[k].is_ascii_digit() {
            k += 1;
        }
        return Err(SqlParamError::Positional {
            number: sql[start + 1..k].to_owned(),
            offset: start,
        });
    }
    while k < b.len() && is_tag_byte(b[k]) {
        k += 1;
    }
    if b.get(k) != Some(&b'$') {
        return Ok(None);
    }
    let tag = &sql[start..=k];
    match sql[k + 1..].find(tag) {
        Some(p) => Ok(Some(k + 1 + p + tag.len())),
        None => Err(SqlParamError::Unterminated {
            what: "dollar-quoted string",
            offset: start,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(sql: &str) -> (String, Vec<String>) {
        match compile_named(sql) {
            Ok(r) => r,
            Err(e) => panic!("{sql:?}: {e}"),
        }
    }

    #[test]
    fn numbers_names_in_order_of_first_appearance() {
        let (s, names) =
            ok("UPDATE t SET a = a - :qty WHERE sku = :sku AND a >= :qty RETURNING :x_1");
        assert_eq!(
            s,
            "UPDATE t SET a = a - $1 WHERE sku = $2 AND a >= $1 RETURNING $3"
        );
        assert_eq!(names, ["qty", "sku", "x_1"]);
    }

    #[test]
    fn no_params_is_unchanged() {
        let (s, names) = ok("SELECT 1");
        assert_eq!(s, "SELECT 1");
        assert!(names.is_empty());
    }

    #[test]
    fn casts_are_not_params() {
        assert_eq!(ok("SELECT a::text, b :: int").0, "SELECT a::text, b :: int");
        let (s, names) = ok("SELECT :qty::int, :amount::numeric(14,2)");
        assert_eq!(s, "SELECT $1::int, $2::numeric(14,2)");
        assert_eq!(names, ["qty", "amount"]);
    }

    #[test]
    fn colon_not_followed_by_a_name_is_kept() {
        assert_eq!(ok("SELECT arr[1:2], ':'").0, "SELECT arr[1:2], ':'");
        assert_eq!(ok("SELECT :1").0, "SELECT :1");
    }

    #[test]
    fn single_quoted_strings_are_skipped() {
        let (s, names) = ok("SELECT ':no', 'it''s :no', :yes");
        assert_eq!(s, "SELECT ':no', 'it''s :no', $1");
        assert_eq!(names, ["yes"]);
        // A backslash is an ordinary character in a standard string.
        assert_eq!(ok(r"SELECT 'a\', :p").0, r"SELECT 'a\', $1");
    }

    #[test]
    fn escape_strings_honour_backslashes() {
        let (s, names) = ok(r"SELECT E'it\'s :no', e'\\', :yes");
        assert_eq!(s, r"SELECT E'it\'s :no', e'\\', $1");
        assert_eq!(names, ["yes"]);
        // `e` ending an identifier does not start an escape string.
        assert!(compile_named(r"SELECT name'x\' :p").is_ok());
    }

    #[test]
    fn quoted_identifiers_are_skipped() {
        let (s, names) = ok(r#"SELECT "a:b", "x"":y", :z FROM "t$1""#);
        assert_eq!(s, r#"SELECT "a:b", "x"":y", $1 FROM "t$1""#);
        assert_eq!(names, ["z"]);
    }

    #[test]
    fn line_comments_are_skipped() {
        let (s, names) = ok("SELECT :a -- :b and $1\n, :c");
        assert_eq!(s, "SELECT $1 -- :b and $1\n, $2");
        assert_eq!(names, ["a", "c"]);
        assert_eq!(ok("SELECT 1 -- :tail").1, Vec::<String>::new());
    }

    #[test]
    fn block_comments_are_skipped_and_nest() {
        let (s, names) = ok("SELECT /* :a /* :b */ $1 */ :c");
        assert_eq!(s, "SELECT /* :a /* :b */ $1 */ $1");
        assert_eq!(names, ["c"]);
    }

    #[test]
    fn dollar_quoted_strings_are_skipped() {
        let (s, names) = ok("SELECT $$ :a ' $1 $$, $fn$ :b $$ $fn$, :c");
        assert_eq!(s, "SELECT $$ :a ' $1 $$, $fn$ :b $$ $fn$, $1");
        assert_eq!(names, ["c"]);
    }

    #[test]
    fn dollar_inside_identifiers_is_not_a_parameter() {
        assert_eq!(ok("SELECT a$1, b$x$ FROM t").0, "SELECT a$1, b$x$ FROM t");
    }

    #[test]
    fn positional_parameters_are_rejected() {
        assert_eq!(
            compile_named("SELECT :a, $12"),
            Err(SqlParamError::Positional {
                number: "12".into(),
                offset: 11
            })
        );
    }

    #[test]
    fn unterminated_sections_are_rejected() {
        for (sql, what) in [
            ("SELECT 'abc", "string literal"),
            (r"SELECT E'abc\'", "string literal"),
            (r#"SELECT "abc"#, "quoted identifier"),
            ("SELECT /* /* */", "block comment"),
            ("SELECT $a$ x $b$", "dollar-quoted string"),
        ] {
            match compile_named(sql) {
                Err(SqlParamError::Unterminated { what: w, .. }) => assert_eq!(w, what, "{sql}"),
                other => panic!("{sql}: {other:?}"),
            }
        }
    }

    #[test]
    fn non_ascii_text_survives() {
        let (s, names) = ok("SELECT 'héllo', :naïve, größe FROM t -- ünï");
        assert_eq!(s, "SELECT 'héllo', $1ïve, größe FROM t -- ünï");
        assert_eq!(names, ["na"]);
    }

    #[test]
    fn keyword_check_ignores_strings_and_comments() {
        assert!(has_keyword(
            "INSERT INTO t VALUES (1) returning id",
            "RETURNING"
        ));
        assert!(has_keyword(
            "INSERT INTO t VALUES (1)\nRETURNING\tid",
            "returning"
        ));
        assert!(!has_keyword(
            "INSERT INTO t VALUES ('RETURNING')",
            "returning"
        ));
        assert!(!has_keyword(
            "INSERT INTO t VALUES (1) -- returning id",
            "returning"
        ));
        assert!(!has_keyword(
            "INSERT INTO t (returning_id) VALUES (1)",
            "returning"
        ));
        assert!(!has_keyword(r#"SELECT "returning""#, "returning"));
    }

    #[test]
    fn read_only_check_accepts_queries_and_refuses_writes() {
        for sql in [
            "SELECT 1 FROM c WHERE id = :id",
            "  with x AS (SELECT 1) SELECT * FROM x",
            "VALUES (1)",
            "TABLE shop.stock",
            "SELECT 1 FROM c WHERE note = 'update me' -- insert",
            "SELECT 1 FROM c FOR UPDATE",
            "SELECT 1 FROM c FOR NO KEY UPDATE SKIP LOCKED",
            "SELECT \"update\" FROM c",
        ] {
            assert_eq!(read_only_violation(sql), None, "{sql}");
        }
        for (sql, why) in [
            ("UPDATE c SET x = 1", "starts with `UPDATE`"),
            (
                "WITH d AS (DELETE FROM c RETURNING 1) SELECT * FROM d",
                "`DELETE`",
            ),
            ("SELECT 1 INTO t", "`INTO`"),
            (
                "with u as (update c set x = 1 returning 1) select 1",
                "`update`",
            ),
            ("CALL p()", "starts with `CALL`"),
        ] {
            let found = read_only_violation(sql).unwrap_or_default();
            assert!(found.contains(why), "{sql}: {found}");
        }
    }

    #[test]
    fn statements_split_at_semicolons_in_code_only() {
        let sql = "-- what\nSELECT ';' FROM t WHERE a = :a;\n/* ; */ SELECT $$;$$;\n-- end\n";
        assert_eq!(
            split_statements(sql).unwrap(),
            [
                "-- what\nSELECT ';' FROM t WHERE a = :a",
                "/* ; */ SELECT $$;$$"
            ]
        );
        assert!(split_statements("SELECT 'open").is_err());
    }

    #[test]
    fn single_statement_check() {
        assert!(is_single_statement("SELECT 1"));
        assert!(is_single_statement("SELECT 1;"));
        assert!(is_single_statement("SELECT ';' -- ; x\n; ;\n"));
        assert!(is_single_statement("DO $$ BEGIN PERFORM 1; END $$"));
        assert!(!is_single_statement("SELECT 1; SELECT 2"));
        assert!(!is_single_statement("UPDATE t SET a = :a; DELETE FROM t"));
    }
}
