//! Sagas: their YAML definitions, validation, and the pure coordinator that decides
//! what happens next. Nothing in here does I/O except reading saga files.

pub mod command;
pub mod context;
pub mod coordinator;
pub mod decide;
pub mod definition;
pub mod diff;
pub mod load;
pub mod setup;
pub mod sql;
pub mod strict;
pub mod versions;
mod yaml;

pub use definition::{
    Action, Backoff, CommandAction, Isolation, OrderingPolicy, RetryPolicy, SagaDef, SqlAction,
    StepDef, StepRole, ValueRef,
};
pub use load::{LoadError, load_dir, load_file, load_str};

use std::collections::HashMap;
use std::sync::Arc;

/// The sagas a process runs, by name and version: several versions of one saga may be
/// loaded at once. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    by_key: HashMap<(String, u32), Arc<SagaDef>>,
    /// Each name's loaded versions, ascending.
    versions: HashMap<String, Vec<u32>>,
    /// Each loaded version's [`SagaDef::content_hash`], computed once.
    hashes: HashMap<(String, u32), Arc<str>>,
}

impl Catalog {
    /// A catalog of `sagas` ((name, version) pairs are unique: [`load_dir`] guarantees
    /// it; of two with the same pair, the later wins).
    pub fn new(sagas: Vec<SagaDef>) -> Self {
        let mut catalog = Catalog::default();
        for saga in sagas {
            let versions = catalog.versions.entry(saga.name.clone()).or_default();
            if let Err(at) = versions.binary_search(&saga.version) {
                versions.insert(at, saga.version);
            }
            let key = (saga.name.clone(), saga.version);
            catalog
                .hashes
                .insert(key.clone(), Arc::from(saga.content_hash()));
            catalog.by_key.insert(key, Arc::new(saga));
        }
        catalog
    }

    /// The newest loaded version of the saga called `name`: what a start that names no
    /// version runs.
    pub fn get(&self, name: &str) -> Option<&Arc<SagaDef>> {
        let newest = *self.versions.get(name)?.last()?;
        self.get_version(name, newest)
    }

    /// Version `version` of the saga called `name`, if it is loaded.
    pub fn get_version(&self, name: &str, version: u32) -> Option<&Arc<SagaDef>> {
        self.by_key.get(&(name.to_owned(), version))
    }

    /// The [`SagaDef::content_hash`] of version `version` of `name`, if it is loaded.
    pub fn hash(&self, name: &str, version: u32) -> Option<&str> {
        self.hashes.get(&(name.to_owned(), version)).map(|h| &**h)
    }

    /// The loaded versions of the saga called `name`, ascending (empty if none).
    pub fn versions(&self, name: &str) -> &[u32] {
        self.versions.get(name).map_or(&[], Vec::as_slice)
    }

    /// Every loaded saga version, sorted by name, then version.
    pub fn all(&self) -> Vec<&Arc<SagaDef>> {
        let mut all: Vec<_> = self.by_key.values().collect();
        all.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
        all
    }

    /// Names of handlers that some step uses but `known` does not contain.
    pub fn missing_handlers(&self, known: impl Fn(&str) -> bool) -> Vec<String> {
        let mut missing: Vec<String> = self
            .by_key
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn saga(name: &str, version: u32) -> SagaDef {
        let src = format!(
            "name: {name}\nversion: {version}\naggregate: payload.id\nsteps:\n\
             - name: a\n  role: retriable\n  action: {{ handler: h }}\n"
        );
        load_str(&src, Path::new("test.yaml")).expect("valid saga")
    }

    #[test]
    fn get_is_the_newest_version_whatever_the_load_order() {
        let catalog = Catalog::new(vec![
            saga("s", 2),
            saga("s", 10),
            saga("s", 1),
            saga("t", 1),
        ]);
        assert_eq!(catalog.get("s").map(|s| s.version), Some(10));
        assert_eq!(catalog.get("t").map(|s| s.version), Some(1));
        assert!(catalog.get("u").is_none());
        assert_eq!(catalog.versions("s"), [1, 2, 10]);
        assert!(catalog.versions("u").is_empty());
    }

    #[test]
    fn get_version_finds_only_a_loaded_version() {
        let catalog = Catalog::new(vec![saga("s", 1), saga("s", 3)]);
        assert_eq!(catalog.get_version("s", 1).map(|s| s.version), Some(1));
        assert_eq!(catalog.get_version("s", 3).map(|s| s.version), Some(3));
        assert!(catalog.get_version("s", 2).is_none());
        assert!(catalog.get_version("t", 1).is_none());
    }

    #[test]
    fn all_lists_every_version_sorted() {
        let catalog = Catalog::new(vec![saga("t", 1), saga("s", 2), saga("s", 1)]);
        let ids: Vec<_> = catalog
            .all()
            .iter()
            .map(|s| (s.name.as_str(), s.version))
            .collect();
        assert_eq!(ids, [("s", 1), ("s", 2), ("t", 1)]);
    }

    #[test]
    fn hash_is_the_loaded_versions_content_hash() {
        let catalog = Catalog::new(vec![saga("s", 1), saga("s", 2)]);
        let v1 = catalog.hash("s", 1).expect("loaded");
        assert_eq!(v1, saga("s", 1).content_hash());
        assert_ne!(Some(v1), catalog.hash("s", 2), "the version is content");
        assert!(catalog.hash("s", 3).is_none());
    }

    #[test]
    fn a_duplicate_name_and_version_keeps_one_entry() {
        let catalog = Catalog::new(vec![saga("s", 1), saga("s", 1)]);
        assert_eq!(catalog.versions("s"), [1]);
        assert_eq!(catalog.all().len(), 1);
    }
}
