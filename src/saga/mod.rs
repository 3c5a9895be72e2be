//! Sagas: their YAML definitions, validation, and the pure coordinator that decides
//! what happens next. Nothing in here does I/O except reading saga files.

pub mod context;
pub mod coordinator;
pub mod decide;
pub mod definition;
pub mod load;
pub mod setup;
pub mod sql;
pub mod strict;
mod yaml;

pub use definition::{
    Action, Backoff, Isolation, OrderingPolicy, RetryPolicy, SagaDef, SqlAction, StepDef, StepRole,
    ValueRef,
};
pub use load::{LoadError, load_dir, load_file, load_str};

use std::collections::HashMap;
use std::sync::Arc;

/// The sagas a process runs, by name. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    by_name: HashMap<String, Arc<SagaDef>>,
}

impl Catalog {
    /// A catalog of `sagas` (names are unique: [`load_dir`] guarantees it).
    pub fn new(sagas: Vec<SagaDef>) -> Self {
        Catalog {
            by_name: sagas
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect(),
        }
    }

    /// The saga called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<SagaDef>> {
        self.by_name.get(name)
    }

    /// Every saga, sorted by name.
    pub fn all(&self) -> Vec<&Arc<SagaDef>> {
        let mut all: Vec<_> = self.by_name.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Names of handlers that some step uses but `known` does not contain.
    pub fn missing_handlers(&self, known: impl Fn(&str) -> bool) -> Vec<String> {
        let mut missing: Vec<String> = self
            .by_name
            .values()
            .flat_map(|s| &s.steps)
            .flat_map(|step| std::iter::once(&step.action).chain(step.compensation.as_ref()))
            .filter_map(|action| match action {
                Action::Handler(h) if !known(&h.name) => Some(h.name.clone()),
                _ => None,
            })
            .collect();
        missing.sort();
        missing.dedup();
        missing
    }
}
