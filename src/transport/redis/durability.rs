//! Whether the Redis server keeps what it acknowledged, judged from its settings
//! (`CONFIG GET appendonly appendfsync maxmemory-policy`). Pure: the caller reads them.

/// What the server's settings promise about an acknowledged write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// An append-only file, fsynced before each reply: an acknowledged message survives
    /// a crash or restart of the server.
    Kept,
    /// Acknowledged messages can be lost on a restart; the text says why and the fix.
    AtRisk(String),
    /// The settings could not be read (`CONFIG` disabled or renamed); the text says why.
    Unknown(String),
}

/// Judges the values of `appendonly`, `appendfsync` and `maxmemory-policy` (`None`:
/// not reported).
pub fn judge(
    appendonly: Option<&str>,
    appendfsync: Option<&str>,
    maxmemory_policy: Option<&str>,
) -> Durability {
    if let Some(policy) = maxmemory_policy
        && policy != "noeviction"
    {
        return Durability::AtRisk(format!(
            "maxmemory-policy is {policy}, so Redis may evict skald's queues when memory \
             runs short; set maxmemory-policy noeviction"
        ));
    }
    match (appendonly, appendfsync) {
        (Some("yes"), Some("always")) => Durability::Kept,
        (Some("yes"), Some(other)) => Durability::AtRisk(format!(
            "appendfsync is {other}, so a message Redis acknowledged may not be on disk yet \
             and is lost if the server crashes; set appendfsync always"
        )),
        (Some("yes"), None) | (None, _) => {
            Durability::Unknown("the server did not report appendonly and appendfsync".into())
        }
        (Some(other), _) => Durability::AtRisk(format!(
            "appendonly is {other}, so messages Redis acknowledged since its last snapshot \
             are lost if it restarts; set appendonly yes and appendfsync always"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_aof_fsynced_always_keeps_acknowledged_messages() {
        let judge2 = |aof, fsync| judge(aof, fsync, Some("noeviction"));
        assert_eq!(judge2(Some("yes"), Some("always")), Durability::Kept);
        let everysec = judge2(Some("yes"), Some("everysec"));
        assert!(
            matches!(&everysec, Durability::AtRisk(why) if why.contains("appendfsync always")),
            "{everysec:?}"
        );
        let no_aof = judge2(Some("no"), Some("always"));
        assert!(
            matches!(&no_aof, Durability::AtRisk(why) if why.contains("appendonly yes")),
            "{no_aof:?}"
        );
        assert!(matches!(judge2(None, None), Durability::Unknown(_)));
    }

    #[test]
    fn a_server_that_may_evict_keys_can_lose_queues() {
        let lru = judge(Some("yes"), Some("always"), Some("allkeys-lru"));
        assert!(
            matches!(&lru, Durability::AtRisk(why) if why.contains("maxmemory-policy noeviction")),
            "{lru:?}"
        );
    }
}
