//! Whether the Redis server keeps what it acknowledged, judged from its settings
//! (`CONFIG GET appendonly appendfsync maxmemory-policy`) and, when skald waits for
//! replicas, how many are connected (`INFO replication`). Pure: the caller reads them.

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

/// The server's persistence settings, as `CONFIG GET` reports them (`None`: not
/// reported).
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings<'a> {
    /// `appendonly`: `yes` when an append-only file is written.
    pub appendonly: Option<&'a str>,
    /// `appendfsync`: `always` when each write is fsynced before its reply.
    pub appendfsync: Option<&'a str>,
    /// `maxmemory-policy`: `noeviction` when no key is ever evicted.
    pub maxmemory_policy: Option<&'a str>,
}

/// Judges `settings`, given that every write skald counts on waits for
/// `wait_replicas` replicas (`SKALD_REDIS_WAIT_REPLICAS`, 0: none) of which
/// `connected` are connected now (`None`: not known). Either an append-only file
/// fsynced always or replicas waited for keep an acknowledged message; evicting
/// keys loses it whatever else is set.
pub fn judge(settings: &Settings<'_>, wait_replicas: u16, connected: Option<u16>) -> Durability {
    if let Some(policy) = settings.maxmemory_policy
        && policy != "noeviction"
    {
        return Durability::AtRisk(format!(
            "maxmemory-policy is {policy}, so Redis may evict skald's queues when memory \
             runs short; set maxmemory-policy noeviction"
        ));
    }
    if wait_replicas > 0 {
        return match connected {
            Some(n) if n < wait_replicas => Durability::AtRisk(format!(
                "SKALD_REDIS_WAIT_REPLICAS is {wait_replicas} but {n} replicas are \
                 connected, so every write fails (is not counted as done) until enough are; \
                 connect more replicas or lower SKALD_REDIS_WAIT_REPLICAS"
            )),
            _ => Durability::Kept,
        };
    }
    match (settings.appendonly, settings.appendfsync) {
        (Some("yes"), Some("always")) => Durability::Kept,
        (Some("yes"), Some(other)) => Durability::AtRisk(format!(
            "appendfsync is {other}, so a message Redis acknowledged may not be on disk yet \
             and is lost if the server crashes; set appendfsync always (or run replicas and \
             set SKALD_REDIS_WAIT_REPLICAS)"
        )),
        (Some("yes"), None) | (None, _) => {
            Durability::Unknown("the server did not report appendonly and appendfsync".into())
        }
        (Some(other), _) => Durability::AtRisk(format!(
            "appendonly is {other}, so messages Redis acknowledged since its last snapshot \
             are lost if it restarts; set appendonly yes and appendfsync always (or run \
             replicas and set SKALD_REDIS_WAIT_REPLICAS)"
        )),
    }
}

/// The `connected_slaves` count in the text of `INFO replication`.
pub fn connected_replicas(info: &str) -> Option<u16> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_aof_fsynced_always_keeps_acknowledged_messages() {
        let judge2 = |aof, fsync| {
            let settings = Settings {
                appendonly: aof,
                appendfsync: fsync,
                maxmemory_policy: Some("noeviction"),
            };
            judge(&settings, 0, None)
        };
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
        let settings = Settings {
            appendonly: Some("yes"),
            appendfsync: Some("always"),
            maxmemory_policy: Some("allkeys-lru"),
        };
        let lru = judge(&settings, 0, None);
        assert!(
            matches!(&lru, Durability::AtRisk(why) if why.contains("maxmemory-policy noeviction")),
            "{lru:?}"
        );
    }

    #[test]
    fn replicas_waited_for_keep_what_an_unsynced_primary_acknowledged() {
        let no_aof = Settings {
            appendonly: Some("no"),
            appendfsync: Some("everysec"),
            maxmemory_policy: Some("noeviction"),
        };
        assert_eq!(judge(&no_aof, 1, Some(1)), Durability::Kept);
        assert_eq!(judge(&no_aof, 2, None), Durability::Kept);
        let short = judge(&no_aof, 2, Some(1));
        assert!(
            matches!(&short, Durability::AtRisk(why) if why.contains("2 but 1 replicas")),
            "{short:?}"
        );
        let evicting = Settings {
            maxmemory_policy: Some("allkeys-lru"),
            ..no_aof
        };
        assert!(matches!(
            judge(&evicting, 1, Some(1)),
            Durability::AtRisk(_)
        ));
    }

    #[test]
    fn the_connected_replicas_are_read_from_info_replication() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=…\r\n";
        assert_eq!(connected_replicas(info), Some(2));
        assert_eq!(connected_replicas("role:master\r\n"), None);
    }
}
