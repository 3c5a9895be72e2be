//! Whether the Redis server keeps what it acknowledged across a restart, judged from
//! its settings (`CONFIG GET appendonly appendfsync`). Pure: the caller reads them.

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

/// Judges the values of `appendonly` and `appendfsync` (`None`: not reported).
pub fn judge(appendonly: Option<&str>, appendfsync: Option<&str>) -> Durability {
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
        assert_eq!(judge(Some("yes"), Some("always")), Durability::Kept);
        let everysec = judge(Some("yes"), Some("everysec"));
        assert!(
            matches!(&everysec, Durability::AtRisk(why) if why.contains("appendfsync always")),
            "{everysec:?}"
        );
        let no_aof = judge(Some("no"), Some("always"));
        assert!(
            matches!(&no_aof, Durability::AtRisk(why) if why.contains("appendonly yes")),
            "{no_aof:?}"
        );
        assert!(matches!(judge(None, None), Durability::Unknown(_)));
    }
}
