//! `skald diff`: what deploying the saga files on disk would do to the live instances,
//! decided from what the database reports (pure: no I/O).
//!
//! Per saga: which versions are added (never loaded before) or removed (recorded, not
//! on disk), which live versions are stranded (removed) or changed under the same
//! version number, and, step by step, how each loaded version differs from the one
//! live instances run, with how many of them are before, at or past each change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::Value;

use super::Catalog;

/// Live instances (waiting, running, compensating) of one definition at one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAt {
    /// The saga's name.
    pub saga: String,
    /// The version they started with.
    pub version: u32,
    /// The definition's hash; `None` for instances started before hashes were recorded.
    pub hash: Option<String>,
    /// Their cursor's step index (a compensating instance counts at the step it
    /// compensates).
    pub step: u32,
    /// How many.
    pub count: i64,
}

/// A definition skald recorded when it loaded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The saga's name.
    pub saga: String,
    /// Its version.
    pub version: u32,
    /// Its hash.
    pub hash: String,
    /// The normalised definition ([`super::SagaDef::normalised`]).
    pub definition: Value,
}

/// What changed about one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    /// A step the old definition does not have.
    Added,
    /// A step the new definition does not have.
    Removed,
    /// The action's SQL text (or handler name).
    ActionSql,
    /// The action's parameters.
    Parameters,
    /// Another property of the action (expected rows, returning, fatal codes).
    Action,
    /// The compensation.
    Compensation,
    /// The role.
    Role,
    /// The retry policy.
    Retry,
    /// The attempt timeout.
    Timeout,
}

impl ChangeKind {
    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::ActionSql => "action SQL changed",
            ChangeKind::Parameters => "parameters changed",
            ChangeKind::Action => "action changed",
            ChangeKind::Compensation => "compensation changed",
            ChangeKind::Role => "role changed",
            ChangeKind::Retry => "retry policy changed",
            ChangeKind::Timeout => "timeout changed",
        }
    }
}

/// One change to one step, with the live instances of the old definition around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepChange {
    /// The step's name.
    pub step: String,
    /// What changed.
    pub kind: ChangeKind,
    /// Live instances whose step index is below the change's position.
    pub before: i64,
    /// At it (always 0 for an added step, which no instance has reached).
    pub at: i64,
    /// Past it (for an added step: at or past the step it is inserted before).
    pub past: i64,
}

/// What one saga version's deployment means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// On disk, never loaded before.
    Added(u32),
    /// Loaded before, not on disk, no live instance.
    Removed(u32),
    /// Not on disk while instances are live on it: they would be stranded (unsafe).
    Stranded {
        /// The version.
        version: u32,
        /// Its live instances.
        live: i64,
    },
    /// On disk with other content than its live instances started with (unsafe).
    ChangedInPlace {
        /// The version.
        version: u32,
        /// Live instances of the other content.
        live: i64,
    },
    /// Live instances whose definition was not recorded: not compared.
    NotCompared {
        /// The version.
        version: u32,
        /// How many.
        live: i64,
    },
    /// On disk as its live instances started with.
    Unchanged {
        /// The version.
        version: u32,
        /// Its live instances.
        live: i64,
    },
}

impl Finding {
    /// Whether deploying would strand or silently change live instances.
    pub fn is_unsafe(&self) -> bool {
        matches!(
            self,
            Finding::Stranded { .. } | Finding::ChangedInPlace { .. }
        )
    }
}

/// Step changes between a live definition and one on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// The version live instances run.
    pub from: u32,
    /// The version on disk (the same one for a change in place).
    pub to: u32,
    /// The changes, by position in the old definition.
    pub changes: Vec<StepChange>,
}

/// One saga's part of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaDiff {
    /// The saga's name.
    pub saga: String,
    /// Per version, ascending.
    pub findings: Vec<Finding>,
    /// Per live definition that differs from a loaded one.
    pub comparisons: Vec<Comparison>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Per saga, by name.
    pub sagas: Vec<SagaDiff>,
}

impl Report {
    /// Whether no live instance would be stranded or silently changed.
    pub fn is_safe(&self) -> bool {
        !self
            .sagas
            .iter()
            .flat_map(|s| &s.findings)
            .any(Finding::is_unsafe)
    }

    /// The report as `skald diff` prints it (README, *Changing a saga*).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.sagas {
            let _ = writeln!(out, "saga {}", s.saga);
            for f in &s.findings {
                let line = match f {
                    Finding::Added(v) => format!("version {v}: added"),
                    Finding::Removed(v) => format!("version {v}: removed, no live instance"),
                    Finding::Stranded { version, live } => format!(
                        "version {version}: removed, {live} live instance(s) stranded (unsafe)"
                    ),
                    Finding::ChangedInPlace { version, live } => format!(
                        "version {version}: changed under the same version number, {live} live \
                         instance(s) would run the new content (unsafe)"
                    ),
                    Finding::NotCompared { version, live } => format!(
                        "version {version}: {live} live instance(s) of an unrecorded definition, \
                         not compared"
                    ),
                    Finding::Unchanged { version, live } => {
                        format!("version {version}: unchanged, {live} live instance(s)")
                    }
                };
                let _ = writeln!(out, "  {line}");
            }
            for c in &s.comparisons {
                let _ = writeln!(out, "  version {} -> version {} on disk:", c.from, c.to);
                for ch in &c.changes {
                    let _ = writeln!(
                        out,
                        "    step `{}`: {} ({} before, {} at, {} past)",
                        ch.step,
                        ch.kind.label(),
                        ch.before,
                        ch.at,
                        ch.past
                    );
                }
            }
        }
        let unsafe_count = self
            .sagas
            .iter()
            .flat_map(|s| &s.findings)
            .filter(|f| f.is_unsafe())
            .count();
        if unsafe_count == 0 {
            out.push_str("safe: no live instance is stranded or changed\n");
        } else {
            let _ = writeln!(
                out,
                "unsafe: {unsafe_count} version(s) would strand or change live instances"
            );
        }
        out
    }
}

/// Compares the definitions on disk (`disk`) with those live instances run (`live`,
/// their definitions in `recorded`, which also says which versions were ever loaded).
pub fn diff(disk: &Catalog, live: &[LiveAt], recorded: &[Recorded]) -> Report {
    let mut names: BTreeSet<&str> = disk.all().iter().map(|s| s.name.as_str()).collect();
    names.extend(live.iter().map(|l| l.saga.as_str()));
    names.extend(recorded.iter().map(|r| r.saga.as_str()));
    let sagas = names
        .into_iter()
        .map(|name| saga_diff(name, disk, live, recorded))
        .collect();
    Report { sagas }
}

fn saga_diff(name: &str, disk: &Catalog, live: &[LiveAt], recorded: &[Recorded]) -> SagaDiff {
    // (version, hash) → (step → count), for this saga's live instances.
    let mut groups: BTreeMap<(u32, Option<&str>), BTreeMap<u32, i64>> = BTreeMap::new();
    for l in live.iter().filter(|l| l.saga == name && l.count > 0) {
        *groups
            .entry((l.version, l.hash.as_deref()))
            .or_default()
            .entry(l.step)
            .or_default() += l.count;
    }
    let ever: BTreeSet<u32> = recorded
        .iter()
        .filter(|r| r.saga == name)
        .map(|r| r.version)
        .collect();
    let on_disk = disk.versions(name);
    let live_versions: BTreeSet<u32> = groups.keys().map(|(v, _)| *v).collect();
    let mut versions: BTreeSet<u32> = on_disk.iter().copied().collect();
    versions.extend(&ever);
    versions.extend(&live_versions);

    let mut findings = Vec::new();
    let mut comparisons = Vec::new();
    for version in versions {
        let loaded = disk.hash(name, version);
        if !live_versions.contains(&version) {
            match (loaded, ever.contains(&version)) {
                (Some(_), false) => findings.push(Finding::Added(version)),
                (None, true) => findings.push(Finding::Removed(version)),
                _ => {}
            }
            continue;
        }
        for ((_, hash), steps) in groups.iter().filter(|((v, _), _)| *v == version) {
            let count: i64 = steps.values().sum();
            let definition = hash.and_then(|h| {
                recorded
                    .iter()
                    .find(|r| r.saga == name && r.version == version && r.hash == h)
                    .map(|r| &r.definition)
            });
            let finding = match (loaded, *hash) {
                (None, _) => Finding::Stranded {
                    version,
                    live: count,
                },
                (Some(_), None) => Finding::NotCompared {
                    version,
                    live: count,
                },
                (Some(disk_hash), Some(h)) if disk_hash == h => Finding::Unchanged {
                    version,
                    live: count,
                },
                (Some(_), Some(_)) => Finding::ChangedInPlace {
                    version,
                    live: count,
                },
            };
            if matches!(finding, Finding::ChangedInPlace { .. })
                && let (Some(old), Some(new)) = (definition, disk.get_version(name, version))
            {
                comparisons.push(Comparison {
                    from: version,
                    to: version,
                    changes: step_changes(old, &new.normalised(), steps),
                });
            }
            // What new starts get instead, if another version is newest.
            if let (Some(old), Some(newest)) = (definition, disk.get(name))
                && newest.version != version
            {
                comparisons.push(Comparison {
                    from: version,
                    to: newest.version,
                    changes: step_changes(old, &newest.normalised(), steps),
                });
            }
            findings.push(finding);
        }
    }
    SagaDiff {
        saga: name.to_owned(),
        findings,
        comparisons,
    }
}

/// The step changes from `old` to `new` (normalised definitions), each with the live
/// instances of `old` (`steps`: step index → count) before, at and past it.
pub fn step_changes(old: &Value, new: &Value, steps: &BTreeMap<u32, i64>) -> Vec<StepChange> {
    let names = |def: &Value| -> Vec<String> {
        def["steps"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|step| step["name"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (old_names, new_names) = (names(old), names(new));
    let old_index = |name: &str| old_names.iter().position(|n| n == name);
    let count = |pred: &dyn Fn(u32) -> bool| -> i64 {
        steps
            .iter()
            .filter(|(s, _)| pred(**s))
            .map(|(_, c)| *c)
            .sum()
    };
    let around = |step: &str, kind: ChangeKind, at: u32| StepChange {
        step: step.to_owned(),
        kind,
        before: count(&|s| s < at),
        at: count(&|s| s == at),
        past: count(&|s| s > at),
    };
    // (position in old, order) → change, so the report reads in step order.
    let mut changes: Vec<(u32, StepChange)> = Vec::new();
    for (i, name) in new_names.iter().enumerate() {
        if old_index(name).is_some() {
            continue;
        }
        // Inserted before the next step both definitions have (or at the end).
        let at = new_names[i + 1..]
            .iter()
            .find_map(|n| old_index(n))
            .unwrap_or(old_names.len()) as u32;
        changes.push((
            at,
            StepChange {
                step: name.clone(),
                kind: ChangeKind::Added,
                before: count(&|s| s < at),
                at: 0,
                past: count(&|s| s >= at),
            },
        ));
    }
    for (i, name) in old_names.iter().enumerate() {
        let at = i as u32;
        let Some(j) = new_names.iter().position(|n| n == name) else {
            changes.push((at, around(name, ChangeKind::Removed, at)));
            continue;
        };
        let (o, n) = (&old["steps"][i], &new["steps"][j]);
        let (oa, na) = (&o["action"], &n["action"]);
        let differs = |fields: &[&str]| fields.iter().any(|f| oa[*f] != na[*f]);
        let mut kinds = Vec::new();
        if differs(&["kind", "sql", "name"]) {
            kinds.push(ChangeKind::ActionSql);
        }
        if differs(&["params", "param_names"]) {
            kinds.push(ChangeKind::Parameters);
        }
        if differs(&[
            "statement",
            "expect_rows",
            "returning",
            "fatal_sqlstates",
            "fatal_errors",
        ]) && !kinds.contains(&ChangeKind::ActionSql)
            && !kinds.contains(&ChangeKind::Parameters)
        {
            kinds.push(ChangeKind::Action);
        }
        for (field, kind) in [
            ("compensation", ChangeKind::Compensation),
            ("role", ChangeKind::Role),
            ("retry", ChangeKind::Retry),
            ("timeout", ChangeKind::Timeout),
        ] {
            if o[field] != n[field] {
                kinds.push(kind);
            }
        }
        for kind in kinds {
            changes.push((at, around(name, kind, at)));
        }
    }
    changes.sort_by_key(|(at, c)| (*at, c.kind != ChangeKind::Added, c.kind));
    changes.into_iter().map(|(_, c)| c).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::saga::{SagaDef, load_str};

    const V1: &str = "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
        - name: one\n  role: compensatable\n  action: { sql: 'SELECT 1' }\n  compensation: { sql: 'SELECT -1' }\n\
        - name: two\n  role: compensatable\n  action: { sql: 'SELECT 2' }\n  compensation: { sql: 'SELECT -2' }\n\
        - name: three\n  role: pivot\n  action: { sql: 'SELECT 3' }\n";

    /// Version 2 of [`V1`]: `one`'s compensation changed, `between` added before `two`,
    /// `two`'s SQL changed, `three` removed.
    const V2: &str = "name: s\nversion: 2\naggregate: payload.id\nsteps:\n\
        - name: one\n  role: compensatable\n  action: { sql: 'SELECT 1' }\n  compensation: { sql: 'SELECT -10' }\n\
        - name: between\n  role: compensatable\n  action: { sql: 'SELECT 15' }\n  compensation: { sql: 'SELECT -15' }\n\
        - name: two\n  role: compensatable\n  action: { sql: 'SELECT 20' }\n  compensation: { sql: 'SELECT -2' }\n";

    fn def(src: &str) -> SagaDef {
        load_str(src, Path::new("s.yaml")).expect("valid saga")
    }

    fn change(step: &str, kind: ChangeKind, before: i64, at: i64, past: i64) -> StepChange {
        StepChange {
            step: step.into(),
            kind,
            before,
            at,
            past,
        }
    }

    /// One instance at step 0, two at step 1, one at step 2.
    const SPREAD: [(u32, i64); 3] = [(0, 1), (1, 2), (2, 1)];

    fn live(version: u32, hash: &str) -> Vec<LiveAt> {
        SPREAD
            .iter()
            .map(|&(step, count)| LiveAt {
                saga: "s".into(),
                version,
                hash: Some(hash.into()),
                step,
                count,
            })
            .collect()
    }

    fn recorded(d: &SagaDef) -> Recorded {
        Recorded {
            saga: d.name.clone(),
            version: d.version,
            hash: d.content_hash(),
            definition: d.normalised(),
        }
    }

    fn four_changes() -> Vec<StepChange> {
        vec![
            change("one", ChangeKind::Compensation, 0, 1, 3),
            change("between", ChangeKind::Added, 1, 0, 3),
            change("two", ChangeKind::ActionSql, 1, 2, 1),
            change("three", ChangeKind::Removed, 3, 1, 0),
        ]
    }

    #[test]
    fn four_step_changes_with_the_instances_before_at_and_past_each() {
        let steps: BTreeMap<u32, i64> = SPREAD.into_iter().collect();
        let changes = step_changes(&def(V1).normalised(), &def(V2).normalised(), &steps);
        assert_eq!(changes, four_changes());
        let same = step_changes(&def(V1).normalised(), &def(V1).normalised(), &steps);
        assert_eq!(same, []);
    }

    #[test]
    fn a_new_version_next_to_the_live_one_is_safe_and_shows_what_new_starts_get() {
        let (v1, v2) = (def(V1), def(V2));
        let disk = Catalog::new(vec![v1.clone(), v2]);
        let report = diff(&disk, &live(1, &v1.content_hash()), &[recorded(&v1)]);
        assert!(report.is_safe());
        assert_eq!(
            report.sagas[0].findings,
            [
                Finding::Unchanged {
                    version: 1,
                    live: 4
                },
                Finding::Added(2)
            ]
        );
        assert_eq!(
            report.sagas[0].comparisons,
            [Comparison {
                from: 1,
                to: 2,
                changes: four_changes()
            }]
        );
        let text = report.render();
        assert!(
            text.contains(
                "  version 1 -> version 2 on disk:\n    step `one`: compensation changed \
                 (0 before, 1 at, 3 past)\n    step `between`: added (1 before, 0 at, 3 past)\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("safe: no live instance is stranded or changed\n"),
            "{text}"
        );
    }

    #[test]
    fn removing_a_live_version_strands_its_instances() {
        let (v1, v2) = (def(V1), def(V2));
        let disk = Catalog::new(vec![v2]);
        let report = diff(&disk, &live(1, &v1.content_hash()), &[recorded(&v1)]);
        assert!(!report.is_safe());
        assert_eq!(
            report.sagas[0].findings,
            [
                Finding::Stranded {
                    version: 1,
                    live: 4
                },
                Finding::Added(2)
            ]
        );
        assert!(
            report
                .render()
                .contains("version 1: removed, 4 live instance(s) stranded (unsafe)")
        );
    }

    #[test]
    fn a_changed_definition_under_the_same_version_is_unsafe_and_compared() {
        let v1 = def(V1);
        let edited = def(&V1.replace("SELECT 2'", "SELECT 20'"));
        let disk = Catalog::new(vec![edited]);
        let report = diff(&disk, &live(1, &v1.content_hash()), &[recorded(&v1)]);
        assert!(!report.is_safe());
        assert_eq!(
            report.sagas[0].findings,
            [Finding::ChangedInPlace {
                version: 1,
                live: 4
            }]
        );
        assert_eq!(
            report.sagas[0].comparisons,
            [Comparison {
                from: 1,
                to: 1,
                changes: vec![change("two", ChangeKind::ActionSql, 1, 2, 1)]
            }]
        );
    }

    #[test]
    fn a_removed_version_without_live_instances_is_safe() {
        let (v1, v2) = (def(V1), def(V2));
        let disk = Catalog::new(vec![v2.clone()]);
        let report = diff(&disk, &[], &[recorded(&v1), recorded(&v2)]);
        assert!(report.is_safe());
        assert_eq!(report.sagas[0].findings, [Finding::Removed(1)]);
    }
}
