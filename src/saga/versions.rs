//! What `skald run` checks about the loaded saga versions against the instances in the
//! database, before consuming: pure decisions over what [`crate::store`] reports.

use std::fmt;
use std::path::PathBuf;

use super::Catalog;

/// Instances of one saga version in the database, as one definition (hash) knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    /// The saga's name.
    pub saga: String,
    /// The version the instances started with.
    pub version: u32,
    /// The [`super::SagaDef::content_hash`] they started with; `None` for instances
    /// started before hashes were recorded.
    pub hash: Option<String>,
    /// How many of them are live: waiting, running or compensating.
    pub live: i64,
}

/// A loaded saga file whose version number the database knows with other content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedVersion {
    /// The saga's name.
    pub saga: String,
    /// The version number both share.
    pub version: u32,
    /// The loaded file.
    pub file: PathBuf,
    /// The line of its `version:`.
    pub line: u32,
    /// The hash of the instances' definition.
    pub stored: String,
    /// The hash of the loaded file's definition.
    pub loaded: String,
}

impl fmt::Display for ChangedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: saga `{}` version {}: same version number, different content: \
             the database has instances started on version {} of another definition \
             (hash {}, this file's is {}); give the changed definition a new version \
             number, or restore the file",
            self.file.display(),
            self.line,
            self.saga,
            self.version,
            self.version,
            short(&self.stored),
            short(&self.loaded),
        )
    }
}

/// The first 12 hex digits: enough to tell two definitions apart in a message.
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Every loaded version that the database holds instances of under another hash,
/// sorted by saga and version (one entry per stored hash). Instances without a hash
/// (started before hashes were recorded) are not compared.
pub fn changed_versions(catalog: &Catalog, stored: &[StoredVersion]) -> Vec<ChangedVersion> {
    let mut changed: Vec<ChangedVersion> = stored
        .iter()
        .filter_map(|s| {
            let stored_hash = s.hash.as_deref()?;
            let def = catalog.get_version(&s.saga, s.version)?;
            let loaded = catalog.hash(&s.saga, s.version)?;
            (loaded != stored_hash).then(|| ChangedVersion {
                saga: s.saga.clone(),
                version: s.version,
                file: def.source.clone(),
                line: def.version_line,
                stored: stored_hash.to_owned(),
                loaded: loaded.to_owned(),
            })
        })
        .collect();
    changed.sort_by(|a, b| (&a.saga, a.version, &a.stored).cmp(&(&b.saga, b.version, &b.stored)));
    changed
}

/// Live instances of a saga version that is not loaded: nothing could run them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanedVersion {
    /// The saga's name.
    pub saga: String,
    /// The version no longer loaded.
    pub version: u32,
    /// How many instances are waiting, running or compensating on it.
    pub live: i64,
}

impl fmt::Display for OrphanedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "saga `{}` version {} is no longer loaded but has {} live instance(s) \
             (waiting, running or compensating): restore its file, or start with \
             --orphaned=park (SKALD_ORPHANED=park) to park them as failed with a dead \
             letter, to replay once the version is loaded again",
            self.saga, self.version, self.live
        )
    }
}

/// Every saga version with live instances that is not loaded, sorted by saga and
/// version (whatever hashes its instances have).
pub fn orphaned_versions(catalog: &Catalog, stored: &[StoredVersion]) -> Vec<OrphanedVersion> {
    let mut orphaned: Vec<OrphanedVersion> = Vec::new();
    for s in stored {
        if s.live == 0 || catalog.get_version(&s.saga, s.version).is_some() {
            continue;
        }
        match orphaned
            .iter_mut()
            .find(|o| o.saga == s.saga && o.version == s.version)
        {
            Some(o) => o.live += s.live,
            None => orphaned.push(OrphanedVersion {
                saga: s.saga.clone(),
                version: s.version,
                live: s.live,
            }),
        }
    }
    orphaned.sort_by(|a, b| (&a.saga, a.version).cmp(&(&b.saga, b.version)));
    orphaned
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::saga::load_str;

    fn catalog(files: &[(&str, u32, &str)]) -> Catalog {
        Catalog::new(
            files
                .iter()
                .map(|(name, version, sql)| {
                    let src = format!(
                        "name: {name}\nversion: {version}\naggregate: payload.id\nsteps:\n\
                         - name: a\n  role: retriable\n  action: {{ sql: '{sql}' }}\n"
                    );
                    load_str(&src, Path::new(&format!("{name}.v{version}.yaml")))
                        .expect("valid saga")
                })
                .collect(),
        )
    }

    fn stored(saga: &str, version: u32, hash: Option<&str>, live: i64) -> StoredVersion {
        StoredVersion {
            saga: saga.into(),
            version,
            hash: hash.map(str::to_owned),
            live,
        }
    }

    #[test]
    fn the_same_content_under_the_same_version_is_fine() {
        let c = catalog(&[("s", 1, "SELECT 1"), ("s", 2, "SELECT 2")]);
        let h1 = c.hash("s", 1).unwrap().to_owned();
        let h2 = c.hash("s", 2).unwrap().to_owned();
        let db = [stored("s", 1, Some(&h1), 3), stored("s", 2, Some(&h2), 0)];
        assert_eq!(changed_versions(&c, &db), []);
    }

    #[test]
    fn other_content_under_a_loaded_version_is_named_with_file_and_line() {
        let old = catalog(&[("s", 1, "SELECT 1")]);
        let edited = catalog(&[("s", 1, "SELECT 42")]);
        let old_hash = old.hash("s", 1).unwrap().to_owned();
        let db = [stored("s", 1, Some(&old_hash), 0)];
        let changed = changed_versions(&edited, &db);
        assert_eq!(changed.len(), 1, "terminal instances count too");
        let c = &changed[0];
        assert_eq!((c.saga.as_str(), c.version, c.line), ("s", 1, 2));
        assert_eq!(c.file, Path::new("s.v1.yaml"));
        assert_eq!(c.loaded, edited.hash("s", 1).unwrap());
        let text = c.to_string();
        assert!(
            text.starts_with(
                "s.v1.yaml:2: saga `s` version 1: same version number, different content"
            ),
            "{text}"
        );
        assert!(text.contains(&old_hash[..12]), "{text}");
    }

    #[test]
    fn versions_not_loaded_and_instances_without_a_hash_are_not_compared() {
        let c = catalog(&[("s", 2, "SELECT 2")]);
        let db = [
            stored("s", 1, Some("aaaa"), 5),
            stored("s", 2, None, 5),
            stored("t", 1, Some("bbbb"), 5),
        ];
        assert_eq!(changed_versions(&c, &db), []);
    }

    #[test]
    fn live_instances_of_a_version_not_loaded_are_orphaned_summed_over_hashes() {
        let c = catalog(&[("s", 2, "SELECT 2")]);
        let db = [
            stored("s", 1, Some("aaaa"), 2),
            stored("s", 1, None, 1),
            stored("s", 2, None, 7),
            stored("t", 3, Some("bbbb"), 1),
            stored("u", 1, Some("cccc"), 0),
        ];
        let orphaned = orphaned_versions(&c, &db);
        assert_eq!(
            orphaned,
            [
                OrphanedVersion {
                    saga: "s".into(),
                    version: 1,
                    live: 3
                },
                OrphanedVersion {
                    saga: "t".into(),
                    version: 3,
                    live: 1
                },
            ],
            "a loaded version, and one with only finished instances, are not orphaned"
        );
        assert!(
            orphaned[0]
                .to_string()
                .starts_with("saga `s` version 1 is no longer loaded but has 3 live instance(s)"),
            "{}",
            orphaned[0]
        );
    }
}
