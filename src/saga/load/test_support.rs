//! Helpers shared by the loader's unit tests.

use std::path::Path;

use super::{LoadError, load_str};
use crate::saga::definition::{Action, SagaDef, SqlAction, ValueRef};

/// Loads `src` as if read from `test.yaml`.
pub(super) fn load(src: &str) -> Result<SagaDef, Vec<LoadError>> {
    load_str(src, Path::new("test.yaml"))
}

/// The saga `src` defines; panics with its errors when it is invalid.
pub(super) fn loaded(src: &str) -> SagaDef {
    match load(src) {
        Ok(def) => def,
        Err(errors) => panic!("unexpected errors:\n{}", render(&errors)),
    }
}

/// `errors` as displayed, one a line.
pub(super) fn render(errors: &[LoadError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The SQL of `action`; panics when it is a handler.
pub(super) fn sql_of(action: &Action) -> &SqlAction {
    match action {
        Action::Sql(sql) => sql,
        other => panic!("expected sql, got {other:?}"),
    }
}

/// `payload.<path…>`.
pub(super) fn payload(path: &[&str]) -> ValueRef {
    ValueRef::Payload {
        path: path.iter().map(|s| (*s).to_owned()).collect(),
    }
}
