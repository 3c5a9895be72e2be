//! `skald scaffold`: a draft saga from a legacy transaction.
//!
//! The legacy file is a psql script holding one transaction (`BEGIN; … COMMIT;`) with
//! psql's named parameters (`:qty`, `:'sku'`), as `skald explore --legacy` runs it. The
//! draft has one step per writing statement, the parameters carried over as
//! `payload.<name>`, a suggested compensation per statement shape, `expect_rows` where
//! the script checked a statement's row count, proposed roles, and a `# TODO` comment
//! wherever the scaffold could not decide, saying why. One concern a file:
//!
//! - [`script`]: the psql script as SQL statements and psql commands, each with its line
//!   (with `sqlparser`'s PostgreSQL tokenizer, so strings and comments are respected);
//! - [`transaction`]: the one transaction in it, each statement parsed (with
//!   `sqlparser`'s PostgreSQL dialect) and the row-count checks attached to the
//!   statements they check; what cannot be scaffolded is an error naming its line;
//! - [`rules`]: one statement shape → one step and its suggested compensation;
//! - [`roles`]: compensatable until the first statement that cannot be undone (the
//!   pivot), retriable after it;
//! - [`draft`]: the YAML text, with its `# TODO` comments.

pub mod draft;
pub mod roles;
pub mod rules;
pub mod script;
pub mod transaction;

use thiserror::Error;

pub use draft::Draft;

/// Why a legacy file cannot be scaffolded. Every variant names the line (1-based) of
/// the legacy file where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScaffoldError {
    /// The SQL parser rejected a statement (or the tokenizer the script).
    #[error("line {line}: the SQL parser rejects this statement: {message}")]
    Parse {
        /// Where the statement starts.
        line: u64,
        /// The parser's message.
        message: String,
    },
    /// A second `BEGIN` after the first transaction's `COMMIT`.
    #[error(
        "line {line}: a second transaction (the first ends at line {first_end}): scaffold \
         one transaction per file"
    )]
    SecondTransaction {
        /// The second `BEGIN`.
        line: u64,
        /// The first transaction's `COMMIT`.
        first_end: u64,
    },
    /// A schema change inside the transaction.
    #[error(
        "line {line}: {what} is DDL: a saga's steps change data; put schema changes in the \
         saga's `setup:` and remove them from the transaction"
    )]
    Ddl {
        /// Where the statement starts.
        line: u64,
        /// Its leading keywords, e.g. `CREATE TABLE`.
        what: String,
    },
    /// Anything else the scaffold cannot read, said plainly.
    #[error("{}", at_line(*line, message))]
    Unsupported {
        /// Where the problem is (0: the whole file).
        line: u64,
        /// What and why.
        message: String,
    },
}

/// `line <n>: <message>`, or the message alone for the whole file (line 0).
fn at_line(line: u64, message: &str) -> String {
    if line == 0 {
        message.to_string()
    } else {
        format!("line {line}: {message}")
    }
}

impl ScaffoldError {
    /// The line of the legacy file the error is about (0: the whole file).
    pub fn line(&self) -> u64 {
        match self {
            ScaffoldError::Parse { line, .. }
            | ScaffoldError::SecondTransaction { line, .. }
            | ScaffoldError::Ddl { line, .. }
            | ScaffoldError::Unsupported { line, .. } => *line,
        }
    }
}

/// Drafts saga `name` from the legacy psql script `legacy` (the text of the file called
/// `source` in the draft's comments).
///
/// # Errors
/// [`ScaffoldError`] naming the line of what cannot be scaffolded: no transaction or a
/// second one, DDL, a statement the parser rejects, a statement whose execution depends
/// on a psql `\if`.
pub fn scaffold(legacy: &str, source: &str, name: &str) -> Result<Draft, ScaffoldError> {
    let items = script::read(legacy)?;
    let statements = transaction::read(items)?;
    let steps: Vec<rules::StepDraft> = statements.iter().map(rules::draft_step).collect();
    let roles = roles::propose(&steps.iter().map(|s| s.undo.kind()).collect::<Vec<_>>());
    Ok(draft::render(name, source, &statements, &steps, &roles))
}
