//! The names of everything the Redis transport keeps, and which partition a key
//! belongs to. Pure: no I/O.
//!
//! Every name starts with the namespace in braces, `{NS}`: a Redis Cluster hash tag,
//! so one deployment's keys share a slot and its Lua scripts may touch several of them.

use crate::transport::Endpoint;

/// The consumer group every skald process of an endpoint reads its partitions in.
pub const GROUP: &str = "skald";

/// The keys of one endpoint's queues.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Keys {
    prefix: String,
    partitions: u16,
}

impl Keys {
    /// The keys of `endpoint` in `namespace`, hashed over `partitions` streams:
    /// `{NS}:skald:…` for skald's intake, `{NS}:svc:<name>:…` for a service's.
    pub fn new(namespace: &str, endpoint: &Endpoint, partitions: u16) -> Keys {
        let prefix = match endpoint {
            Endpoint::Orchestrator => format!("{{{namespace}}}:skald"),
            Endpoint::Service(name) => format!("{{{namespace}}}:svc:{name}"),
        };
        Keys {
            prefix,
            partitions: partitions.max(1),
        }
    }

    /// How many partition streams there are.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// The partition of `key` (the aggregate id): the same for every process with the
    /// same partition count. FNV-1a, 64 bits: stable, unlike std's randomised hasher.
    pub fn partition_of(&self, key: &str) -> u16 {
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        (hash % u64::from(self.partitions)) as u16
    }

    /// The stream of partition `i`.
    pub fn stream(&self, i: u16) -> String {
        format!("{}{i}", self.stream_prefix())
    }

    /// What every partition stream's name starts with (the delay mover appends the
    /// partition number).
    pub fn stream_prefix(&self) -> String {
        format!("{}:p:", self.prefix)
    }

    /// The lease of partition `i`: which consumer reads it now.
    pub fn lease(&self, i: u16) -> String {
        format!("{}:lease:{i}", self.prefix)
    }

    /// The sorted set of delayed messages, scored by when they are due (ms).
    pub fn delayed(&self) -> String {
        format!("{}:delayed", self.prefix)
    }

    /// The dead-letter stream.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.prefix)
    }
}

/// A `SCAN MATCH` pattern for every key of `namespace` (all endpoints), for tools and
/// tests that remove a namespace.
pub fn namespace_pattern(namespace: &str) -> String {
    let mut escaped = String::new();
    for c in namespace.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    format!("{{{escaped}}}:*")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_has_its_own_keys_under_the_namespace() {
        let skald = Keys::new("ns", &Endpoint::Orchestrator, 4);
        let svc = Keys::new("ns", &Endpoint::Service("stock".into()), 4);
        assert_eq!(skald.stream(3), "{ns}:skald:p:3");
        assert_eq!(skald.lease(0), "{ns}:skald:lease:0");
        assert_eq!(skald.delayed(), "{ns}:skald:delayed");
        assert_eq!(skald.dead(), "{ns}:skald:dead");
        assert_eq!(svc.stream(0), "{ns}:svc:stock:p:0");
        assert_eq!(namespace_pattern("a*b"), "{a\\*b}:*");
    }

    #[test]
    fn a_key_always_goes_to_the_same_partition_and_keys_spread() {
        let keys = Keys::new("ns", &Endpoint::Orchestrator, 8);
        // Fixed values: every process, every build, must agree.
        assert_eq!(
            keys.partition_of(""),
            (0xcbf2_9ce4_8422_2325_u64 % 8) as u16
        );
        assert_eq!(keys.partition_of("order-1"), keys.partition_of("order-1"));
        let mut used = [0u32; 8];
        for i in 0..800 {
            used[keys.partition_of(&format!("agg-{i}")) as usize] += 1;
        }
        assert!(used.iter().all(|&n| n > 50), "{used:?}");
        assert_eq!(Keys::new("ns", &Endpoint::Orchestrator, 0).partitions(), 1);
    }
}
